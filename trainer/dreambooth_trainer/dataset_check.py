"""What a dataset directory holds, and `dreambooth validate`'s look at local datasets.

Light on purpose (PIL and the contract, no torch): `dreambooth validate` imports it to check a
job's local photos, captions and class images as soon as the YAML is written, by listing them
and decoding each image cheaply (see verify_image). s3:// datasets are checked
when a phase loads them, with the same messages.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from dreambooth_contract.api import DreamBoothJob
from dreambooth_contract.subjects import classes_of, subjects_of
from dreambooth_contract.trainer_config import ConfigError, TrainerConfig, is_remote

from .captions import read_captions

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
# The largest image decoded (width x height), checked on the header before any pixel is: a file
# of a few KB can claim gigapixels (a decompression bomb). 64 megapixels is more than a phone's
# full-resolution photo in its usual modes and far more than training (<= 2048 px) can use; PIL's
# own limit (Image.MAX_IMAGE_PIXELS, ~89 MP to warn) is left alone for the rest of the process.
MAX_IMAGE_PIXELS = 64_000_000
# What PIL raises on a corrupt or truncated file (the exceptions Pillow's own fuzzers expect).
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def list_images(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def too_many_pixels() -> str:
    return f"more than the {MAX_IMAGE_PIXELS / 1e6:g} megapixels allowed: downscale it"


def no_images(field: str, where: object) -> ConfigError:
    return ConfigError(field, f"no images (png, jpg, webp) in {where}")


def local_dataset_problems(job: DreamBoothJob, base_dir: Path) -> list[str]:
    """ "spec.<field>: problem" for each local dataset of `job` (paths relative to `base_dir`)
    that training would refuse: no images, an unreadable image, a caption without a photo."""
    try:
        config = TrainerConfig.from_job(job, base_dir=base_dir)
    except ConfigError as error:
        return [f"spec.{error}"]
    problems = []
    for subject in subjects_of(config):
        captions = subject.spec.captions != "ignore"
        problem = directory_problem(subject.spec.images_uri, subject.images_field, captions)
        problems += [problem] if problem else []
    for class_set in classes_of(config):
        uri, count = class_set.priors.class_images_uri, class_set.priors.num_class_images
        problem = uri and directory_problem(uri, class_set.images_field, False, count)
        problems += [problem] if problem else []
    return [f"spec.{problem}" for problem in problems]


def directory_problem(uri: str, field: str, captions: bool, limit: int | None = None) -> str:
    """The first problem of a local image directory ('' when none, or when not local): its
    first `limit` images (all by default) and, with `captions`, their captions."""
    if is_remote(uri):
        return ""
    directory = Path(uri)
    images = list_images(directory)[:limit]
    try:
        if not images:
            raise no_images(field, directory)
        for image in images:
            verify_image(image, field)
        if captions:
            read_captions(directory, images, field)
    except ConfigError as error:
        return str(error)
    return ""


@contextmanager
def opened_image(
    path: Path, field: str, advice: str = "replace or remove it"
) -> Iterator[Image.Image]:
    """`path` opened, its header's size within MAX_IMAGE_PIXELS; whatever goes wrong opening or
    decoding it inside the block is ConfigError naming `field` and the file (a corrupt,
    truncated or oversized file is bad input, not a crash on every restart)."""
    try:
        with warnings.catch_warnings():
            # PIL warns (DecompressionBombWarning) between its two limits; here that is an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    size = f"{image.width}x{image.height}"
                    raise ConfigError(field, f"{path.name} is {size} pixels, {too_many_pixels()}")
                yield image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own limits are higher than ours; its message would name them.
        raise ConfigError(field, f"{path.name} has {too_many_pixels()}") from None
    except ConfigError:
        raise
    except UNREADABLE as error:
        raise ConfigError(
            field,
            f"{path.name} is not a readable image ({error or type(error).__name__}): {advice}",
        ) from None


def verify_image(path: Path, field: str) -> None:
    """Decode `path` (a JPEG at 1/8 scale, PIL's draft mode: cheap) to see that it can be:
    ConfigError naming `field` when not. Headers claiming too many pixels are not decoded."""
    with opened_image(path, field) as image:
        image.draft("RGB", (64, 64))
        image.load()
