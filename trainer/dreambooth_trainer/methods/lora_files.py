"""A LoRA adapter on disk: the one format training writes and export, serving and users read.

diffusers' own layout: `pytorch_lora_weights.safetensors` with the UNet's adapter under `unet.`
and the text encoder's under `text_encoder.` (SDXL's second one under `text_encoder_2.`), each
adapter's peft LoraConfig in the file's metadata (so alpha and dropout survive, not only the rank
the shapes imply). `load_lora_weights` on any pipeline of the same base reads it, as do our
export and server.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from torch import nn

# diffusers' default weight name: `load_lora_weights(directory)` finds it without being told.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def adapter_state(module: nn.Module) -> dict:
    """The module's adapter weights (peft's "default" adapter), in diffusers' key layout."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


def adapter_config(module: nn.Module) -> dict:
    """peft's LoraConfig as the file's metadata, the same bytes on every machine and in every
    process: its sets sorted (a set's order follows the process's hash seed, and the
    artifact's digest would follow it) and no local path to the base it was built on."""
    config = module.peft_config["default"].to_dict()
    stable = {
        key: sorted(value) if isinstance(value, set) else value for key, value in config.items()
    }
    return {**stable, "base_model_name_or_path": None}


def save_adapter(
    unet: nn.Module,
    text_encoder: nn.Module | None,
    directory: Path,
    text_encoder_2: nn.Module | None = None,
) -> Path:
    """Write the adapters of `unet` (and of `text_encoder`, and SDXL's `text_encoder_2`, those
    that have one) as LORA_WEIGHTS."""
    layers = {"unet_lora_layers": adapter_state(unet)}
    metadata = {"unet_lora_adapter_metadata": adapter_config(unet)}
    for name, module in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if module is not None and getattr(module, "peft_config", None):
            layers[f"{name}_lora_layers"] = adapter_state(module)
            metadata[f"{name}_lora_adapter_metadata"] = adapter_config(module)
    # Both write the same layout; only SDXL's takes the second text encoder.
    writer = StableDiffusionXLPipeline if text_encoder_2 is not None else StableDiffusionPipeline
    writer.save_lora_weights(
        directory, **layers, **metadata, weight_name=LORA_WEIGHTS, safe_serialization=True
    )
    sort_safetensors_header(directory / LORA_WEIGHTS)
    return directory / LORA_WEIGHTS


def has_adapter(directory: Path) -> bool:
    return (directory / LORA_WEIGHTS).is_file()


def sort_safetensors_header(path: Path) -> None:
    """Rewrite the file's JSON header with its keys sorted, so that its bytes depend on its
    content alone: safetensors writes the metadata map in an order that changes from process
    to process (a Rust HashMap), and with it the file's sha256 and the artifact's digest.

    Every tensor entry states its own offsets, so the order of the entries means nothing; the
    header keeps its length, padded with spaces as the format allows."""
    with open(path, "r+b") as file:
        (size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(size))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(canonical) > size:
            raise ValueError(f"{path}: the sorted header would not fit in the original's place")
        file.seek(8)
        file.write(canonical.ljust(size, b" "))
