"""Load the base Stable Diffusion model from a hub id, a local directory, s3:// or random://."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, SchedulerMixin

from dreambooth_contract.api import BaseModelSpec, S3Spec
from dreambooth_contract.trainer_config import ConfigError, is_local_model

from ..cache_dirs import build_once
from . import random_models
from .family import UnsupportedModel, open_pipeline

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"


def resolve_model_source(spec: BaseModelSpec, cache_dir: Path, s3: S3Spec | None = None) -> str:
    """What `from_pretrained` should open: a local directory, or a hub id (needs network)."""
    return resolve_source(
        spec.uri,
        cache_dir,
        s3,
        build_random=random_models.materialize,
        index_file="model_index.json",
        kind="diffusers pipeline",
    )


def resolve_source(
    uri: str,
    cache_dir: Path,
    s3: S3Spec | None,
    *,
    build_random: Callable[[str, Path], Path],
    index_file: str,
    kind: str,
) -> str:
    """A hub id as it is; a local directory checked for `index_file`; s3:// downloaded into the
    cache; random:// built into it by `build_random`. Shared with the evaluation encoders."""
    if random_models.is_random_uri(uri):
        return str(build_random(uri, cache_dir))
    if uri.startswith("s3://"):
        return str(download_s3_model(uri, cache_dir, s3 or S3Spec()))
    if is_local_model(uri):
        path = Path(uri).expanduser()
        if not (path / index_file).exists():
            raise FileNotFoundError(f"{uri}: no {kind} here ({index_file} missing)")
        return str(path)
    return uri


def download_s3_model(uri: str, cache_dir: Path, s3: S3Spec) -> Path:
    """Copy a model directory from s3:// into the cache once (keyed by its URI)."""
    from ..storage import open_store  # boto3 only when a model actually lives in S3

    target = cache_dir / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]

    def download(directory: Path) -> None:
        log.info("downloading %s to %s", uri, target)
        open_store(uri, s3.endpoint, s3.region).download_dir("", directory)
        (directory / COMPLETE_MARKER).touch()

    # The processes of a pod share the cache: one download must not delete another's.
    return build_once(target, download, marker=COMPLETE_MARKER)


# What training can target (diffusers' train_dreambooth.py allows the same two).
PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(scheduler: SchedulerMixin) -> str:
    """The scheduler's prediction type, or ConfigError (bad input: exit 2) when unsupported.

    A base model whose scheduler config predicts something else ("sample", a typo) must not
    silently train on the epsilon target: the fine-tuned model would learn the wrong output.
    """
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        allowed = ", ".join(repr(name) for name in PREDICTION_TYPES)
        raise ConfigError(
            "baseModel.uri",
            f"Unknown prediction type {prediction_type!r} in the model's scheduler config "
            f"(scheduler_config.json); training supports {allowed}",
        )
    return prediction_type


def load_pipeline(
    spec: BaseModelSpec,
    cache_dir: Path,
    s3: S3Spec | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """The base pipeline, safety checker off (class images and samples are ours to judge)."""
    source = resolve_model_source(spec, cache_dir, s3)
    try:
        pipeline = open_pipeline(source, torch_dtype, spec.revision, spec.variant)
    except UnsupportedModel as error:
        raise ConfigError("baseModel.uri", f"{spec.uri} is {error}") from None
    check_prediction_type(pipeline.scheduler)  # every phase refuses it before any work
    if spec.vae_uri:
        vae = load_vae(spec.vae_uri, cache_dir, s3, torch_dtype)
        pipeline.register_modules(vae=vae)
    return pipeline


def load_vae(
    uri: str, cache_dir: Path, s3: S3Spec | None, torch_dtype: torch.dtype
) -> AutoencoderKL:
    """baseModel.vaeUri: a VAE in the diffusers layout (or a random:// model's VAE)."""
    try:
        source = resolve_source(
            uri,
            cache_dir,
            s3,
            build_random=lambda name, cache: random_models.materialize(name, cache) / "vae",
            index_file="config.json",
            kind="VAE",
        )
        return AutoencoderKL.from_pretrained(source, torch_dtype=torch_dtype)
    except (OSError, ValueError) as error:
        raise ConfigError("baseModel.vaeUri", f"{uri}: not a diffusers VAE ({error})") from None


def training_noise_scheduler(pipeline: DiffusionPipeline) -> DDPMScheduler:
    """DDPM with the model's own schedule and prediction type (epsilon or v_prediction)."""
    return DDPMScheduler.from_config(pipeline.scheduler.config)
