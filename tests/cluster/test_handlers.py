"""handlers.reconcile_once against the real API server: what it acts on when kopf's copy lags."""

from __future__ import annotations

import json
from dataclasses import replace

import kubernetes
import pytest

from dreambooth_contract import names
from dreambooth_contract.api import GROUP, PLURAL, VERSION
from dreambooth_operator import handlers, kube
from dreambooth_operator.reconcile import COND_PRIORS_READY, ChildJob

pytestmark = pytest.mark.cluster

# As a user or an older operator might have written it: no observedGeneration.
PRIORS_READY = {
    "type": COND_PRIORS_READY,
    "status": "True",
    "reason": "Generated",
    "message": "8 class images",
    "lastTransitionTime": "2026-11-22T12:00:00+00:00",
}


def dreambooth_job(namespace: str, **training) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DreamBoothJob",
        "metadata": {"name": "dog", "namespace": namespace},
        "spec": {
            "baseModel": {"uri": "random://tiny-sd"},
            "instance": {"imagesUri": "s3://data/dog", "prompt": "a photo of sks dog"},
            "priorPreservation": {"classPrompt": "a photo of dog", "numClassImages": 8},
            "training": {"mixedPrecision": "bf16", **training},
            "resources": {"nodes": 2, "gpusPerNode": 0, "processesPerNode": 1},
            "storage": {"outputUri": "s3://runs/dog"},
        },
    }


class TrainingJob:
    """The job "dog" on the API server as the operator left it: priors done, no Job yet."""

    def __init__(self, kube_api, namespace: str, **training):
        self.custom = kubernetes.client.CustomObjectsApi(kube_api)
        self.namespace = namespace
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, dreambooth_job(namespace, **training)
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
def operator_client(dreambooth_crd, kubeconfig, monkeypatch) -> None:
    kube.load_config(str(kubeconfig))  # the client kube.py uses
    monkeypatch.setattr(handlers.kopf, "event", lambda *args, **kwargs: None)  # kopf not running


@pytest.fixture
def training_job(operator_client, kube_api, namespace) -> TrainingJob:
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

    handlers.reconcile_once(stale, handlers.Children((), (), None, False))

    assert sorted(job.attempt for job in child_jobs(kube_api, namespace)) == [1, 1]
    assert training_job.read()["status"]["restarts"] == 1


def test_a_pass_with_nothing_to_do_makes_no_api_call(
    training_job, kube_api, namespace, monkeypatch
):
    """Not even when a condition was written without observedGeneration (the model's None
    must compare equal to the field the API server does not store)."""
    handlers.reconcile_once(
        training_job.read(), handlers.Children((), (), None, False)
    )  # creates rank Jobs
    jobs = child_jobs(kube_api, namespace)
    assert len(jobs) == 2

    calls = []
    for function in (
        "read_job",
        "patch_job_status",
        "patch_job_annotations",
        "create",
        "replace",
        "delete",
        "delete_job",
        "post_event",
    ):
        monkeypatch.setattr(kube, function, lambda *args, f=function: calls.append(f))
    handlers.reconcile_once(training_job.read(), handlers.Children(jobs, (), None, False))
    assert calls == []


def rank_job(namespace: str, rank: int) -> dict:
    """A training Job as an earlier operator version created it."""
    labels = {
        names.LABEL_JOB: "dog",
        names.LABEL_COMPONENT: names.TRAIN,
        names.LABEL_RANK: str(rank),
        names.LABEL_ATTEMPT: "0",
    }
    container = {"name": "trainer", "image": "trainer"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"dog-train-{rank}", "namespace": namespace, "labels": labels},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [container]}}},
    }


def test_a_running_job_that_breaks_a_newer_rule_fails_and_stops(
    operator_client, kube_api, namespace
):
    """8-bit AdamW with FSDP2 trained (in 32 bits) before the API refused it: after an upgrade
    the job fails with the rule's words, and its rank Jobs are deleted."""
    job = TrainingJob(kube_api, namespace, use8bitAdam=True, sharding={"backend": "fsdp"})
    batch = kubernetes.client.BatchV1Api(kube_api)
    for rank in range(2):
        batch.create_namespaced_job(namespace, rank_job(namespace, rank))

    children = handlers.Children(child_jobs(kube_api, namespace), (), None, False)
    handlers.reconcile_once(job.read(), children)

    status = job.read()["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (status["phase"], failed["reason"]) == ("Failed", "InvalidSpec")
    assert failed["message"].startswith("spec.training.use8bitAdam: 8-bit AdamW cannot step")
    left = batch.list_namespaced_job(namespace).items
    assert all(j.metadata.deletion_timestamp for j in left)


class OperatorDied(Exception):
    pass


def test_a_gang_restart_is_counted_before_its_jobs_are_deleted(
    training_job, kube_api, namespace, monkeypatch
):
    """An operator that dies between deleting the gang and patching status lost the restart,
    and with it the backoff limit's count."""
    handlers.reconcile_once(training_job.read(), handlers.Children((), (), None, False))
    jobs = child_jobs(kube_api, namespace)
    failed = (replace(jobs[0], failed=True), *jobs[1:])

    def die(*args, **kwargs):
        raise OperatorDied

    monkeypatch.setattr(kube, "delete", die)
    with pytest.raises(OperatorDied):
        handlers.reconcile_once(training_job.read(), handlers.Children(failed, (), None, False))
    assert training_job.read()["status"]["restarts"] == 1
