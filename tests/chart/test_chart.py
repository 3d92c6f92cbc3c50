"""The Helm chart: lint, rendering, the operator Deployment, values schema, CRD and manifests drift."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from tests.support.fixtures import CRD_FILES, REPO_ROOT, crd_yaml

from .conftest import (
    CHART,
    NAMESPACE,
    RELEASE,
    VARIANTS,
    WATCHED,
    find,
    hooks,
    installed,
    kinds,
    parse,
)

MONITORING_KINDS = ["ConfigMap", "PodMonitor", "PodMonitor", "PrometheusRule", "ServiceMonitor"]
BASE_KINDS = [
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",  # DreamBoothJob
    "CustomResourceDefinition",  # DreamBoothServer
    "Deployment",
    "Service",
    "ServiceAccount",
]
HOOK = f"{RELEASE}-release-finalizers"
# The uninstall hook (templates/release-finalizers-hook.yaml): its Job, ServiceAccount and RBAC.
HOOK_KINDS = ["ClusterRole", "ClusterRoleBinding", "Job", "ServiceAccount"]
NAMESPACED_HOOK_KINDS = sorted(["Job", "ServiceAccount"] + ["Role", "RoleBinding"] * len(WATCHED))


# -- lint and render ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_strict(helm_local, variant):
    r = helm_local("lint", "--strict", CHART, *VARIANTS[variant])
    assert "0 chart(s) failed" in r.stdout, r.stdout
    # --strict turns warnings into failures; the only note left is the optional icon.
    assert "[WARNING]" not in r.stdout and "[ERROR]" not in r.stdout, r.stdout


@pytest.mark.parametrize(
    ("variant", "expected", "expected_hooks"),
    [
        ("default", BASE_KINDS, HOOK_KINDS),
        ("all", sorted(BASE_KINDS + MONITORING_KINDS), HOOK_KINDS),
        (
            "namespaced",
            sorted(BASE_KINDS + ["Role", "RoleBinding"] * len(WATCHED)),
            NAMESPACED_HOOK_KINDS,
        ),
    ],
)
def test_template_renders(render, variant, expected, expected_hooks):
    objects = render(*VARIANTS[variant])
    assert kinds(installed(objects)) == expected
    assert kinds(hooks(objects)) == expected_hooks
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "dreambooth-operator"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "dreambooth-operator-0.1.0"


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == "0.1.0"
    assert chart["appVersion"] == "0.1.0"
    from dreambooth_operator import __version__

    assert chart["appVersion"] == __version__, "the image tag defaults to appVersion"


# -- the operator Deployment --------------------------------------------------------------------
def test_deployment_defaults(render):
    deploy = find(render(), "Deployment", RELEASE)
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == RELEASE
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/dreambooth-operator/operator:0.1.0"
    assert container["args"] == ["operator", "--metrics-port=8000", "--health-port=8080"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 8000,
        "health": 8080,
    }
    probe = container["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    # The metrics Service points at the same port and the same pod labels.
    service = find(render(), "Service", f"{RELEASE}-metrics")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 8000, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["selector"]["matchLabels"] == service["spec"]["selector"]


@pytest.mark.parametrize("workload", ["Deployment", "Job"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pod_security_restricted(render, variant, workload):
    """Pod Security Standards "restricted", and a read-only root filesystem with /tmp writable:
    the operator's pod, and the uninstall hook's (the release namespace may enforce it)."""
    pod = find(render(*VARIANTS[variant]), workload)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["runAsNonRoot"] is True
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {v["name"]: v for v in pod["volumes"]}["tmp"]["emptyDir"]
    # restricted: no host namespaces, no privileged, no hostPath volumes
    assert not {"hostNetwork", "hostPID", "hostIPC"} & pod.keys()
    assert all("hostPath" not in v for v in pod["volumes"])


def test_all_features_reach_the_objects(render):
    objects = render(*VARIANTS["all"])
    pod_template = find(objects, "Deployment")["spec"]["template"]
    pod = pod_template["spec"]
    (container,) = pod["containers"]
    assert container["image"] == (
        "registry.example.com/ml/dreambooth-operator:0.1.0-test@sha256:"
        "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    )
    assert container["imagePullPolicy"] == "Always"
    assert container["args"][-1] == "--verbose"
    assert container["env"] == [{"name": "TZ", "value": "UTC"}]
    assert pod["serviceAccountName"] == "dreambooth-operator-sa"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "high-priority"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"]
    assert pod_template["metadata"]["labels"]["team"] == "ml-platform"
    assert pod_template["metadata"]["annotations"] == {"example.com/scrape": "false"}
    assert find(objects, "ServiceAccount", "dreambooth-operator-sa")["metadata"]["annotations"] == {
        "example.com/role": "dreambooth"
    }
    for obj in objects:
        assert obj["metadata"]["labels"]["cost-center"] == "research"
    binding = find(objects, "ClusterRoleBinding", RELEASE)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "dreambooth-operator-sa", "namespace": NAMESPACE}
    ]
    # The uninstall hook's pod runs the same image, where the operator's pod may run.
    hook = find(objects, "Job", HOOK)["spec"]
    hook_pod = hook["template"]["spec"]
    assert hook_pod["containers"][0]["image"] == container["image"]
    assert hook_pod["containers"][0]["imagePullPolicy"] == "Always"
    for key in ("imagePullSecrets", "priorityClassName", "nodeSelector", "tolerations", "affinity"):
        assert hook_pod[key] == pod[key], key
    assert hook_pod["containers"][0]["resources"] == {
        "requests": {"cpu": "20m", "memory": "96Mi"},
        "limits": {"memory": "192Mi"},
    }
    assert hook_pod["containers"][0]["args"][-1] == "--timeout=60"
    assert hook["activeDeadlineSeconds"] == 120


def test_namespaced_mode_passes_one_flag_per_namespace(render):
    objects = render(*VARIANTS["namespaced"])
    (container,) = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["args"][3:] == [f"--namespace={ns}" for ns in WATCHED]
    roles = [o for o in installed(objects) if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(WATCHED)
    for binding in (o for o in installed(objects) if o["kind"] == "RoleBinding"):
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": RELEASE,
        }
        assert binding["subjects"][0]["namespace"] == NAMESPACE


def test_service_account_can_be_brought(render):
    objects = render("--set", "serviceAccount.create=false", "--set", "serviceAccount.name=mine")
    assert "ServiceAccount" not in kinds(installed(objects))
    assert find(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"
    assert find(objects, "ClusterRoleBinding", RELEASE)["subjects"][0]["name"] == "mine"


def test_rbac_and_crds_can_be_left_out(render):
    """No RBAC of the chart's, so no uninstall hook either (it would need RBAC)."""
    objects = render("--set", "rbac.create=false", "--set", "crds.install=false")
    assert kinds(objects) == ["Deployment", "Service", "ServiceAccount"]


