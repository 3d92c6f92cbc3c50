"""A LoRA adapter on disk: the one format training writes and export, serving and users read.

diffusers' own layout: `pytorch_lora_weights.safetensors` with the UNet's adapter under `unet.`
and the text encoder's under `text_encoder.`, each adapter's peft LoraConfig in the file's
metadata (so alpha and dropout survive, not only the rank the shapes imply). `load_lora_weights`
on any StableDiffusionPipeline of the same base reads it, as do our export and server.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from torch import nn

# diffusers' default weight name: `load_lora_weights(directory)` finds it without being told.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def adapter_state(module: nn.Module) -> dict:
    """The module's adapter weights (peft's "default" adapter), in diffusers' key layout."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(module))


def adapter_config(module: nn.Module) -> dict:
    return module.peft_config["default"].to_dict()


def save_adapter(unet: nn.Module, text_encoder: nn.Module | None, directory: Path) -> Path:
    """Write the adapters of `unet` (and of `text_encoder`, when it has one) as LORA_WEIGHTS."""
    has_text_adapter = text_encoder is not None and getattr(text_encoder, "peft_config", None)
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=adapter_state(unet),
        text_encoder_lora_layers=adapter_state(text_encoder) if has_text_adapter else None,
        unet_lora_adapter_metadata=adapter_config(unet),
        text_encoder_lora_adapter_metadata=(
            adapter_config(text_encoder) if has_text_adapter else None
        ),
        weight_name=LORA_WEIGHTS,
        safe_serialization=True,
    )
    return directory / LORA_WEIGHTS


def has_adapter(directory: Path) -> bool:
    return (directory / LORA_WEIGHTS).is_file()
