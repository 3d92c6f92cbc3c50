"""The evaluation phase of a job: the exported pipeline against the base model, on the subject's
own photos, into <outputUri>/evaluation (report.json, grid.png)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from dreambooth_contract.api import EvaluationStatus
from dreambooth_contract.layout import EVALUATION_DIR
from dreambooth_contract.trainer_config import ConfigError, TrainerConfig

from ..data import list_images, load_rgb
from ..export import load_exported
from ..locations import fetch_dir, publish_dir, working_dir
from ..models.loading import load_pipeline
from .encoders import load_encoders
from .prompts import plan_for
from .run import GRID_FILE, REPORT_FILE, evaluate

log = logging.getLogger(__name__)


def evaluation_device() -> tuple[str, torch.dtype]:
    """A GPU generates in fp16, as inference does; the CPU in float32."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def load_subject_images(config: TrainerConfig) -> list[Image.Image]:
    field = "instance.imagesUri"
    directory = fetch_dir(config.instance.images_uri, config.s3, config.model_cache_dir())
    paths = list_images(directory)
    if not paths:
        raise ConfigError(field, f"no subject images in {config.instance.images_uri}")
    return [load_rgb(path, field) for path in paths]


def run_evaluation(config: TrainerConfig, export_dir: Path) -> EvaluationStatus:
    """Score the artifact in `export_dir` and the base model; publish the report and grid."""
    cache = config.model_cache_dir()
    device, dtype = evaluation_device()
    real = load_subject_images(config)
    encoders = load_encoders(config.evaluation, cache, config.s3, device)
    trained = load_exported(config, export_dir, torch_dtype=dtype).to(device)
    base = load_pipeline(config.base_model, cache, config.s3, torch_dtype=dtype).to(device)
    directory = working_dir(config.output(EVALUATION_DIR), cache)
    status = evaluate(trained, base, real, plan_for(config), encoders, directory)
    publish_dir(directory, config.output(EVALUATION_DIR), config.s3)
    log.info("evaluation: %s", status.summary)
    return status.model_copy(
        update={
            "report_uri": config.output(EVALUATION_DIR, REPORT_FILE),
            "grid_uri": config.output(EVALUATION_DIR, GRID_FILE),
        }
    )
