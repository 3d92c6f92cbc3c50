"""Parallelism backends behind one protocol (`base.Backend`); pick one with `create_backend`."""

from __future__ import annotations

import importlib
import logging

from .base import Backend, BackendOptions, World
from .single import SingleProcessBackend

log = logging.getLogger(__name__)

# backend name (api.ShardingBackend) -> "module:class", imported on use.
# DeepSpeed ZeRO and FSDP2 join here in the distributed-training issue.
DISTRIBUTED_BACKENDS = {"ddp": "dreambooth_trainer.parallel.ddp:DDPBackend"}
FALLBACK = "ddp"


def create_backend(name: str, world: World, options: BackendOptions) -> Backend:
    """The backend for `name`; a single process needs no parallelism whatever the name."""
    if not world.distributed:
        return SingleProcessBackend(world, options)
    if name not in DISTRIBUTED_BACKENDS:
        log.warning("backend %r is not available yet; using %s", name, FALLBACK)
        name = FALLBACK
    module_name, class_name = DISTRIBUTED_BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(world, options)


__all__ = ["Backend", "BackendOptions", "World", "create_backend"]
