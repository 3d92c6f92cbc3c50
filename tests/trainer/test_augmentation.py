"""training.randomFlip and training.cropEachStep: what the VAE sees of one photo, step by step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_trainer import data
from dreambooth_trainer.parallel.base import World
from dreambooth_trainer.train import build_trainer

pytestmark = pytest.mark.trainer

STEPS = 8


@pytest.fixture(scope="module")
def wide_photos(tmp_path_factory) -> Path:
    """Two landscape photos (96x64): a 64 px square crop can move 32 px sideways."""
    directory = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        pixels = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"{name}.png")
    return directory


def trainer_with(make_config, photos: Path, training: dict):
    config = make_config(
        {"priorPreservation": {"enabled": False}, "training": {"centerCrop": False, **training}}
    )
    return build_trainer(config, photos, None, World())


def pixels_over_steps(source: data.EncodedEachStep) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [source.pixels_of([0], generator)[0] for _ in range(STEPS)]


def distinct(images: list[torch.Tensor]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for image in images:
        if not any(torch.equal(image, seen) for seen in found):
            found.append(image)
    return found


def test_without_augmentation_a_photo_is_the_same_pixels_every_step(make_config, wide_photos):
    source = trainer_with(make_config, wide_photos, {"cacheLatents": False}).data.latents
    assert len(distinct(pixels_over_steps(source))) == 1


def test_crop_each_step_crops_the_photo_anew(make_config, wide_photos):
    training = {"cacheLatents": False, "cropEachStep": True}
    trainer = trainer_with(make_config, wide_photos, training)
    crops = pixels_over_steps(trainer.data.latents)
    assert len(distinct(crops)) > 1
    # Each crop is a 64x64 window of the whole resized photo, at some offset.
    whole = data.resized_tensor(Image.open(wide_photos / "a.png").convert("RGB"), 64)
    windows = [whole[:, :, left : left + 64] for left in range(whole.shape[2] - 63)]
    assert all(any(torch.equal(crop, w) for w in windows) for crop in crops)
    assert math.isfinite(trainer.train_step().loss)  # and training runs on them


def test_random_flip_mirrors_the_photo_some_steps(make_config, wide_photos):
    source = trainer_with(
        make_config, wide_photos, {"cacheLatents": False, "randomFlip": True}
    ).data.latents
    images = distinct(pixels_over_steps(source))
    plain = source.pixels[0]
    assert len(images) == 2
    assert {0, 1} == {int(torch.equal(image, plain.flip(-1))) for image in images}
    assert any(torch.equal(image, plain) for image in images)


def test_with_the_latent_cache_a_flip_picks_the_cached_mirror_image(make_config, wide_photos):
    trainer = trainer_with(make_config, wide_photos, {"randomFlip": True})
    source = trainer.data.latents
    assert isinstance(source, data.CachedLatents)
    # The mirror rows are the VAE's encoding of the mirrored pixels, not a flipped latent.
    assert not torch.equal(source.mirrored, source.parameters.flip(-1))
    generator = torch.Generator().manual_seed(1)
    rows = [source.posterior([0], generator)[0] for _ in range(STEPS)]
    kinds = {
        "plain" if torch.equal(row, source.parameters[0]) else "mirror"
        for row in rows
        if torch.equal(row, source.parameters[0]) or torch.equal(row, source.mirrored[0])
    }
    assert len(kinds) == 2 and len(distinct(rows)) == 2
