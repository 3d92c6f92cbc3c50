"""No reconcile pass hangs for good unnoticed: API calls time out, and /healthz fails while a
pass runs longer than a pass can."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path

import kopf
import pytest
import urllib3
import yaml

from dreambooth_operator import handlers, kube
from dreambooth_operator.liveness import PassTracker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_pass_counts_as_stuck_only_past_the_limit_and_while_it_runs():
    clock = Clock()
    passes = PassTracker(limit=60, clock=clock)
    with passes.running("team/dog"):
        clock.now += 30
        with passes.running("team/cat"):
            clock.now += 45
            assert passes.stuck() == ["team/dog for 75s"]
            clock.now += 30
            assert passes.stuck() == ["team/dog for 105s", "team/cat for 75s"]
        assert passes.stuck() == ["team/dog for 105s"]
    assert passes.stuck() == []


def test_the_probe_fails_while_a_pass_is_stuck():
    clock = Clock()
    memo = kopf.Memo(passes=PassTracker(limit=60, clock=clock))
    assert handlers.no_stuck_pass(memo=memo) == "ok"
    with memo.passes.running("team/dog"):
        clock.now += 61
        with pytest.raises(kopf.PermanentError, match="reconcile stuck: team/dog for 61s"):
            handlers.no_stuck_pass(memo=memo)
    assert handlers.no_stuck_pass(memo=memo) == "ok"


@pytest.fixture
def black_hole(tmp_path: Path):
    """A kubeconfig whose API server accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    port = listener.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    yield kubeconfig
    stop.set()
    acceptor.join()
    for connection in accepted:
        connection.close()
    listener.close()


CALLS = {
    "create": lambda: kube.create(
        {"kind": "ConfigMap", "metadata": {"name": "c", "namespace": "team"}}
    ),
    "delete": lambda: kube.delete("Job", "team", "dog-train-0"),
    "replace": lambda: kube.replace(
        {
            "kind": "Deployment",
            "metadata": {"name": "d", "namespace": "team"},
            "spec": {
                "selector": {"matchLabels": {"app": "d"}},
                "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
            },
        }
    ),
    "read_job": lambda: kube.read_job("team", "dog"),
    "patch_job_status": lambda: kube.patch_job_status("team", "dog", {"phase": "Training"}),
    "patch_job_annotations": lambda: kube.patch_job_annotations("team", "dog", {"a": "b"}),
    "delete_job": lambda: kube.delete_job("team", "dog"),
}


@pytest.mark.parametrize("call", CALLS)
def test_every_api_call_times_out_on_a_server_that_never_answers(black_hole, monkeypatch, call):
    monkeypatch.setattr(kube, "TIMEOUT", (1.0, 1.0))
    kube.load_config(str(black_hole))
    raised: list[BaseException] = []

    def run() -> None:
        try:
            CALLS[call]()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            raised.append(error)

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(timeout=60)  # only guards a hang: a timed-out call ends in seconds
    assert not caller.is_alive(), f"kube.{call} still waiting after 60 s"
    assert raised and isinstance(raised[0], urllib3.exceptions.HTTPError), raised


async def healthz(memo: kopf.Memo) -> int:
    """The status of GET /healthz from kopf's own liveness endpoint, with our probe registered.
    (kopf's reporter is internal API; `kopf run` serves exactly this.)"""
    from kopf._core.engines.indexing import OperatorIndexers
    from kopf._core.engines.probing import health_reporter

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ready = asyncio.Event()
    reporter = asyncio.create_task(
        health_reporter(
            f"http://127.0.0.1:{port}/healthz",
            memo=memo,
            indices=OperatorIndexers().indices,
            registry=kopf.get_default_registry(),
            settings=kopf.OperatorSettings(),
            ready_flag=ready,
        )
    )
    await ready.wait()

    def get() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as error:
            return error.code

    try:
        return await asyncio.to_thread(get)
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter


def test_kopf_liveness_endpoint_fails_while_a_pass_is_stuck():
    clock = Clock()
    memo = kopf.Memo(passes=PassTracker(limit=60, clock=clock))
    assert asyncio.run(healthz(memo)) == 200
    with memo.passes.running("team/dog"):
        clock.now += 61
        assert asyncio.run(healthz(memo)) == 500
