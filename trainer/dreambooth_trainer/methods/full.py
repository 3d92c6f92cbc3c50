"""Full fine-tuning: every weight of the UNet trains, and of the text encoder with
trainTextEncoder; the VAE never does.

- What trains: `split_pipeline` makes the trainable components one module (DreamBoothModel, the
  one module every backend wraps) and freezes the rest.
- What a checkpoint holds: that module's state as the backend keeps it (all its weights, the
  optimizer's state over them), through `Backend.save_to_dir`; nothing else of the model.
- What is exported: `save_trained` writes the trained components in diffusers layout
  (<output>/trained), and the export phase puts them into the base pipeline
  (`with_trained_weights`) to write the artifact.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from dreambooth_contract.api import TrainingSpec

from ..models.components import (
    DreamBoothModel,
    FrozenParts,
    freeze,
    frozen_dtype,
    frozen_parts,
    trained_model,
    use_torch_sdpa,
)

UNET_DIR = "unet"
TEXT_ENCODER_DIR = "text_encoder"


def split_pipeline(
    pipeline: StableDiffusionPipeline, training: TrainingSpec, device: torch.device
) -> tuple[DreamBoothModel, FrozenParts]:
    """UNet (+ text encoder) trainable in fp32; VAE (+ text encoder) frozen, eval, on `device`."""
    dtype = frozen_dtype(training.mixed_precision)
    unet, text_encoder, vae = pipeline.unet, pipeline.text_encoder, pipeline.vae
    use_torch_sdpa(unet, vae)
    unet.train().requires_grad_(True)
    freeze(vae, device, dtype)
    if training.train_text_encoder:
        text_encoder.train().requires_grad_(True)
    else:
        freeze(text_encoder, device, dtype)
    return trained_model(unet, text_encoder, training), frozen_parts(pipeline)


def save_trained(model: DreamBoothModel, directory: Path) -> None:
    """The trained components in diffusers layout: what the export phase starts from."""
    model.unet.save_pretrained(directory / UNET_DIR, safe_serialization=True)
    if model.text_encoder is not None:
        model.text_encoder.save_pretrained(directory / TEXT_ENCODER_DIR, safe_serialization=True)


def has_trained_weights(directory: Path) -> bool:
    return (directory / UNET_DIR).is_dir()


def with_trained_weights(
    pipeline: StableDiffusionPipeline, trained_dir: Path
) -> StableDiffusionPipeline:
    """The base pipeline with the fine-tuned UNet (and text encoder, if it was trained)."""
    components = dict(pipeline.components)
    components["unet"] = UNet2DConditionModel.from_pretrained(trained_dir / UNET_DIR)
    if (trained_dir / TEXT_ENCODER_DIR).is_dir():
        components["text_encoder"] = CLIPTextModel.from_pretrained(trained_dir / TEXT_ENCODER_DIR)
    trained = StableDiffusionPipeline(**components)
    trained.set_progress_bar_config(disable=True)
    return trained
