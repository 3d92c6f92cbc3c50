"""What a public endpoint must withstand: huge bodies, abandoned and overdue requests, failures
that must not leak internals, and callers without the API key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import click
import httpx
import openai
import pytest

from dreambooth_trainer.serve import cli as serve_cli
from dreambooth_trainer.serve.app import create_app
from dreambooth_trainer.serve.batching import Job
from dreambooth_trainer.serve.engine import Text2ImageEngine
from dreambooth_trainer.serve.guard import RequestGuard
from dreambooth_trainer.serve.host import ModelHost
from dreambooth_trainer.serve.schemas import ImageGenerationRequest, resolve
from tests.support.procs import wait_for

from .conftest import MODEL_ID, settings
from .harness import (
    BATCHED_IMAGES,
    BATCHES,
    DEPTH,
    FAST,
    GENERATE,
    HTTP_TIMEOUT,
    HeldWorker,
    generate,
    images,
    metric,
    running,
    serve_process,
)

ABANDONED = "dreambooth_inference_requests_abandoned_total"
REJECTED = "dreambooth_inference_requests_rejected_total"
GENERATED = f'dreambooth_inference_images_generated_total{{model="{MODEL_ID}"}}'
API_KEY = "sk-test-0123456789abcdef"


def abandoned(reason: str, stage: str) -> str:
    return f'{ABANDONED}{{reason="{reason}",stage="{stage}"}}'


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


@contextlib.contextmanager
def app_server(loaded, **options) -> Iterator[tuple[str, ModelHost]]:
    app = create_app(settings(**options), lambda: loaded, warm_up=False)
    with running(app) as url:
        yield url, app.state.host


def occupy_directly(held: HeldWorker, host: ModelHost) -> Future:
    """Hold the worker with a job submitted past HTTP: no deadline or client applies to it."""
    request = ImageGenerationRequest(prompt="the blocker", seed=0, **FAST)
    generation = resolve(request, host.settings, 64)
    assert host.batcher is not None
    future = host.batcher.submit(Job(key=("blocker",), size=1, payload=generation))
    assert held.entered.wait(HTTP_TIMEOUT)
    return future


# -- the request body --------------------------------------------------------------------------


def test_a_huge_body_is_refused_with_413_and_nothing_runs(serve):
    url = serve()
    huge = {"prompt": "a dog", "negative_prompt": "x" * (20 << 20), **FAST}  # 20 MiB, as seen
    response = httpx.post(url + GENERATE, json=huge, timeout=HTTP_TIMEOUT)
    error = assert_openai_error(response, 413, "request_too_large")
    assert error["type"] == "invalid_request_error"
    assert str(1 << 20) in error["message"]

    # Without a Content-Length (chunked), the streamed bytes are counted.
    chunks = (b"x" * 65536 for _ in range(32))  # 2 MiB
    response = httpx.post(
        url + GENERATE,
        content=chunks,
        headers={"content-type": "application/json"},
        timeout=HTTP_TIMEOUT,
    )
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, "request_too_large")
    assert metric(url, f'{REJECTED}{{reason="too_large"}}') == 2
    assert metric(url, BATCHES) == 0
    images(generate(url, seed=1))  # the server is fine


def asgi_exchange(guard: RequestGuard, headers: list[tuple[bytes, bytes]], chunks):
    """Run `guard` on one request whose body comes in `chunks`; return what was read and sent."""
    received: list[int] = []
    sent: list[dict] = []
    body = iter(chunks)

    async def receive() -> dict:
        chunk = next(body, None)
        received.append(0 if chunk is None else len(chunk))
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations"}
    asyncio.run(guard({**scope, "headers": headers}, receive, send))
    return received, sent


def test_the_body_limit_reads_no_more_than_the_limit():
    reached: list[bool] = []

    async def app(scope, receive, send) -> None:
        reached.append(True)

    guard = RequestGuard(app, max_body_bytes=1000)
    endless = (b"x" * 100 for _ in range(10**9))
    # A declared length above the limit: not one body byte is read.
    received, sent = asgi_exchange(guard, [(b"content-length", b"50000000")], endless)
    assert received == []
    assert sent[0]["status"] == 413
    # Chunked: reading stops at the first chunk past the limit.
    received, sent = asgi_exchange(guard, [], endless)
    assert sum(received) == 1100
    assert sent[0]["status"] == 413
    assert reached == []
    # Within the limit, the app gets the body.
    received, sent = asgi_exchange(guard, [], [b"{}"])
    assert reached == [True]


# -- clients that go away, requests past their deadline ---------------------------------------


async def post_then_disconnect(url: str, body: dict) -> None:
    """Send a request, wait until it is queued, then drop the connection."""
    async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT) as client:
        request = asyncio.create_task(client.post(GENERATE, json=body))
        for _ in range(int(HTTP_TIMEOUT / 0.05)):
            if (await client.get("/metrics")).text.count(f"\n{DEPTH} 1.0") == 1:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the request was never queued")
        request.cancel()  # httpx closes the connection of a cancelled request
        with contextlib.suppress(asyncio.CancelledError):
            await request


def test_a_request_whose_client_disconnected_is_never_generated(serve, held):
    url = serve(max_batch_size=8, batch_timeout_ms=0)
    with ThreadPoolExecutor(1) as pool:
        blocker = held.occupy(pool, url)
        body = {"prompt": "a photo of sks dog", "n": 3, "seed": 7, **FAST}
        asyncio.run(post_then_disconnect(url, body))
        # The server sees the disconnect and takes the job out of the queue while the worker
        # is still held: it cannot have run.
        wait_for("the abandoned job to leave the queue", lambda: metric(url, DEPTH) == 0, 30)
        assert metric(url, abandoned("client_disconnected", "queued")) == 1
        held.release()
        images(blocker.result(HTTP_TIMEOUT))
    # One pipeline call with one image (the blocker's): the three abandoned images never ran.
    assert (metric(url, BATCHES), metric(url, BATCHED_IMAGES)) == (1, 1)
    assert metric(url, GENERATED) == 1
    images(generate(url, seed=8))
    assert (metric(url, BATCHES), metric(url, BATCHED_IMAGES)) == (2, 2)


def test_cancelling_the_handler_cancels_its_queued_job(loaded, held):
    """A handler task cancelled by anything (here: its in-process ASGI client) drops its job."""
    app = create_app(settings(batch_timeout_ms=0), lambda: loaded, warm_up=False)
    host: ModelHost = app.state.host
    host.start()
    try:
        assert host.wait_loaded(HTTP_TIMEOUT).value == "ready"
        blocker = occupy_directly(held, host)

        async def cancelled_request() -> None:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                request = asyncio.create_task(client.post(GENERATE, json={"prompt": "a dog"}))
                for _ in range(int(HTTP_TIMEOUT / 0.01)):
                    if host.batcher is not None and host.batcher.depth == 1:
                        break
                    await asyncio.sleep(0.01)
                else:
                    pytest.fail("the request was never queued")
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await request

        asyncio.run(cancelled_request())
        assert host.batcher is not None and host.batcher.depth == 0
        held.release()
        blocker.result(HTTP_TIMEOUT)
        assert host.batcher.stats.batches == 1  # the blocker's only
    finally:
        held.release()
        host.close()


def test_a_request_still_queued_at_its_deadline_gets_504_and_is_dropped(loaded, held):
    with app_server(loaded, request_timeout_s=0.5, batch_timeout_ms=0) as (url, host):
        blocker = occupy_directly(held, host)
        # The worker is held: this request can only wait, and waits past its deadline.
        response = generate(url, n=2, seed=3)
        error = assert_openai_error(response, 504, "timeout")
        assert error["type"] == "server_error"
        assert "0.5 seconds" in error["message"]
        assert metric(url, DEPTH) == 0
        assert metric(url, abandoned("deadline", "queued")) == 1
        assert metric(url, f'{REJECTED}{{reason="timeout"}}') == 1
        held.release()
        blocker.result(HTTP_TIMEOUT)
        assert (metric(url, BATCHES), metric(url, BATCHED_IMAGES)) == (1, 1)


def test_a_request_still_running_at_its_deadline_gets_504(loaded, held):
    with app_server(loaded, request_timeout_s=2.0) as (url, _), ThreadPoolExecutor(1) as pool:
        running_request = pool.submit(generate, url, seed=4)
        assert held.entered.wait(HTTP_TIMEOUT)  # in the pipeline call, held there
        assert_openai_error(running_request.result(HTTP_TIMEOUT), 504, "timeout")
        assert metric(url, abandoned("deadline", "running")) == 1
        held.release()


# -- failures ----------------------------------------------------------------------------------

SECRET = "CUDA error at /opt/secret/kernels.cu:42"


def test_a_failed_generation_is_a_500_that_reveals_nothing(serve, monkeypatch, caplog):
    def broken(engine, jobs):
        raise RuntimeError(SECRET)

    monkeypatch.setattr(Text2ImageEngine, "__call__", broken)
    url = serve()
    with caplog.at_level(logging.ERROR):
        response = generate(url)
    error = assert_openai_error(response, 500, "internal_error")
    assert error["type"] == "server_error"
    request_id = response.headers["x-request-id"]
    assert "internal error" in error["message"] and request_id in error["message"]
    assert "secret" not in response.text.lower() and "RuntimeError" not in response.text
    # The detail is in the log, under the same request id.
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and SECRET in str(logged[0].exc_info[1])


def test_an_unexpected_error_anywhere_is_a_500_that_reveals_nothing(serve, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise KeyError(SECRET)

    monkeypatch.setattr("dreambooth_trainer.serve.app.resolve", broken)
    url = serve()
    with caplog.at_level(logging.ERROR):
        response = generate(url)
    error = assert_openai_error(response, 500, "internal_error")
    assert response.headers["x-request-id"] in error["message"]
    assert "secret" not in response.text.lower()
    assert any(SECRET in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


# -- the API key -------------------------------------------------------------------------------


def test_with_an_api_key_the_api_needs_it_and_probes_do_not(serve, caplog):
    url = serve(api_key=API_KEY)
    with caplog.at_level(logging.DEBUG):
        missing = httpx.post(url + GENERATE, json={"prompt": "a dog", **FAST})
        wrong = httpx.post(
            url + GENERATE,
            json={"prompt": "a dog", **FAST},
            headers={"Authorization": "Bearer sk-wrong-key"},
        )
        models = httpx.get(f"{url}/v1/models")
        for response in (missing, wrong, models):
            error = assert_openai_error(response, 401, "invalid_api_key")
            assert error["type"] == "invalid_request_error"
            assert response.headers["www-authenticate"] == "Bearer"
            assert API_KEY not in response.text and "sk-wrong-key" not in response.text
        # Probes and Prometheus need no key.
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(url + path).status_code == 200, path
        assert metric(url, f'{REJECTED}{{reason="unauthorized"}}') == 3
        assert metric(url, BATCHES) == 0

        client = openai.OpenAI(
            base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=HTTP_TIMEOUT
        )
        result = client.images.generate(prompt="a dog", size="32x32", extra_body={"seed": 1})
        assert result.data[0].b64_json
        assert [model.id for model in client.models.list()] == [MODEL_ID]
        impostor = openai.OpenAI(
            base_url=f"{url}/v1", api_key="sk-wrong-key", max_retries=0, timeout=HTTP_TIMEOUT
        )
        with pytest.raises(openai.AuthenticationError):
            impostor.images.generate(prompt="a dog", size="32x32")
    assert not [r for r in caplog.records if API_KEY in r.getMessage()]


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY + "\n")  # a Secret's file may end with a newline
    assert serve_cli.read_api_key(key_file, {}) == API_KEY
    assert serve_cli.read_api_key(None, {serve_cli.API_KEY_ENV: API_KEY}) == API_KEY
    assert serve_cli.read_api_key(None, {}) is None
    with pytest.raises(click.BadParameter, match="once"):
        serve_cli.read_api_key(key_file, {serve_cli.API_KEY_ENV: API_KEY})
    for bad in ("", "  \n", "two words", "kéy"):
        key_file.write_text(bad)
        with pytest.raises(click.BadParameter, match="printable ASCII") as raised:
            serve_cli.read_api_key(key_file, {})
        assert bad.strip() not in str(raised.value) or not bad.strip()


def test_the_cli_takes_the_new_options_and_never_logs_the_key(tmp_path):
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY)
    args = ["--model", "random://tiny-sd", "--served-model-name", MODEL_ID]
    args += ["--default-steps", "2"]
    args += ["--api-key-file", str(key_file), "--request-timeout", "60"]
    args += ["--max-request-bytes", "2000", "--log-level", "debug"]
    env = {**os.environ, "DREAMBOOTH_CACHE": str(tmp_path / "cache")}
    with serve_process(args, tmp_path / "serve.log", env) as (url, server):
        auth = {"Authorization": f"Bearer {API_KEY}"}
        body = {"prompt": "a dog", "seed": 1, **FAST}
        assert httpx.post(url + GENERATE, json=body).status_code == 401
        ok = httpx.post(url + GENERATE, json=body, headers=auth, timeout=HTTP_TIMEOUT)
        assert len(images(ok)) == 1
        big = {**body, "negative_prompt": "x" * 2000}
        too_large = httpx.post(url + GENERATE, json=big, headers=auth, timeout=HTTP_TIMEOUT)
        assert_openai_error(too_large, 413, "request_too_large")
    log = server.log_path.read_text()
    assert "API key: required on /v1/" in log
    assert API_KEY not in log
