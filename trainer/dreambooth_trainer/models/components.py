"""The module that trains and the parts that stay frozen: Stable Diffusion 1.x/2.x's here, and
the choice of family (SDXL's own parts are in sdxl.py)."""

from __future__ import annotations

import torch
from diffusers import (
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn
from transformers import CLIPTextModel

from dreambooth_contract.api import TrainingSpec

from . import sdxl
from .family import SDXL, family_of
from .loading import training_noise_scheduler
from .parts import DreamBoothModel, FrozenParts, enable_activation_checkpointing

# Callers import the module and its parts from here, whatever the family.
__all__ = ["DreamBoothModel", "FrozenParts", "enable_activation_checkpointing"]


def frozen_parts(pipeline: StableDiffusionPipeline) -> FrozenParts:
    """The pipeline's parts a training method never trains (its text encoder included)."""
    family = family_of(pipeline)
    tokenizer = sdxl.tokenizers(pipeline) if family == SDXL else pipeline.tokenizer
    return FrozenParts(
        vae=pipeline.vae,
        tokenizer=tokenizer,
        text_encoder=text_encoder_of(pipeline),
        sampling_scheduler=pipeline.scheduler,
        noise_scheduler=training_noise_scheduler(pipeline),
        family=family,
    )


def text_encoder_of(pipeline: StableDiffusionPipeline) -> nn.Module:
    """The pipeline's text encoder as one module: SD's one, or SDXL's two (sdxl.TextEncoders)."""
    if family_of(pipeline) == SDXL:
        return sdxl.text_encoders(pipeline)
    return pipeline.text_encoder


def vae_dtype(pipeline: StableDiffusionPipeline, dtype: torch.dtype) -> torch.dtype:
    """The frozen VAE's dtype: SDXL's VAE overflows in fp16 (its config says force_upcast), so
    it stays in fp32 then, as diffusers' SDXL scripts and pipeline keep it; a VAE fixed for fp16
    (baseModel.vaeUri, e.g. madebyollin/sdxl-vae-fp16-fix, force_upcast false) runs in fp16."""
    upcast = pipeline.vae.config.get("force_upcast", True)
    if family_of(pipeline) == SDXL and dtype == torch.float16 and upcast:
        return torch.float32
    return dtype


def use_torch_sdpa(*modules: nn.Module) -> None:
    """torch's scaled_dot_product_attention (flash / memory-efficient) in every attention."""
    for module in modules:
        module.set_attn_processor(AttnProcessor2_0())


def frozen_dtype(mixed_precision: str) -> torch.dtype:
    """Frozen modules run in the autocast dtype: half the memory, and no gradients to lose."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def freeze(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    module.requires_grad_(False).eval().to(device)
    if dtype != torch.float32:  # diffusers warns about any dtype cast, even a no-op one
        module.to(dtype=dtype)


def trained_model(
    unet: UNet2DConditionModel, text_encoder: CLIPTextModel, training: TrainingSpec
) -> DreamBoothModel:
    """The module that trains: the UNet, and the text encoder when it trains too (its weights
    or its adapter), with activations recomputed in backward when gradientCheckpointing asks."""
    if training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if training.train_text_encoder:
            enable_activation_checkpointing(text_encoder)
    model_class = DreamBoothModel
    if getattr(text_encoder, "pooled_output", False):
        model_class = sdxl.SdxlDreamBoothModel
    return model_class(unet, text_encoder if training.train_text_encoder else None)


def sampling_pipeline(model: DreamBoothModel, frozen: FrozenParts) -> StableDiffusionPipeline:
    """A pipeline over the current weights (shares the modules, copies nothing)."""
    if frozen.family == SDXL:
        return sdxl.sampling_pipeline(model, frozen)
    pipeline = StableDiffusionPipeline(
        vae=frozen.vae,
        text_encoder=model.text_encoder or frozen.text_encoder,
        tokenizer=frozen.tokenizer,
        unet=model.unet,
        scheduler=frozen.sampling_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
