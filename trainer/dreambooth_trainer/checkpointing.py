"""Training checkpoints: the full state every `checkpointing.interval` steps and on SIGTERM, and
automatic resume from the newest committed checkpoint.

One checkpoint under ``<outputUri>/checkpoints`` (commit protocol: checkpoint.py)::

    checkpoint-00000100/
      trainer/rank-00000.pt   per rank: step, data position, RNG and generator states
      backend/...             the backend's files: weights, optimizer (shards), LR scheduler,
                              loss scaler
      manifest.json           written last, by rank 0, after every rank has uploaded

Every rank stages its files in a local directory of its own and uploads them itself (no shared
filesystem needed); rank 0 gathers the file entries and commits.

Resume: rank 0 picks the newest checkpoint whose manifest and file sizes check out and
broadcasts its step; every rank downloads the files it needs, hash-checked. If any rank found a
file broken, all ranks agree to fall back to the checkpoint before it.

A checkpoint records what determined its weights (the config's parts, world size, backend):
a run whose parts differ refuses to resume it, as bad input naming storage.outputUri, rather
than continue (or, past maxSteps, export) weights trained for another spec.

Preemption: SIGTERM (what Kubernetes and torchrun send) only sets a flag. After the step in
progress the ranks agree on it (one tiny all-reduce per step), save and commit a checkpoint and
stop; `dreambooth train` then exits with 143. Kubernetes' grace period, and torchrun's
``--shutdown-timeout``, must leave time for one save.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from . import checkpoint
from .callbacks import Callback, StepMetrics
from .checkpoint import CheckpointInfo, CheckpointInvalid, FileEntry
from .config import ConfigError
from .parallel import World
from .storage import Store

if TYPE_CHECKING:
    from .train import Trainer

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # inside the output location
COMPARED = ("worldSize", "backend")  # besides the identity, what a resumed run must match


class StopSignal:
    """Remembers SIGTERM instead of dying of it: the loop stops at the next step boundary."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM will not trigger a checkpoint")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        log.warning("%s: saving a checkpoint after this step, then stopping", self.received.name)


