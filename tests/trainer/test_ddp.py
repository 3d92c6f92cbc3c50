"""DDP over gloo: two CPU processes keep identical replicas while seeing different data."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from .ddp_worker import train_rank

pytestmark = [pytest.mark.trainer, pytest.mark.distributed]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ddp_replicas_stay_identical(make_config, tmp_path: Path):
    config = make_config(
        {
            "training": {
                "maxSteps": 3,
                "gradientAccumulationSteps": 2,
                "sharding": {"backend": "ddp"},
            },
            "resources": {"processesPerNode": 2},
        }
    )
    from dreambooth_trainer import priors

    priors.run_priors(config)  # once, before the ranks read it
    mp.spawn(train_rank, args=(2, free_port(), config.to_json(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(2)]
    first, second = (r["unet"] for r in ranks)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # logged losses are the mean over ranks
