"""The training phase as train.py wires it: CheckpointManager takes its anchor from the environment
(progress.anchor_from_env, here a stand-in for the job's status that reads what StatusReport
recorded), so a checkpoint replaced consistently in the output location is refused before the
trainer loads anything, and the genuine one resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreambooth_contract.api import CheckpointStatus
from dreambooth_contract.env import JOB_NAME_ENV
from dreambooth_contract.layout import CHECKPOINTS_DIR
from dreambooth_contract.trainer_config import ConfigError
from dreambooth_trainer import checkpoint_files, checkpoint_manager, priors, progress
from dreambooth_trainer.parallel import World
from dreambooth_trainer.storage import LocalStore
from dreambooth_trainer.train import Trainer, run_training

pytestmark = pytest.mark.trainer

TRAINING = {"maxSteps": 2, "checkpointing": {"interval": 2}}


class StatusFileAnchor:
    """Reads status.checkpoint where the local reporter writes the status (DBJ_PROGRESS_FILE):
    the same record the Kubernetes reporter makes in the job's status."""

    def __init__(self, path: Path):
        self.path = path

    def recorded_checkpoint(self, attempts: int | None = None) -> CheckpointStatus | None:
        if not self.path.exists():
            return None
        value = json.loads(self.path.read_text()).get("checkpoint")
        return CheckpointStatus.model_validate(value) if value else None

    def describe(self) -> str:
        return "the test's status file"


@pytest.fixture
def status_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "status.json"
    monkeypatch.delenv(JOB_NAME_ENV, raising=False)
    monkeypatch.setenv(progress.ENV_FILE, str(path))
    monkeypatch.setattr(checkpoint_manager, "anchor_from_env", lambda: StatusFileAnchor(path))
    return path


@pytest.fixture
def loads(monkeypatch) -> list[Path]:
    """Directories Trainer.load_state was called with (it still loads them)."""
    calls: list[Path] = []
    real = Trainer.load_state

    def spy(self, directory: Path) -> None:
        calls.append(directory)
        real(self, directory)

    monkeypatch.setattr(Trainer, "load_state", spy)
    return calls


def test_only_the_recorded_checkpoint_is_resumed(make_config, tmp_path, status_file, loads):
    output = tmp_path / "output"
    config = make_config({"training": TRAINING}, output=output)
    priors.run_priors(config)
    run_training(config, World(), progress=False)
    recorded = json.loads(status_file.read_text())["checkpoint"]
    store = LocalStore(output)
    manifest = store.read_bytes(f"{CHECKPOINTS_DIR}/checkpoint-00000002/manifest.json")
    assert recorded["manifestDigest"] == checkpoint_files.manifest_digest(manifest)
    assert loads == []

    # The genuine checkpoint resumes (nothing left to train).
    run_training(config, World(), progress=False)
    assert len(loads) == 1

    # Someone with write access to the output location trains other weights and commits them
    # as checkpoint 2: files and manifest consistent, the genuine metadata, identity and all.
    genuine = checkpoint_files.read_manifest(store, CHECKPOINTS_DIR, 2)
    planted = tmp_path / "planted"
    store.download_dir(f"{CHECKPOINTS_DIR}/checkpoint-00000002", planted)
    (planted / "manifest.json").unlink()
    state_path = next(p for p in planted.rglob("*.pt") if "backend" in p.parts)
    state = torch.load(state_path, weights_only=True)
    for tensor in state["model"].values():
        if tensor.is_floating_point():
            tensor.add_(1.0)
    torch.save(state, state_path)
    checkpoint_files.save(planted, store, CHECKPOINTS_DIR, 2, genuine.metadata)
    checkpoint_files.verify(store, CHECKPOINTS_DIR, 2, level="sha256")  # it checks out

    loads.clear()
    with pytest.raises(ConfigError) as refused:
        run_training(config, World(), progress=False)
    assert refused.value.field == "storage.outputUri"
    assert "checkpoint-00000002 is the checkpoint recorded in the test's status file" in str(
        refused.value
    )
    assert loads == []
