"""`dreambooth release-finalizers`: what it patches, and when it stops (a fake API; the real one
runs it in tests/chart/test_uninstall.py)."""

from __future__ import annotations

import copy
import logging

import kopf
import pytest
from click.testing import CliRunner
from kubernetes.client.exceptions import ApiException

from dreambooth_contract.api import GROUP, PLURAL, VERSION
from dreambooth_contract.server_api import SERVER_PLURAL
from dreambooth_operator import finalizers, handlers, kube
from dreambooth_operator.cli import main
from dreambooth_operator.finalizers import (
    FINALIZER,
    FinalizerKeptComingBack,
    release_one,
    release_pass,
    release_until_settled,
)

OTHER = "example.com/keep-me"


def job(namespace: str, name: str, *finalizer_names: str, rv: str = "1") -> dict:
    meta = {"namespace": namespace, "name": name, "resourceVersion": rv}
    if finalizer_names:
        meta["finalizers"] = list(finalizer_names)
    return {"metadata": meta, "spec": {"x": 1}}


def _by_key(items) -> dict:
    return {(i["metadata"]["namespace"], i["metadata"]["name"]): i for i in items}


class FakeCustom:
    """CustomObjectsApi over a dict of jobs; resourceVersions checked like the API server's."""

    def __init__(self, *jobs: dict, page_size: int | None = None, servers: tuple = ()) -> None:
        self.jobs = _by_key(jobs)
        self.servers = _by_key(servers)  # DreamBoothServers: the same finalizer
        self.objects = {PLURAL: self.jobs, SERVER_PLURAL: self.servers}
        self.page_size = page_size
        self.calls: list[tuple[str, dict]] = []
        self.on_patch = None  # called after each patch (an operator putting the finalizer back)
        self.conflicts = 0  # the next N patches fail with 409 after a concurrent change

    def _call(self, name: str, group, version, plural, kwargs) -> None:
        assert (group, version) == (GROUP, VERSION) and plural in (PLURAL, SERVER_PLURAL)
        self.calls.append((name, kwargs))

    def _page(self, items: list[dict], kwargs: dict) -> dict:
        start = int(kwargs.get("_continue") or 0)
        size = self.page_size or len(items) or 1
        page = {"items": copy.deepcopy(items[start : start + size]), "metadata": {}}
        if start + size < len(items):
            page["metadata"]["continue"] = str(start + size)
        return page

    def list_cluster_custom_object(self, group, version, plural, **kwargs):
        self._call("list", group, version, plural, kwargs)
        return self._page(list(self.objects[plural].values()), kwargs)

    def list_namespaced_custom_object(self, group, version, namespace, plural, **kwargs):
        self._call("list", group, version, plural, kwargs)
        found = [j for (ns, _), j in self.objects[plural].items() if ns == namespace]
        return self._page(found, kwargs)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._call("get", group, version, plural, kwargs)
        if (namespace, name) not in self.objects[plural]:
            raise ApiException(status=404)
        return copy.deepcopy(self.objects[plural][namespace, name])

    def patch_namespaced_custom_object(
        self, group, version, namespace, plural, name, body, **kwargs
    ):
        self._call("patch", group, version, plural, kwargs)
        if (namespace, name) not in self.objects[plural]:
            raise ApiException(status=404)
        current = self.objects[plural][namespace, name]["metadata"]
        if self.conflicts:
            self.conflicts -= 1
            current["resourceVersion"] = str(int(current["resourceVersion"]) + 1)
            current.setdefault("finalizers", []).append("example.com/late")
        if body["metadata"]["resourceVersion"] != current["resourceVersion"]:
            raise ApiException(status=409)
        assert set(body) == {"metadata"} and set(body["metadata"]) == {
            "finalizers",
            "resourceVersion",
        }, body
        if body["metadata"]["finalizers"] is None:
            current.pop("finalizers", None)
        else:
            current["finalizers"] = body["metadata"]["finalizers"]
        current["resourceVersion"] = str(int(current["resourceVersion"]) + 1)
        if self.on_patch:
            self.on_patch(self)
        return copy.deepcopy(self.objects[plural][namespace, name])

    def finalizers(self, namespace: str, name: str) -> list[str] | None:
        return self.jobs[namespace, name]["metadata"].get("finalizers")


