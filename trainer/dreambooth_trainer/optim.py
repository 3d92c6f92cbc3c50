"""Optimizer and learning-rate schedule, as factories: backends build them after wrapping
the model (FSDP2 and ZeRO-3 shard the parameters first)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler
from torch import nn

from dreambooth_contract.api import TrainingSpec

from .parallel.base import OptimizerFactory, SchedulerFactory
from .speedups import adamw_options

# diffusers' train_dreambooth.py defaults.
ADAM_BETAS = (0.9, 0.999)
WEIGHT_DECAY = 1e-2
ADAM_EPSILON = 1e-8


def optimizer_factory(training: TrainingSpec, fused: bool = False) -> OptimizerFactory:
    """AdamW (bitsandbytes' 8-bit one with use8bitAdam); `fused`: torch's one-kernel update,
    where the parameters allow it (speedups.adamw_options)."""

    def make(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        parameters = list(parameters)
        if training.use_8bit_adam:
            optimizer_class, options = adamw_8bit(), {}
        else:
            optimizer_class, options = torch.optim.AdamW, adamw_options(parameters, fused)
        return optimizer_class(
            parameters,
            lr=training.effective_learning_rate,
            betas=ADAM_BETAS,
            weight_decay=WEIGHT_DECAY,
            eps=ADAM_EPSILON,
            **options,
        )

    return make


def adamw_8bit() -> type[torch.optim.Optimizer]:
    """bitsandbytes' AdamW8bit: optimizer state in 8 bits, a quarter of AdamW's memory.

    Imported only when asked for: loading it probes for GPU kernels and logs about them.
    """
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit


def scheduler_factory(training: TrainingSpec) -> SchedulerFactory:
    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        # Stepped once per optimizer step, so steps count optimizer steps (not micro-batches).
        return get_scheduler(
            training.lr_scheduler,
            optimizer,
            num_warmup_steps=training.lr_warmup_steps,
            num_training_steps=training.max_steps,
        )

    return make
