"""SDXL artifacts: the diffusers pipeline, the single file in the original (SGM) layout and the
LoRA in diffusers' and kohya's formats, each loaded where users load them: a process with
nothing but diffusers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from dreambooth_contract.api import BaseModelSpec
from dreambooth_contract.layout import PIPELINE_DIR
from dreambooth_trainer.export import SINGLE_FILE, export_adapter, export_pipeline
from dreambooth_trainer.methods.lora_export import KOHYA_WEIGHTS
from dreambooth_trainer.methods.lora_files import LORA_WEIGHTS
from dreambooth_trainer.models import base_identity, random_models
from dreambooth_trainer.models.single_file import OPEN_CLIP_PREFIX, sdxl_state
from tests.support.lora import export_for, write_random_adapter

from .test_export import assert_same_weights
from .test_lora_export import FRESH_LORA_BODY, PROMPT, fresh_script, image, merged_weights

pytestmark = pytest.mark.trainer

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """random://tiny-sdxl as a local directory: a base that is files we read."""
    source = random_models.materialize("random://tiny-sdxl", tmp_path_factory.mktemp("cache"))
    return Path(shutil.copytree(source, tmp_path_factory.mktemp("sdxl-base") / "tiny-sdxl"))


def perturbed(base_dir: Path) -> StableDiffusionXLPipeline:
    """The base with every weight of the UNet and both text encoders moved: a stand-in for a
    full fine-tune that the base's files cannot pass for."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("unet", "text_encoder", "text_encoder_2"):
            for parameter in getattr(pipeline, name).parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return pipeline


def run_fresh(script: str, *args: str | Path) -> dict[str, np.ndarray]:
    """`script` in a new interpreter that can import nothing of ours (-I: no PYTHONPATH); it
    writes its images to the npz file named by its last argument."""
    out = Path(args[-1])
    subprocess.run([sys.executable, "-I", "-c", script, *map(str, args)], check=True, timeout=600)
    return dict(np.load(out))


# What a user with diffusers alone does with an SDXL export.
FRESH_PIPELINE = fresh_script(
    """
prompt, export, single_file, out = sys.argv[1:]
pretrained = image(PIPELINE.from_pretrained(export))
# config=: the component configs come from the export, nothing from the hub (a tiny model's
# shapes are not SDXL's, so they could not be inferred from the weights anyway).
single = PIPELINE.from_single_file(single_file, config=export, local_files_only=True)
np.savez(out, pretrained=pretrained, single_file=image(single))
""",
    "StableDiffusionXLPipeline",
)


def test_the_sdxl_artifact_loads_in_a_fresh_diffusers_process_both_ways(base_dir, tmp_path):
    trained = perturbed(base_dir)
    export_pipeline(trained, tmp_path / "export")
    pipeline_dir, single_file = (
        tmp_path / "export" / PIPELINE_DIR,
        tmp_path / "export" / SINGLE_FILE,
    )
    images = run_fresh(FRESH_PIPELINE, PROMPT, pipeline_dir, single_file, tmp_path / "out.npz")
    np.testing.assert_array_equal(images["single_file"], images["pretrained"])
    np.testing.assert_array_equal(images["pretrained"], image(trained))
    base = image(StableDiffusionXLPipeline.from_pretrained(base_dir))
    assert np.abs(images["pretrained"] - base).max() > 0.05  # the trained weights, not the base's


def test_the_single_file_holds_every_weight_of_the_four_networks(base_dir, tmp_path):
    trained = perturbed(base_dir)
    export_pipeline(trained, tmp_path)
    loaded = StableDiffusionXLPipeline.from_single_file(
        tmp_path / SINGLE_FILE, config=str(tmp_path / PIPELINE_DIR), local_files_only=True
    )
    for name in COMPONENTS:
        assert_same_weights(getattr(trained, name), getattr(loaded, name))


def sdxl_on_meta():
    """SDXL's networks without memory: parameter shapes only."""
    architecture = random_models.SDXL
    with torch.device("meta"):
        unet = UNet2DConditionModel(**architecture.unet)
        vae = AutoencoderKL(**architecture.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**architecture.text_encoder))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**architecture.text_encoder_2))
    return unet, vae, text_encoder, text_encoder_2


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def test_the_sdxl_single_file_layout_is_what_sdxl_tools_expect():
    """The full SDXL architecture: diffusers recognises the file as SDXL base and its own
    converters map every weight back to its diffusers name and shape."""
    networks = sdxl_on_meta()
    unet, vae, text_encoder, text_encoder_2 = networks
    checkpoint = sdxl_state(SimpleNamespace(**dict(zip(COMPONENTS, networks, strict=True))))
    # Every weight once; OpenCLIP's q, k, v weights and biases (6 tensors) fused into 2.
    layers = text_encoder_2.config.num_hidden_layers
    assert len(checkpoint) == sum(len(net.state_dict()) for net in networks) - 4 * layers
    assert infer_diffusers_model_type(checkpoint) == "xl_base"
    assert CHECKPOINT_KEY_NAMES["clip_sdxl"] in checkpoint
    assert CHECKPOINT_KEY_NAMES["open_clip_sdxl"] in checkpoint
    assert "model.diffusion_model.label_emb.0.0.weight" in checkpoint  # the added embedding
    # open_clip's layout: fused q/k/v, the projection stored transposed
    assert checkpoint[OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"].shape == (
        3 * 1280,
        1280,
    )
    assert shapes(convert_ldm_unet_checkpoint(checkpoint, unet.config)) == shapes(unet.state_dict())
    assert shapes(convert_ldm_vae_checkpoint(checkpoint, vae.config)) == shapes(vae.state_dict())
    clip = {
        key.removeprefix("text_model."): tensor
        for key, tensor in convert_ldm_clip_checkpoint(checkpoint).items()
    }
    assert shapes(clip) == shapes(text_encoder.state_dict())
    open_clip = convert_open_clip_checkpoint(text_encoder_2, checkpoint, prefix=OPEN_CLIP_PREFIX)
    assert shapes(open_clip) == shapes(text_encoder_2.state_dict())


