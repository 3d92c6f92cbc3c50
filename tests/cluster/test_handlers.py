"""handlers.reconcile_once against the real API server: what it acts on when kopf's copy lags."""

from __future__ import annotations

import json

import kubernetes
import pytest

from dreambooth_operator import handlers, kube, names
from dreambooth_operator.api import GROUP, PLURAL, VERSION
from dreambooth_operator.reconcile import ChildJob

pytestmark = pytest.mark.cluster

# As a user or an older operator might have written it: no observedGeneration.
PRIORS_READY = {
    "type": "PriorsReady",
    "status": "True",
    "reason": "Generated",
    "message": "8 class images",
    "lastTransitionTime": "2026-11-22T12:00:00+00:00",
}


def dreambooth_job(namespace: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DreamBoothJob",
        "metadata": {"name": "dog", "namespace": namespace},
        "spec": {
            "baseModel": {"uri": "random://tiny-sd"},
            "instance": {"imagesUri": "s3://data/dog", "prompt": "a photo of sks dog"},
            "priorPreservation": {"classPrompt": "a photo of dog", "numClassImages": 8},
            "training": {"mixedPrecision": "bf16"},
            "resources": {"nodes": 2, "gpusPerNode": 0, "processesPerNode": 1},
            "storage": {"outputUri": "s3://runs/dog"},
        },
    }


class TrainingJob:
    """The job "dog" on the API server as the operator left it: priors done, no Job yet."""

    def __init__(self, kube_api, namespace: str):
        self.custom = kubernetes.client.CustomObjectsApi(kube_api)
        self.namespace = namespace
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, dreambooth_job(namespace)
        )
        self.patch_status({"phase": "Training", "restarts": 0, "conditions": [PRIORS_READY]})
        # As the operator's first pass leaves it: the spec it applies recorded.
        applied = json.dumps(self.read()["spec"], sort_keys=True)
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            "dog",
            {"metadata": {"annotations": {names.ANNOTATION_APPLIED_SPEC: applied}}},
        )

    def patch_status(self, status: dict) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, "dog", {"status": status}
        )

    def read(self) -> dict:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, "dog"
        )


@pytest.fixture
def training_job(dreambooth_crd, kube_api, kubeconfig, namespace, monkeypatch) -> TrainingJob:
    kube.load_config(str(kubeconfig))  # the operator's client
    monkeypatch.setattr(handlers.kopf, "event", lambda *args, **kwargs: None)  # kopf not running
    return TrainingJob(kube_api, namespace)


def child_jobs(kube_api, namespace: str) -> tuple[ChildJob, ...]:
    """What the operator's Job index would hold."""
    listed = kubernetes.client.BatchV1Api(kube_api).list_namespaced_job(namespace).items
    return tuple(
        ChildJob(
            name=j.metadata.name,
            component=j.metadata.labels[names.LABEL_COMPONENT],
            rank=int(j.metadata.labels[names.LABEL_RANK]),
            attempt=int(j.metadata.labels[names.LABEL_ATTEMPT]),
        )
        for j in listed
    )


def test_a_pass_on_a_stale_copy_acts_on_the_servers_status(training_job, kube_api, namespace):
    """Right after a gang restart (restarts 0 -> 1, old Jobs gone), kopf may still hand over the
    job with restarts 0: the pass must create attempt 1's Jobs, not attempt 0's again."""
    stale = training_job.read()
    training_job.patch_status({"restarts": 1})

    handlers.reconcile_once(stale, (), (), None, False, {})

    assert sorted(job.attempt for job in child_jobs(kube_api, namespace)) == [1, 1]
    assert training_job.read()["status"]["restarts"] == 1


def test_a_pass_with_nothing_to_do_makes_no_api_call(
    training_job, kube_api, namespace, monkeypatch
):
    """Not even when a condition was written without observedGeneration (the model's None
    must compare equal to the field the API server does not store)."""
    handlers.reconcile_once(training_job.read(), (), (), None, False, {})  # creates rank Jobs
    jobs = child_jobs(kube_api, namespace)
    assert len(jobs) == 2

    calls = []
    for function in ("read_job", "patch_job_status", "patch_job_annotations", "create", "delete"):
        monkeypatch.setattr(kube, function, lambda *args, f=function: calls.append(f))
    handlers.reconcile_once(training_job.read(), jobs, (), None, False, {})
    assert calls == []