def test_the_finalizer_released_is_the_one_kopf_is_configured_with(monkeypatch):
    monkeypatch.setattr(kube, "load_config", lambda *a, **k: None)
    settings = kopf.OperatorSettings()
    # As kopf calls a startup handler (the keyword arguments it gives them all).
    handlers.configure(settings=settings, memo=kopf.Memo(), logger=logging.getLogger(), retry=0)
    assert settings.persistence.finalizer == FINALIZER == "dreambooth.dev/finalizer"


def test_servers_lose_the_finalizer_too():
    api = FakeCustom(job("a", "j", FINALIZER), servers=(job("a", "shared", OTHER, FINALIZER),))
    assert release_pass(api, None) == ["a/j", "dreamboothservers/a/shared"]
    assert api.servers["a", "shared"]["metadata"]["finalizers"] == [OTHER]


def test_only_the_operators_finalizer_goes_and_every_call_has_a_timeout():
    api = FakeCustom(
        job("a", "only-ours", FINALIZER),
        job("a", "shared", OTHER, FINALIZER),
        job("b", "not-ours", OTHER),
        job("b", "none"),
    )
    assert release_pass(api, None) == ["a/only-ours", "a/shared"]
    assert api.finalizers("a", "only-ours") is None
    assert api.finalizers("a", "shared") == [OTHER]
    assert api.finalizers("b", "not-ours") == [OTHER]
    assert api.jobs["b", "none"]["metadata"]["resourceVersion"] == "1"  # not patched
    assert api.jobs["a", "shared"]["spec"] == {"x": 1}
    # the jobs, then the (no) servers
    assert [name for name, _ in api.calls] == ["list", "patch", "patch", "list"]
    assert all(kwargs["_request_timeout"] == kube.TIMEOUT for _, kwargs in api.calls)


def test_namespaces_are_listed_one_by_one_and_pages_are_followed():
    api = FakeCustom(
        *(job("a", f"j{i}", FINALIZER) for i in range(5)),
        job("other", "untouched", FINALIZER),
        page_size=2,
    )
    assert release_pass(api, ["a", "empty"]) == [f"a/j{i}" for i in range(5)]
    assert api.finalizers("other", "untouched") == [FINALIZER]
    lists = [kwargs for name, kwargs in api.calls if name == "list"]
    # the jobs of each namespace, page by page; then each namespace's (no) servers
    assert [k.get("_continue") for k in lists] == [None, "2", "4", None, None, None]
    assert all(k["limit"] == finalizers.PAGE_SIZE for k in lists)


def test_a_conflict_reads_the_job_again_and_keeps_what_changed():
    api = FakeCustom(job("a", "busy", FINALIZER))
    api.conflicts = 1  # someone added a finalizer between our read and our patch
    assert release_one(api, copy.deepcopy(api.jobs["a", "busy"])) is True
    assert api.finalizers("a", "busy") == ["example.com/late"]
    assert [name for name, _ in api.calls] == ["patch", "get", "patch"]


def test_a_job_deleted_meanwhile_is_not_an_error():
    api = FakeCustom()
    assert release_one(api, job("a", "gone", FINALIZER)) is False


def test_no_crd_means_no_jobs():
    class NoCrd(FakeCustom):
        def list_cluster_custom_object(self, *args, **kwargs):
            raise ApiException(status=404)

    assert release_pass(NoCrd(), None) == []


