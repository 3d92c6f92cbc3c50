"""Run an app under uvicorn in a background thread on a free loopback port."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import httpx
import uvicorn
from fastapi import FastAPI

from tests.support.procs import free_port, wait_for

# Generous: two cores shared with other test suites can make a tiny request take seconds.
HTTP_TIMEOUT = 60.0


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
