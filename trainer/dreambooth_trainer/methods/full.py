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
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from dreambooth_contract.api import TrainingSpec

from ..models.components import (
    DreamBoothModel,
    FrozenParts,
    freeze,
    frozen_dtype,
    frozen_parts,
    text_encoder_of,
    trained_model,
    use_torch_sdpa,
    vae_dtype,
)

UNET_DIR = "unet"
TEXT_ENCODER_DIR = "text_encoder"
TEXT_ENCODER_2_DIR = "text_encoder_2"  # SDXL's second encoder


def split_pipeline(
    pipeline: StableDiffusionPipeline, training: TrainingSpec, device: torch.device
) -> tuple[DreamBoothModel, FrozenParts]:
    """UNet (+ text encoder) trainable in fp32; VAE (+ text encoder) frozen, eval, on `device`.
    SDXL's two text encoders train or stay frozen together."""
    dtype = frozen_dtype(training.mixed_precision)
    unet, text_encoder, vae = pipeline.unet, text_encoder_of(pipeline), pipeline.vae
    use_torch_sdpa(unet, vae)
    unet.train().requires_grad_(True)
    freeze(vae, device, vae_dtype(pipeline, dtype))
    if training.train_text_encoder:
        text_encoder.train().requires_grad_(True)
    else:
        freeze(text_encoder, device, dtype)
    return trained_model(unet, text_encoder, training), frozen_parts(pipeline)


def save_trained(model: DreamBoothModel, directory: Path) -> None:
    """The trained components in diffusers layout: what the export phase starts from."""
    model.unet.save_pretrained(directory / UNET_DIR, safe_serialization=True)
    for name, encoder in trained_text_encoders(model).items():
        encoder.save_pretrained(directory / name, safe_serialization=True)


def trained_text_encoders(model: DreamBoothModel) -> dict[str, torch.nn.Module]:
    """The trained text encoders by their pipeline directory: none, SD's one or SDXL's two."""
    encoder = model.text_encoder
    if encoder is None:
        return {}
    if hasattr(encoder, "text_encoder_2"):
        return {TEXT_ENCODER_DIR: encoder.text_encoder, TEXT_ENCODER_2_DIR: encoder.text_encoder_2}
    return {TEXT_ENCODER_DIR: encoder}


def has_trained_weights(directory: Path) -> bool:
    return (directory / UNET_DIR).is_dir()


def with_trained_weights(
    pipeline: StableDiffusionPipeline, trained_dir: Path
) -> StableDiffusionPipeline:
    """The base pipeline (SD or SDXL) with the fine-tuned UNet (and text encoders, if they were
    trained)."""
    components = dict(pipeline.components)
    components["unet"] = UNet2DConditionModel.from_pretrained(trained_dir / UNET_DIR)
    encoder_classes = {
        TEXT_ENCODER_DIR: CLIPTextModel,
        TEXT_ENCODER_2_DIR: CLIPTextModelWithProjection,
    }
    for name, encoder_class in encoder_classes.items():
        if (trained_dir / name).is_dir():
            components[name] = encoder_class.from_pretrained(trained_dir / name)
    trained = type(pipeline)(**components)
    trained.set_progress_bar_config(disable=True)
    return trained
