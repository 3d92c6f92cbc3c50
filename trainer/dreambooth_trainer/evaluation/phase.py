"""The evaluation phase of a job: the exported pipeline against the base model, on the subject's
own photos, into <outputUri>/evaluation (report.json, grid.png) and TensorBoard (<outputUri>/logs).

`run_evaluation` scores an export already on disk (`dreambooth run`); `evaluate_export` fetches
it from the job's storage first (the operator's evaluation pod, `dreambooth evaluate`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from dreambooth_contract.api import EvaluationStatus
from dreambooth_contract.layout import EVALUATION_DIR, EXPORT_DIR, LOGS_DIR
from dreambooth_contract.trainer_config import ConfigError, TrainerConfig

from ..data import list_images, load_rgb
from ..digest import verify
from ..export import load_exported
from ..locations import fetch_dir, publish_dir, working_dir
from ..models.loading import load_pipeline
from ..tracking import log_evaluation
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
    # The scores belong to this artifact: checked against its manifest, named in the report.
    artifact_digest = verify(export_dir)
    trained = load_exported(config, export_dir, torch_dtype=dtype).to(device)
    base = load_pipeline(config.base_model, cache, config.s3, torch_dtype=dtype).to(device)
    directory = working_dir(config.output(EVALUATION_DIR), cache)
    status = evaluate(trained, base, real, plan_for(config), encoders, directory, artifact_digest)
    publish_dir(directory, config.output(EVALUATION_DIR), config.s3)
    log_scores(config, status, directory / GRID_FILE)
    log.info("evaluation: %s", status.summary)
    return status.model_copy(
        update={
            "report_uri": config.output(EVALUATION_DIR, REPORT_FILE),
            "grid_uri": config.output(EVALUATION_DIR, GRID_FILE),
        }
    )


def evaluate_export(config: TrainerConfig) -> EvaluationStatus:
    """The evaluation pod: the job's export, fetched from its storage, scored."""
    export_dir = fetch_dir(config.output(EXPORT_DIR), config.s3, config.model_cache_dir())
    return run_evaluation(config, export_dir)


def scalars(status: EvaluationStatus) -> dict[str, float]:
    """`evaluation/<model>/<metric>` -> score, for TensorBoard and experiment trackers."""
    values = {}
    for model in ("trained", "base"):
        scores = getattr(status, model).model_dump(by_alias=True, exclude_none=True)
        values |= {f"evaluation/{model}/{metric}": value for metric, value in scores.items()}
    return values


def log_scores(config: TrainerConfig, status: EvaluationStatus, grid: Path) -> None:
    """The scores and the grid beside the training's own logs: TensorBoard (scalars at the last
    training step, the grid as an image) and W&B when the spec asks for it."""
    local = working_dir(config.output(LOGS_DIR), config.model_cache_dir())
    step = config.training.max_steps
    values = scalars(status)
    with SummaryWriter(str(local)) as writer:
        for name, value in values.items():
            writer.add_scalar(name, value, step)
        with Image.open(grid) as image:
            pixels = np.asarray(image.convert("RGB"))
        writer.add_image("evaluation/grid", pixels, step, dataformats="HWC")
    log_evaluation(config, status, values, grid)
    publish_dir(local, config.output(LOGS_DIR), config.s3)
