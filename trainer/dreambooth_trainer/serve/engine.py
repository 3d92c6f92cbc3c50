"""Run one batch of generations through the diffusers pipeline.

All jobs of a batch share size, steps, guidance and scheduler (the batch key), so their prompts
go through ONE pipeline call: one text-encoder pass and, per step, one UNet forward over
2 x images latents (diffusers concatenates the unconditional and conditional halves for
classifier-free guidance when guidance_scale > 1). On a multi-adapter server the jobs may name
different adapters: each image's rows run under its own (AdapterCache.per_row), so 8 clients
spread over 10 adapters still fill a batch instead of running one small batch per adapter.

Reproducibility: each image gets its own CPU torch.Generator seeded with its seed, and diffusers
draws each image's initial latents (and ancestral noise) from its own generator. The same seed
therefore gives the same image whether it ran alone or in a batch of eight, and the same noise
on CPU or GPU (CPU generators are device-independent; latents move to the device afterwards).
"The same" up to float rounding: a batched GEMM may sum in another order (~1e-6 in the
latents), which can move a pixel by one 8-bit level; the same request alone is bit-identical.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import diffusers
import torch
from diffusers import StableDiffusionPipeline
from PIL.Image import Image

from ..models.generation import generate_images
from .adapters import AdapterCache, VerifiedAdapter
from .batching import Job
from .schedulers import SCHEDULERS
from .schemas import Generation


class Text2ImageEngine:
    def __init__(self, pipeline: StableDiffusionPipeline, adapters: AdapterCache | None = None):
        self.pipeline = pipeline
        # Adapters published to a multi-adapter server; None serves the pipeline as loaded.
        self.adapters = adapters
        # One pipeline object per scheduler, all sharing the same modules (no weight copies):
        # schedulers keep per-call state, so they are not swapped on a shared pipeline.
        self._pipelines: dict[str | None, StableDiffusionPipeline] = {None: pipeline}

    @property
    def native_side(self) -> int:
        """The resolution the model was trained at (512 for SD1.5), the default size."""
        return int(self.pipeline.unet.config.sample_size) * self.pipeline.vae_scale_factor

    def __call__(self, jobs: Sequence[Job[Generation]]) -> list[list[Image]]:
        """Images of each job, in order; every job must have the same batch key. Their adapters
        may differ (at most the cache's max_loaded): each image's rows run under its own."""
        generations = [job.payload for job in jobs]
        row_adapters = [g.adapter for g in generations for _ in range(g.n)]
        with self._adapters_per_row(row_adapters):
            images = self._generate(generations)
        results, start = [], 0
        for g in generations:
            results.append(images[start : start + g.n])
            start += g.n
        return results

    def _adapters_per_row(self, adapters: list[VerifiedAdapter | None]) -> AbstractContextManager:
        if self.adapters is None:
            return nullcontext()
        return self.adapters.per_row(adapters)

    def _generate(self, generations: list[Generation]) -> list[Image]:
        first = generations[0]
        prompts = [g.prompt for g in generations for _ in range(g.n)]
        negatives = [g.negative_prompt for g in generations for _ in range(g.n)]
        generators = [
            torch.Generator("cpu").manual_seed(seed) for g in generations for seed in g.seeds
        ]
        with torch.inference_mode():
            return generate_images(
                self._pipeline_for(first.scheduler),
                prompts,
                # "" and None encode the same unconditional prompt; a list only when needed.
                negatives if any(negatives) else None,
                width=first.width,
                height=first.height,
                steps=first.steps,
                guidance_scale=first.guidance_scale,
                generators=generators,
            )

    def warm_up(self) -> None:
        """One tiny call so that lazy initialisation (kernels, allocator) happens before ready."""
        side = self.pipeline.vae_scale_factor * 8
        self.pipeline(
            prompt="warm up",
            width=side,
            height=side,
            num_inference_steps=1,
            guidance_scale=2.0,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
        )

    def _pipeline_for(self, scheduler: str | None) -> StableDiffusionPipeline:
        if scheduler not in self._pipelines:
            class_name, overrides = SCHEDULERS[scheduler]
            scheduler_cls = getattr(diffusers, class_name)
            # from_pipe: the same modules and the pipeline's own options (SD's safety checker
            # off, SDXL's watermarker), whichever family the pipeline is.
            pipeline = type(self.pipeline).from_pipe(
                self.pipeline,
                scheduler=scheduler_cls.from_config(self.pipeline.scheduler.config, **overrides),
            )
            pipeline.set_progress_bar_config(disable=True)
            self._pipelines[scheduler] = pipeline
        return self._pipelines[scheduler]


def png_base64(image: Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
