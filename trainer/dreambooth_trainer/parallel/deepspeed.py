"""DeepSpeed ZeRO: stage 2 shards optimizer state and gradients, stage 3 the parameters too.

The engine owns what DeepSpeed does best: mixed precision with fp32 master weights (fp16 with
dynamic loss scaling on GPUs, bf16 on CPUs), gradient accumulation (it divides the loss, counts
micro-steps and reduces gradients at the boundary) and clipping. The config is built here from
`BackendOptions`; nothing reads a JSON file.

State lives in files: `save_to_dir` is the engine's `save_checkpoint`, which writes one optimizer
(and, under ZeRO-3, parameter) shard per rank plus, on rank 0, the module/scheduler file; every
rank writes into a directory of its own, so no shared filesystem is needed. `needs_file` tells a
rank which of a checkpoint's files it must download before `load_from_dir`.

`load_from_dir` is the engine's `load_checkpoint`, which unpickles (torch.load with
weights_only=False: optimizer states hold Python objects): it runs whatever code the files ask
for. Only hand it files checkpoint_manager.py verified against the job's trust anchor.
"""

from __future__ import annotations

import logging
import re
import tempfile
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
from torch import nn

from dreambooth_contract.api import DEFAULT_ZERO_STAGE, ZeroStage

from .base import (
    BackendOptions,
    OptimizerFactory,
    SchedulerFactory,
    World,
    mixed_precision_autocast,
)
from .collectives import broadcast_from_main, mean_over_ranks
from .full_weights import FullWeights
from .trainable import load_trainable_state

log = logging.getLogger(__name__)

# The engine's checkpoint tag: the directory below the save dir. One fixed name, because the
# checkpoint module, not DeepSpeed, decides which step a directory holds.
TAG = "zero"
# Files of one rank's shards are named "..zero_pp_rank_<rank>_mp_rank_00_..". Anything else
# (module states under ZeRO-2, DeepSpeed's recovery scripts) is read by every rank.
RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")
# fp16 dynamic loss scaling: start at 2**16, halve on overflow, double after 1000 clean steps.
FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1}  # fmt: skip
NEVER = 2**31 - 1
DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is"


def deepspeed_config(
    options: BackendOptions, zero_stage: ZeroStage, on_gpu: bool
) -> dict[str, Any]:
    """The engine's configuration for these options."""
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "contiguous_gradients": True,
        # Overlapping reduction with backward needs a side stream; CPUs have none.
        "overlap_comm": on_gpu,
    }
    if zero_stage == 3:
        # unwrap() consolidates fp32 master weights itself; no 16-bit copy on every save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        # The loop feeds batches itself; DeepSpeed uses this only to count samples.
        "train_micro_batch_size_per_gpu": options.micro_batch_size,
        "gradient_accumulation_steps": options.gradient_accumulation_steps,
        "gradient_clipping": options.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": options.mixed_precision == "bf16"},
        "fp16": {"enabled": options.mixed_precision == "fp16", **FP16_LOSS_SCALING},
        # 8-bit AdamW (bitsandbytes) is not on DeepSpeed's list but shards like any optimizer.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
    }


def rank_reads(path: str, rank: int) -> bool:
    """Whether `rank` reads the checkpoint file `path`: its own shards and the shared files."""
    match = RANK_FILE.search(path)
    return match is None or int(match.group(1)) == rank


