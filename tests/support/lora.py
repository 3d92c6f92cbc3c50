"""A LoRA adapter that changes the image, written the way training writes one (lora_files).

peft initialises lora_B to zero, which makes a fresh adapter a no-op: its up-projections get
random values here so that applying it (or failing to) shows in every image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

from dreambooth_contract.api import DEFAULT_LORA_UNET_TARGETS, LORA_TEXT_ENCODER_TARGETS
from dreambooth_trainer.methods.lora_files import save_adapter

RANK = 4
# alpha != rank: a reader that takes the rank for alpha (scale 1) gets other images.
ALPHA = 8


def add_random_adapter(
    pipeline: StableDiffusionPipeline, text_encoder: bool = True, seed: int = 1
) -> None:
    """Give the pipeline's UNet (and text encoder) an adapter with non-zero weights."""
    config = {"r": RANK, "lora_alpha": ALPHA, "init_lora_weights": "gaussian"}
    pipeline.unet.add_adapter(LoraConfig(**config, target_modules=list(DEFAULT_LORA_UNET_TARGETS)))
    modules = [pipeline.unet]
    if text_encoder:
        pipeline.text_encoder.add_adapter(
            LoraConfig(**config, target_modules=list(LORA_TEXT_ENCODER_TARGETS))
        )
        modules.append(pipeline.text_encoder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def write_random_adapter(
    base: StableDiffusionPipeline, directory: Path, text_encoder: bool = True, seed: int = 1
) -> Path:
    """An adapter for `base` (which gets it added), saved into `directory` as training does;
    adapters of different seeds give different images."""
    add_random_adapter(base, text_encoder, seed)
    directory.mkdir(parents=True, exist_ok=True)
    return save_adapter(base.unet, base.text_encoder if text_encoder else None, directory)