class Checkpointing(Callback):
    """Saves every `interval` steps and on SIGTERM; resumes at train start. On every rank."""

    def __init__(
        self,
        store: Store,
        staging: Path,
        interval: int,
        keep: int,
        root: str = CHECKPOINTS_DIR,
        metadata: dict[str, Any] | None = None,
        identity: dict[str, Any] | None = None,
    ):
        self.store = store
        self.identity = dict(identity or {})  # what a resumed run must match (see describe)
        self.staging = staging  # local, this process's: per-rank subdirectories below
        self.interval = interval
        self.keep = keep
        self.root = root
        self.metadata = dict(metadata or {})
        self.stop_signal = StopSignal()

    # -- hooks -------------------------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer) -> None:
        self.stop_signal.install()
        self.resume(trainer)

    def on_step_end(self, trainer: Trainer, metrics: StepMetrics) -> None:
        stopping = any_rank(trainer.world, self.stop_signal.received is not None)
        if stopping or trainer.step % self.interval == 0:
            self.save(trainer)
        if stopping:
            trainer.request_stop("SIGTERM")

    def on_train_end(self, trainer: Trainer) -> None:
        self.stop_signal.uninstall()

    # -- saving ------------------------------------------------------------------------------------

    def save(self, trainer: Trainer) -> CheckpointInfo | None:
        """Collective. Save, upload, commit (rank 0) and apply retention; rank 0 gets the info."""
        world, step = trainer.world, trainer.step
        started = time.perf_counter()
        local = self._empty_dir(f"save-rank-{world.rank:05d}")
        trainer.save_state(local)
        if world.is_main:
            checkpoint.begin(self.store, self.root, step)  # drop debris of an earlier attempt
        world.barrier()  # nobody uploads into the directory begin() is clearing
        entries = checkpoint.upload(self.store, self.root, step, local)
        everyone = gather_to_main(entries, world)
        info = None
        if world.is_main:
            files = [entry for rank_entries in everyone for entry in rank_entries]
            metadata = {**self.metadata, **self.describe(trainer)}
            info = checkpoint.commit(self.store, self.root, step, files, metadata)
            checkpoint.apply_retention(self.store, self.root, self.keep)
        # No rank runs ahead (or exits, after SIGTERM) before the commit: torchrun would stop
        # rank 0 mid-commit as soon as any rank is gone.
        world.barrier()
        shutil.rmtree(local, ignore_errors=True)
        if info is not None:
            seconds = time.perf_counter() - started
            log.info("checkpoint at step %d: %s (%.1fs)", step, info.uri, seconds)
            for callback in trainer.callbacks:
                callback.on_checkpoint(trainer, info, seconds)
        return info

    def describe(self, trainer: Trainer) -> dict[str, Any]:
        """What a resuming run must match: the weights' parts (`identity`) and, since resharding
        to other world sizes is not supported, world size and backend."""
        return {
            "identity": self.identity,
            "worldSize": trainer.world.world_size,
            "backend": type(trainer.backend).__name__,
            "microStep": trainer.micro_step,
        }

    # -- resuming ----------------------------------------------------------------------------------

    def resume(self, trainer: Trainer) -> CheckpointInfo | None:
        """Collective. Load the newest checkpoint every rank could restore; None if none."""
        world = trainer.world
        below = None
        while (step := self._newest_step(world, below)) is not None:
            local = self.staging / f"restore-rank-{world.rank:05d}"
            info = self._download(trainer, step, local)
            if all_ranks(world, info is not None):
                self._check_compatible(info, trainer)
                trainer.load_state(local)
                shutil.rmtree(local, ignore_errors=True)
                log.info("resumed from %s at step %d", info.uri, trainer.step)
                return info
            below = step  # some rank found it broken: everyone takes the previous one
        log.info("no committed checkpoint in %s: training from step 0", self._uri())
        return None

    def _newest_step(self, world: World, below: int | None) -> int | None:
        """Rank 0 lists and verifies (manifest, sizes); every rank gets its answer."""
        step = None
        if world.is_main:
            info = checkpoint.latest_valid(self.store, self.root, level="size", below=below)
            step = info.step if info else None
        return broadcast_from_main(step, world)

    def _download(self, trainer: Trainer, step: int, local: Path) -> CheckpointInfo | None:
        try:
            return checkpoint.restore(
                self.store, self.root, local, step=step, select=trainer.needs_file
            )
        except CheckpointInvalid as exc:
            log.warning("skipping %s", exc)
            return None

    def _check_compatible(self, info: CheckpointInfo, trainer: Trainer) -> None:
        def matched(metadata: dict[str, Any]) -> dict[str, Any]:
            # Checkpoints of older trainers have no identity: world size and backend only.
            return {**metadata.get("identity", {}), **{k: metadata.get(k) for k in COMPARED}}

        saved, ours = matched(info.metadata), matched(self.describe(trainer))
        differs = [part for part in ours if part in saved and saved[part] != ours[part]]
        if differs:
            raise ConfigError(
                "storage.outputUri",
                f"{info.uri} was written by job {info.metadata.get('job', '?')} with another "
                f"{', '.join(differs)} than this run's: resuming it would continue other weights. "
                "Use another outputUri, or delete its checkpoints to start over",
            )

    # -- helpers -----------------------------------------------------------------------------------

    def _empty_dir(self, name: str) -> Path:
        directory = self.staging / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        return directory

    def _uri(self) -> str:
        return self.store.uri_for(self.root)


# -- agreement between ranks -------------------------------------------------------------------


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
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(entries: list[FileEntry], world: World) -> list[list[FileEntry]]:
    """Every rank's entries on rank 0 (others get an empty list)."""
    if not world.distributed:
        return [entries]
    gathered: list[list[FileEntry]] | None = [[] for _ in range(world.world_size)]
    dist.gather_object(entries, gathered if world.is_main else None, dst=0)
    return gathered if world.is_main else []