class DeepSpeedBackend:
    def __init__(
        self, world: World, options: BackendOptions, zero_stage: ZeroStage = DEFAULT_ZERO_STAGE
    ):
        if zero_stage not in (2, 3):
            raise ValueError(f"ZeRO stage must be 2 or 3, not {zero_stage}")
        self.world = world
        self.options = options
        self.zero_stage = zero_stage
        self.device = world.device
        if options.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 mixed precision needs a GPU; use bf16 or no on the CPU")
        world.init_process_group()
        deepspeed.init_distributed(dist_backend=dist.get_backend())  # adopts the process group
        # DeepSpeed logs every engine detail at INFO; its warnings still come through.
        deepspeed.utils.logger.setLevel(logging.WARNING)
        # ...and calls collectives torch deprecated, a FutureWarning on every ZeRO-3 step.
        warnings.filterwarnings("ignore", message=DEPRECATED_COLLECTIVES, category=FutureWarning)
        self.engine: deepspeed.DeepSpeedEngine | None = None
        self.lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.full_weights: FullWeights | None = None
        self._sync: bool | None = None  # what the loop said about the current micro-step

    def prepare(
        self, model: nn.Module, make_optimizer: OptimizerFactory, make_scheduler: SchedulerFactory
    ) -> nn.Module:
        model = model.to(self.device)
        self.full_weights = FullWeights(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # The engine casts the module to 16 bits before it creates the fp32 master weights from
        # it; keep the exact fp32 values to put back afterwards.
        exact = self._host_copy(model) if self.options.autocast_dtype is not None else {}
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model,
            optimizer=make_optimizer(trainable),
            lr_scheduler=make_scheduler,  # called with the optimizer the engine wraps
            config=deepspeed_config(self.options, self.zero_stage, self.device.type == "cuda"),
            dist_init_required=False,
        )
        for name, param in self.engine.module.named_parameters():
            if name in exact:
                safe_set_full_fp32_param(param, exact[name].to(self.device))
        return self.engine

    @staticmethod
    def _host_copy(model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def unwrap(self) -> nn.Module:
        """Collective: every rank must call it. Rank 0 gets full fp32 (master) weights."""
        module = self.engine.module
        full = {
            name: safe_get_full_fp32_param(param)  # all-gathers the shards
            for name, param in module.named_parameters()
            if param.requires_grad
        }
        return self.full_weights.load(full if self.world.is_main else None, module)

    def autocast(self) -> AbstractContextManager[Any]:
        # The engine holds 16-bit weights; autocast runs the float32 inputs (latents, frozen
        # embeddings) in the same precision and keeps precision-sensitive ops in float32.
        return mixed_precision_autocast(self.device, self.options.autocast_dtype)

    def accumulate(self, sync: bool) -> AbstractContextManager[Any]:
        # ZeRO reduces (and partitions) gradients on every backward; there is no no_sync. The
        # engine counts micro-steps itself: backward() checks that it agrees with the loop.
        self._sync = sync
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        if self._sync is not None and self._sync != boundary:
            raise RuntimeError("the loop and DeepSpeed disagree on the accumulation boundary")
        self.engine.backward(loss)  # scales by 1/accumulation (and the fp16 loss scale)
        if not boundary:
            self.engine.step()  # only counts the micro-step

    def step(self) -> float:
        """Clip, step optimizer and scheduler (the engine does all; it skips fp16 overflows)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return mean_over_ranks(value, self.world, self.device)

    # -- state -------------------------------------------------------------------------------------

    def save_to_dir(self, directory: Path | str) -> None:
        """Collective. This rank's shards (and on rank 0 the module/scheduler file)."""
        # Trainable state only (parallel/trainable.py): no frozen base weights.
        self.engine.save_checkpoint(
            str(directory), tag=TAG, save_latest=False, exclude_frozen_parameters=True
        )

    def load_from_dir(self, directory: Path | str) -> None:
        """Collective. `directory` must hold the files `needs_file` selects for this rank, and
        only verified ones: this unpickles them (module docstring)."""
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=TAG, custom_load_fn=_load_module_state
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")

    def needs_file(self, path: str) -> bool:
        """Whether this rank reads `path` (relative to the save directory) when loading."""
        return rank_reads(path, self.world.rank)

    def state_dict(self) -> dict[str, Any]:
        """Collective. This rank's checkpoint files as bytes, including the shared ones."""
        with tempfile.TemporaryDirectory(prefix="zero-state-") as tmp:
            self.save_to_dir(tmp)
            mine = _read_files(Path(tmp))
        shared = {k: v for k, v in mine.items() if RANK_FILE.search(k) is None}
        shared = broadcast_from_main(shared, self.world)  # only rank 0 wrote them
        return {"files": {**shared, **mine}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Collective. `state` is what `state_dict()` returned on this rank."""
        with tempfile.TemporaryDirectory(prefix="zero-state-") as tmp:
            for rel, data in state["files"].items():
                target = Path(tmp, rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            self.load_from_dir(tmp)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
        self.world.leave_process_group()


def _load_module_state(src: dict[str, Any], dst: nn.Module) -> None:
    """The engine's module state, saved without frozen parameters, into the module."""
    load_trainable_state(dst, src)


def _read_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
