"""api.py's rules that stand in for the API server's agree with the real one (1.20).

Resource names: the CRD cannot check map keys on 1.20 (no propertyNames, patternProperties is
forbidden), so api.py checks them and the operator refuses the job (InvalidSpec); the rule must
accept what the API server's pod validation accepts. URIs: the CRD's patterns run in the API
server's regex engine (RE2), not Python's.
"""

from __future__ import annotations

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from dreambooth_contract.api import GROUP, PLURAL, VERSION, is_container_resource_name

pytestmark = pytest.mark.cluster

RESOURCE_NAMES = [
    "cpu",
    "memory",
    "ephemeral-storage",
    "hugepages-2Mi",
    "hugepages-1Gi",
    "nvidia.com/gpu",
    "amd.com/gpu",
    "example.com/foo",
    "example.com/Foo",
    "a/b",
    "rdma.example.com/hca_shared-devices.a",
    "kubernetes.io/foo",
    "memroy",
    "gpu",
    "CPU",
    "storage",
    "pods",
    "hugepages",
    "hugepages-",
    "nvidia.com/",
    "/gpu",
    "nvidia.com/gpu/0",
    "Nvidia.com/gpu",
    "nvidia_com/gpu",
    "nvidia.com/-gpu",
    "example.com/foo_",
    "requests.nvidia.com/gpu",
    "nvidia.com/" + "g" * 64,
]
# The API server takes any hugepages-<suffix>; no node offers a page size that is not a size.
STRICTER = {"hugepages-two": False}


def server_accepts(core: kubernetes.client.CoreV1Api, namespace: str, name: str) -> bool:
    resources = {"memory": "1Gi", name: "1"}  # hugepages need cpu or memory beside them
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "names"},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "c",
                    "image": "example.com/none",
                    "resources": {"requests": resources, "limits": resources},
                }
            ],
        },
    }
    try:
        core.create_namespaced_pod(namespace, pod, dry_run="All")
    except ApiException as error:
        assert error.status == 422, error.body
        return False
    return True


def test_resource_names_agree_with_the_api_servers_pod_validation(kube_api, namespace):
    core = kubernetes.client.CoreV1Api(kube_api)
    disagreements = [
        (name, ours, theirs)
        for name in [*RESOURCE_NAMES, *STRICTER]
        if (ours := is_container_resource_name(name))
        != (theirs := STRICTER.get(name, server_accepts(core, namespace, name)))
    ]
    assert not disagreements, disagreements
    assert server_accepts(core, namespace, "hugepages-two")  # what STRICTER is about


def job(namespace: str, images_uri: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DreamBoothJob",
        "metadata": {"name": "uri", "namespace": namespace},
        "spec": {
            "baseModel": {"uri": "random://tiny-sd"},
            "instance": {"imagesUri": images_uri, "prompt": "a photo of sks dog"},
            "priorPreservation": {"classPrompt": "a photo of dog"},
            "storage": {"outputUri": "s3://runs/dog"},
        },
    }


@pytest.mark.parametrize(
    ("uri", "accepted"),
    [
        ("s3://data/dog/", True),
        ("s3://data/dog..v2/.hidden/...", True),
        ("../photos/dog", True),
        ("subjects/dog", True),
        ("s3://data/../dog", False),
        ("s3://data/dog/..", False),
        ("s3://data/./dog", False),
        ("gs://data/dog", False),
    ],
)
def test_the_crd_refuses_s3_uris_with_dot_segments(
    dreambooth_crd, kube_api, namespace, uri: str, accepted: bool
):
    custom = kubernetes.client.CustomObjectsApi(kube_api)
    try:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, job(namespace, uri), dry_run="All"
        )
    except ApiException as error:
        assert error.status == 422 and "spec.instance.imagesUri" in error.body, error.body
        assert not accepted, error.body
        return
    assert accepted, f"the API server accepted {uri}"
