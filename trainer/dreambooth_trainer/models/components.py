"""The module that trains and the parts that stay frozen: Stable Diffusion 1.x/2.x's here, and
the choice of family (SDXL's own parts are in sdxl.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from dreambooth_contract.api import TrainingSpec

from .family import SD, SDXL, family_of
from .loading import training_noise_scheduler


class DreamBoothModel(nn.Module):
    """The UNet and, when it trains, the text encoder, as ONE module.

    Backends wrap one module (DDP, DeepSpeed's engine, FSDP2); training the text encoder as a
    second wrapped model is what breaks diffusers' script under DeepSpeed.
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel | None = None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor,
        condition_is_embedding: bool,
    ) -> torch.Tensor:
        hidden_states = condition if condition_is_embedding else self.text_encoder(condition)[0]
        # Inputs in the UNet's own dtype: DeepSpeed's engine holds 16-bit weights and turns the
        # caller's CUDA autocast off inside its forward, so float32 latents would not match.
        # That of its first layer, which `unet.dtype` reports after a walk over every submodule
        # (1.6 ms per forward for SD1.5's UNet on one Xeon core; a GPU idles through host work at
        # the start of a step).
        dtype = self.unet.conv_in.weight.dtype
        return self.unet(
            noisy_latents.to(dtype), timesteps, encoder_hidden_states=hidden_states.to(dtype)
        ).sample


@dataclass
class FrozenParts:
    """What the loop uses but never trains, and what sampling needs besides the trained parts."""

    vae: AutoencoderKL
    tokenizer: CLIPTokenizer  # SDXL: both as one (sdxl.Tokenizers)
    text_encoder: CLIPTextModel  # the frozen one when it does not train (SDXL: sdxl.TextEncoders)
    sampling_scheduler: SchedulerMixin
    noise_scheduler: DDPMScheduler
    family: str = SD


def frozen_parts(pipeline: StableDiffusionPipeline) -> FrozenParts:
    """The pipeline's parts a training method never trains (its text encoder included)."""
    family = family_of(pipeline)
    if family == SDXL:
        from . import sdxl

        tokenizer = sdxl.tokenizers(pipeline)
    else:
        tokenizer = pipeline.tokenizer
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
        from . import sdxl

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


def enable_activation_checkpointing(text_encoder: CLIPTextModel) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (the old name warns).
    enable = getattr(text_encoder, "activation_checkpointing_enable", None)
    (enable or text_encoder.gradient_checkpointing_enable)()


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
        from .sdxl import SdxlDreamBoothModel as model_class
    return model_class(unet, text_encoder if training.train_text_encoder else None)


def sampling_pipeline(model: DreamBoothModel, frozen: FrozenParts) -> StableDiffusionPipeline:
    """A pipeline over the current weights (shares the modules, copies nothing)."""
    if frozen.family == SDXL:
        from . import sdxl

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
