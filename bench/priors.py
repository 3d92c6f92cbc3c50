"""Class-image generation speed (the priors phase) by generation batch size."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from . import Settings, benchmark
from .training import config_for

BATCH_SIZES = (1, 2, 4, 8, 16)


@benchmark("priors")
def class_images(settings: Settings) -> dict[str, Any]:
    """Class images/s by batch size (classifier-free guidance: 2 UNet passes' worth per image)."""
    from dreambooth_trainer.models.loading import load_pipeline
    from dreambooth_trainer.priors import PriorRequest, generate_batch, generation_device

    inference_steps = 10 if settings.quick else 25
    images = max(BATCH_SIZES)
    config = config_for(settings, {}, class_images=images)
    device, dtype = generation_device()
    pipeline = load_pipeline(config.base_model, config.model_cache_dir(), torch_dtype=dtype)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    request = replace(PriorRequest.from_config(config), steps=inference_steps)
    runs = []
    for batch_size in BATCH_SIZES:
        generate_batch(pipeline, request, range(batch_size))  # warm-up at this shape
        started = time.perf_counter()
        for start in range(0, images, batch_size):
            generate_batch(pipeline, request, range(start, start + batch_size))
        rate = images / (time.perf_counter() - started)
        runs.append({"batch_size": batch_size, "images_per_second": round(rate, 2)})
    return {
        "images": images,
        "inference_steps": inference_steps,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "runs": runs,
    }
