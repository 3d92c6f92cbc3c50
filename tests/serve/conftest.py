"""Fixtures of the inference server tests: a tiny exported artifact and servers over it.

The tiny random-weights pipeline (random://tiny-sd) is exported ONCE per session the way the
export phase does it (diffusers pipeline + single file + sha256 manifest) and loaded ONCE; each
test starts its own app (own batcher, metrics and limits) over that shared pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from dreambooth_trainer.models import random_models
from dreambooth_trainer.serve import artifact
from dreambooth_trainer.serve.app import create_app
from dreambooth_trainer.serve.config import BatchingSettings, Limits, ServeSettings

from .harness import FAST, HeldWorker, running

__all__ = ["FAST", "MODEL_ID", "settings"]

MODEL_ID = "sks-dog"


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # Two cores shared with other suites: a 2-thread OpenMP region waits for a descheduled
    # thread at every op, which makes a 25 ms tiny-model call take seconds. One thread is steady.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def exported(model_cache, tmp_path_factory) -> Path:
    """An artifact directory exactly as export.py writes it."""
    from dreambooth_trainer.export import export_pipeline

    source = random_models.materialize("random://tiny-sd", model_cache)
    pipeline = artifact.load_pipeline(source, torch.device("cpu"), torch.float32)
    directory = tmp_path_factory.mktemp("artifact") / "export"
    export_pipeline(pipeline, directory, metadata={"job": MODEL_ID})
    return directory


@pytest.fixture
def tampered(exported, tmp_path) -> Path:
    """A copy of the artifact with one byte of the UNet weights changed."""
    copy = tmp_path / "tampered"
    shutil.copytree(exported, copy)
    weights = next((copy / "pipeline" / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return copy


@pytest.fixture(scope="session")
def base_dir(model_cache, tmp_path_factory) -> Path:
    """A LoRA base model on disk (its files are what adapters record and are checked against)."""
    source = random_models.materialize("random://tiny-sd", model_cache)
    return Path(shutil.copytree(source, tmp_path_factory.mktemp("lora-base") / "tiny-sd"))


@pytest.fixture(scope="session")
def loaded(exported, model_cache) -> artifact.LoadedModel:
    return artifact.load(str(exported), cache_dir=model_cache, device="cpu")


SERVER_OPTIONS = {field.name for field in dataclasses.fields(ServeSettings)}


def settings(**options) -> ServeSettings:
    """Test settings; `options` are ServeSettings fields (request_timeout_s, api_key...) or
    BatchingSettings fields (max_batch_size...)."""
    server = {key: value for key, value in options.items() if key in SERVER_OPTIONS}
    batching = {key: value for key, value in options.items() if key not in SERVER_OPTIONS}
    return ServeSettings(
        model_id=MODEL_ID,
        limits=Limits(max_n=4, max_side=256, max_steps=50),
        batching=BatchingSettings(**batching),
        default_steps=2,
        **server,
    )


@pytest.fixture
def serve(loaded) -> Iterator[Callable[..., str]]:
    """Factory: `url = serve(max_batch_size=..., ...)` starts a ready server for this test."""
    with contextlib.ExitStack() as stack:

        def start(**options) -> str:
            app = create_app(settings(**options), lambda: loaded, warm_up=False)
            return stack.enter_context(running(app))

        yield start


@pytest.fixture
def held(monkeypatch) -> HeldWorker:
    """The inference worker, held inside its next pipeline call until `held.release()`."""
    return HeldWorker(monkeypatch)
