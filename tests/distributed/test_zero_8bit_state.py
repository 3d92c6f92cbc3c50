"""8-bit AdamW under ZeRO-2 (torchrun, 2 ranks): each rank's optimizer shard in the committed
checkpoint holds the 8-bit moments, not float copies of them."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dreambooth_contract.layout import CHECKPOINTS_DIR
from dreambooth_trainer import checkpoint_files

from .jobs import Job, trainer_config

pytestmark = pytest.mark.distributed


def tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors(item)


def test_zero2_shards_hold_the_8bit_adamw_moments(tmp_path: Path, deepspeed_ops):
    overrides = {
        "training": {
            "maxSteps": 2,
            "use8bitAdam": True,
            "sharding": {"backend": "deepspeed", "zeroStage": 2},
            "checkpointing": {"interval": 2},
        }
    }
    workdir = tmp_path / "job"
    workdir.mkdir()
    config = trainer_config("adam8", str(tmp_path / "out"), tmp_path / "models", overrides)
    config_file = workdir / "config.json"
    config_file.write_text(config.to_json())
    env = {"DBJ_PROGRESS_FILE": str(workdir / "progress.json")}
    job = Job("adam8", config, config_file, workdir, env)
    job.train()

    info = job.verified(2)
    directory = checkpoint_files.checkpoint_key(CHECKPOINTS_DIR, 2)
    shards = sorted(f.path for f in info.files if f.path.endswith("optim_states.pt"))
    assert len(shards) == 2, [f.path for f in info.files]  # one per rank
    for path in shards:
        data = job.store.read_bytes(f"{directory}/{path}")
        optimizer = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)[
            "optimizer_state_dict"
        ]
        # This rank's slice of the flattened parameters, and its optimizer's state for it.
        partition = sum(p.numel() for p in optimizer["single_partition_of_fp32_groups"])
        state = list(tensors(optimizer["base_optimizer_state"]))
        eight_bit = sum(t.numel() for t in state if t.dtype == torch.uint8)
        floats = sum(t.numel() for t in state if t.is_floating_point())
        dtypes = sorted({str(t.dtype) for t in state})
        # AdamW's two moments, one byte per element of the partition ...
        assert eight_bit == 2 * partition, f"{path}: {eight_bit} 8-bit values, {dtypes}"
        # ... and in floats only the quantization maps and per-block scales.
        assert floats < partition // 10, f"{path}: {floats} float values of state"
