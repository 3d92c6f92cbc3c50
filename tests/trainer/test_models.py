"""Random-weight models: deterministic, cached; the SD1.5 architecture has SD1.5's shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dreambooth_trainer.models import random_models
from dreambooth_trainer.models.single_file import convert_text_encoder, convert_unet, convert_vae
from dreambooth_trainer.storage import local_files, sha256_file

from .conftest import CLASS_PROMPT, INSTANCE_PROMPT

pytestmark = pytest.mark.trainer


def digests(directory: Path) -> dict[str, str]:
    return {key: sha256_file(path) for path, key in local_files(directory)}


def test_tiny_model_is_deterministic_and_small(tmp_path: Path):
    first = random_models.materialize("random://tiny-sd", tmp_path / "a")
    second = random_models.materialize("random://tiny-sd", tmp_path / "b")
    assert digests(first) == digests(second)
    size = sum(path.stat().st_size for path, _ in local_files(first))
    assert size < 10 << 20


def test_materialize_reuses_the_cache(tmp_path: Path, monkeypatch):
    path = random_models.materialize("random://tiny-sd", tmp_path)
    monkeypatch.setattr(random_models, "build_pipeline", lambda _: pytest.fail("rebuilt"))
    assert random_models.materialize("random://tiny-sd", tmp_path) == path


def test_tiny_sdxl_is_an_sdxl_pipeline(tmp_path: Path):
    path = random_models.materialize("random://tiny-sdxl", tmp_path)
    assert digests(path) == digests(random_models.materialize("random://tiny-sdxl", tmp_path / "b"))
    pipeline = StableDiffusionXLPipeline.from_pretrained(path)
    # The UNet conditions on the pooled embedding of the second encoder and six size numbers.
    assert pipeline.unet.config.addition_embed_type == "text_time"
    width = pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
    assert pipeline.unet.config.cross_attention_dim == width
    image = pipeline(
        INSTANCE_PROMPT, num_inference_steps=2, height=64, width=64, output_type="np"
    ).images
    assert image.shape == (1, 64, 64, 3)


def test_unknown_random_model_is_named(tmp_path: Path):
    with pytest.raises(ValueError, match="random://tiny-sd, random://sd15"):
        random_models.materialize("random://huge", tmp_path)


def test_tokenizer_knows_prompt_words():
    tokenizer = random_models.build_tokenizer()
    ids = tokenizer(INSTANCE_PROMPT).input_ids
    # <start> a photo of sks cube <end>: one token per word
    assert len(ids) == 7
    assert tokenizer.decode(ids, skip_special_tokens=True) == INSTANCE_PROMPT
    assert tokenizer(CLASS_PROMPT).input_ids != ids
    assert tokenizer("zebra!").input_ids[1:-1]  # unknown words fall back to bytes


def sd15_on_meta():
    """SD1.5's networks without memory: parameter shapes only."""
    architecture = random_models.SD15
    with torch.device("meta"):
        unet = UNet2DConditionModel(**architecture.unet)
        vae = AutoencoderKL(**architecture.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**architecture.text_encoder))
    return unet, vae, text_encoder


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_architecture_has_sd15_size():
    unet, vae, text_encoder = sd15_on_meta()
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text_encoder) == 123_060_480


def test_single_file_layout_is_what_sd15_tools_expect():
    unet, vae, text_encoder = sd15_on_meta()
    checkpoint = {**convert_unet(unet), **convert_vae(vae), **convert_text_encoder(text_encoder)}
    assert infer_diffusers_model_type(checkpoint) == "v1"
    assert CHECKPOINT_KEY_NAMES["clip"] in checkpoint
    # diffusers' own loader maps every weight back to its diffusers name
    assert set(convert_ldm_unet_checkpoint(checkpoint, unet.config)) == set(unet.state_dict())
    assert set(convert_ldm_vae_checkpoint(checkpoint, vae.config)) == set(vae.state_dict())


def test_sdxl_architecture_has_sdxl_size():
    architecture = random_models.SDXL
    with torch.device("meta"):
        unet = UNet2DConditionModel(**architecture.unet)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**architecture.text_encoder_2))
    assert count(unet) == 2_567_463_684
    assert count(text_encoder_2) == 694_659_840


def test_the_family_comes_from_the_model_and_others_are_refused_naming_the_field(tmp_path: Path):
    from dreambooth_contract.api import BaseModelSpec
    from dreambooth_contract.trainer_config import ConfigError
    from dreambooth_trainer.models.family import SD, SDXL, family_of
    from dreambooth_trainer.models.loading import load_pipeline

    for uri, family in (("random://tiny-sd", SD), ("random://tiny-sdxl", SDXL)):
        assert family_of(load_pipeline(BaseModelSpec(uri=uri), tmp_path)) == family
    other = tmp_path / "other"
    shutil.copytree(random_models.materialize("random://tiny-sd", tmp_path), other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError, match="FluxPipeline") as refused:
        load_pipeline(BaseModelSpec(uri=str(other)), tmp_path)
    assert refused.value.field == "baseModel.uri"


def test_the_api_accepts_exactly_the_random_models_the_trainer_builds():
    from dreambooth_contract.api import RANDOM_MODELS

    built = {random_models.RANDOM_SCHEME + name for name in random_models.ARCHITECTURES}
    assert set(RANDOM_MODELS) == built
