"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded as DTensors.

Each block (UNet down/mid/up block, text-encoder layer) is its own FSDP unit, so only one
block's parameters are gathered at a time; the root unit holds what is left (embeddings, the
UNet's input and output convolutions). Mixed precision is FSDP's own: fp32 shards, compute in
the 16-bit type, gradients reduced in fp32.

State: `state_dict()` is the sharded (DTensor) model and optimizer state from
`torch.distributed.checkpoint.state_dict`; `save_to_dir` writes it with torch.distributed.checkpoint
(one file per rank plus metadata), which can also load into a different number of ranks.
Its `.metadata` file is a pickle that `load_from_dir` unpickles: only hand it files
checkpoint_manager.py verified against the job's trust anchor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor

from .base import BackendOptions, World
from .full_weights import FullWeights
from .single import SingleProcessBackend
from .trainable import check_loaded_keys

ShardUnit = Callable[[str, nn.Module], bool]
# diffusers' UNet blocks and transformers' encoder layers, by their qualified names.
BLOCK_NAME = re.compile(r"(^|\.)((down_blocks|up_blocks|layers)\.\d+|mid_block)$")
# Checkpoints hold trainable state only (parallel/trainable.py); a load leaves the frozen
# parameters as they are and check_loaded_keys is strict about the rest.
SAVE_TRAINABLE = StateDictOptions(ignore_frozen_params=True)
LOAD_TRAINABLE = StateDictOptions(ignore_frozen_params=True, strict=False)


def is_block(name: str, module: nn.Module) -> bool:
    """The default FSDP units: UNet down/mid/up blocks and (text-encoder) layers."""
    return bool(BLOCK_NAME.search(name))


def shard_units(model: nn.Module, is_unit: ShardUnit) -> Iterator[nn.Module]:
    """Submodules to shard on their own, innermost first (fully_shard goes bottom-up)."""
    for name, module in reversed(list(model.named_modules())):
        if name and is_unit(name, module):
            yield module


class FSDPBackend(SingleProcessBackend):
    """The single-process loss scaling, backward and step over sharded parameters and
    gradients; the model is sharded by `wrap`, its state saved with torch.distributed.checkpoint."""

    def __init__(self, world: World, options: BackendOptions, is_unit: ShardUnit = is_block):
        self.is_unit = is_unit
        super().__init__(world, options)
        self.mesh = init_device_mesh(self.device.type, (world.world_size,))
        self.full_weights: FullWeights | None = None

    def make_scaler(self) -> torch.amp.GradScaler:
        # With sharded gradients no rank sees them all: this scaler agrees on overflows.
        return ShardedGradScaler(device=self.device.type)

    def wrap(self, model: nn.Module) -> nn.Module:
        self.full_weights = FullWeights(model)
        dtype = self.options.autocast_dtype
        policy = MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None
        )
        for unit in shard_units(model, self.is_unit):
            fully_shard(unit, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        return model

    def unwrap(self) -> nn.Module:
        """Collective: every rank must call it. Rank 0 gets the full fp32 weights."""
        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
        )
        full = get_model_state_dict(self.model, options=options)  # only rank 0 gets tensors
        if not self.world.is_main:
            return self.full_weights.load(None, self.model)
        # Buffers come along too; FullWeights takes them from the live model.
        trainable = {name: full[name].to(self.device) for name in self.full_weights.trainable}
        return self.full_weights.load(trainable, self.model)

    def autocast(self) -> AbstractContextManager[Any]:
        # The mixed-precision policy casts parameters and forward inputs; no autocast needed.
        return nullcontext()

    def accumulate(self, sync: bool) -> AbstractContextManager[Any]:
        # Without sync, gradients accumulate unreduced; the last micro-step reduce-scatters.
        self.model.set_requires_gradient_sync(sync)
        return nullcontext()

    def clip_gradients(self) -> torch.Tensor:
        norm = super().clip_gradients()  # a DTensor: clip_grad_norm_ handles sharded gradients
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's shards of model and optimizer state, and the scheduler (and scaler)."""
        model, optimizer = get_state_dict(self.model, self.optimizer, options=SAVE_TRAINABLE)
        state = {
            "model": model,
            "optimizer": optimizer,
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }
        if self.scaler:
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loaded = set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            options=LOAD_TRAINABLE,
        )
        check_loaded_keys(self.model, loaded.missing_keys, loaded.unexpected_keys)
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    def save_to_dir(self, directory: Path | str) -> None:
        """Collective. This rank's shards; rank 0 also writes the metadata file."""
        dcp.save(self.state_dict(), checkpoint_id=str(directory))

    def load_from_dir(self, directory: Path | str) -> None:
        """Collective. `directory` must hold every file of the checkpoint (see `needs_file`)."""
        state = self.state_dict()  # the structure to load into, shards placed like ours
        dcp.load(state, checkpoint_id=str(directory))
        self.load_state_dict(state)

    def needs_file(self, path: str) -> bool:
        # The planner may store an item every rank holds (scheduler, step counts) in any
        # rank's file, so a loading rank may read from all of them.
        return True
