"""The rendered chart is accepted by the real kube-apiserver (server-side dry run).

The Prometheus Operator's CRDs are not on the test control plane: monitoring-crds.yaml installs
minimal stand-ins (kinds and names real, specs unvalidated), so every rendered kind is dry-run;
promtool checks the PrometheusRule's contents (test_monitoring.py).
"""

from __future__ import annotations

import shutil

import pytest

from .conftest import CHART, HERE, VALUES_ALL, kinds, parse

pytestmark = pytest.mark.cluster

MONITORING_CRDS = HERE / "monitoring-crds.yaml"


@pytest.fixture(scope="module")
def monitoring_crds(kubectl):
    kubectl("apply", "-f", MONITORING_CRDS)
    kubectl("wait", "--for=condition=Established", "--timeout=30s", "-f", MONITORING_CRDS)
    try:
        yield
    finally:
        kubectl("delete", "-f", MONITORING_CRDS, "--ignore-not-found", check=False)


@pytest.mark.parametrize("variant", ["default", "all", "namespaced"])
def test_server_side_dry_run(kubectl, helm_local, monitoring_crds, namespace, tmp_path, variant):
    args = {
        "default": (),
        "all": ("--values", str(VALUES_ALL)),
        # Roles go into the watched namespaces, which must exist for the dry run.
        "namespaced": (
            "--set",
            "rbac.scope=namespaced",
            "--set",
            f"rbac.namespaces={{{namespace}}}",
        ),
    }[variant]
    rendered = helm_local("template", "dryrun", CHART, "--namespace", namespace, *args).stdout
    objects = parse(rendered)
    # A fresh discovery cache: kubectl must see the monitoring kinds just added.
    r = kubectl(
        "apply",
        "--dry-run=server",
        "--cache-dir",
        tmp_path / "kube-cache",
        "-f",
        "-",
        input=rendered,
    )
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) == len(objects), r.stdout
    assert all("(server dry run)" in line for line in lines), r.stdout
    if variant == "all":
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= set(kinds(objects))


def test_helm_upgrade_upgrades_the_crd_and_uninstall_keeps_it(helm, kubectl, namespace, tmp_path):
    """Why the CRD is a template: `helm upgrade` ships a changed schema; `helm uninstall` keeps it.

    A copy of the chart whose CRDs are renamed to another API group, so that they cannot touch
    the session's DreamBoothJob and DreamBoothServer CRDs (nor be refused for them: helm will not
    adopt a CRD that another test applied).
    """
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    group = f"{namespace}.upgrade.test"
    for crd_path in (chart / "files").glob("crd*.yaml"):
        crd_path.write_text(crd_path.read_text().replace("dreambooth.dev", group))
    crd_file = chart / "files" / "crd.yaml"
    crd_name = f"dreamboothjobs.{group}"
    release = f"u{namespace[2:]}"
    base = ("--namespace", namespace, "--wait=false")
    try:
        helm("install", release, chart, *base)
        crd = kubectl.json("get", "crd", crd_name)
        assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == release

        crd_file.write_text(crd_file.read_text().replace("- dbj\n", "- dbj\n    - dbjupgraded\n"))
        helm("upgrade", release, chart, *base)
        assert "dbjupgraded" in kubectl.json("get", "crd", crd_name)["spec"]["names"]["shortNames"]

        # --no-hooks: no node runs pods here, and the uninstall hook's Job would never finish
        # (test_uninstall.py runs it).
        helm("uninstall", release, "--namespace", namespace, "--no-hooks")
        assert kubectl.json("get", "crd", crd_name)["metadata"]["name"] == crd_name
        assert not kubectl(
            "get", "clusterrole", f"{release}-dreambooth-operator", check=False
        ).stdout
    finally:
        helm("uninstall", release, "--namespace", namespace, "--ignore-not-found", check=False)
        for name in (crd_name, f"dreamboothservers.{group}"):
            kubectl("delete", "crd", name, "--ignore-not-found", check=False)
