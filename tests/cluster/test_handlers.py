"""handlers.reconcile_once against the real API server: what it acts on when kopf's copy lags."""

from __future__ import annotations

import copy

import kubernetes
import pytest

from dreambooth_operator import handlers, kube, names
from dreambooth_operator.api import GROUP, PLURAL, VERSION

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


def test_a_pass_on_a_stale_copy_acts_on_the_servers_status(
    dreambooth_crd, kube_api, kubeconfig, namespace, monkeypatch
):
    """Right after a gang restart (restarts 0 -> 1, old Jobs gone), kopf may still hand over the
    job with restarts 0: the pass must create attempt 1's Jobs, not attempt 0's again."""
    kube.load_config(str(kubeconfig))
    monkeypatch.setattr(handlers.kopf, "event", lambda *args, **kwargs: None)
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, dreambooth_job(namespace)
    )
    training = {"phase": "Training", "restarts": 0, "conditions": [PRIORS_READY]}
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "dog", {"status": training}
    )
    stale = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "dog")
    custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "dog", {"status": {"restarts": 1}}
    )

    handlers.reconcile_once(copy.deepcopy(stale), (), (), None, False, {})

    created = kubernetes.client.BatchV1Api(kube_api).list_namespaced_job(
        namespace, label_selector=f"{names.LABEL_COMPONENT}={names.TRAIN}"
    )
    attempts = sorted(j.metadata.labels[names.LABEL_ATTEMPT] for j in created.items)
    assert attempts == ["1", "1"]
    status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "dog")["status"]
    assert status["restarts"] == 1
