"""Hooks into the training loop, and the standard ones: progress bar, TensorBoard scalars,
status for the operator and Prometheus; and one for tests, a pause at a given step.

Callbacks see the loop through `TrainingState` only (train.Trainer is one), so that they need
not know the trainer, and the trainer imports them, not the reverse. The loop calls each hook on
its callbacks in list order (train.rank_callbacks builds the list and says why that order); a
callback never calls another's hooks.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from .metrics import TrainerMetrics, start_exporter
from .progress import ProgressReporter, reporter_from_env
from .speedups import compile_seconds

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    import torch
    from diffusers import StableDiffusionPipeline

    from .checkpoint_files import CheckpointInfo
    from .parallel import World

log = logging.getLogger(__name__)


@dataclass
class StepMetrics:
    step: int
    loss: float
    instance_loss: float
    prior_loss: float
    grad_norm: float
    learning_rate: float
    images: int  # images (instance + class) processed by all ranks in this step
    seconds: float
    # data/forward/backward/optimizer seconds when the trainer times phases (timing.PhaseClock)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # each subject's instance loss by name, with several subjects (one: instance_loss)
    subject_losses: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class TrainingState(Protocol):
    """What callbacks read of the training loop, and what they may ask of it."""

    @property
    def world(self) -> World: ...

    @property
    def step(self) -> int:
        """Optimizer steps done."""

    @property
    def max_steps(self) -> int: ...

    @property
    def stop_reason(self) -> str | None:
        """Why training ends early; None while it runs to max_steps."""

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The mixed-precision dtype the frozen modules run in (None: full precision)."""

    def request_stop(self, reason: str) -> None:
        """End training after this step (every rank must ask alike)."""

    def pipeline(self) -> StableDiffusionPipeline:
        """Collective. A sampling pipeline over the current weights (usable on rank 0)."""


class Callback:
    """Hooks into the loop (progress, samples, reports); override what you need."""

    def on_train_start(self, state: TrainingState) -> None:
        """Before the first step (after a resume: state.step is where training goes on)."""

    def on_step_end(self, state: TrainingState, metrics: StepMetrics) -> None:
        """After each optimizer step (state.step is already incremented)."""

    def on_checkpoint(self, state: TrainingState, info: CheckpointInfo, seconds: float) -> None:
        """On rank 0, after a checkpoint was committed (`seconds` to save and commit it)."""

    def on_train_end(self, state: TrainingState) -> None:
        """After the last step (or the step at which training was asked to stop)."""


class ProgressBar(Callback):
    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_start(self, state: TrainingState) -> None:
        self.bar = tqdm(total=state.max_steps, initial=state.step, desc="training", unit="step")

    def on_step_end(self, state: TrainingState, metrics: StepMetrics) -> None:
        self.bar.set_postfix(loss=f"{metrics.loss:.4f}", img_s=f"{metrics.images_per_second:.1f}")
        self.bar.update(1)

    def on_train_end(self, state: TrainingState) -> None:
        self.bar.close()


def step_scalars(metrics: StepMetrics) -> dict[str, float]:
    """What a step logs, by name: to TensorBoard and to experiment trackers alike."""
    return {
        "loss/total": metrics.loss,
        "loss/instance": metrics.instance_loss,
        "loss/prior": metrics.prior_loss,
        "train/grad_norm": metrics.grad_norm,
        "train/learning_rate": metrics.learning_rate,
        "train/images_per_second": metrics.images_per_second,
        **{f"loss/instance/{name}": loss for name, loss in metrics.subject_losses.items()},
    }


class TensorBoardScalars(Callback):
    def __init__(self, writer: SummaryWriter):
        self.writer = writer

    def on_step_end(self, state: TrainingState, metrics: StepMetrics) -> None:
        for name, value in step_scalars(metrics).items():
            self.writer.add_scalar(name, value, metrics.step)

    def on_train_end(self, state: TrainingState) -> None:
        self.writer.close()


