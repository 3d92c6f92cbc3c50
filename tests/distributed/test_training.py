"""The real trainer under `torchrun --nproc-per-node 2` (gloo, CPU) on the tiny SD model, with
checkpoints in S3 (moto): ZeRO-2/3 with the text encoder, exact resume after a crash, broken
checkpoints skipped, SIGTERM saving a checkpoint before the exit."""

from __future__ import annotations

import io
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from dreambooth_contract.layout import CHECKPOINTS_DIR, join_uri
from dreambooth_trainer import checkpoint_files
from dreambooth_trainer.methods.lora_files import LORA_WEIGHTS
from dreambooth_trainer.models import random_models
from tests.trainer.conftest import merged

from . import harness
from .jobs import (
    TRAINED_FILES,
    Job,
    kill_all,
    make_job,
    same_weights,
    wait_for_pause,
    wait_for_step,
)

pytestmark = pytest.mark.distributed

TINY_SD = "random://tiny-sd"
TINY_SDXL = "random://tiny-sdxl"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """The tiny models built once (ranks and runs load the same files)."""
    cache = tmp_path_factory.mktemp("models")
    for uri in (TINY_SD, TINY_SDXL):
        random_models.materialize(uri, cache)
    return cache


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """Credentials from the environment as in a pod; the endpoint only from the job's config."""
    env = {k: v for k, v in s3_server.env().items() if not k.startswith("AWS_ENDPOINT_URL")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return env


@pytest.fixture
def new_job(
    tmp_path, s3_server, s3_bucket, s3_env, model_cache, deepspeed_ops
) -> Callable[..., Job]:
    def new(name: str, overrides: dict | None = None) -> Job:
        return make_job(
            name, tmp_path / name, s3_bucket, s3_server.endpoint_url, model_cache, s3_env, overrides
        )

    return new


def base_weights(cache: Path, path: str, model: str = TINY_SD) -> dict[str, torch.Tensor]:
    directory = random_models.materialize(model, cache)
    return load_file(directory / path)


# SDXL's second text encoder trains beside the first.
SDXL_TRAINED_FILES = {**TRAINED_FILES, "text_encoder_2": "text_encoder_2/model.safetensors"}
ZERO_RUNS = {
    "zero2": (2, TINY_SD, TRAINED_FILES),
    "zero3": (3, TINY_SD, TRAINED_FILES),
    "zero3-sdxl": (3, TINY_SDXL, SDXL_TRAINED_FILES),
}


@pytest.mark.parametrize("zero_stage, model, files", ZERO_RUNS.values(), ids=ZERO_RUNS.keys())
def test_zero_trains_unet_and_text_encoder_with_checkpoints_in_s3(
    new_job, model_cache, zero_stage, model, files
):
    job = new_job(
        f"zero{zero_stage}",
        {
            "baseModel": {"uri": model},
            "training": {
                "maxSteps": 4,
                "sharding": {"zeroStage": zero_stage},
                "checkpointing": {"interval": 2, "keep": 1},
                # Samples gather the sharded weights on every rank mid-training.
                "validation": {
                    "prompts": ["a photo of sks cube"],
                    "interval": 2,
                    "numInferenceSteps": 2,
                },
            },
        },
    )
    job.train()
    assert [o.key for o in job.store.list("samples")] == [
        "samples/step-000002.png",
        "samples/step-000004.png",
    ]

    assert job.checkpoint_steps() == [4]  # keep 1: the one at step 2 was retired
    info = job.verified(4)
    assert info.metadata["worldSize"] == 2 and info.metadata["backend"] == "DeepSpeedBackend"
    paths = [f.path for f in info.files]
    for rank in range(2):
        assert f"trainer/rank-{rank:05d}.pt" in paths
        assert any(re.search(rf"backend/zero/.*zero_pp_rank_{rank}_", p) for p in paths), paths

    trained = job.trained_weights()
    assert trained.keys() == set(files.values())
    for name, path in files.items():
        before = base_weights(model_cache, path, model)
        assert trained[path].keys() == before.keys()
        assert all(t.dtype == torch.float32 for t in trained[path].values())
        assert not same_weights(trained[path], before), f"{name} did not train"

    status = job.progress()
    assert status["progress"]["step"] == 4
    assert status["checkpoint"]["step"] == 4 and status["checkpoint"]["uri"] == info.uri


LORA_DDP = {"method": "lora", "sharding": {"backend": "ddp", "zeroStage": None}}
# What each run changes of DISTRIBUTED_SPEC (ZeRO-2, bf16, text encoder trained), and a file of
# rank 1's that only rank 1 downloads on resume (the one the test corrupts).
RESUME_RUNS = {
    "adamw": ({}, "zero_pp_rank_1_"),
    "adamw-8bit": ({"use8bitAdam": True}, "zero_pp_rank_1_"),
    "lora-ddp": (LORA_DDP, "trainer/rank-00001"),
    "lora-zero2-8bit": ({"method": "lora", "use8bitAdam": True}, "zero_pp_rank_1_"),
}


@pytest.mark.parametrize("changes, rank_1_file", RESUME_RUNS.values(), ids=RESUME_RUNS.keys())
def test_exact_resume_after_a_crash_skips_broken_checkpoints(new_job, changes, rank_1_file):
    """6 steps straight == 3 steps, SIGKILL, restart, 3 more: bitwise. Before the restart a
    newer checkpoint 5 lost its manifest (upload cut off) and one of rank 1's files in a newer
    checkpoint 6 has the wrong content: only rank 1 downloads it, all ranks must skip it. ZeRO-2
    shards the 8-bit AdamW state like any other. A LoRA run resumes its adapter (UNet and text
    encoder) from checkpoints that hold nothing of the frozen base. The first run pauses after
    step 3 (its checkpoint committed) until it is killed, however fast the machine."""
    # 4 micro-batches a step: the resumed data position is a micro-step, not a step.
    training = {
        "maxSteps": 6,
        "gradientAccumulationSteps": 4,
        "checkpointing": {"interval": 3, "keep": 2},
    }
    overrides = {"training": merged(training, changes)}
    straight = new_job("straight", overrides)
    straight.train()
    assert straight.checkpoint_steps() == [6, 3]

    resumed = new_job("resumed", overrides)
    proc = resumed.launch(pause_after=3)
    wait_for_pause(resumed, 3, proc)
    kill_all(proc)
    resumed.resume()
    assert resumed.checkpoint_steps() == [3], "killed too late"

    plant_cut_off_checkpoint(resumed, from_step=3, step=5)
    plant_corrupt_checkpoint(straight, resumed, step=6, victim=rank_1_file)
    resumed.train()

    log = resumed.log(resumed.launches).read_text()
    assert re.search(r"skipping checkpoint .*checkpoint-00000006.*sha256", log), log[-3000:]
    assert re.search(r"skipping checkpoint .*checkpoint-00000005.*no manifest", log)
    assert re.search(r"resumed from .*checkpoint-00000003 at step 3", log)
    expected, actual = straight.trained_weights(), resumed.trained_weights()
    assert actual.keys() == expected.keys()
    for path in expected:
        assert same_weights(actual[path], expected[path]), f"{path} differs after resume"
    if changes.get("method") == "lora":
        assert list(expected) == [LORA_WEIGHTS]
        assert_adapter_only(straight, step=6)
    assert resumed.checkpoint_steps() == [6, 3]  # 6 saved anew, debris 5 retired
    resumed.verified(6)


def plant_cut_off_checkpoint(job: Job, from_step: int, step: int) -> None:
    """A checkpoint whose files arrived but whose manifest never did."""
    store, source = job.store, checkpoint_files.checkpoint_key(CHECKPOINTS_DIR, from_step)
    target = checkpoint_files.checkpoint_key(CHECKPOINTS_DIR, step)
    for obj in store.list(source):
        rel = obj.key[len(source) + 1 :]
        if rel != checkpoint_files.MANIFEST:
            store.write_bytes(join_uri(target, rel), store.read_bytes(obj.key))


def plant_corrupt_checkpoint(source_job: Job, job: Job, step: int, victim: str) -> None:
    """A committed-looking checkpoint (manifest, right sizes) with the file whose key contains
    `victim` corrupted."""
    source, store = source_job.store, job.store
    prefix = checkpoint_files.checkpoint_key(CHECKPOINTS_DIR, step)
    corrupted = None
    for obj in source.list(prefix):
        data = source.read_bytes(obj.key)
        if corrupted is None and victim in obj.key:
            corrupted = obj.key
            data = data[:-64] + bytes(64)  # same size, other bytes: only the hash can tell
        store.write_bytes(obj.key, data)
    assert corrupted is not None


# Where the model's tensors are in a checkpoint, by name: DDP's state, DeepSpeed's module file
# (ZeRO-2 writes one, ZeRO-3 one per rank; ZeRO's optimizer shards hold flat partitions of the
# trainable parameters, no names), FSDP2's torch.distributed.checkpoint metadata.
MODEL_STATES = {
    "backend/state.pt": "model",
    "backend/zero/mp_rank_00_model_states.pt": "module",
    "backend/zero/zero_pp_rank_0_mp_rank_00_model_states.pt": "module",
}
DCP_METADATA = "backend/.metadata"


def checkpoint_model_names(job: Job, step: int) -> set[str]:
    """Names of the model tensors a verified checkpoint holds."""
    paths = [f.path for f in job.verified(step).files]
    prefix = checkpoint_files.checkpoint_key(CHECKPOINTS_DIR, step)
    if DCP_METADATA in paths:
        local = job.workdir / f"checkpoint-{step}"
        job.store.download_dir(f"{prefix}/backend", local)
        metadata = dcp.FileSystemReader(local).read_metadata()
        return {k.removeprefix("model.") for k in metadata.state_dict_metadata if k[:6] == "model."}
    found = [p for p in paths if p in MODEL_STATES]
    assert len(found) == 1, paths
    data = job.store.read_bytes(f"{prefix}/{found[0]}")
    # Our own checkpoint, just verified by hash; DeepSpeed's file holds Python objects.
    state = torch.load(io.BytesIO(data), weights_only=False)
    assert state.get("frozen_param_fragments") is None  # DeepSpeed's copy of frozen weights
    return set(state[MODEL_STATES[found[0]]])


def assert_adapter_only(job: Job, step: int) -> None:
    """The checkpoint's model state holds LoRA adapter weights (UNet and text encoder) only."""
    names = checkpoint_model_names(job, step)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), sorted(names)[:5]
    assert {n.split(".")[0] for n in names} == {"unet", "text_encoder"}


