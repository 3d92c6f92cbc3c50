"""One process, one device: the reference backend, and the base of DDP and FSDP2.

The loss scaler, backward, clipping, optimizer and learning-rate steps live here once; the
subclasses change how the model is wrapped (`wrap`), how its gradients are reduced and its state
is saved. What involves other ranks (the process group, the mean over ranks) does nothing in a
lone process, so the same code serves the subclasses.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import (
    BackendOptions,
    OptimizerFactory,
    SchedulerFactory,
    World,
    apply_update,
    mixed_precision_autocast,
    unscale_and_clip,
)
from .collectives import mean_over_ranks
from .trainable import load_trainable_state, trainable_state

STATE_FILE = "state.pt"


class SingleProcessBackend:
    def __init__(self, world: World, options: BackendOptions):
        self.world = world
        self.options = options
        self.device = world.device
        world.init_process_group()  # a lone process has none to join
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        # (torch scales on the CPU too: pointless for real work, but the fp16 path is tested.)
        fp16 = options.mixed_precision == "fp16"
        self.scaler = self.make_scaler() if fp16 else None
        self.model: nn.Module | None = None
        self.trainable: list[nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def make_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type)

    def prepare(
        self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory
    ) -> nn.Module:
        self.model = self.wrap(model.to(self.device))
        # Listed once: walking the modules for them on every step costs the host about as much
        # as the clipping itself (1.4 ms for SD1.5's UNet on one Xeon core).
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.trainable)
        self.lr_scheduler = make_scheduler(self.optimizer)
        return self.model

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train, on the device: the model itself here."""
        return model

    def unwrap(self) -> nn.Module:
        return self.model

    def autocast(self) -> AbstractContextManager[Any]:
        return mixed_precision_autocast(self.device, self.options.autocast_dtype)

    def accumulate(self, sync: bool) -> AbstractContextManager[Any]:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        steps = self.options.gradient_accumulation_steps
        if steps > 1:  # a division by one would still cost an op forward and one backward
            loss = loss / steps
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> float:
        grad_norm = self.clip_gradients()
        apply_update(self.optimizer, self.lr_scheduler, self.scaler)
        return float(grad_norm)

    def clip_gradients(self) -> torch.Tensor:
        """Undo fp16 loss scaling and clip; the pre-clip gradient norm."""
        max_norm = self.options.max_grad_norm
        return unscale_and_clip(self.trainable, self.optimizer, self.scaler, max_norm)

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return mean_over_ranks(value, self.world, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": trainable_state(self.unwrap()),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_trainable_state(self.unwrap(), state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    # Every rank holds the same state, so rank 0 alone writes it and every rank reads it.

    def save_to_dir(self, directory: Path) -> None:
        if self.world.is_main:
            Path(directory).mkdir(parents=True, exist_ok=True)
            torch.save(self.state_dict(), Path(directory, STATE_FILE))

    def load_from_dir(self, directory: Path) -> None:
        state = torch.load(Path(directory, STATE_FILE), map_location=self.device, weights_only=True)
        self.load_state_dict(state)

    def needs_file(self, path: str) -> bool:
        return path == STATE_FILE

    def close(self) -> None:
        self.world.leave_process_group()