def test_forbidden_is_an_error():
    class Forbidden(FakeCustom):
        def list_namespaced_custom_object(self, *args, **kwargs):
            raise ApiException(status=403)

    with pytest.raises(ApiException):
        release_pass(Forbidden(), ["a"])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_it_looks_again_after_releasing_and_stops_when_none_came_back():
    api = FakeCustom(job("a", "j", FINALIZER), job("a", "k"))
    clock = Clock()
    reported: list[str] = []
    released = release_until_settled(
        api, ["a"], report=reported.append, clock=clock, sleep=clock.sleep
    )
    assert released == reported == ["a/j"]
    assert clock.sleeps == [finalizers.SETTLE_SECONDS]  # one look again, which found none


def test_nothing_to_release_returns_at_once():
    clock = Clock()
    assert release_until_settled(FakeCustom(), None, clock=clock, sleep=clock.sleep) == []
    assert clock.sleeps == []


def test_a_finalizer_put_back_once_is_released_again():
    """An operator still shutting down puts it back once, then is gone."""
    api = FakeCustom(job("a", "j", FINALIZER))
    restores = [1]

    def operator(fake: FakeCustom) -> None:
        if restores:
            restores.pop()
            fake.jobs["a", "j"]["metadata"]["finalizers"] = [FINALIZER]

    api.on_patch = operator
    clock = Clock()
    reported: list[str] = []
    released = release_until_settled(
        api, ["a"], report=reported.append, clock=clock, sleep=clock.sleep
    )
    assert released == ["a/j"] and reported == ["a/j", "a/j"]
    assert api.finalizers("a", "j") is None
    assert len(clock.sleeps) == 2


def test_a_finalizer_that_keeps_coming_back_fails_after_the_timeout():
    """A live operator (a pre-delete hook would meet one) puts it back every time."""
    api = FakeCustom(job("a", "j", FINALIZER))

    def operator(fake: FakeCustom) -> None:
        fake.jobs["a", "j"]["metadata"]["finalizers"] = [FINALIZER]

    api.on_patch = operator
    clock = Clock()
    with pytest.raises(FinalizerKeptComingBack, match="an operator still runs"):
        release_until_settled(api, ["a"], timeout=10, clock=clock, sleep=clock.sleep)
    assert 8 <= clock.now <= 10


def test_dry_run_patches_nothing():
    api = FakeCustom(job("a", "j", FINALIZER))
    clock = Clock()
    assert release_until_settled(api, None, dry_run=True, clock=clock, sleep=clock.sleep) == ["a/j"]
    assert api.finalizers("a", "j") == [FINALIZER]
    assert [name for name, _ in api.calls] == ["list", "list"]  # jobs, servers


def test_cli_needs_an_explicit_scope():
    for args in ([], ["-A", "-n", "a"]):
        result = CliRunner().invoke(main, ["release-finalizers", *args])
        assert result.exit_code == 2
        assert "give --namespace (one or more) or --all-namespaces" in result.output


def test_cli_reports_each_job_and_fails_when_the_finalizer_keeps_coming_back(monkeypatch):
    api = FakeCustom(job("a", "j", FINALIZER), job("b", "k", FINALIZER))
    monkeypatch.setattr(kube, "load_config", lambda *a, **k: None)
    monkeypatch.setattr("kubernetes.client.CustomObjectsApi", lambda: api)
    monkeypatch.setattr(finalizers, "SETTLE_SECONDS", 0.0)
    result = CliRunner().invoke(main, ["release-finalizers", "-n", "a"])
    assert result.exit_code == 0, result.output
    assert result.output == (
        f"released {FINALIZER} from DreamBoothJob a/j\nreleased 1 DreamBoothJob(s) in a\n"
    )
    assert api.finalizers("b", "k") == [FINALIZER]

    def operator(fake: FakeCustom) -> None:
        fake.jobs["b", "k"]["metadata"]["finalizers"] = [FINALIZER]

    api.on_patch = operator
    result = CliRunner().invoke(main, ["release-finalizers", "-A", "--timeout", "1"])
    assert result.exit_code == 1
    assert "Error: dreambooth.dev/finalizer was put back on b/k" in result.output
