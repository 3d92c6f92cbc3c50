"""Training checkpoints: the full state every `checkpointing.interval` steps and on SIGTERM, and
automatic resume from the newest committed checkpoint.

One checkpoint under ``<outputUri>/checkpoints`` (commit protocol: checkpoint_files.py)::

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

Trust: loading a checkpoint unpickles parts of it (DeepSpeed's and DCP's files), so a checkpoint
is code. The manifest proves one complete, not genuine: it lies in the same storage, and whoever
may write there may rewrite files and manifest alike. Under the operator (``DBJ_NAME`` set) the
anchor is the job's ``status.checkpoint`` (progress.py), which rank 0 records after each commit,
confirmed, with the sha256 of the manifest's bytes, and reads back before a resume:

- nothing recorded (a new job, or one deleted and re-created: its status starts empty), or a
  record of another location or without a digest: storage is not trusted, training starts from
  step 0; the checkpoints there stay until this run's own commits overtake or retire them.
  Unless their manifests (parsed, nothing loaded) name another spec: then, as for a resume, bad
  input, rather than replace another job's checkpoints and export;
- checkpoints newer than the recorded one are skipped (a lost status report, or planted);
- the recorded one gone (deleted: "delete the checkpoints to start over"): the same as none;
- the recorded one there but its manifest without the recorded digest, or a file without its
  manifest's sha256: refused, as bad input naming storage.outputUri, and never loaded;
- the status cannot be read: the run fails (a restart tries again), loading nothing.

Every rank checks the digest of the manifest bytes it reads itself, so no rank acts on a
manifest swapped after rank 0 looked. Retention never deletes the recorded checkpoint, and
leaves alone those newer than it, so a lost report cannot leave a job with nothing to resume.
Local runs (no ``DBJ_NAME``) trust their storage as it is.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from dreambooth_contract.layout import CHECKPOINTS_DIR
from dreambooth_contract.trainer_config import ConfigError

from . import checkpoint_files
from .checkpoint_files import CheckpointInfo, CheckpointInvalid, CheckpointMissing
from .parallel import World
from .parallel.collectives import all_ranks, any_rank, broadcast_from_main, gather_to_main
from .progress import AnchorUnavailable, CheckpointAnchor, anchor_from_env
from .storage import Store

log = logging.getLogger(__name__)

COMPARED = ("worldSize", "backend")  # besides the identity, what a resumed run must match
RESUMING = "resuming it would continue other weights"
REPLACING = "training here from step 0 would replace its checkpoints and export"
FROM_ENV = "from-env"  # CheckpointManager's default anchor: progress.anchor_from_env()
# Reads of the anchor for retention: a status that cannot be read only postpones retention.
RETENTION_READ_ATTEMPTS = 2


class Checkpointable(Protocol):
    """What the manager saves, restores and records of a training run (train.Trainer)."""

    @property
    def world(self) -> World: ...

    @property
    def step(self) -> int:
        """Optimizer steps done."""

    @property
    def micro_step(self) -> int:
        """The data position: micro-batches consumed."""

    @property
    def backend_name(self) -> str:
        """Recorded: a run on another backend does not resume the checkpoint."""

    def save_state(self, directory: Path) -> None:
        """Collective. This rank's files of the full training state."""

    def load_state(self, directory: Path) -> None:
        """Collective. Load what `save_state` wrote; `directory` holds this rank's files."""

    def needs_file(self, path: str) -> bool:
        """Whether this rank reads `path` (relative to a saved state) to load it."""

    def request_stop(self, reason: str) -> None:
        """End training after this step (every rank asks alike)."""


# Told on rank 0 of each committed checkpoint (and the seconds it took), before retention.
Announce = Callable[[CheckpointInfo, float], None]


def announce_nothing(info: CheckpointInfo, seconds: float) -> None:
    pass


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


