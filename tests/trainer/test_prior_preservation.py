"""Prior preservation does its job: training on the subject makes the model forget its class
less when the prior loss is on.

A model with random weights has no class to forget, so the test first teaches the tiny model a
class ("a photo of cube": dark blue cubes on dark backgrounds), generates the class images with
it through the real priors phase, then fine-tunes twice on the bright subject photos with the
same seed: with the prior loss and without (its weight 0, everything else identical).

Measure: the class prompt's denoising error on the class images (fixed noise and timesteps),
relative to the base model's. That is what the prior loss protects. (The raw distance between
noise predictions is dominated, at this scale and learning rate, by Adam's per-parameter steps
on gradients that are mostly noise: both runs move about as far, just not in the same way.)
At a constant learning rate that error jitters from step to step, so the test averages it over
the last steps of the run instead of reading it once at the end.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from dreambooth_contract.layout import PIPELINE_DIR
from dreambooth_contract.trainer_config import TrainerConfig
from dreambooth_trainer import priors
from dreambooth_trainer.callbacks import Callback, StepMetrics
from dreambooth_trainer.export import export_pipeline
from dreambooth_trainer.models.loading import load_pipeline
from dreambooth_trainer.parallel import World
from dreambooth_trainer.train import Trainer, build_trainer

from .conftest import BASE_SPEC, CLASS_PROMPT, SUBJECT_DIR, make_job, merged

pytestmark = pytest.mark.trainer

CLASS_PHOTOS = 8
PRETRAIN = {"maxSteps": 300, "batchSize": 8, "learningRate": 2e-3, "lrScheduler": "cosine"}
FINE_TUNE = {"maxSteps": 100, "batchSize": 4, "learningRate": 2e-3, "seed": 0}
# The class error is taken at these steps and averaged. Read once at step 100, forgetting with /
# without the prior loss was 0.08, 0.03, 0.55, 0.04, 0.41, 0.04, 0.30, 0.13 for fine-tune seeds
# 0-7: one Adam step more or less, or another CPU's rounding, moves a single reading that far.
# Averaged over steps 60-100 the same seeds give 0.39, 0.26, 0.29, 0.36, 0.23, 0.28, 0.32, 0.27
# (seed 0 is the test's), and AVX2 kernels instead of AVX-512 (ATEN_CPU_CAPABILITY=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2, class model trained anew) 0.39, 0.25, 0.29, 0.36 for seeds 0-3.
# Without the prior loss the model forgets 0.009-0.012 of the base's 0.095 error on average.
EVAL_STEPS = range(60, 101, 10)
MAX_FORGETTING_RATIO = 0.6


def draw_class_photos(directory: Path, count: int, seed: int = 0) -> Path:
    """Dark blue cubes on dark backgrounds: unlike the bright red subject."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for i in range(count):
        image = Image.new("RGB", (64, 64), tuple(rng.randint(0, 50) for _ in range(3)))
        half = rng.randint(12, 22)
        x, y = rng.randint(half, 64 - half), rng.randint(half, 64 - half)
        color = (rng.randint(0, 40), rng.randint(0, 60), rng.randint(90, 160))
        ImageDraw.Draw(image).rectangle([x - half, y - half, x + half, y + half], fill=color)
        image.save(directory / f"cube-{i}.png")
    return directory


@pytest.fixture(scope="module")
def class_model(tmp_path_factory) -> Path:
    """The tiny model after learning the class: the stand-in for a pretrained base model."""
    root = tmp_path_factory.mktemp("class-model")
    photos = draw_class_photos(root / "photos", CLASS_PHOTOS)
    spec = merged(
        BASE_SPEC,
        {
            "instance": {"imagesUri": str(photos), "prompt": CLASS_PROMPT},
            "priorPreservation": {"enabled": False},
            "training": PRETRAIN,
            "storage": {"outputUri": str(root / "out")},
        },
    )
    config = TrainerConfig.from_job(make_job(spec))
    config = config.model_copy(update={"cache_dir": str(root / "cache")})
    trainer = build_trainer(config, photos, None, World())
    trainer.fit()
    export_pipeline(trainer.pipeline(), root / "model")
    return root / "model" / PIPELINE_DIR


@torch.no_grad()
def class_error(unet, text_encoder, tokenizer, scheduler, latents) -> float:
    """Class-prompt denoising MSE on class latents, fixed noise and timesteps."""
    generator = torch.Generator().manual_seed(11)
    draws = [i % len(latents) for i in range(64)]
    x0 = latents.sample(draws, generator)
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.randint(50, 1000, (len(x0),), generator=generator)
    ids = tokenizer(
        [CLASS_PROMPT] * len(x0), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    prediction = unet(
        scheduler.add_noise(x0, noise, timesteps), timesteps, text_encoder(ids)[0]
    ).sample
    return torch.nn.functional.mse_loss(prediction, noise).item()


class ClassErrors(Callback):
    """The trained model's class error at EVAL_STEPS, while it trains."""

    def __init__(self) -> None:
        self.errors: list[float] = []

    def on_step_end(self, trainer: Trainer, metrics: StepMetrics) -> None:
        if trainer.step in EVAL_STEPS:
            frozen, unet = trainer.frozen, trainer.trained_model.unet
            error = class_error(
                unet, frozen.text_encoder, frozen.tokenizer, frozen.noise_scheduler,
                trainer.data.classes.latents,
            )  # fmt: skip
            self.errors.append(error)


def test_prior_loss_keeps_the_class(make_config, class_model):
    config = make_config(
        {
            "baseModel": {"uri": str(class_model)},
            "priorPreservation": {"numClassImages": 8, "generation": {"steps": 20}},
            "training": FINE_TUNE,
        }
    )
    class_dir = priors.run_priors(config)
    errors = {}
    for weight in (1.0, 0.0):
        run = config.model_copy(deep=True)
        run.prior_preservation.loss_weight = weight
        measured = ClassErrors()
        trainer = build_trainer(run, SUBJECT_DIR, class_dir, World(), [measured])
        trainer.fit()
        assert len(measured.errors) == len(EVAL_STEPS)
        errors[weight] = sum(measured.errors) / len(measured.errors)
    base = load_pipeline(config.base_model, config.model_cache_dir())
    latents = trainer.data.classes.latents
    base_error = class_error(
        base.unet, base.text_encoder, base.tokenizer, trainer.frozen.noise_scheduler, latents
    )
    forgot_with_prior = errors[1.0] - base_error
    forgot_without = errors[0.0] - base_error
    print(
        f"class error: base {base_error:.5f}, with prior {errors[1.0]:.5f}, without {errors[0.0]:.5f}"
    )  # noqa: E501
    assert forgot_without > 0, "fine-tuning on the subject alone should cost some of the class"
    assert forgot_with_prior < MAX_FORGETTING_RATIO * forgot_without
