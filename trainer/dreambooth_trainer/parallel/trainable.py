"""What a checkpoint holds of the model: its trainable state, never its frozen parameters.

Frozen parameters never change, so a resumed run gets them from the base model as the first
run did; saving them would only make checkpoints large (a LoRA adapter's checkpoint would carry
the whole base UNet). For full fine-tuning every parameter of the trained module trains, so the
rule changes nothing there. Buffers stay in (they may change in training).

Every backend applies this one rule in its own way: single process and DDP with the functions
here, DeepSpeed with `exclude_frozen_parameters`, FSDP2 with `ignore_frozen_params`. Loading is
strict about the trainable side: each trainable parameter must be in the checkpoint, and nothing
the model lacks may be.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from torch import nn


def frozen_parameter_names(module: nn.Module) -> set[str]:
    return {
        name
        for name, param in module.named_parameters(remove_duplicate=False)
        if not param.requires_grad
    }


def trainable_state(module: nn.Module) -> dict[str, Any]:
    """`module.state_dict()` without its frozen parameters."""
    frozen = frozen_parameter_names(module)
    return {name: value for name, value in module.state_dict().items() if name not in frozen}


def check_loaded_keys(
    module: nn.Module, missing: Collection[str], unexpected: Collection[str]
) -> None:
    """Raise unless a (non-strict) load missed only frozen parameters and found nothing more."""
    missing_trainable = set(missing) - frozen_parameter_names(module)
    if missing_trainable or unexpected:
        raise KeyError(
            "checkpoint does not match the trainable model: "
            f"missing {sorted(missing_trainable)}, unexpected {sorted(unexpected)}"
        )


def load_trainable_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    """Load what `trainable_state` returned (strict about everything but frozen parameters)."""
    result = module.load_state_dict(state, strict=False)
    check_loaded_keys(module, result.missing_keys, result.unexpected_keys)
