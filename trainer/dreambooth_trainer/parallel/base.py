"""What the training loop needs from a parallelism backend, and the process's place in the world.

The loop is written against `Backend` only: single process, DDP, DeepSpeed ZeRO and FSDP2 differ
in how they wrap the model, build the optimizer over (possibly sharded) parameters, reduce
gradients, clip, step and save state; the loop does not care which one runs.

Per optimizer step the loop does::

    for micro_step in range(accumulation):
        with backend.accumulate(sync=last), backend.autocast():
            loss = compute(model(...))
        backend.backward(loss)      # the backend divides by the accumulation steps (or DS does)
    grad_norm = backend.step()      # clip, optimizer step, LR step, zero grads

Checkpoints go through files: every rank calls ``save_to_dir`` with a directory of its own (no
shared filesystem needed); what all ranks wrote together is one checkpoint. To load, each rank
gathers the files it ``needs_file`` into a directory and calls ``load_from_dir``. Sharded
backends write one shard per rank; replicated ones write from rank 0 only.

Collective calls (every rank must make them, in the same order): ``prepare``, ``unwrap``,
``all_reduce_mean``, ``save_to_dir``, ``load_from_dir``, and for sharded backends ``state_dict``
and ``load_state_dict``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dreambooth_contract.api import MixedPrecision

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


@dataclass(frozen=True)
class World:
    """This process's rank among all training processes (torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # A lone process normally runs without a process group or a parallel backend; set this to
    # run the configured backend anyway (benchmarks of ZeRO or FSDP on a single GPU).
    alone_with_backend: bool = False

    @classmethod
    def from_env(cls) -> World:
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.alone_with_backend

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def init_process_group(self) -> None:
        """Join torchrun's rendezvous (MASTER_ADDR/PORT from the env): nccl on GPU, gloo on CPU."""
        import torch.distributed as dist

        if not self.distributed or dist.is_initialized():
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            "nccl" if self.device.type == "cuda" else "gloo",
            rank=self.rank,
            world_size=self.world_size,
        )

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.distributed and dist.is_initialized():
            dist.barrier()

    def leave_process_group(self) -> None:
        """End what `init_process_group` joined (backends call it from `close`)."""
        import torch.distributed as dist

        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class BackendOptions:
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: MixedPrecision = "no"
    micro_batch_size: int = 1  # per rank and micro-step (DeepSpeed counts samples with it)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.mixed_precision)


def mixed_precision_autocast(
    device: torch.device, dtype: torch.dtype | None
) -> AbstractContextManager[Any]:
    """torch.autocast in `dtype` on `device`, or nothing for full precision."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class Backend(Protocol):
    world: World
    options: BackendOptions

    def prepare(
        self,
        model: nn.Module,
        make_optimizer: OptimizerFactory,
        make_scheduler: SchedulerFactory,
    ) -> nn.Module:
        """Wrap `model`, then build optimizer and LR scheduler over the wrapped parameters
        (FSDP2 and ZeRO-3 shard them first); return the module to call forward on."""
        ...

    def unwrap(self) -> nn.Module:
        """The plain module (for validation samples and export); full weights on rank 0."""
        ...

    def autocast(self) -> AbstractContextManager[Any]: ...

    def accumulate(self, sync: bool) -> AbstractContextManager[Any]:
        """Around forward and backward of a micro-step; sync=False skips gradient reduction."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> float:
        """Clip, step optimizer and LR scheduler, zero gradients; the pre-clip gradient norm."""
        ...

    @property
    def learning_rate(self) -> float: ...

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks, for logging (not for gradients)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, LR scheduler and loss-scaler state, for checkpoints."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_to_dir(self, directory: Path) -> None:
        """This rank's part of `state_dict()` as files under `directory` (paths never collide
        with other ranks' files)."""
        ...

    def load_from_dir(self, directory: Path) -> None:
        """Load what all ranks saved; `directory` holds the files `needs_file` selected."""
        ...

    def needs_file(self, path: str) -> bool:
        """Whether this rank reads `path` (relative to the save directory) in `load_from_dir`."""
        ...

    def close(self) -> None: ...


def unscale_and_clip(
    parameters: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    max_grad_norm: float | None,
) -> torch.Tensor:
    """Undo fp16 loss scaling, clip the gradients of `parameters` (the trainable ones); the
    pre-clip norm (a DTensor under FSDP2: clip_grad_norm_ handles sharded gradients itself)."""
    if scaler:
        scaler.unscale_(optimizer)
    return torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm or float("inf"))


def apply_update(
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """Optimizer step (through the fp16 loss scaler when there is one), LR step, zero grads.

    A step the scaler skips (inf/NaN gradients: it lowers the scale) does not advance the
    learning-rate schedule either, as accelerate (diffusers' script) does not.
    """
    skipped = False
    if scaler:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale
    else:
        optimizer.step()
    if not skipped:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
