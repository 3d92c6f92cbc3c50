"""Pytest fixtures for the real test equipment (loaded by tests/conftest.py via pytest_plugins).

Session-scoped: ``control_plane``, ``kube_api``, ``kubeconfig``, ``dreambooth_crd``, ``s3_server``,
``kubectl``, ``helm``. Per test: ``namespace``, ``kube_node``, ``s3_bucket``, ``prometheus``.
Missing binaries skip the test locally and fail it in CI (CI=true); see ``needs.require``.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .needs import require
from .paths import SETUP_HINT, kube_assets_dir, tool

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_NAME = "dreamboothjobs.dreambooth.dev"


# -- control plane ------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """etcd + kube-apiserver + kube-controller-manager on loopback (a ``ControlPlane``)."""
    assets = kube_assets_dir()
    require(assets is not None, f"no etcd/kube-apiserver/kube-controller-manager: {SETUP_HINT}")
    from .controlplane import ControlPlane

    cp = ControlPlane.start(assets, workdir=tmp_path_factory.mktemp("controlplane"))
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kube_api(control_plane):
    """A ready ``kubernetes.client.ApiClient`` with admin rights."""
    return control_plane.api_client


@pytest.fixture(scope="session")
def kubeconfig(control_plane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture
def namespace(control_plane) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount has its token (pods can be created)."""
    import kubernetes

    v1 = kubernetes.client.CoreV1Api(control_plane.api_client)
    name = f"t-{uuid.uuid4().hex[:10]}"
    v1.create_namespace({"metadata": {"name": name, "labels": {"dreambooth.dev/test": "true"}}})
    control_plane.service_account_token(name, "default")
    yield name
    try:
        v1.delete_namespace(name, propagation_policy="Background")
    except kubernetes.client.ApiException as exc:
        if exc.status != 404:
            raise


@pytest.fixture
def kube_node(control_plane):
    """A ``TestNode`` that runs the cluster's pods as local processes during the test."""
    from .node import TestNode

    with TestNode(control_plane.api_client) as node:
        yield node


# -- CRD ----------------------------------------------------------------------------------------
CRD_FILES = {"job": "crd.yaml", "server": "crd-server.yaml"}
SERVER_CRD_NAME = "dreamboothservers.dreambooth.dev"


def crd_yaml(kind: str = "job") -> str:
    """A CRD (job or server): manifests/crd*.yaml, else `python -m dreambooth_operator.cli crd`."""
    path = REPO_ROOT / "manifests" / CRD_FILES[kind]
    if path.is_file():
        return path.read_text()
    r = subprocess.run(
        [sys.executable, "-m", "dreambooth_operator.cli", "crd", kind],
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout


@pytest.fixture(scope="session")
def dreambooth_crd(control_plane, kubectl) -> dict:
    """Applies the DreamBoothJob and DreamBoothServer CRDs with kubectl and waits until both
    are Established; returns the job's."""
    import kubernetes

    for kind in CRD_FILES:
        kubectl("apply", "-f", "-", input=crd_yaml(kind))
    ext = kubernetes.client.ApiextensionsV1Api(control_plane.api_client)
    found = {}
    for name in (SERVER_CRD_NAME, CRD_NAME):
        deadline = time.monotonic() + 30
        while True:
            crd = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])}
            if conds.get("Established") == "True":
                found[name] = control_plane.api_client.sanitize_for_serialization(crd)
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established: {conds}")
            time.sleep(0.1)
    return found[CRD_NAME]


# -- tools --------------------------------------------------------------------------------------
def _tool(name: str) -> Path:
    path = tool(name)
    require(path is not None, f"no {name} in the test tool cache: {SETUP_HINT}")
    return path


@pytest.fixture(scope="session")
def kubectl_bin() -> Path:
    return _tool("kubectl")


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return _tool("helm")


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    return _tool("prometheus")


@pytest.fixture(scope="session")
def promtool_bin() -> Path:
    return _tool("promtool")


@pytest.fixture(scope="session")
def kubectl(kubectl_bin, control_plane):
    """kubectl bound to the test control plane: ``kubectl("get", "pods")``."""
    from .tools import CLI

    return CLI(kubectl_bin, control_plane.kubeconfig)


@pytest.fixture(scope="session")
def helm(helm_bin, control_plane):
    from .tools import CLI

    return CLI(helm_bin, control_plane.kubeconfig)


# -- S3 -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on loopback: ``.endpoint_url``, ``.access_key``, ``.client()``, ``.env()``."""
    require(_has_module("moto.server"), "moto[server] is not installed")
    from .s3 import S3Server

    server = S3Server.start(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the S3 server."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


# -- Prometheus ---------------------------------------------------------------------------------
@pytest.fixture
def prometheus(prometheus_bin, tmp_path):
    """Factory: ``prom = prometheus(targets=["127.0.0.1:PORT"])``; stopped after the test."""
    from .prometheus import Prometheus

    started: list[Prometheus] = []

    def start(targets, **kwargs) -> Prometheus:
        kwargs.setdefault("workdir", tmp_path / f"prometheus-{len(started)}")
        prom = Prometheus(prometheus_bin, targets, **kwargs)
        started.append(prom)
        return prom

    try:
        yield start
    finally:
        for prom in started:
            prom.stop()


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False
