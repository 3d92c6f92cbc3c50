"""Checkpoints in one process (no torchrun): exact resume through the real manager after a
crash, with a local output directory; and the status report when the metrics port is taken."""

from __future__ import annotations

import json
import socket
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_contract.layout import CHECKPOINTS_DIR, TRAINED_DIR
from dreambooth_trainer import checkpoint_files
from dreambooth_trainer.callbacks import Callback, StatusReport, StepMetrics
from dreambooth_trainer.models.random_models import materialize
from dreambooth_trainer.parallel import World
from dreambooth_trainer.storage import LocalStore
from dreambooth_trainer.train import Trainer, run_training

from .jobs import TRAINED_FILES, same_weights, trainer_config

pytestmark = pytest.mark.trainer


class Crash(Exception):
    pass


class CrashAfterCheckpoint(Callback):
    """Dies right after the checkpoint at `step` is committed, losing everything in memory."""

    def __init__(self, step: int):
        self.step = step

    def on_checkpoint(
        self, trainer: Trainer, info: checkpoint_files.CheckpointInfo, seconds: float
    ):
        if info.step == self.step:
            raise Crash


class FirstStep(Callback):
    def on_train_start(self, trainer: Trainer) -> None:
        self.step = trainer.step


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only fight the other processes on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_single_process_resume_after_a_crash_is_exact(tmp_path: Path, one_thread):
    cache = tmp_path / "cache"
    materialize("random://tiny-sd", cache)
    overrides = {
        "training": {"maxSteps": 4, "checkpointing": {"interval": 2, "keep": 3}},
        "resources": {"processesPerNode": 1},
    }

    def run(name: str, *callbacks: Callback) -> dict[str, dict[str, torch.Tensor]]:
        config = trainer_config(name, str(tmp_path / name), cache, overrides)
        output = run_training(config, World(), progress=False, callbacks=callbacks)
        trained = output / TRAINED_DIR
        return {name: load_file(trained / path) for name, path in TRAINED_FILES.items()}

    expected = run("straight")
    with pytest.raises(Crash):
        run("crashed", CrashAfterCheckpoint(2))
    store = LocalStore(tmp_path / "crashed")
    assert checkpoint_files.list_steps(store, CHECKPOINTS_DIR) == [2]
    start = FirstStep()
    actual = run("crashed", start)
    assert start.step == 2
    for name in TRAINED_FILES:
        assert same_weights(actual[name], expected[name]), name
    assert checkpoint_files.list_steps(store, CHECKPOINTS_DIR) == [4, 2]


def test_status_report_goes_on_when_the_metrics_port_is_taken(monkeypatch, tmp_path: Path):
    progress_file = tmp_path / "status.json"
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        monkeypatch.setenv("DREAMBOOTH_METRICS_PORT", str(taken.getsockname()[1]))
        monkeypatch.setenv("DBJ_PROGRESS_FILE", str(progress_file))
        monkeypatch.delenv("DBJ_NAME", raising=False)
        report = StatusReport()
        trainer = SimpleNamespace(max_steps=10, step=3, world=World())
        report.on_train_start(trainer)
        assert report.server is None  # logged, not raised
        metrics = StepMetrics(4, 0.5, 0.5, 0.0, 1.0, 1e-4, images=8, seconds=2.0)
        report.on_step_end(trainer, metrics)
        now = datetime.now(timezone.utc)
        info = checkpoint_files.CheckpointInfo(
            4, "c/checkpoint-00000004", "s3://b/c/4", created=now
        )
        report.on_checkpoint(trainer, info, seconds=1.5)
        report.on_train_end(trainer)
    status = json.loads(progress_file.read_text())
    assert status["progress"]["step"] == 4 and status["progress"]["imagesPerSecond"] == 4.0
    assert (status["checkpoint"]["step"], status["checkpoint"]["uri"]) == (4, "s3://b/c/4")
    assert report.metrics.checkpoint_step._value.get() == 4
    assert report.metrics.step._value.get() == 4