# -- the uninstall hook ---------------------------------------------------------------------------
def test_uninstall_hook_is_a_post_delete_job_with_its_own_service_account(render):
    objects = render()
    for obj in hooks(objects):
        annotations = obj["metadata"]["annotations"]
        # post-delete: after helm deleted the operator (and its RBAC), which would otherwise put
        # its finalizer straight back. Gone when it succeeded; replaced by the next one.
        assert annotations["helm.sh/hook"] == "post-delete"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
        # Its ServiceAccount and RBAC exist before its Job runs.
        assert int(annotations["helm.sh/hook-weight"]) == (0 if obj["kind"] == "Job" else -5)
        assert obj["metadata"]["name"] == HOOK
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "release-finalizers"
    job = find(objects, "Job", HOOK)
    assert job["metadata"]["namespace"] == NAMESPACE
    spec = job["spec"]
    assert spec["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] == 180  # below helm's --timeout (5m)
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == HOOK
    assert pod["automountServiceAccountToken"] is True
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    operator = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == operator["image"]  # the operator image: entrypoint dreambooth
    assert container["args"] == ["release-finalizers", "--all-namespaces", "--timeout=120"]
    assert container["resources"]["limits"]["memory"]
    assert find(objects, "ServiceAccount", HOOK)["metadata"]["namespace"] == NAMESPACE


def test_uninstall_hook_releases_only_the_watched_namespaces(render):
    objects = render(*VARIANTS["namespaced"])
    (container,) = find(objects, "Job", HOOK)["spec"]["template"]["spec"]["containers"]
    assert container["args"] == [
        "release-finalizers",
        *(f"--namespace={ns}" for ns in WATCHED),
        "--timeout=120",
    ]


def test_uninstall_hook_can_be_turned_off(render):
    assert hooks(render("--set", "uninstall.releaseFinalizers=false")) == []


def test_uninstall_hook_name_stays_a_dns_label(render):
    long = "a" * 63
    names = {o["metadata"]["name"] for o in hooks(render("--set", f"fullnameOverride={long}"))}
    assert names == {f"{'a' * 44}-release-finalizers"}
    assert len(names.pop()) == 63


# -- values.schema.json -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "bogus=1"), "additional properties 'bogus' not allowed"),
        (("--set", "monitoring.serviceMonitor.enable=true"), "'enable' not allowed"),
        (("--set", "rbac.scope=namespace"), "/rbac/scope"),
        (("--set", "rbac.scope=namespaced"), "/rbac/namespaces"),
        (("--set", "replicaCount=2"), "/replicaCount"),
        (("--set", "image.pullPolicy=Sometimes"), "/image/pullPolicy"),
        (("--set", "image.digest=latest"), "/image/digest"),
        (("--set", "operator.metricsPort=0"), "/operator/metricsPort"),
        (("--set", "monitoring.prometheusRule.noProgressMinutes=0"), "noProgressMinutes"),
        (("--set", "monitoring.podMonitor.interval=often"), "/monitoring/podMonitor/interval"),
        (("--set", "serviceAccount.create=false"), "serviceAccount.name is required"),
        (("--set", "uninstall.timeoutSeconds=0"), "/uninstall/timeoutSeconds"),
        (("--set", "uninstall.releaseFinalizer=true"), "'releaseFinalizer' not allowed"),
    ],
)
def test_bad_values_are_rejected(helm_local, args, message):
    r = helm_local("template", RELEASE, CHART, *args, check=False)
    assert r.returncode != 0, f"accepted: {args}"
    assert message in r.stderr, r.stderr


