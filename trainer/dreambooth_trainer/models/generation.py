"""Stable Diffusion (1.x/2.x and XL) text-to-image: the one pipeline call that turns prompts
into images.

The priors phase, the inference server, validation samples and the GPU checks all generate
through here, so a family whose pipeline wants other arguments (SDXL: sizes it conditions on,
two prompts) changes one place.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline


def generate_images(
    pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline,
    prompts: list[str],
    negative_prompts: list[str] | None,
    *,
    width: int,
    height: int,
    steps: int,
    guidance_scale: float,
    generators: list[torch.Generator],
    output_type: str = "pil",
) -> Any:
    """Image i of `prompts` starts from the noise of `generators[i]` (CPU generators: the same
    noise on every device). With `negative_prompts` None the unconditional half of classifier-free
    guidance encodes the empty prompt (SD), or is zeros (SDXL, whose pipelines say
    force_zeros_for_empty_prompt). Returns PIL images, or an array for output_type "np".

    SDXL is told the image size as its micro-conditioning too: an uncropped image of
    width x height (what training tells it of an uncropped photo at its resolution).
    """
    sizes = {}
    if isinstance(pipeline, StableDiffusionXLPipeline):
        sizes = {"original_size": (height, width), "target_size": (height, width)}
    return pipeline(
        prompt=prompts,
        negative_prompt=negative_prompts,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generators,
        output_type=output_type,
        **sizes,
    ).images
