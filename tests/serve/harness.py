"""Run an app under uvicorn in a background thread on a free loopback port; hold its worker."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from dreambooth_trainer.serve.engine import Text2ImageEngine
from tests.support.procs import ManagedProcess, free_port, wait_for

# Generous: two cores shared with other test suites can make a tiny request take seconds.
HTTP_TIMEOUT = 60.0
# Small everywhere: 2 denoising steps at 32 px keep a request in the tens of milliseconds.
FAST = {"num_inference_steps": 2, "size": "32x32"}


@contextlib.contextmanager
def running(app: FastAPI, ready: bool = True, timeout: float = 60.0) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 and yield its base URL; with `ready`, wait for /readyz 200."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("uvicorn to start", lambda: server.started, timeout=timeout, interval=0.05)
        if ready:
            wait_for(
                "/readyz",
                lambda: httpx.get(f"{url}/readyz", timeout=HTTP_TIMEOUT).status_code == 200,
                timeout=timeout,
            )
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def metric(url: str, name: str) -> float:
    """The value of one sample (name with labels, exactly as exposed) on /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=HTTP_TIMEOUT).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


GENERATE = "/v1/images/generations"
BATCHES = "dreambooth_inference_batch_size_count"
BATCHED_IMAGES = "dreambooth_inference_batch_size_sum"
DEPTH = "dreambooth_inference_queue_depth"


def generate(url: str, **body) -> httpx.Response:
    return httpx.post(
        url + GENERATE, json={"prompt": "a photo of sks dog", **FAST, **body}, timeout=HTTP_TIMEOUT
    )


def images(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["b64_json"] for item in response.json()["data"]]


class HeldWorker:
    """Holds the inference worker inside its next call until `release()`, so that requests
    queue up behind it deterministically instead of racing a batch timer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.entered, self.gate = threading.Event(), threading.Event()
        original = Text2ImageEngine.__call__

        def held(engine: Text2ImageEngine, jobs):
            self.entered.set()
            assert self.gate.wait(HTTP_TIMEOUT)
            return original(engine, jobs)

        monkeypatch.setattr(Text2ImageEngine, "__call__", held)

    def occupy(self, pool: ThreadPoolExecutor, url: str) -> Future:
        """A first request (another size, so it batches with nothing) that holds the worker."""
        blocker = pool.submit(generate, url, seed=0, size="64x64")
        assert self.entered.wait(HTTP_TIMEOUT)
        return blocker

    def release(self) -> None:
        self.gate.set()


# `dreambooth serve` in a process of its own, with one torch thread as a CPU Deployment runs it.
SERVE = [sys.executable, "-m", "dreambooth_trainer.serve", "--cpu-threads", "1"]


@contextlib.contextmanager
def serve_process(
    args: list[str], log: Path, env: dict[str, str]
) -> Iterator[tuple[str, ManagedProcess]]:
    """`dreambooth serve ARGS` on a free local port, once ready: its URL and process. Stopped
    afterwards (stop() it again for its exit code)."""
    port = free_port()
    argv = [*SERVE, *args, "--host", "127.0.0.1", "--port", str(port)]
    server = ManagedProcess("dreambooth-serve", argv, log, env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        server.check_alive()
        return httpx.get(f"{url}/readyz").status_code == 200

    try:
        wait_for("dreambooth serve", ready, 120, on_timeout=server.log_tail)
        yield url, server
    finally:
        server.stop()
