"""`dreambooth run job.yaml`: the operator's phases as local processes instead of pods.

The same config (`TrainerConfig.from_job`) and the same phase functions the pods call, run one
after another: priors -> train -> export -> evaluate -> samples. One process runs everything in
place; a job with more processes (processesPerNode, nodes) runs priors and training under
torchrun.

Relative paths in the YAML resolve against the YAML file's directory (like docker compose), so
a job file works from any working directory. `--output DIR` overrides storage.outputUri.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth_contract.api import DreamBoothJob, EvaluationStatus
from dreambooth_contract.layout import EXPORT_DIR, PRIORS_DIR, SAMPLES_DIR
from dreambooth_contract.trainer_config import TrainerConfig, sibling_uri
from dreambooth_contract.validation import JobInvalid, load_jobs

from .evaluation.phase import run_evaluation
from .export import load_exported, run_export
from .locations import publish_dir, working_dir
from .priors import run_priors
from .samples import render_grid
from .train import run_training

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
FINAL_SAMPLES = "final.png"


@dataclass
class LocalRun:
    output: Path
    digest: str = ""
    evaluation: EvaluationStatus | None = None
    evaluation_error: str | None = None  # what a failed evaluation said; the artifact stands
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        log.info("phase %s", name)
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 2)


def load_config(job_file: Path, output: Path | None = None) -> TrainerConfig:
    """The trainer config of the single DreamBoothJob in `job_file` (JobInvalid if bad)."""
    jobs = load_jobs(job_file.read_text())
    if len(jobs) != 1 or not isinstance(jobs[0], DreamBoothJob):
        kinds = ", ".join(j.kind for j in jobs)
        raise JobInvalid([f"document: expected one DreamBoothJob, found {kinds}"])
    job = jobs[0]
    config = TrainerConfig.from_job(job, base_dir=job_file.resolve().parent)
    if output is None:
        return config
    output_uri = str(output.resolve())
    update = {"output_uri": output_uri}
    if job.spec.storage.prior_cache_uri is None:
        update["prior_cache_uri"] = sibling_uri(output_uri, PRIORS_DIR)
    return config.model_copy(update=update)


def run_local(config: TrainerConfig, progress: bool = True) -> LocalRun:
    output = working_dir(config.output_uri, config.model_cache_dir())
    output.mkdir(parents=True, exist_ok=True)
    config_file = output / CONFIG_FILE
    config_file.write_text(config.to_json())
    run = LocalRun(output)
    with run.phase("priors"):
        run_ranks(config, "priors", config_file, lambda: run_priors(config, progress=progress))
    with run.phase("train"):
        run_ranks(config, "train", config_file, lambda: run_training(config, progress=progress))
    with run.phase("export"):
        run.digest = run_export(config).digest
    if config.evaluation.enabled:
        with run.phase("evaluate"):
            evaluate_artifact(config, run)
    with run.phase("samples"):
        render_final_samples(config, output)
    return run


def evaluate_artifact(config: TrainerConfig, run: LocalRun) -> None:
    """The evaluation judges the artifact; it cannot unmake it. A failure (an encoder that will
    not load, a hub out of reach) is reported, and the run goes on, as the operator's
    evaluation phase fails only its own condition."""
    try:
        run.evaluation = run_evaluation(config, run.output / EXPORT_DIR)
    except Exception as error:
        log.exception("evaluation failed; the exported artifact is unaffected")
        run.evaluation_error = f"{type(error).__name__}: {error}"


def run_ranks(
    config: TrainerConfig, command: str, config_file: Path, in_process: Callable[[], object]
) -> None:
    """One process runs the phase in place; more run `dreambooth <command>` under torchrun,
    all on this machine (a multi-node job runs as one node)."""
    if config.world_size == 1:
        in_process()
        return
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={config.world_size}",
        "-m", "dreambooth_operator.cli", command, "--config", str(config_file),
    ]  # fmt: skip
    subprocess.run(argv, check=True)


def render_final_samples(config: TrainerConfig, output: Path) -> Path:
    """Samples from the exported artifact as loaded from disk: proof the artifact works."""
    pipeline = load_exported(config, output / EXPORT_DIR)
    prompts = config.sample_prompts or [config.instance.prompt]
    grid = render_grid(pipeline, prompts, config.validation, config.training.resolution)
    path = output / SAMPLES_DIR / FINAL_SAMPLES
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    publish_dir(path.parent, config.output(SAMPLES_DIR), config.s3)
    return path
