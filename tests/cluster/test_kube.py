"""operator/kube.py against the real API server: idempotent creates, exact replaces, refusals."""

from __future__ import annotations

import kubernetes
import pytest

from dreambooth_operator import kube

pytestmark = pytest.mark.cluster


def deployment(namespace: str, limits: dict[str, str]) -> dict:
    labels = {"app": "probe"}
    container = {"name": "c", "image": "busybox", "resources": {"limits": limits}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "probe", "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


@pytest.fixture
def operator_client(kubeconfig):
    kube.load_config(str(kubeconfig))  # kube.py uses the default client configuration


def live_limits(kube_api, namespace: str) -> dict[str, str]:
    live = kubernetes.client.AppsV1Api(kube_api).read_namespaced_deployment("probe", namespace)
    return live.spec.template.spec.containers[0].resources.limits or {}


def test_replace_drops_what_the_new_manifest_leaves_out(operator_client, kube_api, namespace):
    assert kube.create(deployment(namespace, {"cpu": "1", "memory": "1Gi"}))
    assert not kube.create(deployment(namespace, {"cpu": "1"}))  # exists: a no-op
    kube.replace(deployment(namespace, {"memory": "1Gi"}))  # e.g. inference.gpus 1 -> 0
    assert live_limits(kube_api, namespace) == {"memory": "1Gi"}


def test_an_invalid_manifest_is_rejected_with_the_servers_words(operator_client, namespace):
    manifest = deployment(namespace, {"cpu": "1"})
    manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] = {"cpu": "2"}
    with pytest.raises(kube.Rejected, match="refused Deployment probe: .*less than or equal"):
        kube.create(manifest)


def test_delete_is_idempotent_for_every_kind_it_deletes(operator_client, kube_api, namespace):
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "probe", "namespace": namespace},
        "spec": {"ports": [{"port": 80}], "selector": {"app": "probe"}},
    }
    for manifest in (service, deployment(namespace, {"cpu": "1"})):
        assert kube.create(manifest)
        assert kube.delete(manifest["kind"], namespace, "probe")
        kube.delete(manifest["kind"], namespace, "probe")  # again: gone or going, no error


def test_a_name_taken_under_another_controller_is_not_success(operator_client, kube_api, namespace):
    """A re-created job must not adopt its deleted namesake's children (which the garbage
    collector is about to remove): a 409 counts as "already there" only under the same owner."""
    core = kubernetes.client.CoreV1Api(kube_api)
    owners = {}
    for name in ("old-job", "new-job"):  # real objects, so the garbage collector spares the child
        owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": name}})
        owners[name] = {"apiVersion": "v1", "kind": "ConfigMap", "name": name,
                        "uid": owner.metadata.uid, "controller": True}  # fmt: skip

    def child(owner: str) -> dict:
        meta = {"name": "dog-config", "namespace": namespace, "ownerReferences": [owners[owner]]}
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {owner: ""}}

    assert kube.create(child("old-job"))
    assert not kube.create(child("old-job"))  # ours already: idempotent
    with pytest.raises(kube.OwnedByAnother, match=f"controller {owners['old-job']['uid']}"):
        kube.create(child("new-job"))