class CheckpointManager:
    """Saves every `interval` steps and on SIGTERM; resumes at train start. On every rank.

    The training loop calls `start` before the first step, `after_step` after each and `end`
    after the last (train.Trainer.fit)."""

    def __init__(
        self,
        store: Store,
        staging: Path,
        interval: int,
        keep: int,
        root: str = CHECKPOINTS_DIR,
        metadata: dict[str, Any] | None = None,
        identity: dict[str, Any] | None = None,
        anchor: CheckpointAnchor | None | str = FROM_ENV,
    ):
        self.store = store
        # Where the checkpoints this job committed are recorded (None: storage is trusted).
        self.anchor = anchor_from_env() if anchor == FROM_ENV else anchor
        self.identity = dict(identity or {})  # what a resumed run must match (see describe)
        self.staging = staging  # local, this process's: per-rank subdirectories below
        self.interval = interval
        self.keep = keep
        self.root = root
        self.metadata = dict(metadata or {})
        self.stop_signal = StopSignal()

    # -- the loop's calls --------------------------------------------------------------------------

    def start(self, state: Checkpointable) -> None:
        self.stop_signal.install()
        self.resume(state)

    def after_step(self, state: Checkpointable, announce: Announce) -> None:
        """Collective. Save when due or after SIGTERM on any rank (then ask the loop to stop)."""
        stopping = any_rank(state.world, self.stop_signal.received is not None)
        if stopping or state.step % self.interval == 0:
            self.save(state, announce)
        if stopping:
            state.request_stop("SIGTERM")

    def end(self) -> None:
        self.stop_signal.uninstall()

    # -- saving ------------------------------------------------------------------------------------

    def save(
        self, state: Checkpointable, announce: Announce = announce_nothing
    ) -> CheckpointInfo | None:
        """Collective. Save and upload; rank 0 commits, `announce`s it (the status report
        records it, confirmed) and applies retention; rank 0 gets the info."""
        world, step = state.world, state.step
        started = time.perf_counter()
        local = self._empty_dir(f"save-rank-{world.rank:05d}")
        state.save_state(local)
        if world.is_main:
            checkpoint_files.begin(self.store, self.root, step)  # drop debris of an earlier attempt
        world.barrier()  # nobody uploads into the directory begin() is clearing
        entries = checkpoint_files.upload(self.store, self.root, step, local)
        everyone = gather_to_main(entries, world)
        info = None
        if world.is_main:
            files = [entry for rank_entries in everyone for entry in rank_entries]
            metadata = {**self.metadata, **self.describe(state)}
            info = checkpoint_files.commit(self.store, self.root, step, files, metadata)
            seconds = time.perf_counter() - started
            log.info("checkpoint at step %d: %s (%.1fs)", step, info.uri, seconds)
            announce(info, seconds)  # recorded, confirmed, before retention looks
            self._retain()
        # No rank runs ahead (or exits, after SIGTERM) before the commit and its report:
        # torchrun would stop rank 0 mid-commit as soon as any rank is gone.
        world.barrier()
        shutil.rmtree(local, ignore_errors=True)
        return info

    def _retain(self) -> None:
        """Retention up to the recorded checkpoint (see the module docstring)."""
        if self.anchor is None:
            checkpoint_files.apply_retention(self.store, self.root, self.keep)
            return
        try:
            recorded = self._recorded(attempts=RETENTION_READ_ATTEMPTS)
        except AnchorUnavailable as exc:
            log.warning("retention postponed: %s", exc)
            return
        if recorded is None:
            log.warning("retention postponed: no checkpoint in %s yet", self.anchor.describe())
            return
        checkpoint_files.apply_retention(self.store, self.root, self.keep, upto=recorded.step)

    def describe(self, state: Checkpointable) -> dict[str, Any]:
        """What a resuming run must match: the weights' parts (`identity`) and, since resharding
        to other world sizes is not supported, world size and backend."""
        return {
            "identity": self.identity,
            "worldSize": state.world.world_size,
            "backend": state.backend_name,
            "microStep": state.micro_step,
        }

    # -- resuming ----------------------------------------------------------------------------------

    def resume(self, state: Checkpointable) -> CheckpointInfo | None:
        """Collective. Load the newest checkpoint every rank could restore; None if none.

        With an anchor, only the recorded checkpoint, and only if it checks out against the
        recorded manifest digest on every rank (module docstring)."""
        if self.anchor is not None:
            return self._resume_recorded(state)
        world = state.world
        below = None
        while (step := self._newest_step(world, below)) is not None:
            local = self.staging / f"restore-rank-{world.rank:05d}"
            info = self._download(state, step, local)
            if all_ranks(world, info is not None):
                return self._load(state, info, local)
            below = step  # some rank found it broken: everyone takes the previous one
        log.info("no committed checkpoint in %s: training from step 0", self._uri())
        return None

    def _load(self, state: Checkpointable, info: CheckpointInfo, local: Path) -> CheckpointInfo:
        self._check_compatible(info, state)
        state.load_state(local)
        shutil.rmtree(local, ignore_errors=True)
        log.info("resumed from %s at step %d", info.uri, state.step)
        return info

    def _resume_recorded(self, state: Checkpointable) -> CheckpointInfo | None:
        world = state.world
        choice = _Choice(failed="rank 0 did not decide")
        if world.is_main:
            try:
                choice = self._choose_recorded(state)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it, not hang
                log.exception("choosing the checkpoint to resume failed")
                choice = _Choice(failed=f"choosing the checkpoint to resume failed: {exc}")
        choice = broadcast_from_main(choice, world)
        if choice.refused is not None:
            raise ConfigError("storage.outputUri", choice.refused)
        if choice.failed is not None:
            raise RuntimeError(choice.failed)
        if choice.step is None:
            return None
        local = self.staging / f"restore-rank-{world.rank:05d}"
        info = self._download(state, choice.step, local, choice.digest)
        if not all_ranks(world, info is not None):
            # No fallback: an older checkpoint is vouched for by nothing.
            raise ConfigError(
                "storage.outputUri",
                self._refusal(self._uri_of(choice.step), "a file does not match it (see the log)"),
            )
        return self._load(state, info, local)

    def _choose_recorded(self, state: Checkpointable) -> _Choice:
        """Rank 0: which checkpoint to resume under the anchor, or why none (docstring)."""
        steps = checkpoint_files.list_steps(self.store, self.root)
        if not steps:  # nothing to trust or distrust: no need to ask
            log.info("no checkpoint in %s: training from step 0", self._uri())
            return _Choice()
        try:
            recorded = self._recorded()
        except AnchorUnavailable as exc:
            return _Choice(failed=f"{exc}: not resuming from {self._uri()} unverified")
        where = self.anchor.describe()
        if recorded is None:
            return self._start_over(state, f"none is recorded in {where} (a re-created job?)")
        newer = [step for step in steps if step > recorded.step]
        if newer:
            log.warning(
                "skipping checkpoints at steps %s in %s: newer than the one recorded in %s "
                "(step %d), so not trusted",
                sorted(newer),
                self._uri(),
                where,
                recorded.step,
            )
        try:
            checkpoint_files.verify(
                self.store,
                self.root,
                recorded.step,
                level="size",
                expect_digest=recorded.manifest_digest,
            )
        except CheckpointMissing:
            return self._start_over(state, f"the one recorded in {where} is gone")
        except CheckpointInvalid as exc:
            log.error("refusing %s", exc)
            return _Choice(refused=self._refusal(recorded.uri, exc.reason))
        return _Choice(step=recorded.step, digest=recorded.manifest_digest)

    def _start_over(self, state: Checkpointable, why: str) -> _Choice:
        """Train from step 0 past checkpoints nothing vouches for; but not over another spec's:
        their manifests' metadata (parsed, nothing loaded) still says whose they are, and a run
        of another spec would replace their checkpoints and export (see _check_compatible)."""
        newest = checkpoint_files.latest_valid(self.store, self.root, level="manifest")
        if newest is not None:
            differs = self._differences(newest.metadata, state, compared=())
            if differs:
                return _Choice(refused=self._incompatible(newest, differs, REPLACING))
        log.warning(
            "not trusting the checkpoints in %s: %s. Training from step 0; they stay until "
            "this run's own checkpoints replace or retire them",
            self._uri(),
            why,
        )
        return _Choice()

    def _recorded(self, attempts: int | None = None) -> _Recorded | None:
        """The anchor's checkpoint if it names one of ours with a digest; None otherwise."""
        recorded = self.anchor.recorded_checkpoint(attempts)
        if recorded is None:
            return None
        if recorded.uri != self._uri_of(recorded.step) or not recorded.manifest_digest:
            log.warning(
                "%s records %s%s, not one of %s: nothing there is trusted",
                self.anchor.describe(),
                recorded.uri,
                "" if recorded.manifest_digest else " without a manifest digest",
                self._uri(),
            )
            return None
        return _Recorded(recorded.step, recorded.uri, recorded.manifest_digest)

    def _refusal(self, uri: str, reason: str) -> str:
        return (
            f"{uri} is the checkpoint recorded in {self.anchor.describe()}, but it was changed "
            f"after its commit ({reason}): refusing to load it. Delete the checkpoints in "
            f"{self._uri()} to train from step 0"
        )

    def _newest_step(self, world: World, below: int | None) -> int | None:
        """Rank 0 lists and verifies (manifest, sizes); every rank gets its answer."""
        step = None
        if world.is_main:
            info = checkpoint_files.latest_valid(self.store, self.root, level="size", below=below)
            step = info.step if info else None
        return broadcast_from_main(step, world)

    def _download(
        self, state: Checkpointable, step: int, local: Path, digest: str | None = None
    ) -> CheckpointInfo | None:
        try:
            return checkpoint_files.restore(
                self.store,
                self.root,
                local,
                step=step,
                select=state.needs_file,
                expect_digest=digest,
            )
        except CheckpointInvalid as exc:
            log.warning("skipping %s", exc)
            return None

    def _check_compatible(self, info: CheckpointInfo, state: Checkpointable) -> None:
        differs = self._differences(info.metadata, state)
        if differs:
            raise ConfigError("storage.outputUri", self._incompatible(info, differs, RESUMING))

    def _differences(
        self, metadata: dict[str, Any], state: Checkpointable, compared: tuple[str, ...] = COMPARED
    ) -> list[str]:
        """The parts of this run that a checkpoint's metadata names otherwise."""

        def matched(metadata: dict[str, Any]) -> dict[str, Any]:
            # Checkpoints of older trainers have no identity: world size and backend only.
            return {**metadata.get("identity", {}), **{k: metadata.get(k) for k in compared}}

        saved, ours = matched(metadata), matched(self.describe(state))
        return [part for part in ours if part in saved and saved[part] != ours[part]]

    @staticmethod
    def _incompatible(info: CheckpointInfo, differs: list[str], consequence: str) -> str:
        return (
            f"{info.uri} was written by job {info.metadata.get('job', '?')} with another "
            f"{', '.join(differs)} than this run's: {consequence}. "
            "Use another outputUri, or delete its checkpoints to start over"
        )

    # -- helpers -----------------------------------------------------------------------------------

    def _empty_dir(self, name: str) -> Path:
        directory = self.staging / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        return directory

    def _uri(self) -> str:
        return self.store.uri_for(self.root)

    def _uri_of(self, step: int) -> str:
        return self.store.uri_for(checkpoint_files.checkpoint_key(self.root, step))


@dataclass(frozen=True)
class _Recorded:
    step: int
    uri: str
    manifest_digest: str


@dataclass(frozen=True)
class _Choice:
    """Rank 0's decision under an anchor, broadcast so that every rank acts on it alike."""

    step: int | None = None  # None: train from step 0
    digest: str | None = None  # what the manifest of `step` must hash to, on every rank
    refused: str | None = None  # bad input: ConfigError on every rank
    failed: str | None = None  # cannot decide now (status unreadable): RuntimeError
