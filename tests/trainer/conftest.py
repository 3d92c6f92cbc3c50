"""Fixtures for the trainer tests: the tiny random model, the example subject, configs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dreambooth_contract.api import DreamBoothJob

REPO = Path(__file__).resolve().parents[2]
SUBJECT_DIR = REPO / "examples" / "local" / "subject"
INSTANCE_PROMPT = "a photo of sks cube"
CLASS_PROMPT = "a photo of cube"

# Small and fast: 64 px (8x8 latents), a few class images and steps; tests override what they test.
BASE_SPEC: dict[str, Any] = {
    "baseModel": {"uri": "random://tiny-sd"},
    "instance": {"imagesUri": str(SUBJECT_DIR), "prompt": INSTANCE_PROMPT},
    "priorPreservation": {
        "classPrompt": CLASS_PROMPT,
        "numClassImages": 4,
        "generation": {"steps": 4, "guidanceScale": 5.0, "batchSize": 4},
    },
    "training": {
        "maxSteps": 4,
        "learningRate": 1e-3,
        "resolution": 64,
        "centerCrop": True,
        "mixedPrecision": "no",
        "gradientCheckpointing": False,
        "validation": {"prompts": []},
    },
    "resources": {"gpusPerNode": 0, "processesPerNode": 1},
    "storage": {"outputUri": "/unused"},
}


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in recursively (a copy)."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def make_job(spec: dict[str, Any], name: str = "test-job") -> DreamBoothJob:
    return DreamBoothJob.model_validate(
        {
            "apiVersion": "dreambooth.dev/v1alpha1",
            "kind": "DreamBoothJob",
            "metadata": {"name": name},
            "spec": spec,
        }
    )


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tiny model's tensors are too small for intra-op threads to pay off, and on a busy
    2-core machine two OpenMP threads spinning against other processes make steps ~30x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """Model cache and class-image cache shared by all tests (both are content-addressed)."""
    return tmp_path_factory.mktemp("trainer-shared")


@pytest.fixture
def make_config(shared_dir: Path, tmp_path: Path) -> Callable[..., Any]:
    """TrainerConfig from BASE_SPEC + overrides (camelCase, nested); output under tmp_path."""
    from dreambooth_contract.trainer_config import TrainerConfig

    def make(overrides: dict[str, Any] | None = None, output: Path | None = None):
        spec = merged(BASE_SPEC, overrides or {})
        spec["storage"] = {
            "outputUri": str(output or tmp_path / "output"),
            "priorCacheUri": str(shared_dir / "priors"),
        }
        config = TrainerConfig.from_job(make_job(spec))
        return config.model_copy(update={"cache_dir": str(shared_dir / "models")})

    return make


@pytest.fixture
def tiny_pipeline(make_config):
    """The random://tiny-sd base pipeline (fp32, CPU)."""
    from dreambooth_trainer.models.loading import load_pipeline

    config = make_config()
    return load_pipeline(config.base_model, config.model_cache_dir())
