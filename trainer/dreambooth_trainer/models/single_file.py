"""Diffusers weights -> one .safetensors file in the original Stable Diffusion (LDM) layout.

This is what A1111, ComfyUI and `StableDiffusionPipeline.from_single_file` load. diffusers ships
only the opposite direction (loaders/single_file_utils.py), so this module inverts it, derived
from the model configs (layers per block, which blocks attend) rather than from SD1.5's fixed
numbers: the tiny test model converts through the same code as the real one. The round trip
through diffusers' own loader is what the tests check.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    LDM_CLIP_PREFIX_TO_REMOVE,
    LDM_UNET_KEY,
    LDM_VAE_KEYS,
)
from safetensors.torch import save_file
from transformers import CLIPTextModel

from .family import SDXL, family_of

StateDict = dict[str, torch.Tensor]
PrefixMap = list[tuple[str, str]]  # (diffusers prefix, LDM prefix)

UNET_RESNET_RENAMES = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
VAE_RESNET_RENAMES = [("conv_shortcut", "nin_shortcut")]
VAE_ATTENTION_RENAMES = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]


def rename(key: str, renames: Iterable[tuple[str, str]]) -> str:
    for old, new in renames:
        key = key.replace(old, new)
    return key


def remap(state: StateDict, prefixes: PrefixMap, fixed: dict[str, str]) -> StateDict:
    """Rename every key: exact names from `fixed`, the rest by their longest matching prefix."""
    ordered = sorted(prefixes, key=lambda pair: len(pair[0]), reverse=True)
    converted = {}
    for key, tensor in state.items():
        if key in fixed:
            converted[fixed[key]] = tensor
            continue
        match = next((pair for pair in ordered if key.startswith(pair[0])), None)
        if match is None:
            raise KeyError(f"no LDM name for diffusers weight {key!r}")
        converted[match[1] + key[len(match[0]) :]] = tensor
    return converted


# -- UNet ------------------------------------------------------------------------------------------


def unet_prefixes(config) -> PrefixMap:
    """LDM numbers the UNet's blocks flatly: input_blocks.k / output_blocks.k, (L + 1) per level."""
    levels = len(config.block_out_channels)
    per_level = config.layers_per_block + 1
    pairs: PrefixMap = [("mid_block.attentions.0.", "middle_block.1.")]
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    for i in range(levels):
        for j in range(config.layers_per_block):
            ldm = f"input_blocks.{per_level * i + j + 1}"
            pairs += [
                (f"down_blocks.{i}.resnets.{j}.", f"{ldm}.0."),
                (f"down_blocks.{i}.attentions.{j}.", f"{ldm}.1."),
            ]
        if i < levels - 1:
            pairs.append(
                (
                    f"down_blocks.{i}.downsamplers.0.conv.",
                    f"input_blocks.{per_level * (i + 1)}.0.op.",
                )
            )
        for j in range(per_level):
            ldm = f"output_blocks.{per_level * i + j}"
            pairs += [
                (f"up_blocks.{i}.resnets.{j}.", f"{ldm}.0."),
                (f"up_blocks.{i}.attentions.{j}.", f"{ldm}.1."),
            ]
        if i < levels - 1:
            # The upsampler follows the last resnet, and its attention when the level has one.
            slot = 2 if "CrossAttn" in config.up_block_types[i] else 1
            pairs.append(
                (
                    f"up_blocks.{i}.upsamplers.0.",
                    f"output_blocks.{per_level * i + config.layers_per_block}.{slot}.",
                )
            )
    return pairs


def convert_unet(unet: UNet2DConditionModel) -> StateDict:
    # Inner resnet names first (prefixes do not contain them), then the block prefixes.
    state = {
        rename(key, UNET_RESNET_RENAMES) if ".resnets." in key else key: tensor
        for key, tensor in unet.state_dict().items()
    }
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    converted = remap(state, unet_prefixes(unet.config), fixed)
    return {LDM_UNET_KEY + key: tensor for key, tensor in converted.items()}


# -- VAE -------------------------------------------------------------------------------------------


def vae_prefixes(config) -> PrefixMap:
    levels = len(config.block_out_channels)
    pairs: PrefixMap = []
    for part in ("encoder", "decoder"):
        pairs.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."))
        pairs += [
            (f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)
        ]
    for i in range(levels):
        pairs += [
            (f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
            # The decoder's levels count up from the lowest resolution in LDM.
            (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block."),
            (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample."),
        ]
    return pairs


def convert_vae(vae: AutoencoderKL) -> StateDict:
    state = {}
    for key, tensor in vae.state_dict().items():
        if ".attentions." in key:
            key = rename(key, VAE_ATTENTION_RENAMES)
            if tensor.ndim == 2:  # LDM's VAE attention projections are 1x1 convolutions
                tensor = tensor[:, :, None, None]
        elif ".resnets." in key:
            key = rename(key, VAE_RESNET_RENAMES)
        state[key] = tensor
    converted = remap(state, vae_prefixes(vae.config), DIFFUSERS_TO_LDM_MAPPING["vae"])
    return {LDM_VAE_KEYS[0] + key: tensor for key, tensor in converted.items()}


# -- text encoder ----------------------------------------------------------------------------------


def convert_text_encoder(text_encoder: CLIPTextModel) -> StateDict:
    """SD1.x keeps CLIP's names under `cond_stage_model.transformer.text_model.`.

    transformers >= 5.6 dropped the `text_model.` level from CLIPTextModel's own names.
    """
    prefix = LDM_CLIP_PREFIX_TO_REMOVE[0]
    return {
        prefix + (key if key.startswith("text_model.") else "text_model." + key): tensor
        for key, tensor in text_encoder.state_dict().items()
    }


def single_file_unsupported(pipeline: StableDiffusionPipeline) -> str | None:
    """Why this pipeline cannot go into the SD1.x layout written here, or None if it can.

    SD2.x single files name the text encoder after OpenCLIP, and nothing in an SD1.x file says
    "v-prediction": such a file would load as a broken SD1 model.
    """
    if family_of(pipeline) == SDXL:  # until the SGM layout is written (the export branch)
        return "unsupported for SDXL (its single-file layout is not written yet)"
    if pipeline.text_encoder.config.hidden_act != "quick_gelu":
        return "its text encoder is not OpenAI CLIP (SD2.x single files use OpenCLIP names)"
    if pipeline.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        return "it predicts v, which an SD1.x single file cannot say"
    return None


def save_single_file(
    pipeline: StableDiffusionPipeline, path: Path, dtype: torch.dtype | None = None
) -> Path:
    state = {
        **convert_unet(pipeline.unet),
        **convert_vae(pipeline.vae),
        **convert_text_encoder(pipeline.text_encoder),
    }
    state = {
        key: (tensor.to(dtype) if dtype else tensor).detach().cpu().contiguous()
        for key, tensor in state.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path
