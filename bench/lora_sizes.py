"""How big a LoRA adapter is against the full UNet: parameters and file bytes, per rank.

Counted on the CPU, without training: each rank's adapters are added the way training adds them
(the base model loaded as `build_trainer` loads it, then the lora method's `split_pipeline`), and
written as training writes them (`lora_files.save_adapter`, fp32). The file sizes are those of
real files, against the full UNet saved as the full method saves it (`save_pretrained`,
safetensors) in fp32 and in fp16.

    python -m bench lora_sizes [--model random://sd15]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from . import Settings, benchmark
from .training import TrainingRun, config_for

RANKS = (4, 16, 64)


def load_base(settings: Settings, run: TrainingRun):
    """(the base pipeline as training loads it, the job's TrainingSpec) for `run`."""
    from dreambooth_trainer.models.loading import load_pipeline

    config = config_for(settings, run.training_spec())
    return load_pipeline(config.base_model, config.model_cache_dir(), config.s3), config.training


def parameter_count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def safetensors_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*.safetensors"))


def full_unet(settings: Settings, scratch: Path) -> dict[str, Any]:
    """The full UNet's parameters, and its weights' bytes as the full method writes them."""
    import torch

    pipeline, _ = load_base(settings, TrainingRun(precision="no"))
    unet = pipeline.unet
    figures = {
        "unet_parameters": parameter_count(unet),
        "text_encoder_parameters": parameter_count(pipeline.text_encoder),
    }
    for dtype, key in ((torch.float32, "unet_fp32_bytes"), (torch.float16, "unet_fp16_bytes")):
        directory = scratch / f"unet-{key}"
        unet.to(dtype).save_pretrained(directory, safe_serialization=True)
        figures[key] = safetensors_bytes(directory)
    return figures


def adapter_parameters(module) -> int:
    from dreambooth_trainer.methods.lora_files import adapter_state

    return sum(tensor.numel() for tensor in adapter_state(module).values())


def adapter_sizes(settings: Settings, rank: int, scratch: Path) -> dict[str, Any]:
    """One rank's adapters on the default targets: the UNet's alone (the default job) and with
    the text encoder's (trainTextEncoder), their parameters and their file's bytes."""
    import torch

    from dreambooth_trainer.methods import lora_files, method_for

    run = TrainingRun(precision="no", method="lora", lora_rank=rank, train_text_encoder=True)
    pipeline, training = load_base(settings, run)
    model, _ = method_for(training).split_pipeline(pipeline, training, torch.device("cpu"))
    unet_only = lora_files.save_adapter(model.unet, None, scratch / f"rank-{rank}-unet")
    with_text = lora_files.save_adapter(model.unet, model.text_encoder, scratch / f"rank-{rank}")
    return {
        "rank": rank,
        "target_modules": training.lora.target_modules,
        # the adapter's weights as the file holds them (peft's state dict of the adapter)
        "unet_parameters": adapter_parameters(model.unet),
        "text_encoder_parameters": adapter_parameters(model.text_encoder),
        "unet_file_bytes": unet_only.stat().st_size,
        "with_text_encoder_file_bytes": with_text.stat().st_size,
    }


def measure(settings: Settings, ranks: tuple[int, ...] = RANKS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-lora-sizes-") as scratch:
        full = full_unet(settings, Path(scratch))
        adapters = [adapter_sizes(settings, rank, Path(scratch)) for rank in ranks]
    for adapter in adapters:  # how much smaller than the full UNet, in parameters and in fp32 bytes
        parameters = adapter["unet_parameters"] / full["unet_parameters"]
        adapter["unet_parameter_fraction"] = float(f"{parameters:.4g}")
        file_bytes = adapter["unet_file_bytes"] / full["unet_fp32_bytes"]
        adapter["unet_file_fraction"] = float(f"{file_bytes:.4g}")
    return {"full_unet": full, "adapters": adapters}


@benchmark("lora_sizes")
def lora_sizes(settings: Settings) -> dict[str, Any]:
    """LoRA adapter parameters and file bytes at ranks 4, 16 and 64 against the full UNet's."""
    return measure(settings)
