"""Trainer subcommands of `dreambooth` (imported lazily by dreambooth_operator.cli, the one
import between the two programs).

    dreambooth run JOB.yaml [--output DIR]       everything, locally
    dreambooth priors --config FILE [--shard i/n] one shard of class images (a priors pod)
    dreambooth train --config FILE               one torchrun rank (a training pod)
    dreambooth export --config FILE              the artifact and its digest (the export pod)
    dreambooth evaluate --config FILE            the export's and the base model's scores
                                                 (the evaluation pod)

Exit codes: 0 done, 1 failed while running, 2 bad input (the message names the field), 143
stopped by SIGTERM after saving a checkpoint (train).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import click
import yaml

from dreambooth_contract import env

TERMINATION_MESSAGE_CHARS = 3000  # Kubernetes keeps 4096 bytes of it
EXIT_TERMINATED = 143

# Quiet the libraries before they are imported: their import-time notices are noise here.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

config_option = click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Trainer config (JSON, as the operator writes it into the job's ConfigMap).",
)


def configure_logging() -> None:
    """Our log lines and progress bars; the libraries' per-file loading bars are noise."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    from .lean_imports import skip_unused_imports

    skip_unused_imports()


def bad_input(lines: list[str]) -> NoReturn:
    for line in lines:
        click.echo(f"error: {line}", err=True)
    leave_termination_message(env.BAD_INPUT_PREFIX + "; ".join(lines))
    sys.exit(env.EXIT_BAD_INPUT)


def leave_termination_message(message: str) -> None:
    """Write the pod's termination message, where the operator set its path.

    Under torchrun the pod's exit code is torchrun's (1 for any failed worker), so exit code 2
    alone would not tell the operator that a restart cannot help; the message does.
    """
    path = os.environ.get(env.TERMINATION_LOG_ENV)
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(message[:TERMINATION_MESSAGE_CHARS])


@contextmanager
def input_errors() -> Iterator[None]:
    """Map every kind of bad input to exit code 2 with field-naming messages."""
    from pydantic import ValidationError

    from dreambooth_contract.trainer_config import ConfigError, TrainerConfig
    from dreambooth_contract.validation import JobInvalid, problems

    from .storage import InvalidUri

    try:
        yield
    except JobInvalid as error:
        bad_input(error.problems)
    except ValidationError as error:
        bad_input(problems(error, root=TrainerConfig))
    except ConfigError as error:
        bad_input([str(error)])
    except InvalidUri as error:  # the config's URIs are checked; this names derived ones too
        bad_input([str(error)])


def read_config(path: Path):
    import yaml

    from dreambooth_contract.trainer_config import TrainerConfig

    try:
        document = yaml.safe_load(path.read_text())  # JSON is YAML
    except yaml.YAMLError as error:
        bad_input([f"{path}: not JSON/YAML: {error}"])
    return TrainerConfig.model_validate(document)


def parse_shard(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    index, _, total = value.partition("/")
    if not (index.isdigit() and total.isdigit() and int(index) < int(total)):
        raise click.BadParameter("expected i/n with 0 <= i < n, e.g. 0/4")
    return int(index), int(total)


@click.command()
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--output", type=click.Path(file_okay=False, path_type=Path), help="Output directory."
)
def run(job_file: Path, output: Path | None) -> None:
    """Run a DreamBoothJob locally: priors, train, export, evaluate, samples."""
    configure_logging()
    from .local import load_config, run_local

    with input_errors():
        config = load_config(job_file, output)
        result = run_local(config)
    click.echo(f"output: {result.output}")
    click.echo(f"digest: {result.digest}")
    if result.evaluation is not None:
        # What the operator puts in status.evaluation, in the shape `kubectl get -o yaml` shows.
        evaluation = result.evaluation.model_dump(mode="json", by_alias=True, exclude_none=True)
        click.echo(yaml.safe_dump({"evaluation": evaluation}, sort_keys=False).rstrip())
    if result.evaluation_error is not None:
        click.echo(f"evaluation failed: {result.evaluation_error}")
    click.echo(f"seconds: {result.seconds}")


@click.command()
@config_option
@click.option(
    "--shard",
    callback=parse_shard,
    help="Shard i/n of the class images (default: from the torchrun and pod rank).",
)
def priors(config_file: Path, shard: tuple[int, int] | None) -> None:
    """Generate class-prior images (one shard)."""
    configure_logging()
    from .metrics import PriorMetrics, exporting, prepare_multiprocess_dir
    from .priors import run_priors, shard_from_env

    prepare_multiprocess_dir()
    metrics = PriorMetrics()
    # One exporter per pod: its first process (local rank 0) serves every process's count.
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    with input_errors(), exporting(metrics.served_registry(), rank=local_rank):
        config = read_config(config_file)
        shard_of = shard or shard_from_env()
        run_priors(config, *shard_of, progress=True, on_written=metrics.images_generated.inc)
    exit_without_teardown(0)


@click.command()
@config_option
def train(config_file: Path) -> None:
    """Train (one torchrun rank)."""
    configure_logging()
    from .train import TrainingInterrupted, run_training

    with input_errors():
        try:
            run_training(read_config(config_file))
        except TrainingInterrupted as stopped:
            # 128 + SIGTERM, as if the signal had ended the process, but after a checkpoint.
            click.echo(f"interrupted: {stopped}", err=True)
            exit_without_teardown(EXIT_TERMINATED)
    exit_without_teardown(0)


def exit_without_teardown(code: int) -> NoReturn:
    """End a phase's process once its work is committed, skipping the interpreter's teardown.

    Tearing down an interpreter that holds torch, diffusers and their kin takes seconds (1.4-2.2
    s on a 2-core machine) that a pod's phase would wait for, doing nothing. And in training,
    freeing a gloo process group (held by DDP's reducer) can deadlock: its destructor holds the
    GIL while joining worker threads that need the GIL to free their last tensors
    (pytorch/pytorch#56297). One rank hung so for minutes after a successful run. Everything
    that matters (checkpoints, trained weights, status) is written and flushed by now.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@click.command()
@config_option
def export(config_file: Path) -> None:
    """Export the trained pipeline and print its digest."""
    configure_logging()
    from .export import run_export
    from .progress import reporter_from_env

    with input_errors():
        config = read_config(config_file)
        result = run_export(config)
    with reporter_from_env(config.training.max_steps, must_deliver=True) as reporter:
        reporter.report_artifact(result.status())
    click.echo(result.digest)
    exit_without_teardown(0)


@click.command()
@config_option
def evaluate(config_file: Path) -> None:
    """Score the exported artifact and the base model; report them as status.evaluation.

    Any failure (an encoder that will not load, a hub out of reach) leaves its reason as the
    termination message: the operator fails the evaluation only, never the job."""
    configure_logging()
    from .evaluation.phase import evaluate_export
    from .progress import reporter_from_env

    with input_errors():
        config = read_config(config_file)
    try:
        status = evaluate_export(config)
        with reporter_from_env(config.training.max_steps, must_deliver=True) as reporter:
            reporter.report_evaluation(status)
    except Exception as error:
        leave_termination_message(f"{type(error).__name__}: {error}")
        raise
    click.echo(status.summary)