# -- the CRD --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_chart_crd_file_is_the_generator_output(kind):
    """files/crd*.yaml == manifests/crd*.yaml == `dreambooth crd KIND` (render-manifests.sh)."""
    from dreambooth_operator.crd import RESOURCES
    from dreambooth_operator.crd import crd_yaml as generated

    chart_copy = (CHART / "files" / CRD_FILES[kind]).read_text()
    assert chart_copy == generated(RESOURCES[kind]), "stale chart CRD: run render-manifests.sh"
    assert chart_copy == crd_yaml(kind), f"manifests/{CRD_FILES[kind]} differs from the chart's"


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_rendered_crd_is_the_generated_crd_plus_labels(render, kind):
    expected = yaml.safe_load((REPO_ROOT / "manifests" / CRD_FILES[kind]).read_text())
    crd = find(render(), "CustomResourceDefinition", expected["metadata"]["name"])
    metadata = crd["metadata"]
    assert metadata.pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert metadata.pop("labels")["app.kubernetes.io/name"] == "dreambooth-operator"
    assert crd == expected


def test_crd_keep_policy_is_optional(render):
    crds = [
        o for o in render("--set", "crds.keep=false") if o["kind"] == "CustomResourceDefinition"
    ]
    assert len(crds) == 2
    assert all("annotations" not in crd["metadata"] for crd in crds)


# -- manifests/ ---------------------------------------------------------------------------------
def test_install_yaml_has_no_drift(helm_bin):
    """manifests/install.yaml is exactly what hack/render-manifests.sh renders now."""
    r = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "render-manifests.sh"), "--stdout"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HELM": str(helm_bin)},
    )
    committed = (REPO_ROOT / "manifests" / "install.yaml").read_text()
    assert committed == r.stdout, "manifests/install.yaml is stale: run hack/render-manifests.sh"


def test_install_yaml_is_the_default_install(render):
    """A Namespace, then the chart with default values except the CRD (manifests/crd.yaml has it)."""
    objects = parse((REPO_ROOT / "manifests" / "install.yaml").read_text())
    namespace, *rest = objects
    assert namespace["kind"] == "Namespace"
    assert namespace["metadata"]["name"] == NAMESPACE
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # Not the uninstall hook: kubectl would run it at once (render-manifests.sh: --no-hooks).
    chart = [o for o in installed(render()) if o["kind"] != "CustomResourceDefinition"]
    assert rest == chart
    for obj in rest:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_notes_render(helm_local):
    """NOTES.txt (only `helm install` renders it; --dry-run=client needs no cluster)."""
    r = helm_local(
        "install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client", *VARIANTS["all"]
    )
    notes = r.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} rollout status deployment/{RELEASE}" in notes
    assert "PrometheusRule dreambooth-operator" in notes
    assert "`helm uninstall` removes the operator's finalizer" in notes
    r = helm_local("install", RELEASE, CHART, "--dry-run=client", *VARIANTS["namespaced"])
    assert f"It watches DreamBoothJobs in: {', '.join(WATCHED)}." in r.stdout
