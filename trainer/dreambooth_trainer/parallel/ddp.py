"""DistributedDataParallel: every rank holds the full model, gradients are all-reduced."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .single import SingleProcessBackend


class DDPBackend(SingleProcessBackend):
    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def unwrap(self) -> nn.Module:
        return self.model.module

    def accumulate(self, sync: bool) -> AbstractContextManager[Any]:
        # Reducing gradients on every micro-step would waste all but the last all-reduce.
        return nullcontext() if sync else self.model.no_sync()
