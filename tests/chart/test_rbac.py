"""Least-privilege RBAC: exactly the verbs the operator uses, checked in the rendered rules and
against the real kube-apiserver with the rendered ServiceAccount's own token."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from tests.support.access import allowed, service_account_user
from tests.support.fixtures import REPO_ROOT

from .conftest import CHART, NAMESPACE, RELEASE, VARIANTS, WATCHED, find, hooks, installed, parse

# (apiGroup, resource) -> verbs: what operator/dreambooth_operator uses (kopf, kube.py, events).
NAMESPACED_RULES: dict[tuple[str, str], set[str]] = {
    ("dreambooth.dev", "dreamboothjobs"): {"get", "list", "watch", "patch", "delete"},
    ("dreambooth.dev", "dreamboothjobs/status"): {"get", "patch"},
    ("dreambooth.dev", "dreamboothjobs/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    ("dreambooth.dev", "dreamboothservers"): {"get", "list", "watch", "patch"},
    ("dreambooth.dev", "dreamboothservers/status"): {"get", "patch"},
    ("dreambooth.dev", "dreamboothservers/finalizers"): {"update"},
    ("", "pods"): {"get", "list", "watch", "patch"},
    ("", "configmaps"): {"get", "list", "watch", "create", "update"},
    ("", "serviceaccounts"): {"get", "create"},
    ("", "services"): {"get", "list", "watch", "create", "delete"},
    ("rbac.authorization.k8s.io", "roles"): {"get", "create"},
    ("rbac.authorization.k8s.io", "rolebindings"): {"get", "create"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "update", "delete"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
CLUSTER_RULES: dict[tuple[str, str], set[str]] = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}

# The uninstall hook (`dreambooth release-finalizers`): read jobs, patch their finalizers.
HOOK = f"{RELEASE}-release-finalizers"
HOOK_RULES: dict[tuple[str, str], set[str]] = {
    ("dreambooth.dev", "dreamboothjobs"): {"get", "list", "patch"},
    ("dreambooth.dev", "dreamboothservers"): {"get", "list", "patch"},
}

# Requests the operator never makes: each must be denied.
FORBIDDEN: list[tuple[str, str, str]] = [
    ("", "secrets", "list"),
    ("", "secrets", "get"),
    ("", "pods", "create"),
    ("", "pods", "delete"),
    ("", "pods/exec", "create"),
    ("", "configmaps", "delete"),
    ("dreambooth.dev", "dreamboothservers", "create"),
    ("dreambooth.dev", "dreamboothservers", "delete"),
    ("", "services", "patch"),
    ("dreambooth.dev", "dreamboothjobs", "create"),
    ("dreambooth.dev", "dreamboothjobs", "update"),
    ("dreambooth.dev", "dreamboothjobs/status", "update"),
    ("batch", "jobs", "patch"),
    ("apps", "deployments", "patch"),
    ("rbac.authorization.k8s.io", "roles", "delete"),
    ("rbac.authorization.k8s.io", "rolebindings", "patch"),
    ("rbac.authorization.k8s.io", "clusterroles", "create"),
]


def rule_table(rules: list[dict]) -> dict[tuple[str, str], set[str]]:
    table: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                table.setdefault((group, resource), set()).update(rule["verbs"])
    for (group, resource), verbs in table.items():
        assert "*" not in verbs and "*" not in group and "*" not in resource
    return table


def test_cluster_role_grants_exactly_the_operators_verbs(render):
    role = find(render(), "ClusterRole", RELEASE)
    assert rule_table(role["rules"]) == NAMESPACED_RULES | CLUSTER_RULES
    binding = find(render(), "ClusterRoleBinding", RELEASE)
    assert binding["roleRef"]["name"] == RELEASE
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": RELEASE, "namespace": NAMESPACE}
    ]


def test_namespaced_mode_grants_namespaced_verbs_per_namespace(render):
    objects = installed(render(*VARIANTS["namespaced"]))
    # Cluster-scoped resources cannot be granted by a Role: they stay in a small ClusterRole.
    assert rule_table(find(objects, "ClusterRole")["rules"]) == CLUSTER_RULES
    roles = [o for o in objects if o["kind"] == "Role"]
    assert len(roles) == len(WATCHED)
    for role in roles:
        assert rule_table(role["rules"]) == NAMESPACED_RULES


def test_uninstall_hook_may_only_read_jobs_and_patch_them(render):
    objects = hooks(render())
    assert rule_table(find(objects, "ClusterRole", HOOK)["rules"]) == HOOK_RULES
    binding = find(objects, "ClusterRoleBinding", HOOK)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": HOOK,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": HOOK, "namespace": NAMESPACE}]


def test_namespaced_uninstall_hook_is_confined_to_the_watched_namespaces(render):
    objects = hooks(render(*VARIANTS["namespaced"]))
    assert not [o for o in objects if o["kind"].startswith("Cluster")]
    roles = [o for o in objects if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(WATCHED)
    for role in roles:
        assert rule_table(role["rules"]) == HOOK_RULES
    bindings = [o for o in objects if o["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(WATCHED)
    for binding in bindings:
        assert binding["roleRef"]["name"] == HOOK
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": HOOK, "namespace": NAMESPACE}
        ]


# -- against the real API server ----------------------------------------------------------------
def _wait_gone(kubectl, *args: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while kubectl("get", *args, "--ignore-not-found", "-o", "name", check=False).stdout.strip():
        assert time.monotonic() < deadline, f"still there: {args}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def installed_manifests(control_plane, kubectl, dreambooth_crd):
    """`kubectl apply` of manifests/crd.yaml and manifests/install.yaml, for real; removed after."""
    manifests = REPO_ROOT / "manifests"
    kubectl("apply", "-f", manifests / "crd.yaml", "-f", manifests / "install.yaml")
    try:
        yield
    finally:
        # The CRD stays (other tests of the session use it); the rest goes, and the namespace
        # is waited for, so a later test can install into dreambooth-system again.
        kubectl("delete", "-f", manifests / "install.yaml", "--wait=false", check=False)
        _wait_gone(kubectl, "namespace", NAMESPACE)


@pytest.mark.cluster
def test_manifests_install_is_accepted_as_written(installed_manifests, kubectl):
    """1.20 silently drops fields it does not know: read the Deployment back."""
    deploy = kubectl.json("get", "deployment", RELEASE, "-n", NAMESPACE)
    pod = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.cluster
def test_service_account_token_has_exactly_the_operators_rights(
    installed_manifests, control_plane, namespace
):
    """The operator's own token (minted by the controller-manager) against the real API server."""
    import kubernetes
    from kubernetes.client.rest import ApiException

    token = control_plane.service_account_token(NAMESPACE, RELEASE)
    client = control_plane.client_for_token(token)

    custom = kubernetes.client.CustomObjectsApi(client)
    custom.list_cluster_custom_object("dreambooth.dev", "v1alpha1", "dreamboothjobs")
    core = kubernetes.client.CoreV1Api(client)
    core.list_pod_for_all_namespaces()
    kubernetes.client.ApiextensionsV1Api(client).read_custom_resource_definition(
        "dreamboothjobs.dreambooth.dev"
    )
    # The operator creates a Role granting get/patch on one job's status: RBAC's escalation
    # check lets it only because it holds those verbs itself.
    rbac = kubernetes.client.RbacAuthorizationV1Api(client)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "sks-dog-status-writer"},
            "rules": [
                {
                    "apiGroups": ["dreambooth.dev"],
                    "resources": ["dreamboothjobs/status"],
                    "resourceNames": ["sks-dog"],
                    "verbs": ["get", "patch"],
                }
            ],
        },
    )

    for call in (
        lambda: core.list_secret_for_all_namespaces(),
        lambda: core.list_namespaced_secret(namespace),
        lambda: core.create_namespaced_pod(
            namespace,
            {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "x", "image": "x"}]}},
        ),
        lambda: rbac.create_namespaced_role(
            namespace,
            {
                "metadata": {"name": "escalate"},
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
            },
        ),
    ):
        with pytest.raises(ApiException) as denied:
            call()
        assert denied.value.status == 403, denied.value

    who = service_account_user(NAMESPACE, RELEASE)
    for (group, resource), verbs in NAMESPACED_RULES.items():
        for verb in verbs:
            assert allowed(control_plane.api_client, who, group, resource, verb, namespace), (
                group,
                resource,
                verb,
            )
    for (group, resource), verbs in CLUSTER_RULES.items():
        for verb in verbs:
            assert allowed(control_plane.api_client, who, group, resource, verb, None)
    for group, resource, verb in FORBIDDEN:
        assert not allowed(control_plane.api_client, who, group, resource, verb, namespace), (
            group,
            resource,
            verb,
        )


