"""`helm uninstall` with DreamBoothJobs present leaves nothing stuck (the post-delete hook).

For real: the chart is installed with helm into a fresh namespace, the test node runs its pods
(the operator Deployment's and the hook Job's: the image's entrypoint `dreambooth` is this
virtualenv's), so the real operator (kopf) puts its finalizer on a job, and the real hook runs
`dreambooth release-finalizers` with its own ServiceAccount's token when helm uninstalls.

rbac.scope=namespaced, watching one fresh namespace: neither the operator nor the hook touches
the session's other DreamBoothJobs. crds.install=false: the session's CRD is not the release's.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from dreambooth_contract.api import GROUP, PLURAL, VERSION
from dreambooth_operator.finalizers import FINALIZER
from tests.e2e.harness import job_document as harness_job_document
from tests.support.procs import free_port, wait_for

from .conftest import CHART

pytestmark = pytest.mark.cluster

IMAGE = "test.invalid/dreambooth-operator"
TAG = "uninstall-test"
HOOK = "release-finalizers"
# The README's way to let a job go by hand when no operator runs.
MANUAL_PATCH = '{"metadata":{"finalizers":null}}'


def job_document(name: str) -> dict:
    """A job the operator accepts and leaves alone (suspended: no pods)."""
    return harness_job_document(name, runPolicy={"suspend": True})


class Release:
    """One release of the chart in ``namespace`` watching ``watched``, its pods on a test node."""

    def __init__(self, helm, kubectl, api_client, namespace: str, watched: str, node) -> None:
        self.helm, self.kubectl, self.node = helm, kubectl, node
        self.namespace, self.watched = namespace, watched
        self.name = f"u{uuid.uuid4().hex[:8]}"
        self.fullname = f"{self.name}-dreambooth-operator"
        self.hook = f"{self.fullname}-{HOOK}"
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)

    def install(self, *args: str) -> None:
        self.helm(
            "install",
            self.name,
            CHART,
            "--namespace",
            self.namespace,
            "--set",
            "crds.install=false",
            "--set",
            "rbac.scope=namespaced",
            "--set",
            f"rbac.namespaces={{{self.watched}}}",
            "--set",
            f"image.repository={IMAGE}",
            "--set",
            f"image.tag={TAG}",
            # Every pod shares the test node's loopback.
            "--set",
            f"operator.metricsPort={free_port()}",
            "--set",
            f"operator.healthPort={free_port()}",
            *args,
        )

    def uninstall(self) -> None:
        # helm waits for the hook's Job (--wait=hookOnly, its default) and fails if it fails.
        self.helm(
            "uninstall", self.name, "--namespace", self.namespace, "--timeout", "150s", timeout=200
        )

    # -- the job -----------------------------------------------------------------------------------
    def create(self, name: str) -> None:
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.watched, PLURAL, job_document(name)
        )

    def get(self, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.watched, PLURAL, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def finalizers(self, name: str) -> list[str]:
        return (self.get(name) or {}).get("metadata", {}).get("finalizers") or []

    def release_leftover_jobs(self) -> None:
        jobs = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.watched, PLURAL)
        for job in jobs["items"]:
            if job["metadata"].get("finalizers"):
                patch = {"metadata": {"finalizers": None}}
                name = job["metadata"]["name"]
                self.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, self.watched, PLURAL, name, patch
                )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.watched, PLURAL, name)

    def wait_for_operator_finalizer(self, name: str) -> None:
        wait_for(
            f"the operator's finalizer on {name}",
            lambda: FINALIZER in self.finalizers(name),
            timeout=120,
            interval=0.5,
            on_timeout=lambda: self.pod_logs(self.fullname),
        )

    # -- what the node ran -------------------------------------------------------------------------
    def pods(self, prefix: str) -> list[str]:
        return sorted(
            n for ns, n in list(self.node.by_name) if ns == self.namespace and n.startswith(prefix)
        )

    def pod_logs(self, prefix: str) -> str:
        return "\n".join(
            f"--- pod {name}:\n{self.node.logs(self.namespace, name)}" for name in self.pods(prefix)
        )

    # -- what is left ----------------------------------------------------------------------------
    def leftovers(self) -> list[str]:
        """Every object of the release still there (helm's record included)."""
        selector = f"app.kubernetes.io/instance={self.name}"
        left = []
        for namespace in (self.namespace, self.watched):
            r = self.kubectl(
                "get",
                "deployments,replicasets,jobs,pods,services,serviceaccounts,roles,rolebindings,"
                "configmaps",
                "-n",
                namespace,
                "-l",
                selector,
                "-o",
                "name",
            )
            left += [f"{namespace}/{line}" for line in r.stdout.split()]
        r = self.kubectl("get", "clusterroles,clusterrolebindings", "-l", selector, "-o", "name")
        left += r.stdout.split()
        # helm's release records, and the token Secrets of the release's ServiceAccounts.
        r = self.kubectl("get", "secrets", "-n", self.namespace, "-o", "json")
        for secret in json.loads(r.stdout)["items"]:
            meta = secret["metadata"]
            labels = meta.get("labels") or {}
            record = labels.get("owner") == "helm" and labels.get("name") == self.name
            account = (meta.get("annotations") or {}).get("kubernetes.io/service-account.name")
            if record or (account or "").startswith(self.fullname):
                left.append(f"{self.namespace}/secret/{meta['name']}")
        return left

    def wait_until_nothing_left(self) -> None:
        # The hook's pod goes with its Job through the garbage collector: not at once.
        wait_for(
            "nothing of the release left",
            lambda: not self.leftovers(),
            timeout=60,
            interval=0.5,
            on_timeout=lambda: f"left: {self.leftovers()}",
        )


@pytest.fixture
def watched(control_plane) -> Iterator[str]:
    """The namespace the release watches (its jobs live here)."""
    v1 = kubernetes.client.CoreV1Api(control_plane.api_client)
    name = f"t-{uuid.uuid4().hex[:10]}"
    v1.create_namespace({"metadata": {"name": name, "labels": {"dreambooth.dev/test": "true"}}})
    yield name
    v1.delete_namespace(name, propagation_policy="Background")


@pytest.fixture
def release(helm, kubectl, control_plane, dreambooth_crd, namespace, watched) -> Iterator[Release]:
    """A release to install, with a test node that runs the pods of its namespace."""
    from tests.support.node import TestNode

    entrypoints = {f"{IMAGE}:{TAG}": ["dreambooth"]}  # the Dockerfile's ENTRYPOINT
    with TestNode(
        control_plane.api_client, namespaces=[namespace], entrypoints=entrypoints
    ) as node:
        rel = Release(helm, kubectl, control_plane.api_client, namespace, watched, node)
        try:
            yield rel
        finally:
            helm("uninstall", rel.name, "-n", namespace, "--no-hooks", "--ignore-not-found")
            kubectl(
                "delete",
                "clusterrole,clusterrolebinding",
                "-l",
                f"app.kubernetes.io/instance={rel.name}",
            )
            # A job the test left behind must not outlive its namespace's deletion.
            rel.release_leftover_jobs()


def test_uninstall_releases_the_finalizer_so_jobs_can_be_deleted(release):
    release.install()
    for name in ("deleted", "kept"):
        release.create(name)
    for name in ("deleted", "kept"):
        release.wait_for_operator_finalizer(name)
    before = release.get("kept")

    release.uninstall()
    # No operator runs any more, yet deleting a job completes: it is gone.
    release.delete("deleted")
    wait_for("DreamBoothJob deleted", lambda: release.get("deleted") is None, timeout=30)
    # The hook ran `dreambooth release-finalizers` (with its own ServiceAccount's token).
    logs = release.pod_logs(release.hook)
    for name in ("deleted", "kept"):
        assert f"released {FINALIZER} from DreamBoothJob {release.watched}/{name}" in logs, logs
    # The other job is kept (as the CRD is), untouched but for the finalizer.
    kept = release.get("kept")
    assert kept["spec"] == before["spec"]
    assert FINALIZER not in (kept["metadata"].get("finalizers") or [])
    release.wait_until_nothing_left()

    # An operator installed again puts its finalizer back; the next uninstall releases it again.
    release.install()
    release.wait_for_operator_finalizer("kept")
    release.uninstall()
    release.delete("kept")
    wait_for("DreamBoothJob deleted", lambda: release.get("kept") is None, timeout=30)
    release.wait_until_nothing_left()


def test_without_the_hook_a_delete_hangs_until_the_finalizer_is_patched_away(release, kubectl):
    """uninstall.releaseFinalizers=false: the defect the hook fixes, and the README's cure."""
    release.install("--set", "uninstall.releaseFinalizers=false")
    release.create("sks-toy")
    release.wait_for_operator_finalizer("sks-toy")
    release.uninstall()
    assert not release.pods(release.hook)

    release.delete("sks-toy")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        job = release.get("sks-toy")
        assert job is not None and job["metadata"].get("deletionTimestamp")
        assert FINALIZER in job["metadata"]["finalizers"]
        time.sleep(1)

    kubectl("patch", "dbj", "sks-toy", "-n", release.watched, "--type=merge", "-p", MANUAL_PATCH)
    wait_for("sks-toy deleted", lambda: release.get("sks-toy") is None, timeout=30)
    release.wait_until_nothing_left()