FSDP = {"backend": "fsdp", "zeroStage": None}
SHARDED_LORA = {
    "zero3": ({"zeroStage": 3}, TINY_SD),
    "fsdp": (FSDP, TINY_SD),
    "fsdp-sdxl": (FSDP, TINY_SDXL),  # adapters on the UNet and both text encoders
}


@pytest.mark.parametrize("sharding, model", SHARDED_LORA.values(), ids=SHARDED_LORA.keys())
def test_sharded_backends_train_and_checkpoint_the_adapter_only(new_job, sharding, model):
    """ZeRO-3 and FSDP2 shard the frozen base with the adapter; checkpoints and the saved
    adapter still hold only the adapter, and samples gather it mid-training."""
    job = new_job(
        "lora-sharded",
        {
            "baseModel": {"uri": model},
            "training": {
                "method": "lora",
                "maxSteps": 2,
                "sharding": sharding,
                "checkpointing": {"interval": 2},
                "validation": {
                    "prompts": ["a photo of sks cube"],
                    "interval": 2,
                    "numInferenceSteps": 2,
                },
            },
        },
    )
    job.train()
    assert [o.key for o in job.store.list("samples")] == ["samples/step-000002.png"]
    assert_adapter_only(job, step=2)
    adapter = job.trained_weights()[LORA_WEIGHTS]
    if model == TINY_SDXL:  # both encoders' adapters, in the checkpoint and in the file
        names = checkpoint_model_names(job, step=2)
        for encoder in ("text_encoder", "text_encoder_2"):
            assert any(n.startswith(f"text_encoder.{encoder}.") for n in names), encoder
            assert any(n.startswith(f"{encoder}.") for n in adapter), encoder
    up = [t for name, t in adapter.items() if name.startswith("unet.") and ".up." in name]
    assert up and any(t.abs().max() > 0 for t in up)  # the up (lora_B) matrices start at 0


def test_sigterm_commits_a_checkpoint_before_exit(new_job):
    """What Kubernetes does to a pod: SIGTERM to PID 1 (torchrun), which forwards it."""
    job = new_job(
        "sigterm",
        {
            "training": {
                "maxSteps": 1000,
                "sharding": {"backend": "fsdp", "zeroStage": None},
                "checkpointing": {"interval": 1000},
            }
        },
    )
    proc = job.launch()
    wait_for_step(job, 2, proc)
    proc.proc.send_signal(signal.SIGTERM)
    code = harness.wait(proc, timeout=90)
    proc.stop()
    steps = job.checkpoint_steps()
    assert len(steps) == 1 and 2 <= steps[0] < 1000, (steps, proc.log_tail(60))
    info = job.verified(steps[0])
    assert info.metadata["backend"] == "FSDPBackend"
    assert code != 0  # stopped early: the pod must not look like a finished run
    log = job.log(1).read_text()
    assert "SIGTERM: saving a checkpoint" in log and "interrupted: stopped at step" in log
    assert job.progress()["checkpoint"]["step"] == steps[0]
    assert not job.store.list("trained")  # no final weights from an interrupted run
