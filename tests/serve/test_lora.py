"""Serving a LoRA export on its base model: `dreambooth serve --model BASE --adapter URI`.

The adapter is verified like a pipeline artifact (manifest, expected digest) and refused on any
base but the one it records, all before anything is loaded; once served, its images are those
of a plain diffusers pipeline with the adapter loaded.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from dreambooth_trainer import digest
from dreambooth_trainer.methods.lora_files import LORA_WEIGHTS
from dreambooth_trainer.models import random_models
from dreambooth_trainer.serve import artifact
from dreambooth_trainer.serve.app import create_app
from tests.support.lora import export_for
from tests.support.procs import free_port

from .conftest import settings
from .harness import GENERATE, HTTP_TIMEOUT, SERVE, running

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def lora_export(base_dir, tmp_path_factory) -> Path:
    return export_for(base_dir, tmp_path_factory.mktemp("lora"))


def load(base: Path, adapter: Path, cache: Path, **options) -> artifact.LoadedModel:
    return artifact.load_with_adapter(
        str(base), str(adapter), cache_dir=cache, device="cpu", **options
    )


def test_the_server_gives_the_image_of_a_plain_pipeline_with_the_adapter(
    base_dir, lora_export, model_cache
):
    loader = partial(load, base_dir, lora_export, model_cache)
    with running(create_app(settings(), loader, warm_up=False)) as url:
        body = {"prompt": PROMPT, "size": "32x32", "num_inference_steps": 2, "seed": 7}
        response = httpx.post(url + GENERATE, json=body, timeout=HTTP_TIMEOUT)
        assert response.status_code == 200, response.text
        served = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        assert httpx.get(f"{url}/readyz").json()["digest"] == digest.verify(lora_export)

    plain = StableDiffusionPipeline.from_pretrained(base_dir)
    plain.set_progress_bar_config(disable=True)
    options = {"height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 7.5}
    base_image = plain(PROMPT, generator=torch_generator(7), **options).images[0]
    plain.load_lora_weights(lora_export)
    expected = plain(PROMPT, generator=torch_generator(7), **options).images[0]
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(expected))
    assert not np.array_equal(np.asarray(expected), np.asarray(base_image))


def torch_generator(seed: int):
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def test_an_adapter_with_another_digest_than_expected_is_refused(
    base_dir, lora_export, model_cache
):
    other = "sha256:" + "0" * 64
    with pytest.raises(artifact.ArtifactError, match=f"expected {other}"):
        load(base_dir, lora_export, model_cache, expected_digest=other)
    found = load(base_dir, lora_export, model_cache, expected_digest=digest.verify(lora_export))
    assert found.digest == digest.verify(lora_export)


def test_a_tampered_adapter_is_refused(base_dir, lora_export, model_cache, tmp_path):
    copy = Path(shutil.copytree(lora_export, tmp_path / "export"))
    data = bytearray((copy / LORA_WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (copy / LORA_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match=f"refusing to serve.*{LORA_WEIGHTS}"):
        load(base_dir, copy, model_cache)


def test_an_adapter_is_refused_on_another_base(base_dir, lora_export, model_cache, tmp_path):
    # The same weights elsewhere are still another base as far as the record goes: the URI is
    # what the job and the operator name.
    other = Path(shutil.copytree(base_dir, tmp_path / "other-base"))
    with pytest.raises(artifact.ArtifactError) as refused:
        load(other, lora_export, model_cache)
    message = str(refused.value)
    assert f"trained on base model {str(base_dir)!r}, not on {str(other)!r}" in message


def test_an_adapter_is_refused_when_its_base_files_changed(model_cache, tmp_path):
    source = random_models.materialize("random://tiny-sd", model_cache)
    base = Path(shutil.copytree(source, tmp_path / "base"))
    export = export_for(base, tmp_path)
    weights = next((base / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match="changed since the adapter was trained"):
        load(base, export, model_cache)


def test_a_pipeline_export_is_not_an_adapter(base_dir, exported, model_cache):
    with pytest.raises(artifact.ArtifactError, match="not a LoRA export"):
        load(base_dir, exported, model_cache)


def test_the_cli_exits_1_naming_both_bases(base_dir, lora_export, model_cache, tmp_path):
    other = shutil.copytree(base_dir, tmp_path / "other-base")
    argv = [*SERVE, "--model", str(other), "--adapter", str(lora_export)]
    result = subprocess.run(
        [*argv, "--port", str(free_port()), "--host", "127.0.0.1"],
        env={**os.environ, "DREAMBOOTH_CACHE": str(model_cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "the model was not loaded" in result.stderr
    assert str(base_dir) in result.stderr and str(other) in result.stderr
