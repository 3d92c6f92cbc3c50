"""A LoRA adapter that changes the image, written the way training writes one (lora_files),
exported the way the export phase does and published the way the operator does.

peft initialises lora_B to zero, which makes a fresh adapter a no-op: its up-projections get
random values here so that applying it (or failing to) shows in every image.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig

from dreambooth_contract import publication
from dreambooth_contract.api import (
    DEFAULT_LORA_UNET_TARGETS,
    LORA_TEXT_ENCODER_TARGETS,
    BaseModelSpec,
)
from dreambooth_contract.publication import Publications, PublishedModel
from dreambooth_trainer import digest
from dreambooth_trainer.export import export_adapter
from dreambooth_trainer.methods.lora_files import save_adapter
from dreambooth_trainer.models import base_identity

RANK = 4
# alpha != rank: a reader that takes the rank for alpha (scale 1) gets other images.
ALPHA = 8


def text_encoders(pipeline: DiffusionPipeline) -> list[torch.nn.Module]:
    """The pipeline's text encoders: one for SD, two for SDXL."""
    second = getattr(pipeline, "text_encoder_2", None)
    return [pipeline.text_encoder] + ([second] if second is not None else [])


def add_random_adapter(
    pipeline: DiffusionPipeline,
    text_encoder: bool = True,
    seed: int = 1,
    strength: float = 0.5,
    unet_targets: tuple[str, ...] = DEFAULT_LORA_UNET_TARGETS,
) -> None:
    """Give the pipeline's UNet (and text encoders) an adapter with non-zero weights: lora_B
    drawn with standard deviation `strength`. At 0.5 the tiny random base is driven far from
    its weights and amplifies float rounding: a batch's other summation order (~1e-6) moves its
    latents by up to a few percent; at 0.2 by ~1e-5, while adapters still differ visibly."""
    config = {"r": RANK, "lora_alpha": ALPHA, "init_lora_weights": "gaussian"}
    pipeline.unet.add_adapter(LoraConfig(**config, target_modules=list(unet_targets)))
    modules = [pipeline.unet]
    if text_encoder:
        for encoder in text_encoders(pipeline):
            encoder.add_adapter(
                LoraConfig(**config, target_modules=list(LORA_TEXT_ENCODER_TARGETS))
            )
            modules.append(encoder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * strength)


def write_random_adapter(
    base: DiffusionPipeline,
    directory: Path,
    text_encoder: bool = True,
    seed: int = 1,
    strength: float = 0.5,
    unet_targets: tuple[str, ...] = DEFAULT_LORA_UNET_TARGETS,
) -> Path:
    """An adapter for `base` (which gets it added), saved into `directory` as training does;
    adapters of different seeds give different images."""
    add_random_adapter(base, text_encoder, seed, strength, unet_targets)
    directory.mkdir(parents=True, exist_ok=True)
    encoders = text_encoders(base) if text_encoder else [None]
    return save_adapter(base.unet, encoders[0], directory, *encoders[1:])


def export_for(
    base_dir: Path,
    directory: Path,
    seed: int = 1,
    strength: float = 0.5,
    unet_targets: tuple[str, ...] = DEFAULT_LORA_UNET_TARGETS,
) -> Path:
    """A LoRA export for the base in `base_dir` (SD or SDXL), as the export phase writes it
    (manifest, base_model.json); adapters of different seeds give different images."""
    write_random_adapter(
        DiffusionPipeline.from_pretrained(base_dir),
        directory / "trained",
        seed=seed,
        strength=strength,
        unet_targets=unet_targets,
    )
    record = base_identity.base_model_record(BaseModelSpec(uri=str(base_dir)), str(base_dir))
    export = directory / "export"
    export_adapter(
        DiffusionPipeline.from_pretrained(base_dir), directory / "trained", export, record
    )
    return export


def publish(directory: Path, models: dict[str, Path], digests: dict[str, str] | None = None):
    """Write the index as the operator will: name -> export (and its manifest's digest)."""
    digests = digests or {}
    index = Publications(
        models=tuple(
            PublishedModel(name=name, uri=str(path), digest=digests.get(name) or digest_of(path))
            for name, path in models.items()
        )
    )
    # Like kubelet: a new file swapped in (a new inode), never a half-written one.
    staged = directory / ".staged"
    staged.write_text(publication.render(index))
    staged.replace(directory / publication.PUBLICATIONS_FILE)


def digest_of(export: Path) -> str:
    return digest.verify(export)
