"""Serving SDXL: an SDXL export, or an SDXL LoRA export on its base, through the HTTP app; the
default size is the model's; a batch mixing SDXL adapters gives each image its adapter's image.
"""

from __future__ import annotations

import base64
import io
import shutil
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft.tuners.lora import LoraLayer
from PIL import Image

from dreambooth_contract.layout import PIPELINE_DIR
from dreambooth_trainer.export import export_pipeline
from dreambooth_trainer.models import random_models
from dreambooth_trainer.serve import artifact
from dreambooth_trainer.serve.adapters import AdapterCache, VerifiedAdapter
from dreambooth_trainer.serve.app import create_app
from dreambooth_trainer.serve.batching import Job
from dreambooth_trainer.serve.engine import Text2ImageEngine
from dreambooth_trainer.serve.schemas import Generation
from tests.support.lora import digest_of, export_for

from .conftest import settings
from .harness import GENERATE, HTTP_TIMEOUT, running

PROMPT = "a photo of sks dog"
# The UNet's added-embedding MLP (pooled text + sizes) and its time embedding: layers only
# SDXL's UNet conditions through, with inputs of one row per image (not per token).
EMBEDDING_TARGETS = ("add_embedding.linear_1", "add_embedding.linear_2", "time_embedding.linear_1")


@pytest.fixture(scope="module")
def sdxl_base(model_cache, tmp_path_factory) -> Path:
    source = random_models.materialize("random://tiny-sdxl", model_cache)
    return Path(shutil.copytree(source, tmp_path_factory.mktemp("sdxl-base") / "tiny-sdxl"))


@pytest.fixture(scope="module")
def sdxl_export(sdxl_base, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sdxl-artifact") / "export"
    export_pipeline(StableDiffusionXLPipeline.from_pretrained(sdxl_base), directory)
    return directory


def plain_image(source: Path, adapter: Path | None = None, seed: int = 7, side: int = 64):
    pipeline = StableDiffusionXLPipeline.from_pretrained(source)
    pipeline.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipeline.load_lora_weights(adapter)
    generator = torch.Generator("cpu").manual_seed(seed)
    options = {"num_inference_steps": 2, "guidance_scale": 7.5, "height": side, "width": side}
    return np.asarray(pipeline(PROMPT, generator=generator, **options).images[0])


def served_image(loader, body: dict) -> np.ndarray:
    with running(create_app(settings(), loader)) as url:  # warmed up, as a Deployment is
        response = httpx.post(url + GENERATE, json=body, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_an_sdxl_export_is_served_at_the_models_size(sdxl_export, model_cache):
    loaded = artifact.load(str(sdxl_export), cache_dir=model_cache, device="cpu")
    # No size in the request: the model's own (tiny-sdxl: 8 latents x 8 = 64 px).
    served = served_image(lambda: loaded, {"prompt": PROMPT, "seed": 7})
    assert served.shape == (64, 64, 3)
    np.testing.assert_array_equal(served, plain_image(sdxl_export / PIPELINE_DIR))
    # Another sampler: a pipeline of the same family over the same modules.
    body = {"prompt": PROMPT, "seed": 7, "size": "32x32", "scheduler": "ddim"}
    assert served_image(lambda: loaded, body).shape == (32, 32, 3)


def test_the_default_size_of_sdxl_is_1024():
    """sample_size x the VAE's factor, read from the model: SDXL's 128 latents are 1024 px."""
    unet = SimpleNamespace(config=SimpleNamespace(**random_models.SDXL.unet))
    assert Text2ImageEngine(SimpleNamespace(unet=unet, vae_scale_factor=8)).native_side == 1024


def test_an_sdxl_lora_is_served_on_its_base(sdxl_base, model_cache, tmp_path):
    export = export_for(sdxl_base, tmp_path)
    loader = partial(
        artifact.load_with_adapter, str(sdxl_base), str(export), cache_dir=model_cache, device="cpu"
    )
    served = served_image(loader, {"prompt": PROMPT, "seed": 7})
    expected = plain_image(sdxl_base, export)
    np.testing.assert_array_equal(served, expected)
    assert np.abs(expected.astype(int) - plain_image(sdxl_base).astype(int)).max() > 32


@pytest.mark.parametrize("negative", ["", "blurry"], ids=["no-negative", "negative"])
def test_a_batch_of_sdxl_adapters_gives_each_image_its_adapters(
    sdxl_base, tmp_path_factory, negative
):
    """Rows of one pipeline call under different adapters, one of them on the added-embedding
    and time-embedding layers (inputs of one row per image): each image is its adapter's alone,
    up to a batched GEMM's rounding."""
    exports = {
        "plain": export_for(sdxl_base, tmp_path_factory.mktemp("a"), seed=1, strength=0.2),
        "embeddings": export_for(
            sdxl_base,
            tmp_path_factory.mktemp("b"),
            seed=2,
            strength=0.2,
            unet_targets=EMBEDDING_TARGETS,
        ),
    }
    adapters = [VerifiedAdapter(name, digest_of(path), path) for name, path in exports.items()]
    pipeline = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
    pipeline.set_progress_bar_config(disable=True)
    engine = Text2ImageEngine(pipeline, AdapterCache(pipeline, max_loaded=2))

    def job(adapter: VerifiedAdapter | None, seed: int) -> Job[Generation]:
        generation = Generation(PROMPT, negative, 1, 32, 32, 2, 7.5, None, seed, adapter)
        return Job(generation.batch_key, 1, generation)

    rows = [adapters[0], adapters[1], None]
    mixed = engine([job(adapter, seed) for seed, adapter in enumerate(rows)])
    alone = [engine([job(adapter, seed)])[0][0] for seed, adapter in enumerate(rows)]
    for seed, (batched, single) in enumerate(zip(mixed, alone, strict=True)):
        difference = np.abs(np.asarray(batched[0], int) - np.asarray(single, int)).max()
        assert difference <= 1, seed
    # The embeddings' adapter is there: peft layers on the added and time embeddings.
    assert isinstance(pipeline.unet.add_embedding.linear_1, LoraLayer)
    assert isinstance(pipeline.unet.time_embedding.linear_1, LoraLayer)
    # ... and each adapter matters: its image is not the base's.
    for seed in range(2):
        assert np.abs(np.asarray(alone[seed], int) - np.asarray(alone[2], int)).max() > 32