@pytest.mark.cluster
def test_namespaced_install_is_confined_to_its_namespaces(
    control_plane, kubectl, helm_local, dreambooth_crd, namespace
):
    """rbac.scope=namespaced, installed for real: the token works in the watched namespace only."""
    import kubernetes
    from kubernetes.client.rest import ApiException

    v1 = kubernetes.client.CoreV1Api(control_plane.api_client)
    watched, other = (f"t-{uuid.uuid4().hex[:10]}" for _ in range(2))
    for ns in (watched, other):
        v1.create_namespace({"metadata": {"name": ns, "labels": {"dreambooth.dev/test": "true"}}})
    release = f"t{uuid.uuid4().hex[:8]}"
    rendered = helm_local(
        "template",
        release,
        CHART,
        "--namespace",
        namespace,
        "--set",
        "crds.install=false",
        "--set",
        "rbac.scope=namespaced",
        "--set",
        f"rbac.namespaces={{{watched}}}",
    ).stdout
    fullname = f"{release}-dreambooth-operator"
    try:
        kubectl("apply", "-f", "-", input=rendered)
        token = control_plane.service_account_token(namespace, fullname)
        custom = kubernetes.client.CustomObjectsApi(control_plane.client_for_token(token))
        args = ("dreambooth.dev", "v1alpha1")
        custom.list_namespaced_custom_object(*args, watched, "dreamboothjobs")
        for call in (
            lambda: custom.list_namespaced_custom_object(*args, other, "dreamboothjobs"),
            lambda: custom.list_cluster_custom_object(*args, "dreamboothjobs"),
        ):
            with pytest.raises(ApiException) as denied:
                call()
            assert denied.value.status == 403
        who = service_account_user(namespace, fullname)
        api = control_plane.api_client
        assert allowed(api, who, "batch", "jobs", "create", watched)
        assert not allowed(api, who, "batch", "jobs", "create", other)
        assert not allowed(api, who, "batch", "jobs", "create", namespace)
        assert allowed(api, who, "apiextensions.k8s.io", "customresourcedefinitions", "list", None)
    finally:
        kubectl("delete", "clusterrole,clusterrolebinding", fullname, "--ignore-not-found")
        for ns in (watched, other):
            v1.delete_namespace(ns, propagation_policy="Background")


