"""Fixtures of the chart tests: helm without a cluster, and the chart rendered with each values set.

Variants: ``default`` (values.yaml), ``all`` (values-all.yaml: every optional feature on) and
``namespaced`` (rbac.scope=namespaced with two watched namespaces).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.support.fixtures import REPO_ROOT
from tests.support.tools import CLI

CHART = REPO_ROOT / "charts" / "dreambooth-operator"
HERE = Path(__file__).resolve().parent
VALUES_ALL = HERE / "values-all.yaml"
# What manifests/install.yaml is rendered with (hack/render-manifests.sh).
RELEASE = "dreambooth-operator"
NAMESPACE = "dreambooth-system"
WATCHED = ("team-a", "team-b")

VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "all": ("--values", str(VALUES_ALL)),
    "namespaced": (
        "--set",
        "rbac.scope=namespaced",
        "--set",
        f"rbac.namespaces={{{','.join(WATCHED)}}}",
    ),
}

Render = Callable[..., list[dict]]


@pytest.fixture(scope="session")
def helm_local(helm_bin) -> CLI:
    """helm for lint and template: no kubeconfig, no cluster."""
    return CLI(helm_bin)


def parse(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def render(helm_local) -> Render:
    """``render("--set", "x=y", release=..., namespace=...)``: the chart's objects."""

    def _render(*args: str, release: str = RELEASE, namespace: str = NAMESPACE) -> list[dict]:
        out = helm_local("template", release, CHART, "--namespace", namespace, *args).stdout
        return parse(out)

    return _render


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of ``kind`` (and ``name``)."""
    hits = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"{len(hits)} {kind} objects named {name!r}"
    return hits[0]


def kinds(objects: list[dict]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def is_hook(obj: dict) -> bool:
    """A Helm hook (``helm.sh/hook``): created by helm at a lifecycle event, not installed."""
    return "helm.sh/hook" in (obj["metadata"].get("annotations") or {})


def installed(objects: list[dict]) -> list[dict]:
    """The objects `helm install` creates (``helm template`` prints hooks too)."""
    return [o for o in objects if not is_hook(o)]


def hooks(objects: list[dict]) -> list[dict]:
    return [o for o in objects if is_hook(o)]
