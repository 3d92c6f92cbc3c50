"""One DDP rank of test_ddp (a module of its own: spawned processes import it by name)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def train_rank(rank: int, world_size: int, port: int, config_json: str, out: str) -> None:
    from dreambooth_contract.trainer_config import TrainerConfig
    from dreambooth_trainer import priors
    from dreambooth_trainer.parallel import World
    from dreambooth_trainer.train import build_trainer

    from .conftest import SUBJECT_DIR

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    config = TrainerConfig.model_validate_json(config_json)
    trainer = build_trainer(
        config, SUBJECT_DIR, priors.run_priors(config), World(rank, world_size, rank)
    )
    try:
        losses = [trainer.train_step().loss for _ in range(config.training.max_steps)]
        state = {"unet": trainer.trained_model.unet.state_dict(), "losses": losses}
        torch.save(state, Path(out) / f"rank-{rank}.pt")
    finally:
        trainer.backend.close()
