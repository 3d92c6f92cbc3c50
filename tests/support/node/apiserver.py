"""What the node says to the API server, with the test's credentials: its Node object and lease,
pod bindings (there is no scheduler), reads of what pods refer to, pod status and removal."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os

import kubernetes
from kubernetes.client.rest import ApiException

from .network import POD_IP, service_host_names
from .status import timestamp

LEASE_NAMESPACE = "kube-node-lease"
DEFAULT_TOKEN_SECONDS = 3600  # a projected token's lifetime when its source sets none


class NodeApi:
    """The API calls of one node, named `node_name`, that tolerate the races a kubelet meets."""

    def __init__(self, api_client: kubernetes.client.ApiClient, node_name: str) -> None:
        self.client = kubernetes.client.ApiClient(api_client.configuration)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.coordination = kubernetes.client.CoordinationV1Api(self.client)
        self.node_name = node_name
        address = api_client.configuration.host.split("://", 1)[-1].rstrip("/")
        self.host, _, port = address.rpartition(":")
        self.port = int(port or 443)

    def close(self) -> None:
        self.client.close()

    # -- the Node object -------------------------------------------------------------------------
    def register(self, capacity: dict[str, str]) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "dreambooth.dev/test-node": "true",
                },
            },
        }
        try:
            self.core.create_node(node)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self.heartbeat(capacity)

    def heartbeat(self, capacity: dict[str, str]) -> None:
        """Report the node Ready and renew its lease, as a kubelet does every few seconds."""
        self.core.patch_node_status(self.node_name, {"status": self._node_status(capacity)})
        lease = {
            "metadata": {"name": self.node_name, "namespace": LEASE_NAMESPACE},
            "spec": {
                "holderIdentity": self.node_name,
                "leaseDurationSeconds": 40,
                "renewTime": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        try:
            self.coordination.patch_namespaced_lease(self.node_name, LEASE_NAMESPACE, lease)
        except ApiException as exc:
            if exc.status != 404:
                raise
            with contextlib.suppress(ApiException):
                self.coordination.create_namespaced_lease(LEASE_NAMESPACE, lease)

    def _node_status(self, capacity: dict[str, str]) -> dict:
        now = timestamp()
        return {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": POD_IP},
                {"type": "Hostname", "address": self.node_name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "test node is ready",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": "",
                "containerRuntimeVersion": "testnode://1",
                "kernelVersion": os.uname().release,
                "kubeProxyVersion": "",
                "kubeletVersion": "v1.20.2-testnode",
                "machineID": "",
                "operatingSystem": "linux",
                "osImage": "test node",
                "systemUUID": "",
            },
        }

    # -- pods ------------------------------------------------------------------------------------
    def list_pods(self) -> list[dict]:
        """Every pod of the cluster, as plain dicts (the specs are used as written)."""
        response = self.core.list_pod_for_all_namespaces(_preload_content=False)
        return json.loads(response.data)["items"]

    def bind(self, namespace: str, name: str, uid: str) -> None:
        body = kubernetes.client.V1Binding(
            metadata=kubernetes.client.V1ObjectMeta(name=name, namespace=namespace, uid=uid),
            target=kubernetes.client.V1ObjectReference(kind="Node", name=self.node_name),
        )
        try:
            self.core.create_namespaced_pod_binding(name, namespace, body, _preload_content=False)
        except ApiException as exc:
            # 403: the namespace is being deleted (an earlier test's), which forbids creating
            # anything in it, a binding included; its pods are going anyway.
            if exc.status not in (403, 404, 409):
                raise

    def patch_pod_status(self, namespace: str, name: str, uid: str, status: dict) -> None:
        """Patch the status of this incarnation (`uid`) of the pod; a newer or removed pod is
        left alone."""
        body = {"metadata": {"uid": uid}, "status": status}
        try:
            self.core.patch_namespaced_pod_status(name, namespace, body)
        except ApiException as exc:
            if exc.status not in (404, 409, 422):
                raise

    def delete_pod(self, namespace: str, name: str, uid: str) -> None:
        """Remove the pod object at once (grace 0): its containers have ended."""
        try:
            self.core.delete_namespaced_pod(
                name,
                namespace,
                body=kubernetes.client.V1DeleteOptions(
                    grace_period_seconds=0,
                    preconditions=kubernetes.client.V1Preconditions(uid=uid),
                ),
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    # -- what pods refer to ----------------------------------------------------------------------
    def read(self, kind: str, namespace: str, name: str) -> dict | None:
        """The object (`kind` as in ``read_namespaced_<kind>``) as a dict; None if absent."""
        try:
            response = getattr(self.core, f"read_namespaced_{kind}")(
                name, namespace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(response.data)

    def service_account_token(self, pod: dict, source: dict) -> str:
        """A token of the pod's service account bound to the pod (a projected token source)."""
        service_account = pod["spec"].get("serviceAccountName") or "default"
        body = {
            "spec": {
                "audiences": [source["audience"]] if source.get("audience") else None,
                "expirationSeconds": source.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS,
                "boundObjectRef": {
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"],
                },
            }
        }
        response = self.core.create_namespaced_service_account_token(
            service_account, pod["metadata"]["namespace"], body
        )
        return response.status.token

    def cluster_host_names(self, namespace: str) -> set[str]:
        """The DNS names a pod of `namespace` may use for Services, for pods with a hostname and
        subdomain, and for the API server's own Service (all of them answer on loopback)."""
        names: set[str] = set()
        try:
            services = self.core.list_namespaced_service(namespace).items
        except ApiException:
            services = []
        for service in services:
            names.add(service.metadata.name)
            names |= service_host_names(service.metadata.name, namespace)
        for pod in self.core.list_namespaced_pod(namespace).items:
            if pod.spec.hostname and pod.spec.subdomain:
                base = f"{pod.spec.hostname}.{pod.spec.subdomain}"
                names.add(base)
                names |= service_host_names(base, namespace)
        names.add("kubernetes")
        names |= service_host_names("kubernetes", "default")
        names.discard(self.host)
        return names
