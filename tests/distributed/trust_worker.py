"""torchrun worker for test_checkpoint_trust: DeepSpeed ZeRO-2 (the toy model) checkpointed and
resumed through the real CheckpointManager, its commits recorded in a status file that
stands in for the job's status (the trust anchor; the API server's part is a cluster test).

1. genuine: train, save (rank 0 records it), resume: DeepSpeed loads it.
2. refused: rank 0 replaces the checkpoint consistently (a pickle that creates a file when
   loaded, in place of the module states every rank reads; a new manifest with the right
   sha256s); resume must raise ConfigError on every rank, DeepSpeed's load never called.
3. unanchored: the same resume trusting storage (as before the anchor): DeepSpeed unpickles the
   planted file and its code runs. What step 2 prevents.

Each rank writes what it saw to ``<out>/result-rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import deepspeed
import torch

from dreambooth_contract.api import CheckpointStatus
from dreambooth_contract.layout import CHECKPOINTS_DIR
from dreambooth_contract.trainer_config import ConfigError
from dreambooth_trainer import checkpoint_files, progress
from dreambooth_trainer.checkpoint_manager import CheckpointManager
from dreambooth_trainer.cli import exit_without_teardown
from dreambooth_trainer.parallel.base import World
from dreambooth_trainer.storage import LocalStore

from . import toy

SHARED_FILE = "backend/zero/mp_rank_00_model_states.pt"  # every rank loads it


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class StatusFile:
    """The anchor: a JSON file only the "operator side" (rank 0's report) writes."""

    def __init__(self, path: Path):
        self.path = path

    def recorded_checkpoint(self, attempts: int | None = None) -> CheckpointStatus | None:
        if not self.path.exists():
            return None
        return CheckpointStatus.model_validate(json.loads(self.path.read_text()))

    def describe(self) -> str:
        return f"the status file {self.path}"


class Record:
    def __init__(self, path: Path):
        self.path = path

    def announce(self, info, seconds) -> None:
        """What the manager calls on each commit (the loop's `announce_checkpoint`)."""
        wire = progress.checkpoint_model(info).model_dump(mode="json", by_alias=True)
        self.path.write_text(json.dumps(wire))


class Shim:
    """The parts of train.Trainer that CheckpointManager uses, over the toy run's backend."""

    def __init__(self, run: toy.Run):
        self.backend = run.backend
        self.backend_name = type(run.backend).__name__
        self.world = run.backend.world
        self.step = run.step
        self.micro_step = run.step

    @property
    def state_file(self) -> str:
        return f"trainer/rank-{self.world.rank:05d}.pt"

    def save_state(self, directory: Path) -> None:
        self.backend.save_to_dir(directory / "backend")
        (directory / self.state_file).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"step": self.step}, directory / self.state_file)

    def load_state(self, directory: Path) -> None:
        self.step = torch.load(directory / self.state_file, weights_only=True)["step"]
        self.backend.load_from_dir(directory / "backend")

    def needs_file(self, path: str) -> bool:
        head, _, rest = path.partition("/")
        return self.backend.needs_file(rest) if head == "backend" else path == self.state_file


def plant(store: LocalStore, step: int, marker: Path) -> None:
    """Replace the shared file and commit a manifest that matches, with the genuine metadata."""
    genuine = checkpoint_files.read_manifest(store, CHECKPOINTS_DIR, step)
    directory = checkpoint_files.checkpoint_key(CHECKPOINTS_DIR, step)
    torch.save(Payload(marker), store.path(f"{directory}/{SHARED_FILE}"))
    entries = [
        checkpoint_files.FileEntry(
            path=e.path,
            size=store.path(f"{directory}/{e.path}").stat().st_size,
            sha256=store.sha256(f"{directory}/{e.path}"),
        )
        for e in genuine.files
    ]
    checkpoint_files.commit(store, CHECKPOINTS_DIR, step, entries, genuine.metadata)
    checkpoint_files.verify(store, CHECKPOINTS_DIR, step, level="sha256")  # consistent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    world = World.from_env()
    store = LocalStore(out / "output")
    status = StatusFile(out / "status.json")
    marker = out / "attacker-code-ran"

    loads: list[str] = []
    real_load = deepspeed.DeepSpeedEngine.load_checkpoint

    def counted_load(engine, load_dir, *args, **kwargs):
        loads.append(str(load_dir))
        return real_load(engine, load_dir, *args, **kwargs)

    deepspeed.DeepSpeedEngine.load_checkpoint = counted_load

    def checkpointing(anchor: Any) -> CheckpointManager:
        staging = out / f"staging-{world.rank}"
        return CheckpointManager(store, staging, interval=100, keep=2, anchor=anchor)

    run = toy.Setup("zero2", world, "no", "sgd", 1, world.world_size).start()
    run.train(2)
    shim = Shim(run)
    checkpointing(status).save(shim, Record(status.path).announce)

    results: dict[str, Any] = {}
    shim.step = 0
    checkpointing(status).resume(shim)
    results["genuine"] = {"step": shim.step, "loads": len(loads)}

    if world.is_main:
        plant(store, 2, marker)
    world.barrier()
    loads.clear()
    shim.step = 0
    try:
        checkpointing(status).resume(shim)
        results["refused"] = None
    except ConfigError as exc:
        results["refused"] = {"field": exc.field, "message": exc.message}
    except Exception as exc:  # noqa: BLE001 - a load that went ahead: told to the test
        results["refused"] = {"field": None, "message": f"not refused, loading failed: {exc!r}"}
    results["after_refusal"] = {"loads": len(loads), "marker": marker.exists(), "step": shim.step}
    world.barrier()

    loads.clear()
    try:
        checkpointing(None).resume(shim)
    except Exception as exc:  # noqa: BLE001 - the payload is no state dict: DeepSpeed fails
        results["unanchored_error"] = repr(exc)
    results["unanchored"] = {"loads": len(loads), "marker": marker.exists()}
    (out / f"result-rank{world.rank}.json").write_text(json.dumps(results))
    # The engine may be half-loaded after the payload: no teardown (see toy.main).
    exit_without_teardown(0)


if __name__ == "__main__":
    main()
