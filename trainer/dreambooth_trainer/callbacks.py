"""Hooks into the training loop, and the standard ones: progress bar, TensorBoard scalars."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .train import Trainer


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

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class Callback:
    """Hooks into the loop (progress, samples, checkpoints); override what you need."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step; a checkpoint callback restores state here."""

    def on_step_end(self, trainer: Trainer, metrics: StepMetrics) -> None:
        """After each optimizer step (trainer.step is already incremented)."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step."""


class ProgressBar(Callback):
    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self.bar = tqdm(total=trainer.max_steps, initial=trainer.step, desc="training", unit="step")

    def on_step_end(self, trainer: Trainer, metrics: StepMetrics) -> None:
        self.bar.set_postfix(loss=f"{metrics.loss:.4f}", img_s=f"{metrics.images_per_second:.1f}")
        self.bar.update(1)

    def on_train_end(self, trainer: Trainer) -> None:
        self.bar.close()


class TensorBoardScalars(Callback):
    def __init__(self, writer: SummaryWriter):
        self.writer = writer

    def on_step_end(self, trainer: Trainer, metrics: StepMetrics) -> None:
        scalars = {
            "loss/total": metrics.loss,
            "loss/instance": metrics.instance_loss,
            "loss/prior": metrics.prior_loss,
            "train/grad_norm": metrics.grad_norm,
            "train/learning_rate": metrics.learning_rate,
            "train/images_per_second": metrics.images_per_second,
        }
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, metrics.step)

    def on_train_end(self, trainer: Trainer) -> None:
        self.writer.close()
