"""Loading: /readyz before and after, digest verification, and `dreambooth serve` itself."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from functools import partial

import httpx
import openai
import pytest

from dreambooth_trainer import digest
from dreambooth_trainer.serve import artifact
from dreambooth_trainer.serve.app import create_app
from dreambooth_trainer.storage import S3Store
from tests.support.procs import free_port, wait_for

from .conftest import FAST, settings
from .harness import HTTP_TIMEOUT, SERVE, metric, running, serve_process


def test_readyz_is_503_until_the_model_is_loaded(loaded):
    release = threading.Event()

    def slow_loader() -> artifact.LoadedModel:
        assert release.wait(30)
        return loaded

    with running(create_app(settings(), slow_loader, warm_up=False), ready=False) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200  # alive while loading
        response = httpx.get(f"{url}/readyz")
        assert (response.status_code, response.json()["status"]) == (503, "loading")
        early = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a dog", **FAST})
        assert early.status_code == 503
        assert early.json()["error"]["code"] == "model_not_ready"
        assert metric(url, "dreambooth_inference_model_ready") == 0

        release.set()
        wait_for("ready", lambda: httpx.get(f"{url}/readyz").status_code == 200, 30)
        assert httpx.get(f"{url}/readyz").json()["digest"] == loaded.digest
        assert metric(url, "dreambooth_inference_model_ready") == 1


def test_the_loaded_model_carries_its_verified_digest(exported, loaded):
    assert loaded.digest == digest.verify(exported)
    assert loaded.digest.startswith("sha256:")


def test_a_tampered_artifact_is_refused_at_load(tampered, model_cache):
    with pytest.raises(artifact.ArtifactError, match="refusing to serve.*unet"):
        artifact.load(str(tampered), cache_dir=model_cache, device="cpu")


def test_an_artifact_with_another_digest_than_expected_is_refused(exported, model_cache):
    other = "sha256:" + "0" * 64
    with pytest.raises(artifact.ArtifactError, match=f"expected {other}"):
        artifact.verify(str(exported), exported, expected_digest=other)
    # Bare hex (without the sha256: prefix) names the same digest.
    found = digest.verify(exported)
    bare = found.removeprefix("sha256:")
    assert artifact.verify(str(exported), exported, expected_digest=bare).digest == found


def test_a_directory_without_a_manifest_is_not_an_artifact(exported, tmp_path):
    with pytest.raises(artifact.ArtifactError, match="manifest.json missing"):
        artifact.verify(str(exported / "pipeline"), exported / "pipeline")


def test_a_refused_artifact_keeps_the_server_unready_and_unhealthy(tampered, model_cache):
    failures: list[BaseException] = []
    loader = partial(artifact.load, str(tampered), cache_dir=model_cache, device="cpu")
    app = create_app(settings(), loader, on_load_failure=failures.append, warm_up=False)
    with running(app, ready=False) as url:
        wait_for("the load to fail", lambda: failures, 30)
        response = httpx.get(f"{url}/readyz")
        assert (response.status_code, response.json()["status"]) == (503, "failed")
        assert "refusing to serve" in response.json()["error"]
        assert httpx.get(f"{url}/healthz").status_code == 500


def test_the_cli_exits_1_on_a_tampered_artifact(tampered, model_cache, tmp_path):
    result = subprocess.run(
        [*SERVE, "--model", str(tampered), "--port", str(free_port()), "--host", "127.0.0.1"],
        env={**os.environ, "DREAMBOOTH_CACHE": str(model_cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "refusing to serve" in result.stderr
    assert "the model was not loaded" in result.stderr


def test_the_cli_serves_a_verified_artifact_from_s3(exported, s3_server, s3_bucket, tmp_path):
    env = {**os.environ, **s3_server.env(), "DREAMBOOTH_CACHE": str(tmp_path / "cache")}
    prefix = "jobs/sks-dog/export"
    S3Store(s3_bucket, prefix, client=s3_server.client()).upload_dir(exported)
    uri = f"s3://{s3_bucket}/{prefix}"
    args = ["--model", uri, "--digest", digest.verify(exported), "--served-model-name", "sks-dog"]
    args += ["--max-batch-size", "4", "--default-steps", "2"]
    with serve_process(args, tmp_path / "serve.log", env) as (url, server):
        client = openai.OpenAI(
            base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=HTTP_TIMEOUT
        )
        result = client.images.generate(
            model="sks-dog",
            prompt="a photo of sks dog",
            n=1,
            size="32x32",
            response_format="b64_json",
        )
        assert len(result.data) == 1 and result.data[0].b64_json
        assert httpx.get(f"{url}/readyz").json()["digest"] == digest.verify(exported)
    returncode = server.stop()
    # SIGTERM: uvicorn drains, runs the app's shutdown, then re-raises the signal.
    assert returncode in (0, -signal.SIGTERM), server.log_tail()
    assert "Application shutdown complete" in server.log_path.read_text()
