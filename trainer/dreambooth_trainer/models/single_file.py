"""Diffusers weights -> one .safetensors file in the original Stable Diffusion (LDM) layout.

SD1.x: `model.diffusion_model.` (UNet), `first_stage_model.` (VAE), `cond_stage_model.transformer.`
(CLIP). SDXL, as Stability's generative-models (SGM) repository wrote it: the same UNet and VAE
names (the UNet's added embedding of the pooled text and the sizes as `label_emb.0.*`),
`conditioner.embedders.0.transformer.` (CLIP ViT-L, transformers' names) and
`conditioner.embedders.1.model.` (OpenCLIP ViT-bigG in open_clip's names: fused q/k/v
`in_proj_weight`, `text_projection` as a matrix applied from the right).

This is what A1111, ComfyUI and `StableDiffusionPipeline.from_single_file` load. diffusers ships
only the opposite direction (loaders/single_file_utils.py), so this module inverts it, derived
from the model configs (layers per block, which blocks attend) rather than from SD1.5's fixed
numbers: the tiny test model converts through the same code as the real one. The round trip
through diffusers' own loader is what the tests check.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES,
    DIFFUSERS_TO_LDM_MAPPING,
    LDM_CLIP_PREFIX_TO_REMOVE,
    LDM_UNET_KEY,
    LDM_VAE_KEYS,
)
from safetensors.torch import save_file
from torch import nn

from .family import SDXL, family_of

StateDict = dict[str, torch.Tensor]
T = TypeVar("T")
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


def remap(state: dict[str, T], prefixes: PrefixMap, fixed: dict[str, str]) -> dict[str, T]:
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


def unet_ldm_names(config, keys: Iterable[str]) -> dict[str, str]:
    """The LDM name (without LDM_UNET_KEY) of each of the UNet weight names `keys`, by name."""
    # Inner resnet names first (prefixes do not contain them), then the block prefixes.
    fixed = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.addition_embed_type == "text_time":  # SDXL: pooled text + sizes -> label_emb
        fixed |= DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    names = {key: rename(key, UNET_RESNET_RENAMES) if ".resnets." in key else key for key in keys}
    converted = remap(
        {renamed: renamed for renamed in names.values()}, unet_prefixes(config), fixed
    )
    ldm_of = {renamed: ldm for ldm, renamed in converted.items()}
    return {key: ldm_of[renamed] for key, renamed in names.items()}


def convert_unet(unet: UNet2DConditionModel) -> StateDict:
    state = unet.state_dict()
    names = unet_ldm_names(unet.config, state)
    return {LDM_UNET_KEY + names[key]: tensor for key, tensor in state.items()}


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


def convert_text_encoder(text_encoder: nn.Module, prefix: str = LDM_CLIP_PREFIX_TO_REMOVE[0]):
    """CLIP's own names under `prefix`: `cond_stage_model.transformer.text_model.` in SD1.x,
    `conditioner.embedders.0.transformer.text_model.` in SDXL.

    transformers >= 5.6 dropped the `text_model.` level from CLIPTextModel's own names.
    """
    return {
        prefix + (key if key.startswith("text_model.") else "text_model." + key): tensor
        for key, tensor in text_encoder.state_dict().items()
    }


# SDXL's second encoder: open_clip's names under this prefix.
OPEN_CLIP_PREFIX = CHECKPOINT_KEY_NAMES["open_clip_sdxl"].removesuffix("positional_embedding")
# transformers -> open_clip inside a layer (the loader's table, read the other way; its
# `transformer.`-prefixed entries are the fixed names below).
OPEN_CLIP_LAYER_RENAMES = [
    (diffusers, ldm)
    for diffusers, ldm in DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"].items()
    if not diffusers.startswith("transformer.")
]
QKV = ("q_proj", "k_proj", "v_proj")


def convert_open_clip(text_encoder: nn.Module, prefix: str = OPEN_CLIP_PREFIX) -> StateDict:
    """A CLIPTextModelWithProjection in open_clip's layout: layers under `transformer.resblocks.`,
    each attention's q, k and v projections fused into one `in_proj_weight` (and bias), and the
    projection stored transposed (open_clip multiplies `x @ text_projection`)."""
    fixed = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    state = text_encoder.state_dict()
    converted: StateDict = {}
    for key, tensor in state.items():
        if key in fixed:
            projection = key == "text_projection.weight"
            converted[prefix + fixed[key]] = tensor.T if projection else tensor
        elif not key.startswith("text_model.encoder.layers."):
            raise KeyError(f"no open_clip name for text_encoder_2 weight {key!r}")
        elif not any(f".self_attn.{name}." in key for name in QKV):
            converted[prefix + "transformer." + rename(key, OPEN_CLIP_LAYER_RENAMES)] = tensor
        elif ".self_attn.q_proj." in key:  # q, k and v of this layer as one tensor
            parts = [state[key.replace(".q_proj.", f".{name}.")] for name in QKV]
            layer = rename(key.rsplit(".q_proj.", 1)[0], OPEN_CLIP_LAYER_RENAMES)
            kind = key.rsplit(".", 1)[1]  # weight or bias
            converted[f"{prefix}transformer.{layer}.in_proj_{kind}"] = torch.cat(parts)
    return converted


def sdxl_state(pipeline: DiffusionPipeline) -> StateDict:
    return {
        **convert_unet(pipeline.unet),
        **convert_vae(pipeline.vae),
        **convert_text_encoder(pipeline.text_encoder, LDM_CLIP_PREFIX_TO_REMOVE[1]),
        **convert_open_clip(pipeline.text_encoder_2),
    }


def sd_state(pipeline: DiffusionPipeline) -> StateDict:
    return {
        **convert_unet(pipeline.unet),
        **convert_vae(pipeline.vae),
        **convert_text_encoder(pipeline.text_encoder),
    }


def single_file_unsupported(pipeline: DiffusionPipeline) -> str | None:
    """Why this pipeline cannot go into a single file written here (SD1.x's or SDXL's layout),
    or None if it can.

    SD2.x single files name the text encoder after OpenCLIP, and nothing in an SD1.x file says
    "v-prediction": such a file would load as a broken SD1 model. (The same holds for an SDXL
    model predicting v.) SDXL's own layout names both of its encoders.
    """
    if pipeline.scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        return "it predicts v, which an SD1.x or SDXL single file cannot say"
    if family_of(pipeline) == SDXL:
        return None
    if pipeline.text_encoder.config.hidden_act != "quick_gelu":
        return "its text encoder is not OpenAI CLIP (SD2.x single files use OpenCLIP names)"
    return None


def save_single_file(
    pipeline: DiffusionPipeline, path: Path, dtype: torch.dtype | None = None
) -> Path:
    state = sdxl_state(pipeline) if family_of(pipeline) == SDXL else sd_state(pipeline)
    state = {
        key: (tensor.to(dtype) if dtype else tensor).detach().cpu().contiguous()
        for key, tensor in state.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path