class StatusReport(Callback):
    """Rank 0's report: progress and checkpoints for the operator (`progress.reporter_from_env`)
    and Prometheus metrics on /metrics (`metrics.start_exporter`). With `compiled` (the UNet is
    compiled at its first step), also what compiling cost: the log and a gauge say it after
    this process's second step."""

    def __init__(self, metrics: TrainerMetrics | None = None, compiled: bool = False):
        self.metrics = metrics or TrainerMetrics()
        self.compiled = compiled
        self.step_seconds: list[float] = []  # this process's first steps, while compiling
        self.reporter: ProgressReporter | None = None
        self.server: WSGIServer | None = None

    def announce(self, activity: str, total_steps: int, rank: int) -> None:
        """Before training starts (the trainer is being built): say what rank 0 is doing."""
        if self.reporter is None:
            self.reporter = reporter_from_env(total_steps, rank)
        self.reporter.announce(activity)

    def on_train_start(self, state: TrainingState) -> None:
        if self.reporter is None:
            self.reporter = reporter_from_env(state.max_steps, state.world.rank)
        self.metrics.total_steps.set(state.max_steps)
        self.metrics.step.set(state.step)
        try:
            self.server = start_exporter(self.metrics, state.world.rank)
        except OSError as exc:  # the port is taken (another trainer on this host): go on
            log.warning("trainer metrics not served: %s", exc)
        self.reporter.report(state.step)  # a resumed run says where it starts at once

    def on_step_end(self, state: TrainingState, metrics: StepMetrics) -> None:
        self.reporter.report(
            metrics.step, loss=metrics.loss, images_per_second=metrics.images_per_second
        )
        self.metrics.observe_step(
            metrics.step, metrics.loss, metrics.images_per_second, metrics.subject_losses
        )
        if self.compiled and len(self.step_seconds) < 2:
            self.step_seconds.append(metrics.seconds)
            if len(self.step_seconds) == 2:
                self.report_compile(*self.step_seconds)

    def report_compile(self, first: float, second: float) -> None:
        seconds = compile_seconds(first, [second])
        self.metrics.compile_seconds.set(seconds)
        log.info(
            "torch.compile took about %.1f s (first step %.1f s, the next %.2f s)",
            seconds, first, second,
        )  # fmt: skip

    def on_checkpoint(self, state: TrainingState, info: CheckpointInfo, seconds: float) -> None:
        self.reporter.report_checkpoint(info)
        self.metrics.checkpoint_save_seconds.observe(seconds)
        self.metrics.checkpoint_step.set(info.step)

    def on_train_end(self, state: TrainingState) -> None:
        self.reporter.close()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


# -- a pause for tests ----------------------------------------------------------------------------

PAUSE_ENV = "DREAMBOOTH_PAUSE_AT"


class PauseAtStep(Callback):
    """A test hook, off unless ``DREAMBOOTH_PAUSE_AT=STEP:FILE`` is set (`pause_from_env`): after
    step STEP, and after everything the callbacks before it do then (a checkpoint, a status
    report, metrics), training waits while FILE exists. A test that must act at a known point
    of a run (kill it after a given checkpoint, scrape its metrics) creates FILE before the run,
    acts once the run reached STEP, and deletes FILE to let it go on, instead of racing a
    trainer whose speed depends on the machine. A run resumed past STEP never pauses."""

    def __init__(self, step: int, path: Path, poll_seconds: float = 0.05):
        self.step, self.path, self.poll_seconds = step, path, poll_seconds

    def on_step_end(self, state: TrainingState, metrics: StepMetrics) -> None:
        if state.step != self.step or not self.path.exists():
            return
        log.warning("%s: paused after step %d while %s exists", PAUSE_ENV, self.step, self.path)
        while self.path.exists():
            time.sleep(self.poll_seconds)
        log.warning("%s: going on after step %d", PAUSE_ENV, self.step)


def pause_from_env(environ: Mapping[str, str] = os.environ) -> PauseAtStep | None:
    """The pause ``DREAMBOOTH_PAUSE_AT`` asks for (``STEP:FILE``), or None when unset."""
    value = environ.get(PAUSE_ENV, "")
    if not value:
        return None
    step, _, path = value.partition(":")
    if not step.isdigit() or not path:
        raise ValueError(f"{PAUSE_ENV}={value!r}: expected STEP:FILE, such as 8:/tmp/pause")
    return PauseAtStep(int(step), Path(path))
