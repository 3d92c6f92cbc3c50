"""Training methods: what of the model trains, what a checkpoint holds, what is exported.

`full` fine-tunes the UNet (and the text encoder, with trainTextEncoder); `lora` trains low-rank
adapters on a frozen base. Each module has the same shape (`split_pipeline`, `save_trained`,
`has_trained_weights`), and `method_for` is the one place that picks it from
`training.method`. A method works on any model family's components
(`dreambooth_trainer.models`): LoRA on SDXL is the two combined, not a third code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from diffusers import StableDiffusionPipeline

from dreambooth_contract.api import TrainingSpec

from ..models.components import DreamBoothModel, FrozenParts


class TrainingMethod(Protocol):
    """What a methods/ module provides (the modules themselves satisfy it)."""

    def split_pipeline(
        self, pipeline: StableDiffusionPipeline, training: TrainingSpec, device: torch.device
    ) -> tuple[DreamBoothModel, FrozenParts]: ...

    def save_trained(self, model: DreamBoothModel, directory: Path) -> None: ...

    def has_trained_weights(self, directory: Path) -> bool: ...


def method_for(training: TrainingSpec) -> TrainingMethod:
    """The module implementing `training.method`."""
    from . import full, lora  # imported on use: lora pulls in peft

    return {"full": full, "lora": lora}[training.method]
