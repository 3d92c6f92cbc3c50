"""Parallelism backends behind one protocol (`base.Backend`); pick one with `create_backend`."""

from __future__ import annotations

import importlib
from enum import Enum

from dreambooth_contract.api import DEFAULT_ZERO_STAGE

from .base import Backend, BackendOptions, World
from .single import SingleProcessBackend

# backend name (api.ShardingBackend) -> "module:class", imported on use: DeepSpeed is a heavy
# import that DDP and FSDP runs need not pay.
DISTRIBUTED_BACKENDS = {
    "deepspeed": "dreambooth_trainer.parallel.deepspeed:DeepSpeedBackend",
    "ddp": "dreambooth_trainer.parallel.ddp:DDPBackend",
    "fsdp": "dreambooth_trainer.parallel.fsdp:FSDPBackend",
}


def create_backend(
    name: str | Enum,
    world: World,
    options: BackendOptions,
    zero_stage: int | None = None,
) -> Backend:
    """The backend for `name` (training.sharding.backend; `zero_stage` for deepspeed).

    A single process needs no parallelism whatever the name.
    """
    name = name.value if isinstance(name, Enum) else name
    if name not in DISTRIBUTED_BACKENDS:
        raise ValueError(
            f"unknown sharding backend {name!r}; known: {sorted(DISTRIBUTED_BACKENDS)}"
        )
    if not world.distributed:
        return SingleProcessBackend(world, options)
    module_name, class_name = DISTRIBUTED_BACKENDS[name].split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    if name == "deepspeed":
        return backend_class(world, options, zero_stage=zero_stage or DEFAULT_ZERO_STAGE)
    return backend_class(world, options)


__all__ = ["Backend", "BackendOptions", "World", "create_backend"]
