"""Validation samples in mixed precision under FSDP2, in a process group of one."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from dreambooth_trainer.parallel import World
from dreambooth_trainer.samples import ValidationSamples
from dreambooth_trainer.train import build_trainer
from tests.support.procs import free_port
from tests.trainer.conftest import SUBJECT_DIR

from .jobs import trainer_config

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["unet", "unet+text"])
def test_fsdp_bf16_training_renders_samples(tmp_path: Path, monkeypatch, train_text_encoder):
    """FSDP2 trains without autocast; its gathered float32 weights meet a bf16 VAE (and text
    encoder) in the sampling pipeline. (DeepSpeed's samples are in test_training.py: DeepSpeed
    keeps process groups in globals, so it runs under torchrun only.)"""
    torchrun_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**torchrun_env, "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    training = {
        "sharding": {"backend": "fsdp", "zeroStage": None},
        "trainTextEncoder": train_text_encoder,
        "validation": {"prompts": ["a photo of sks cube"], "numInferenceSteps": 2},
    }
    config = trainer_config(
        "samples", str(tmp_path / "out"), tmp_path / "models", {"training": training}
    )
    trainer = build_trainer(config, SUBJECT_DIR, None, World(alone_with_backend=True))
    try:
        trainer.train_step()
        path = ValidationSamples(config.validation, 64, tmp_path / "samples", None).render(trainer)
    finally:
        trainer.backend.close()
    with Image.open(path) as grid:
        assert grid.size[0] >= 64
