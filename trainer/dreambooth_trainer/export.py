"""The artifact: a diffusers pipeline, a single-file checkpoint and a sha256 manifest.

<output>/export/
  pipeline/               StableDiffusionPipeline.from_pretrained (safetensors; + fp16 variant)
  model.safetensors       original SD1.x layout: from_single_file, A1111, ComfyUI (SD1.x only)
  model.fp16.safetensors  (with the fp16 option)
  manifest.json           every file's sha256 and the digest (written last)
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from dreambooth_contract.layout import EXPORT_DIR, PIPELINE_DIR, TRAINED_DIR
from dreambooth_contract.trainer_config import TrainerConfig

from .digest import MANIFEST, write_manifest
from .locations import fetch_dir, publish_dir, working_dir
from .methods import full
from .models.loading import load_pipeline
from .models.single_file import save_single_file, single_file_unsupported

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
SINGLE_FILE_FP16 = "model.fp16.safetensors"


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    uri: str
    digest: str


def forget_load_paths(pipeline: StableDiffusionPipeline) -> None:
    """diffusers writes where each model was loaded from into its config.json; a local path
    would make the digest depend on the machine (and leak its directory layout)."""
    for name, component in pipeline.components.items():
        config = getattr(component, "config", None)
        if isinstance(config, dict) and "_name_or_path" in config:
            component.register_to_config(_name_or_path=name)


def export_pipeline(
    pipeline: StableDiffusionPipeline,
    directory: Path,
    fp16_variant: bool = False,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the artifact into `directory` (replacing what was there); return the manifest."""
    shutil.rmtree(directory, ignore_errors=True)
    forget_load_paths(pipeline)
    pipeline.save_pretrained(directory / PIPELINE_DIR, safe_serialization=True)
    unsupported = single_file_unsupported(pipeline)
    if unsupported:
        log.warning(
            "no single-file checkpoint: %s; the diffusers pipeline is exported", unsupported
        )
    else:
        save_single_file(pipeline, directory / SINGLE_FILE)
    if fp16_variant:
        half = pipeline.to(torch.float16)
        half.save_pretrained(directory / PIPELINE_DIR, safe_serialization=True, variant="fp16")
        if not unsupported:
            save_single_file(half, directory / SINGLE_FILE_FP16)
    return write_manifest(directory, metadata)


def run_export(config: TrainerConfig) -> ExportResult:
    """The export phase: base model + trained weights -> artifact under <outputUri>/export."""
    cache = config.model_cache_dir()
    trained_dir = fetch_dir(config.output(TRAINED_DIR), config.s3, cache)
    if not full.has_trained_weights(trained_dir):
        raise FileNotFoundError(f"{config.output(TRAINED_DIR)}: no trained UNet; train first")
    base = load_pipeline(config.base_model, cache, config.s3)
    pipeline = full.with_trained_weights(base, trained_dir)
    directory = working_dir(config.output(EXPORT_DIR), cache)
    metadata = {
        "job": config.job_name,
        "baseModel": config.base_model.uri,
        "steps": config.training.max_steps,
        "instancePrompt": config.instance.prompt,
    }
    manifest = export_pipeline(pipeline, directory, config.export_fp16_variant, metadata)
    # A re-run export (the artifact report was lost, fp16 variant switched off) must leave no
    # file of the previous one: the server verifies the prefix against the manifest.
    publish_dir(directory, config.output(EXPORT_DIR), config.s3, last=MANIFEST, replace=True)
    log.info("exported %s (%s)", config.output(EXPORT_DIR), manifest["digest"])
    return ExportResult(directory, config.output(EXPORT_DIR), manifest["digest"])
