"""LoRA: the base model stays frozen; low-rank adapters on the UNet's attention projections
(and on the text encoder's, with trainTextEncoder) are all that trains.

- What trains: `split_pipeline` freezes every base weight in the training dtype (half the
  memory under fp16/bf16), gives the UNet (and text encoder) peft LoRA adapters through
  diffusers' and transformers' own `add_adapter`, and keeps the adapter weights in fp32 (their
  updates are small; 16-bit weights would round them away), as diffusers' LoRA script does.
  The UNet and text encoder still form the one module every backend wraps (DreamBoothModel).
- What a checkpoint holds: the backends save trainable state only (parallel/trainable.py):
  the adapter's weights and the optimizer's state over them, never the frozen base.
- What is exported: `save_trained` writes the adapter (methods/lora_files.py) to
  <output>/trained; the export phase starts from that file and the base model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig

from dreambooth_contract.api import LORA_TEXT_ENCODER_TARGETS, LoraSpec, TrainingSpec

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
from . import lora_files


def lora_config(spec: LoraSpec, target_modules: list[str] | tuple[str, ...]) -> LoraConfig:
    """peft's config for one component's adapter. Gaussian init for A and zeros for B (as
    diffusers' script): the adapted model starts exactly as the base."""
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.effective_alpha,
        lora_dropout=spec.dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )


def split_pipeline(
    pipeline: StableDiffusionPipeline, training: TrainingSpec, device: torch.device
) -> tuple[DreamBoothModel, FrozenParts]:
    """Frozen base (UNet, text encoder, VAE) in the training dtype on `device`; fp32 adapters
    on the UNet (and the text encoder: both of SDXL's) as the trainable module."""
    spec = training.lora
    dtype = frozen_dtype(training.mixed_precision)
    unet, text_encoder, vae = pipeline.unet, text_encoder_of(pipeline), pipeline.vae
    use_torch_sdpa(unet, vae)
    for module in (unet, text_encoder):
        freeze(module, device, dtype)
    freeze(vae, device, vae_dtype(pipeline, dtype))
    adapted = [unet]
    unet.add_adapter(lora_config(spec, spec.target_modules))
    if training.train_text_encoder:
        text_encoder.add_adapter(lora_config(spec, LORA_TEXT_ENCODER_TARGETS))
        adapted.append(text_encoder)
    for module in adapted:
        module.train()  # adapter dropout; the frozen base has none that trains
    # peft creates adapter weights in their base layer's dtype; train them in fp32.
    cast_training_params(adapted, dtype=torch.float32)
    return trained_model(unet, text_encoder, training), frozen_parts(pipeline)


def save_trained(model: DreamBoothModel, directory: Path) -> None:
    """The adapter (diffusers' LoRA file): what the export phase starts from."""
    directory.mkdir(parents=True, exist_ok=True)
    encoders = model.text_encoder
    if hasattr(encoders, "text_encoder_2"):  # SDXL's two, trained as one module
        lora_files.save_adapter(
            model.unet, encoders.text_encoder, directory, encoders.text_encoder_2
        )
    else:
        lora_files.save_adapter(model.unet, encoders, directory)


def has_trained_weights(directory: Path) -> bool:
    return lora_files.has_adapter(directory)
