"""The inference server answers unauthenticated requests: its pods hold no Kubernetes token and
run as an identity that may do nothing, on the real API server and controllers."""

from __future__ import annotations

import kubernetes
import pytest

from dreambooth_contract import names
from dreambooth_contract.api import GROUP, PLURAL, VERSION
from dreambooth_contract.validation import parse_job
from dreambooth_operator import builders, kube
from tests.e2e.harness import job_document
from tests.support.access import allowed, service_account_user
from tests.support.procs import wait_for

pytestmark = pytest.mark.cluster


def test_inference_pods_get_no_token_and_no_permissions(
    dreambooth_crd, kubeconfig, kube_api, namespace
):
    document = job_document("dog", inference={"enabled": True, "gpus": 0})
    document["metadata"]["namespace"] = namespace
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    # The real job, so that the garbage collector sees its children's owner alive.
    job = parse_job(
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, document)
    )
    kube.load_config(str(kubeconfig))
    for manifest in builders.shared_objects(job, "{}"):
        kube.create(manifest)
    kube.create(builders.inference_service_account(job))
    kube.create(builders.inference_deployment(job, "s3://runs/dog/export", "sha256:aaa"))

    core = kubernetes.client.CoreV1Api(kube_api)
    selector = ",".join(f"{k}={v}" for k, v in names.selector("dog", names.INFERENCE).items())
    pod = wait_for(
        "the Deployment's pod",
        lambda: next(
            iter(core.list_namespaced_pod(namespace, label_selector=selector).items), None
        ),
        timeout=60,
    )
    assert pod.spec.service_account_name == names.inference_service_account("dog")
    assert pod.spec.automount_service_account_token is False
    mounted = [m.mount_path for c in pod.spec.containers for m in c.volume_mounts or []]
    assert not any("serviceaccount" in path for path in mounted), mounted

    inference = service_account_user(namespace, names.inference_service_account("dog"))
    trainer = service_account_user(namespace, builders.pod_service_account(job))
    status = (GROUP, "dreamboothjobs/status", "patch", namespace, "dog")
    assert allowed(kube_api, trainer, *status)  # the trainer reports progress...
    assert not allowed(kube_api, inference, *status)  # ...the server may not
    for group, resource in (("", "pods"), ("", "secrets"), (GROUP, "dreamboothjobs")):
        assert not allowed(kube_api, inference, group, resource, "get", namespace), resource
