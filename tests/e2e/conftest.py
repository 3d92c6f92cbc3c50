"""The operator as a real process against the test control plane, and helpers to drive jobs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from dreambooth_contract import api
from tests.e2e.harness import OperatorProcess, job_document
from tests.support.procs import wait_for

CHART = Path(__file__).resolve().parents[2] / "charts" / "dreambooth-operator"
OPERATOR_NAMESPACE = "dreambooth-e2e"
# A release name of its own: the chart tests install "dreambooth-operator" (cluster-scoped RBAC).
OPERATOR_RELEASE = "e2e-dreambooth-operator"


@pytest.fixture(scope="session")
def operator_kubeconfig(control_plane, kubectl, helm_bin, tmp_path_factory) -> Path:
    """A kubeconfig with the chart's operator ServiceAccount token: the e2e operator runs with
    exactly the chart's RBAC, not as admin."""
    import json
    import subprocess

    kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    show = ["--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"]
    rendered = subprocess.run(
        [str(helm_bin), "template", OPERATOR_RELEASE, str(CHART), "-n", OPERATOR_NAMESPACE, *show],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    kubectl("apply", "-n", OPERATOR_NAMESPACE, "-f", "-", input=rendered)
    token = control_plane.service_account_token(OPERATOR_NAMESPACE, OPERATOR_RELEASE)
    cluster = {"server": control_plane.server, "certificate-authority": str(control_plane.ca_file)}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "test", "user": "operator"}}],
        "current-context": "operator",
    }
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def kube_node(control_plane):
    """The test node with the pods' containerPorts on free host ports (``node.host_port``):
    the operator's pods declare fixed ones (rendezvous 29500, trainer metrics 9400, inference
    8000), which all pods here would otherwise bind on the machine's one loopback."""
    from tests.support.node import TestNode

    with TestNode(control_plane.api_client, map_ports=True) as node:
        yield node


@pytest.fixture
def operator_factory(
    control_plane, dreambooth_crd, operator_kubeconfig, tmp_path
) -> Iterator[Callable[..., OperatorProcess]]:
    started: list[OperatorProcess] = []

    def start(*namespaces: str, kubeconfig: Path | None = None) -> OperatorProcess:
        operator = OperatorProcess(
            kubeconfig or operator_kubeconfig, namespaces, tmp_path / "operator"
        )
        started.append(operator.start())
        return operator

    yield start
    for operator in started:
        operator.stop()


class Jobs:
    """DreamBoothJobs (or, by `plural`, DreamBoothServers) of one namespace through the real
    API."""

    def __init__(
        self, api_client: kubernetes.client.ApiClient, namespace: str, plural: str = api.PLURAL
    ):
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.batch = kubernetes.client.BatchV1Api(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.namespace = namespace
        self.plural = plural

    def create(self, document: dict[str, Any]) -> dict:
        return self.custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, self.namespace, self.plural, document
        )

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(
            api.GROUP, api.VERSION, self.namespace, self.plural, name
        )

    def patch(self, name: str, patch: dict) -> dict:
        return self.custom.patch_namespaced_custom_object(
            api.GROUP, api.VERSION, self.namespace, self.plural, name, patch
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            api.GROUP, api.VERSION, self.namespace, self.plural, name
        )

    def status(self, name: str) -> dict:
        return self.get(name).get("status") or {}

    def wait(
        self, name: str, predicate: Callable[[dict], Any], what: str, timeout: float, log=None
    ):
        """Wait until predicate(status) holds; return that status."""

        def probe() -> dict | None:
            status = self.status(name)
            return status if predicate(status) else None

        return wait_for(
            f"{name}: {what}",
            probe,
            timeout=timeout,
            interval=0.5,
            on_timeout=lambda: f"status: {self.status(name)}\n{log() if log else ''}",
        )

    def batch_jobs(self, selector: str = "") -> list:
        return self.batch.list_namespaced_job(self.namespace, label_selector=selector).items

    def pods(self, selector: str = "") -> list:
        return self.core.list_namespaced_pod(self.namespace, label_selector=selector).items


@pytest.fixture
def jobs(kube_api, namespace) -> Jobs:
    return Jobs(kube_api, namespace)


def wait_until(what: str, probe: Callable[[], Any], timeout: float = 60.0, on_timeout=None):
    return wait_for(what, probe, timeout=timeout, interval=0.5, on_timeout=on_timeout)


__all__ = ["Jobs", "job_document", "wait_until", "time"]
