"""Agreement between ranks: every collective the trainer makes outside the backends' own.

Each is collective (every rank calls it, in the same order) when the world is distributed, and
returns its input unchanged in a lone process, which has no process group.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .base import World

T = TypeVar("T")


def mean_over_ranks(value: torch.Tensor, world: World, device: torch.device) -> torch.Tensor:
    """Mean of `value` over all ranks, for logging; reduced on `device` (nccl needs the GPU)."""
    if not world.distributed:
        return value
    reduced = value.detach().to(device, copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return (reduced / world.world_size).to(value.device)


def any_rank(world: World, flag: bool) -> bool:
    return _reduce_flag(world, flag, dist.ReduceOp.MAX)


def all_ranks(world: World, flag: bool) -> bool:
    return _reduce_flag(world, flag, dist.ReduceOp.MIN)


def _reduce_flag(world: World, flag: bool, op: dist.ReduceOp) -> bool:
    if not world.distributed:
        return flag
    value = torch.tensor([int(flag)], device=world.device)  # nccl reduces GPU tensors only
    dist.all_reduce(value, op=op)
    return bool(value.item())


def broadcast_from_main(value: Any, world: World) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(items: list[T], world: World) -> list[list[T]]:
    """Every rank's `items` on rank 0, in rank order (others get an empty list)."""
    if not world.distributed:
        return [items]
    gathered: list[list[T]] | None = [[] for _ in range(world.world_size)]
    dist.gather_object(items, gathered if world.is_main else None, dst=0)
    return gathered if world.is_main else []