@pytest.mark.cluster
def test_uninstall_hook_token_may_only_read_and_patch_jobs(
    control_plane, kubectl, helm_local, dreambooth_crd, namespace
):
    """The hook's ServiceAccount and RBAC (not its Job), applied for real, cluster scope."""
    import kubernetes
    from kubernetes.client.rest import ApiException

    release = f"h{uuid.uuid4().hex[:8]}"
    hook = f"{release}-dreambooth-operator-release-finalizers"
    rendered = helm_local(
        "template",
        release,
        CHART,
        "--namespace",
        namespace,
        "--set",
        "crds.install=false",
        "--show-only",
        "templates/release-finalizers-hook.yaml",
    ).stdout
    objects = [o for o in parse(rendered) if o["kind"] != "Job"]
    try:
        kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}),
        )
        token = control_plane.service_account_token(namespace, hook)
        custom = kubernetes.client.CustomObjectsApi(control_plane.client_for_token(token))
        custom.list_cluster_custom_object("dreambooth.dev", "v1alpha1", "dreamboothjobs")
        with pytest.raises(ApiException) as denied:
            custom.delete_namespaced_custom_object(
                "dreambooth.dev", "v1alpha1", namespace, "dreamboothjobs", "any"
            )
        assert denied.value.status == 403
        who = service_account_user(namespace, hook)
        api = control_plane.api_client
        for verb in ("get", "list", "patch"):
            assert allowed(api, who, "dreambooth.dev", "dreamboothjobs", verb, "elsewhere")
        for group, resource, verb in [
            ("dreambooth.dev", "dreamboothjobs", "create"),
            ("dreambooth.dev", "dreamboothjobs", "update"),
            ("dreambooth.dev", "dreamboothjobs", "delete"),
            ("dreambooth.dev", "dreamboothjobs", "watch"),
            ("dreambooth.dev", "dreamboothjobs/status", "patch"),
            ("", "pods", "list"),
            ("", "secrets", "get"),
            ("batch", "jobs", "delete"),
        ]:
            assert not allowed(api, who, group, resource, verb, namespace), (resource, verb)
    finally:
        kubectl("delete", "clusterrole,clusterrolebinding", hook, "--ignore-not-found")
