"""Smoke tests of the test control plane: CRD, DreamBoothJob defaults, ServiceAccount RBAC."""

from __future__ import annotations

import copy
import json
import socket

import kubernetes
import pytest
import yaml
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "dreambooth.dev", "v1alpha1", "dreamboothjobs"


def apply_defaults(value, schema: dict):
    """Structural-schema defaulting as the API server does it (defaults, then recurse)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, sub in props.items():
            if key in value:
                value[key] = apply_defaults(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in props:
                    value[key] = apply_defaults(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(v, schema["items"]) for v in value]
    return value


MINIMAL_SPEC = {
    "baseModel": {"uri": "random://tiny-sd"},
    "instance": {"imagesUri": "s3://subjects/sks-dog/", "prompt": "a photo of sks dog"},
    "priorPreservation": {"classPrompt": "a photo of dog"},
    "storage": {"outputUri": "s3://runs/smoke"},
}


def test_control_plane_is_up(control_plane):
    v1 = kubernetes.client.CoreV1Api(control_plane.api_client)
    names = {ns.metadata.name for ns in v1.list_namespace().items}
    assert {"default", "kube-system"} <= names
    host, port = control_plane.server.removeprefix("https://").split(":")
    assert host == "127.0.0.1"
    with socket.create_connection((host, int(port)), timeout=2):
        pass


def test_crd_applied_and_dreamboothjob_defaults(dreambooth_crd, kubectl, namespace, tmp_path):
    version = next(v for v in dreambooth_crd["spec"]["versions"] if v["name"] == VERSION)
    schema = version["schema"]["openAPIV3Schema"]
    spec_schema = schema["properties"]["spec"]
    for field in spec_schema.get("required", []):
        assert field in MINIMAL_SPEC, f"smoke spec lacks the required field {field!r}"

    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DreamBoothJob",
        "metadata": {"name": "smoke", "namespace": namespace},
        "spec": MINIMAL_SPEC,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    kubectl("apply", "-f", path)

    got = kubectl.json("get", "dbj", "smoke", "-n", namespace)
    expected = apply_defaults(copy.deepcopy(MINIMAL_SPEC), spec_schema)
    assert expected != MINIMAL_SPEC, "the CRD declares no defaults for this spec"
    assert got["spec"] == expected, json.dumps(got["spec"], indent=1)
    # defaults reached nested objects the user did not write at all
    defaulted = set(expected) - set(MINIMAL_SPEC)
    assert defaulted, "no top-level spec section was defaulted"

    # the same object through the Python client, listed by the short name with kubectl
    api = kubernetes.client.CustomObjectsApi(kubectl_api(kubectl))
    obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "smoke")
    assert obj["spec"] == got["spec"]
    names = [i["metadata"]["name"] for i in kubectl.json("get", "dbj", "-n", namespace)["items"]]
    assert names == ["smoke"]

    # the API server enforces the schema (--validate=false: no client-side check by kubectl)
    bad = dict(manifest, metadata={"name": "bad", "namespace": namespace}, spec={})
    r = kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(bad), check=False)
    assert r.returncode != 0 and "Required value" in r.stderr, r.stderr


def kubectl_api(kubectl) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(kubectl.kubeconfig))


def test_service_account_token_has_exactly_its_rbac(control_plane, namespace):
    v1 = kubernetes.client.CoreV1Api(control_plane.api_client)
    rbac = kubernetes.client.RbacAuthorizationV1Api(control_plane.api_client)
    v1.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader-pods"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "pod-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    token = control_plane.service_account_token(namespace, "reader")
    with control_plane.client_for_token(token) as client:
        sa_v1 = kubernetes.client.CoreV1Api(client)
        assert sa_v1.list_namespaced_pod(namespace).items == []  # allowed: 200
        with pytest.raises(ApiException) as forbidden:
            sa_v1.list_namespaced_secret(namespace)
        assert forbidden.value.status == 403
        with pytest.raises(ApiException) as other_ns:
            sa_v1.list_namespaced_pod("default")
        assert other_ns.value.status == 403
