"""Which family a diffusers pipeline is (SD1.x/2.x or SDXL), read from the model itself.

Every place that opens a base model or an export goes through `open_pipeline`, so a job never
names its family: `model_index.json`'s `_class_name` says it, as it does for diffusers'
`DiffusionPipeline.from_pretrained`. Anything else is refused with the class it found.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

SD = "sd"
SDXL = "sdxl"
# The pipeline class each family loads with; model_index.json names one of these.
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    SD: StableDiffusionPipeline,
    SDXL: StableDiffusionXLPipeline,
}


class UnsupportedModel(ValueError):
    """The model is a diffusers pipeline, but of a family we do not train or serve."""


def family_of_class(class_name: str) -> str:
    for family, pipeline_class in PIPELINE_CLASSES.items():
        if pipeline_class.__name__ == class_name:
            return family
    supported = ", ".join(cls.__name__ for cls in PIPELINE_CLASSES.values())
    raise UnsupportedModel(f"a {class_name} (model_index.json); supported: {supported}")


def family_of(pipeline: DiffusionPipeline) -> str:
    return family_of_class(type(pipeline).__name__)


def source_family(source: str | Path, revision: str | None = None) -> str:
    """The family of a local pipeline directory or a hub id (whose model_index.json is fetched)."""
    config = DiffusionPipeline.load_config(str(source), revision=revision)
    return family_of_class(config["_class_name"])


def open_pipeline(
    source: str | Path,
    torch_dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    variant: str | None = None,
) -> DiffusionPipeline:
    """The pipeline of the source's family, progress bars off, SD's safety checker off (class
    images, samples and served images are the user's to judge; SDXL has none)."""
    family = source_family(source, revision)
    options: dict[str, Any] = {"revision": revision, "variant": variant}
    if family == SD:
        options.update(safety_checker=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        # diffusers >= 0.36 renamed torch_dtype to dtype; the old name works everywhere.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipeline = PIPELINE_CLASSES[family].from_pretrained(
            source, torch_dtype=torch_dtype, **options
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
