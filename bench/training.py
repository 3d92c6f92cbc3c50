"""Training throughput with and without latent caching, and class-image generation speed."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import Settings, benchmark

REPO = Path(__file__).resolve().parents[1]
SUBJECT_DIR = REPO / "examples" / "local" / "subject"
WARMUP_STEPS = 2


def config_for(settings: Settings, training: dict[str, Any], class_images: int = 4):
    """A TrainerConfig for `settings.model` (through the same mapping the operator uses)."""
    from dreambooth_operator.api import DreamBoothJob
    from dreambooth_trainer.config import TrainerConfig

    spec = {
        "baseModel": {"uri": settings.model},
        "instance": {"imagesUri": str(SUBJECT_DIR), "prompt": "a photo of sks cube"},
        "priorPreservation": {
            "classPrompt": "a photo of cube",
            "numClassImages": class_images,
            "generation": {"steps": 4, "batchSize": 4},
        },
        "training": {
            "resolution": settings.resolution,
            "mixedPrecision": "no",
            "gradientCheckpointing": False,
            "validation": {"prompts": []},
            **training,
        },
        "resources": {"gpusPerNode": 0, "processesPerNode": 1},
        "storage": {"outputUri": str(settings.work_dir / "output")},
    }
    job = DreamBoothJob.model_validate(
        {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob",
         "metadata": {"name": "bench"}, "spec": spec}
    )  # fmt: skip
    config = TrainerConfig.from_job(job)
    return config.model_copy(update={"cache_dir": str(settings.work_dir / "models")})


def steps_per_second(trainer, steps: int) -> float:
    for _ in range(WARMUP_STEPS):
        trainer.train_step()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return steps / (time.perf_counter() - started)


@benchmark("training")
def training(settings: Settings) -> dict[str, Any]:
    """Optimizer steps/s and images/s (instance + class), VAE latents cached or encoded per step."""
    from dreambooth_trainer import priors
    from dreambooth_trainer.parallel import World
    from dreambooth_trainer.train import build_trainer

    steps = 5 if settings.quick else 20
    runs = []
    for batch_size in (1,) if settings.quick else (1, 4):
        for cache_latents in (True, False):
            config = config_for(
                settings,
                {"batchSize": batch_size, "cacheLatents": cache_latents, "maxSteps": 10**6},
            )
            trainer = build_trainer(config, SUBJECT_DIR, priors.run_priors(config), World())
            rate = steps_per_second(trainer, steps)
            runs.append(
                {
                    "batch_size": batch_size,
                    "cache_latents": cache_latents,
                    "steps_per_second": round(rate, 3),
                    "images_per_second": round(rate * trainer.images_per_step, 2),
                }
            )
    return {"steps_measured": steps, "runs": runs}


@benchmark("priors")
def class_images(settings: Settings) -> dict[str, Any]:
    """Class images/s by batch size (classifier-free guidance: 2 UNet passes' worth per image)."""
    from dreambooth_trainer.models import load_pipeline
    from dreambooth_trainer.priors import PriorRequest, generate_batch, generation_device

    inference_steps = 10 if settings.quick else 25
    images = 8 if settings.quick else 16
    config = config_for(settings, {}, class_images=images)
    device, dtype = generation_device()
    pipeline = load_pipeline(config.base_model, config.model_cache_dir(), torch_dtype=dtype)
    pipeline.to(device)
    request = replace(PriorRequest.from_config(config), steps=inference_steps)
    runs = []
    for batch_size in (1, 4, 8):
        generate_batch(pipeline, request, range(batch_size))  # warm-up
        started = time.perf_counter()
        for start in range(0, images, batch_size):
            generate_batch(pipeline, request, range(start, start + batch_size))
        rate = images / (time.perf_counter() - started)
        runs.append({"batch_size": batch_size, "images_per_second": round(rate, 2)})
    return {"images": images, "inference_steps": inference_steps, "runs": runs}
