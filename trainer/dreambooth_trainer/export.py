"""The artifact: a diffusers pipeline, a single-file checkpoint and a sha256 manifest.

<output>/export/ of a full fine-tune (kind "pipeline"):
  pipeline/               StableDiffusion(XL)Pipeline.from_pretrained (safetensors; + fp16 variant)
  model.safetensors       the original single-file layout (SD1.x; SDXL's SGM one): from_single_file,
                          A1111, ComfyUI (not for SD2.x or v-prediction models)
  model.fp16.safetensors  (with the fp16 option)
  manifest.json           every file's sha256 and the digest (written last)

<output>/export/ of a LoRA job (kind "lora"):
  pytorch_lora_weights.safetensors  the adapter as training wrote it: pipe.load_lora_weights(dir)
  lora.kohya.safetensors            the same adapter in kohya's single-file layout (A1111, ComfyUI)
  base_model.json                   the base it applies to (models/base_identity.py)
  pipeline/, model.safetensors      with export.fuse: the base with the adapter fused in
  manifest.json                     as above; its metadata repeats kind and baseModel
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from dreambooth_contract.api import ArtifactKind, ArtifactStatus
from dreambooth_contract.layout import (
    EVALUATION_DIR,
    EVALUATION_GRID,
    EVALUATION_REPORT,
    EXPORT_DIR,
    PIPELINE_DIR,
    TRAINED_DIR,
)
from dreambooth_contract.trainer_config import TrainerConfig

from .digest import MANIFEST, write_manifest
from .locations import fetch_dir, publish_dir, working_dir
from .methods import full, lora_export, lora_files
from .models import base_identity
from .models.family import open_pipeline
from .models.loading import load_pipeline, resolve_model_source
from .models.single_file import save_single_file, single_file_unsupported

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
SINGLE_FILE_FP16 = "model.fp16.safetensors"


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    uri: str
    digest: str
    kind: ArtifactKind = "pipeline"
    base_model: str | None = None  # the base a LoRA adapter applies to

    def status(self) -> ArtifactStatus:
        """What status.artifact says: the operator serves exactly this."""
        return ArtifactStatus(
            uri=self.uri, digest=self.digest, kind=self.kind, base_model=self.base_model
        )


def forget_load_paths(pipeline: DiffusionPipeline) -> None:
    """diffusers writes where each model was loaded from into its config.json; a local path
    would make the digest depend on the machine (and leak its directory layout)."""
    for name, component in pipeline.components.items():
        config = getattr(component, "config", None)
        if isinstance(config, dict) and "_name_or_path" in config:
            component.register_to_config(_name_or_path=name)


def export_pipeline(
    pipeline: DiffusionPipeline,
    directory: Path,
    fp16_variant: bool = False,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the artifact into `directory` (replacing what was there); return the manifest."""
    shutil.rmtree(directory, ignore_errors=True)
    write_pipeline_files(pipeline, directory, fp16_variant)
    return write_manifest(directory, {"kind": "pipeline", **(metadata or {})})


def write_pipeline_files(
    pipeline: DiffusionPipeline, directory: Path, fp16_variant: bool = False
) -> None:
    """pipeline/ and the single-file checkpoint(s) of `pipeline` into `directory`."""
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


def export_adapter(
    pipeline: DiffusionPipeline,
    adapter_dir: Path,
    directory: Path,
    base_record: dict[str, Any],
    fuse: bool = False,
    fp16_variant: bool = False,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a LoRA artifact into `directory` (replacing what was there); return the manifest.

    `pipeline` is the base the adapter in `adapter_dir` was trained on (`base_record` says
    which); with `fuse` it ends up holding the fused weights.
    """
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    # Byte for byte what training wrote: what users load is what the samples were made with.
    shutil.copyfile(adapter_dir / lora_files.LORA_WEIGHTS, directory / lora_files.LORA_WEIGHTS)
    base_identity.write_record(base_record, directory)
    lora_export.apply_adapter(pipeline, adapter_dir)
    lora_export.save_kohya(pipeline, directory / lora_export.KOHYA_WEIGHTS)
    if fuse:
        write_pipeline_files(lora_export.fuse_adapter(pipeline), directory, fp16_variant)
    return write_manifest(directory, {"kind": "lora", "baseModel": base_record, **(metadata or {})})


def evaluation_record(config: TrainerConfig) -> dict[str, Any]:
    """Where the evaluation of this artifact will lie, relative to the export directory (the
    manifest cannot hold the scores: they come after it, and its digest is what is served).
    The report names the artifact back by that digest."""
    if not config.evaluation.enabled:
        return {}
    evaluation = f"../{EVALUATION_DIR}"
    return {
        "evaluation": {
            "report": f"{evaluation}/{EVALUATION_REPORT}",
            "grid": f"{evaluation}/{EVALUATION_GRID}",
        }
    }


def run_export(config: TrainerConfig) -> ExportResult:
    """The export phase: base model + trained weights -> artifact under <outputUri>/export."""
    cache = config.model_cache_dir()
    trained_dir = fetch_dir(config.output(TRAINED_DIR), config.s3, cache)
    directory = working_dir(config.output(EXPORT_DIR), cache)
    metadata = {
        "job": config.job_name,
        "steps": config.training.max_steps,
        "instancePrompt": config.instance.prompt,
        **evaluation_record(config),
    }
    if config.training.method == "lora":
        if not lora_files.has_adapter(trained_dir):
            raise FileNotFoundError(f"{config.output(TRAINED_DIR)}: no LoRA adapter; train first")
        source = resolve_model_source(config.base_model, cache, config.s3)
        base_record = base_identity.base_model_record(config.base_model, source)
        manifest = export_adapter(
            load_pipeline(config.base_model, cache, config.s3),
            trained_dir,
            directory,
            base_record,
            fuse=config.export.fuse,
            fp16_variant=config.export_fp16_variant,
            metadata=metadata,
        )
        kind, base_model = "lora", config.base_model.uri
    else:
        if not full.has_trained_weights(trained_dir):
            raise FileNotFoundError(f"{config.output(TRAINED_DIR)}: no trained UNet; train first")
        base = load_pipeline(config.base_model, cache, config.s3)
        pipeline = full.with_trained_weights(base, trained_dir)
        metadata["baseModel"] = config.base_model.uri
        manifest = export_pipeline(pipeline, directory, config.export_fp16_variant, metadata)
        kind, base_model = "pipeline", None
    # A re-run export (the artifact report was lost, fp16 variant switched off) must leave no
    # file of the previous one: the server verifies the prefix against the manifest.
    publish_dir(directory, config.output(EXPORT_DIR), config.s3, last=MANIFEST, replace=True)
    log.info("exported %s (%s)", config.output(EXPORT_DIR), manifest["digest"])
    return ExportResult(directory, config.output(EXPORT_DIR), manifest["digest"], kind, base_model)


def load_exported(
    config: TrainerConfig, export_dir: Path, torch_dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """The export as users load it: the diffusers pipeline, or for a LoRA job the base model
    with the exported adapter applied (what the server runs too)."""
    if config.training.method == "lora":
        pipeline = load_pipeline(
            config.base_model, config.model_cache_dir(), config.s3, torch_dtype
        )
        lora_export.apply_adapter(pipeline, export_dir)
        return pipeline
    return open_pipeline(export_dir / PIPELINE_DIR, torch_dtype)
