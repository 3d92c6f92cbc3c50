"""Sample grids: how users judge a run. Fixed seeds, so grids from different steps compare."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from dreambooth_contract.api import ValidationSpec

from .callbacks import Callback, StepMetrics, TrainingState
from .models.generation import generate_images
from .parallel.base import mixed_precision_autocast


@torch.inference_mode()
def render_grid(
    pipeline: StableDiffusionPipeline,
    prompts: list[str],
    spec: ValidationSpec,
    resolution: int,
) -> Image.Image:
    """One image per prompt, side by side; prompt i always starts from the noise of seed + i."""
    generators = [torch.Generator().manual_seed(spec.seed + i) for i in range(len(prompts))]
    images = generate_images(
        pipeline,
        prompts,
        None,
        width=resolution,
        height=resolution,
        steps=spec.num_inference_steps,
        guidance_scale=spec.guidance_scale,
        generators=generators,
    )
    return make_image_grid(images, rows=1, cols=len(images))


def sample_path(directory: Path, step: int) -> Path:
    """The grid rendered after `step`."""
    return directory / f"step-{step:06d}.png"


class ValidationSamples(Callback):
    """Every `validation.interval` steps and after the last: a PNG grid and TensorBoard.

    On every rank: sharded backends gather the weights collectively; rank 0 renders."""

    def __init__(
        self,
        spec: ValidationSpec,
        resolution: int,
        directory: Path,
        writer: SummaryWriter | None = None,
    ):
        self.spec = spec
        self.resolution = resolution
        self.directory = directory
        self.writer = writer

    def on_step_end(self, state: TrainingState, metrics: StepMetrics) -> None:
        due = state.step % self.spec.interval == 0 or state.step == state.max_steps
        if due and self.spec.prompts:
            self.render(state)

    def render(self, state: TrainingState) -> Path | None:
        """Every rank calls it (sharded weights are gathered); rank 0 renders and saves."""
        pipeline = state.pipeline()
        if not state.world.is_main:
            return None
        # Autocast whatever the backend (FSDP2 trains without it): the gathered weights are
        # float32 and the frozen VAE and text encoder run in the mixed-precision dtype.
        with mixed_precision_autocast(state.world.device, state.autocast_dtype):
            grid = render_grid(pipeline, self.spec.prompts, self.spec, self.resolution)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = sample_path(self.directory, state.step)
        grid.save(path)
        if self.writer is not None:
            pixels = torch.from_numpy(np.array(grid)).permute(2, 0, 1)
            self.writer.add_image("samples", pixels, state.step)
        return path
