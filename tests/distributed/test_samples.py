"""Validation samples in mixed precision under FSDP2, in a process group of one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_trainer.parallel import World
from dreambooth_trainer.samples import ValidationSamples
from dreambooth_trainer.train import build_trainer
from tests.support.procs import free_port
from tests.trainer.conftest import SUBJECT_DIR

from .jobs import trainer_config

pytestmark = pytest.mark.distributed

PROMPTS = ["a photo of sks cube", "a sks cube on a beach"]
RESOLUTION = 64


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
        "validation": {"prompts": PROMPTS, "numInferenceSteps": 2},
    }
    config = trainer_config(
        "samples", str(tmp_path / "out"), tmp_path / "models", {"training": training}
    )
    trainer = build_trainer(config, SUBJECT_DIR, None, World(alone_with_backend=True))
    try:
        trainer.train_step()
        samples = ValidationSamples(config.validation, RESOLUTION, tmp_path / "samples", None)
        path = samples.render(trainer)
    finally:
        trainer.backend.close()
    with Image.open(path) as grid:
        pixels = np.asarray(grid.convert("RGB"), dtype=np.float64)
    # One 64 px image per prompt, side by side.
    assert pixels.shape == (RESOLUTION, RESOLUTION * len(PROMPTS), 3)
    for i in range(len(PROMPTS)):
        tile = pixels[:, i * RESOLUTION : (i + 1) * RESOLUTION]
        # A NaN latent decodes to a constant (black) image; a real one varies.
        assert tile.std() > 1.0, f"sample {i} is flat: {tile.min()}..{tile.max()}"
