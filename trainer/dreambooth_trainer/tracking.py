"""Weights & Biases, when `spec.tracking.wandb` asks for it: the same scalars TensorBoard gets,
the sample grids and the evaluation, in one run per job.

The run id is derived from the job (its name and output location), so every pod of a job logs to
the same run: the training pods (rank 0), after a restart too (`resume="allow"`), and the
evaluation pod. The API key comes only from the environment (WANDB_API_KEY, which the operator
sets from the spec's Secret); without one the run is logged offline (WANDB_MODE=offline works
too, as in the tests) into <outputUri>/logs/wandb, published with the TensorBoard logs, for
`wandb sync` to upload later.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dreambooth_contract.layout import LOGS_DIR, SAMPLES_DIR
from dreambooth_contract.trainer_config import TrainerConfig

from .callbacks import Callback, StepMetrics, TrainingState, step_scalars
from .locations import working_dir
from .samples import sample_path

if TYPE_CHECKING:
    from dreambooth_contract.api import EvaluationStatus


def run_id(config: TrainerConfig) -> str:
    """One run per job: its name, and a hash of its output location (one job's own)."""
    digest = hashlib.sha256(config.output_uri.encode()).hexdigest()[:8]
    return f"{config.job_name}-{digest}"


def logs_dir(config: TrainerConfig) -> Path:
    """Where wandb makes its `wandb` directory (of offline runs): beside TensorBoard's files."""
    return working_dir(config.output(LOGS_DIR), config.model_cache_dir())


def start_run(config: TrainerConfig, job_type: str) -> Any | None:
    """The job's W&B run (None when the spec asks for none), for this process to log to."""
    spec = config.tracking.wandb
    if spec is None:
        return None
    import wandb

    directory = logs_dir(config)
    directory.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get("WANDB_MODE") or (
        "online" if os.environ.get("WANDB_API_KEY") else "offline"
    )
    return wandb.init(
        project=spec.project,
        entity=spec.entity,
        name=spec.run_name or config.job_name,
        id=run_id(config),
        resume="allow",
        job_type=job_type,
        dir=str(directory),
        mode=mode,
        config={
            "baseModel": config.base_model.uri,
            "instancePrompt": config.instance.prompt,
            "training": config.training.model_dump(mode="json", by_alias=True),
            "evaluation": config.evaluation.model_dump(mode="json", by_alias=True),
        },
    )


class WandbLogger(Callback):
    """Rank 0: each step's scalars (as TensorBoard's) and each sample grid when it is rendered
    (this callback runs after the samples' own)."""

    def __init__(self, config: TrainerConfig, output: Path):
        self.config, self.samples = config, output / SAMPLES_DIR
        self.run: Any | None = None

    def on_train_start(self, state: TrainingState) -> None:
        self.run = start_run(self.config, "train")

    def on_step_end(self, state: TrainingState, metrics: StepMetrics) -> None:
        values: dict[str, Any] = dict(step_scalars(metrics))
        grid = sample_path(self.samples, metrics.step)
        if grid.is_file():
            import wandb

            values["samples"] = wandb.Image(str(grid), caption=f"step {metrics.step}")
        self.run.log(values, step=metrics.step)

    def on_train_end(self, state: TrainingState) -> None:
        self.run.finish()


def log_evaluation(
    config: TrainerConfig, status: EvaluationStatus, scalars: dict[str, float], grid: Path
) -> None:
    """The evaluation's scores (history and summary) and its grid, in the job's run."""
    run = start_run(config, "evaluate")
    if run is None:
        return
    import wandb

    # The summary keeps the last logged value of each key (the scores) by itself.
    run.log({**scalars, "evaluation/grid": wandb.Image(str(grid), caption=status.summary)})
    run.summary["evaluation/diversityMethod"] = status.diversity_method
    run.finish()
