"""What a LoRA job exports besides the adapter file training wrote (lora_files.LORA_WEIGHTS).

- KOHYA_WEIGHTS: the same adapter in the single-file layout of kohya's sd-scripts, which
  AUTOMATIC1111, ComfyUI, InvokeAI and diffusers' own load_lora_weights read;
- optionally the base pipeline with the adapter fused into its weights (`fuse`).

Both start from a base pipeline with the adapter applied by diffusers (`apply_adapter`), so the
adapter is read the one way every user of LORA_WEIGHTS reads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ..models.family import SDXL, family_of
from ..models.single_file import unet_ldm_names
from .lora_files import LORA_WEIGHTS, sort_safetensors_header

KOHYA_WEIGHTS = "lora.kohya.safetensors"
# The name the adapter gets inside the pipeline while it is exported.
ADAPTER_NAME = "dreambooth"
# Pipeline components that can carry an adapter, with their kohya key prefixes. kohya names the
# text encoder of a one-encoder model (SD1/SD2) lora_te_; lora_te1_/lora_te2_ are SDXL's two.
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
KOHYA_PREFIXES_SDXL = {
    "unet": "lora_unet_",
    "text_encoder": "lora_te1_",
    "text_encoder_2": "lora_te2_",
}


def apply_adapter(pipeline: DiffusionPipeline, adapter_dir: Path) -> None:
    pipeline.load_lora_weights(adapter_dir, weight_name=LORA_WEIGHTS, adapter_name=ADAPTER_NAME)


def kohya_prefixes(pipeline: DiffusionPipeline) -> dict[str, str]:
    return KOHYA_PREFIXES_SDXL if family_of(pipeline) == SDXL else KOHYA_PREFIXES


def adapted_components(pipeline: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's components that carry the exported adapter, by component name."""
    return {
        name: module
        for name in kohya_prefixes(pipeline)
        if ADAPTER_NAME in (getattr(module := getattr(pipeline, name), "peft_config", None) or {})
    }


def _peft_keys(name: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The component's adapter in peft's key layout, under the component's name.

    kohya names text-encoder modules by the original CLIP layout (text_model.encoder...), which
    transformers 5 flattened (encoder... directly on CLIPTextModel): put the level back.
    """
    state = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    prefix = name
    if name == "text_encoder" and not hasattr(module, "text_model"):
        prefix = f"{name}.text_model"
    return {f"{prefix}.{key}": tensor for key, tensor in state.items()}


def _sgm_unet_keys(unet: torch.nn.Module, state: dict[str, torch.Tensor]):
    """SDXL's UNet adapter under the original (SGM) UNet's module names, as kohya's sd-scripts
    names it (it trains SDXL on that UNet): lora_unet_input_blocks_4_1_..., label_emb_0_0.
    diffusers maps these back by the UNet's config; diffusers-named SDXL keys it misreads (it
    merges add_embedding.linear_1 and linear_2 into one module)."""
    modules = {key.removeprefix("unet.").partition(".lora_")[0] for key in state}
    names = unet_ldm_names(unet.config, [f"{module}.weight" for module in modules])
    renamed = {}
    for key, tensor in state.items():
        module, separator, rest = key.removeprefix("unet.").partition(".lora_")
        renamed[f"unet.{names[module + '.weight'].removesuffix('.weight')}{separator}{rest}"] = (
            tensor
        )
    return renamed


def kohya_state(pipeline: DiffusionPipeline) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, file metadata) of the pipeline's adapter in kohya's layout.

    diffusers' converter writes every module's alpha as its rank (scale 1); the adapter's real
    alpha goes in instead, or other tools would scale the update by the wrong factor.
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    prefixes = kohya_prefixes(pipeline)
    for name, module in adapted_components(pipeline).items():
        config = module.peft_config[ADAPTER_NAME]
        if config.rank_pattern or config.alpha_pattern or config.use_rslora:
            raise ValueError(f"{name}: per-module ranks, alphas or rsLoRA have no kohya form")
        keys = _peft_keys(name, module)
        if name == "unet" and family_of(pipeline) == SDXL:
            keys = _sgm_unet_keys(module, keys)
        converted = convert_state_dict_to_kohya(keys)
        for key, tensor in converted.items():
            key = key.replace("lora_te1_", prefixes[name], 1)
            if key.endswith(".alpha"):
                tensor = torch.tensor(float(config.lora_alpha))
            tensors[key] = tensor.detach().to("cpu").contiguous()
        ranks.add(config.r)
        alphas.add(config.lora_alpha)
    # What sd-scripts writes and tools show (network dim and alpha), when one value fits all.
    metadata = {"ss_network_module": "networks.lora"}
    if len(ranks) == 1 and len(alphas) == 1:
        metadata |= {"ss_network_dim": str(ranks.pop()), "ss_network_alpha": str(alphas.pop())}
    return tensors, metadata


def save_kohya(pipeline: DiffusionPipeline, path: Path) -> Path:
    tensors, metadata = kohya_state(pipeline)
    save_file(tensors, path, metadata=metadata)
    sort_safetensors_header(path)
    return path


def fuse_adapter(pipeline: DiffusionPipeline) -> DiffusionPipeline:
    """The pipeline with the adapter merged into the base weights, and no adapter left."""
    pipeline.fuse_lora(components=list(adapted_components(pipeline)), adapter_names=[ADAPTER_NAME])
    pipeline.unload_lora_weights()
    return pipeline