# test_lora_export's user with diffusers alone, with SDXL's pipeline class.
FRESH_LORA = fresh_script(FRESH_LORA_BODY, "StableDiffusionXLPipeline")


@pytest.fixture(scope="module")
def lora_export(base_dir, tmp_path_factory) -> tuple[Path, np.ndarray, StableDiffusionXLPipeline]:
    """(export, the adapted pipeline's image, that pipeline): a random adapter on the UNet and
    both text encoders, written as training writes it, exported as the export phase does."""
    directory = tmp_path_factory.mktemp("sdxl-lora")
    adapted = StableDiffusionXLPipeline.from_pretrained(base_dir)
    write_random_adapter(adapted, directory / "trained")
    record = base_identity.base_model_record(BaseModelSpec(uri=str(base_dir)), str(base_dir))
    base = StableDiffusionXLPipeline.from_pretrained(base_dir)
    export_adapter(base, directory / "trained", directory / "export", record, fuse=True)
    return directory / "export", image(adapted), adapted


def test_the_sdxl_lora_loads_in_a_fresh_diffusers_process_in_both_formats(
    base_dir, lora_export, tmp_path
):
    export, expected, _ = lora_export
    out = tmp_path / "images.npz"
    images = run_fresh(FRESH_LORA, PROMPT, base_dir, export, KOHYA_WEIGHTS, out)
    assert np.abs(images["diffusers_format"] - images["before"]).max() > 0.05
    # The adapted pipeline's image: the adapter of every network came through.
    np.testing.assert_allclose(images["diffusers_format"], expected, atol=1e-5)
    np.testing.assert_allclose(images["kohya_format"], images["diffusers_format"], atol=1e-5)


def lora_modules(keys, suffix: str) -> set[str]:
    return {key.removesuffix(suffix) for key in keys if key.endswith(suffix)}


def test_the_sdxl_kohya_file_names_all_three_networks_and_diffusers_maps_every_key(lora_export):
    export, _, _ = lora_export
    with safe_open(export / KOHYA_WEIGHTS, "pt") as kohya:
        keys = list(kohya.keys())
    assert {key.split("_")[1] for key in keys} == {"unet", "te1", "te2"}
    # kohya's SDXL UNet names are the original (SGM) UNet's, as sd-scripts writes them.
    assert any(key.startswith("lora_unet_input_blocks_") for key in keys)
    assert not any(key.startswith("lora_unet_down_blocks_") for key in keys)
    # diffusers' reader leaves no key unconverted (it would raise) and loses no module.
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(export, weight_name=KOHYA_WEIGHTS)
    ours, _ = StableDiffusionXLPipeline.lora_state_dict(export, weight_name=LORA_WEIGHTS)
    assert len(converted) == len(ours) == len(keys) * 2 // 3  # down, up (and alpha) per module
    for network in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(key.startswith(network) for key in converted), network


def test_the_fused_sdxl_export_is_a_pipeline_and_a_single_file(lora_export):
    export, _, adapted = lora_export
    fused = StableDiffusionXLPipeline.from_pretrained(export / PIPELINE_DIR)
    single = StableDiffusionXLPipeline.from_single_file(
        export / SINGLE_FILE, config=str(export / PIPELINE_DIR), local_files_only=True
    )
    for name in COMPONENTS:
        assert_same_weights(getattr(fused, name), getattr(single, name))
    for name in ("unet", "text_encoder", "text_encoder_2"):
        expected = merged_weights(getattr(adapted, name))
        weights = getattr(fused, name).state_dict()
        assert expected, name
        for key, tensor in expected.items():
            # The same sum, perhaps in another order: float32 rounding only.
            torch.testing.assert_close(weights[key], tensor, rtol=1e-5, atol=1e-6)


def test_a_kohya_adapter_on_the_added_embedding_loads_as_its_diffusers_file(base_dir, tmp_path):
    """kohya's SGM names (label_emb_0_0, label_emb_0_2) come back to each of the two layers of
    the added-embedding MLP; diffusers-style names there would be read as one module."""
    targets = ("add_embedding.linear_1", "add_embedding.linear_2")
    export = export_for(base_dir, tmp_path, unet_targets=targets)
    images = {}
    for weights in (LORA_WEIGHTS, KOHYA_WEIGHTS):
        pipeline = StableDiffusionXLPipeline.from_pretrained(base_dir)
        pipeline.load_lora_weights(export, weight_name=weights)
        images[weights] = image(pipeline)
    np.testing.assert_allclose(images[KOHYA_WEIGHTS], images[LORA_WEIGHTS], atol=1e-5)
    base = image(StableDiffusionXLPipeline.from_pretrained(base_dir))
    assert np.abs(images[LORA_WEIGHTS] - base).max() > 0.05
