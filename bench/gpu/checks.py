"""Correctness steps of the GPU check: does the trainer do on a GPU what the CPU tests prove?

- `environment`: every package imports (the wheelhouse's too) and the device is what we think.
- `prepare`: the random model and the class images, made as the priors phase makes them.
- `train_fixed_batch`: one backend in one precision trains; the loss on one fixed batch (same
  latents, same noise, same timesteps at every step) falls, and stays finite. fp16 runs with
  loss scaling (torch's GradScaler, DeepSpeed's dynamic scaler, FSDP's sharded scaler).
- `resume`: N steps, save the state to files as a checkpoint does, N more steps; load the
  checkpoint, the same N steps again: the weights and losses must match those of the straight
  run. Bitwise is expected (and is what the CPU gives); on a GPU with deterministic algorithms
  asked for, kernels without a deterministic variant may still sum in another order, so the
  step also passes when the resumed weights differ from the straight ones by under 1 % of what
  those N steps changed, and each loss by under 1e-3 relative. The report says which held.
- `priors_fp16`, `inference_fp16`: class images and served images in fp16 are finite and not
  blank.

Parallel backends run as a process group of one (`World(alone_with_backend=True)`): NCCL on a
GPU, gloo on a CPU. Each step builds what it needs itself, so that any step can run alone.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .worker import Context, StepFailed

# Packages the check needs (imported by `environment`) and those it reports if present.
REQUIRED_IMPORTS = ("torch", "diffusers", "transformers", "deepspeed", "pydantic", "fastapi",
                    "uvicorn", "boto3", "safetensors", "httpx", "PIL")  # fmt: skip
VERSIONS = ("torch", "diffusers", "transformers", "deepspeed", "accelerate", "peft", "pydantic",
            "fastapi", "uvicorn", "boto3", "bitsandbytes", "safetensors", "huggingface_hub",
            "numpy")  # fmt: skip
PROJECT_MODULES = ("dreambooth_trainer.train", "dreambooth_trainer.serve.app", "bench.training",
                   "bench.priors", "bench.inference")  # fmt: skip
RESUME_WEIGHT_TOLERANCE = 1e-2  # of the update the steps after the checkpoint made
RESUME_LOSS_TOLERANCE = 1e-3  # relative
SHM_NEEDED = 24 * 2**30


# -- shared helpers ------------------------------------------------------------------------------


def settings(ctx: Context, model: str = ""):
    """The bench's settings for the profile's model, or its `model` one ("sdxl")."""
    from bench import Settings

    uri, resolution = ctx.profile.trained_model(model)
    return Settings(quick=True, model=uri, resolution=resolution, work_dir=ctx.work_dir)


def config_for_cache(ctx: Context) -> Path:
    """The model cache the bench's configs use (where `prepare` built the model)."""
    from bench.training import config_for

    return config_for(settings(ctx), {}).model_cache_dir()


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def require_device(ctx: Context) -> None:
    if ctx.profile.on_gpu and not on_gpu():
        raise StepFailed("the GPU profile needs CUDA, and torch sees no GPU")


def trainer_config(ctx: Context, backend: str, precision: str, model: str = "", **training: Any):
    """The bench's config for this backend (the same class images `prepare` made), in
    `precision`: the API refuses fp16 without GPUs, so on a CPU it is set afterwards, as the
    trainer tests do. `model`: as in `settings`."""
    from bench.training import SHARDING, config_for

    spec = {
        "sharding": SHARDING[backend],
        "mixedPrecision": "no",
        "learningRate": ctx.profile.learning_rate,
        "maxSteps": 10**6,
        **training,
    }
    config = config_for(settings(ctx, model), spec)
    updated = config.training.model_copy(update={"mixed_precision": precision})
    return config.model_copy(update={"training": updated})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group_env() -> Iterator[None]:
    """torchrun's variables for a process group of one, on a fresh port; restored afterwards."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def built_trainer(
    ctx: Context, backend: str, precision: str, model: str = "", **training: Any
) -> Iterator[Any]:
    """A Trainer for the profile's `model` (as in `settings`) on this backend and precision (and
    `training` spec fields); its backend closed and memory freed after."""
    from bench.training import SUBJECT_DIR, prepare_class_images
    from dreambooth_trainer.parallel import World
    from dreambooth_trainer.train import build_trainer, class_images_dir

    prepare_class_images(settings(ctx, model))  # a no-op once made (`prepare` makes SD's)
    config = trainer_config(ctx, backend, precision, model, **training)
    world = World() if backend == "single" else World(alone_with_backend=True)
    with process_group_env():
        trainer = build_trainer(
            config, SUBJECT_DIR, class_images_dir(config, config.model_cache_dir()), world
        )
        try:
            yield trainer
        finally:
            trainer.backend.close()
            del trainer
            forget_deepspeed_groups()
            free_memory()


def forget_deepspeed_groups() -> None:
    """Let a later step in this process start DeepSpeed again.

    The backend ends its process group with torch's destroy_process_group, after which the
    process ends in real training; DeepSpeed still caches groups of the old one and the next
    engine would use them. deepspeed.comm.destroy_process_group drops them like this.
    """
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release()
    elif groups is not None:
        import importlib

        importlib.reload(groups)


def free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def loss_scale(backend: Any) -> float | None:
    """The fp16 loss scale now (torch's or FSDP's GradScaler, or DeepSpeed's); None without."""
    scaler = getattr(backend, "scaler", None)
    if scaler is not None:
        return float(scaler.get_scale())
    engine = getattr(backend, "engine", None)
    if engine is not None and engine.fp16_enabled():
        optimizer = engine.optimizer
        scale = getattr(optimizer, "loss_scale", None) or getattr(optimizer, "cur_scale", None)
        return None if scale is None else float(scale)
    return None


def fmt_mib(mib: float | None) -> str:
    return "" if mib is None else f", peak {mib / 1024:.1f} GiB"


def nvidia_smi() -> str | None:
    """Name, driver and memory as the driver reports them (None where there is no nvidia-smi)."""
    import subprocess

    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
    try:
        done = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


# -- steps ----------------------------------------------------------------------------------------


def environment(ctx: Context) -> dict[str, Any]:
    """Imports, versions, and the device."""
    import importlib
    import importlib.metadata
    import platform

    problems = []
    origins = {}
    for name in (*REQUIRED_IMPORTS, *PROJECT_MODULES):
        try:
            module = importlib.import_module(name)
            origins[name] = str(Path(module.__file__ or "").parent)
        except Exception as error:  # noqa: BLE001 - report every missing piece at once
            problems.append(f"{name}: {type(error).__name__}: {error}")
    import torch

    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "versions": versions,
        "imported_from": {k: v for k, v in origins.items() if k in ("deepspeed", "diffusers")},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version()
        result.update(
            device=torch.cuda.get_device_name(0),
            device_count=torch.cuda.device_count(),
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            bf16=torch.cuda.is_bf16_supported(),
            nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
            nvidia_smi=nvidia_smi(),
        )
    else:
        result["device"] = "cpu"
    result["summary"] = (
        f"{result['device']}, python {result['python']}, torch {versions['torch']}, "
        f"diffusers {versions['diffusers']}, deepspeed {versions['deepspeed']}, "
        f"transformers {versions['transformers']}, bitsandbytes {versions['bitsandbytes']}"
    )
    if problems:
        raise StepFailed("; ".join(problems), result)
    if ctx.profile.on_gpu and not torch.cuda.is_available():
        raise StepFailed("the GPU profile needs CUDA, and torch sees no GPU", result)
    return result


def prepare(ctx: Context) -> dict[str, Any]:
    """Build (or find) the random model, then the class images the training steps use."""
    from bench.training import config_for, prepare_class_images
    from dreambooth_trainer.models.loading import resolve_model_source
    from dreambooth_trainer.priors import generation_device

    config = config_for(settings(ctx), {})
    started = time.perf_counter()
    model_dir = Path(resolve_model_source(config.base_model, config.model_cache_dir()))
    model_seconds = time.perf_counter() - started
    started = time.perf_counter()
    prepare_class_images(settings(ctx))
    priors_seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    device, dtype = generation_device()
    return {
        "model": ctx.profile.model,
        "model_mib": round(size / 2**20, 1),
        "model_seconds": round(model_seconds, 1),
        "class_images": config.prior_preservation.num_class_images,
        "class_images_seconds": round(priors_seconds, 1),
        "class_images_dtype": str(dtype).removeprefix("torch."),
        "summary": f"{ctx.profile.model} {size / 2**30:.2f} GiB in {model_seconds:.0f} s; "
        f"{config.prior_preservation.num_class_images} class images on {device} "
        f"({str(dtype).removeprefix('torch.')}) in {priors_seconds:.0f} s",
    }


def train_fixed_batch(
    ctx: Context, backend: str, precision: str, model: str = "", **training: Any
) -> dict[str, Any]:
    """The loss on one fixed batch falls under this backend and precision (and `training`
    spec fields, e.g. method lora), and stays finite. `model`: the profile's model ("") or its
    SDXL one ("sdxl", at sdxl_resolution)."""
    import torch

    require_device(ctx)
    steps = ctx.profile.fixed_batch_steps
    with built_trainer(ctx, backend, precision, model, **training) as trainer:
        device = trainer.world.device
        generator = torch.Generator().manual_seed(0)
        batch = trainer.data.batch(0, trainer.training.batch_size, 0, 1, generator)

        def loss(grad: bool) -> torch.Tensor:
            noise = torch.Generator().manual_seed(1234)  # same noise and timesteps every time
            with contextlib.nullcontext() if grad else torch.no_grad(), trainer.backend.autocast():
                return trainer.objective(trainer.model, batch, noise, device).total

        reset_peak(device)
        losses, scales, norms = [], [], []
        started = time.perf_counter()
        for _ in range(steps):
            with trainer.backend.accumulate(sync=True):
                total = loss(grad=True)
                trainer.backend.backward(total)
            norms.append(trainer.backend.step())
            losses.append(float(total.detach()))
            scales.append(loss_scale(trainer.backend))
        final = float(loss(grad=False))
        seconds = (time.perf_counter() - started) / steps
        result = {
            **trained_what(trainer),
            "backend_class": type(trainer.backend).__name__,
            "device": str(device),
            "losses": [round(v, 6) for v in losses],
            "final_loss": round(final, 6),
            "ratio": round(final / losses[0], 4) if losses[0] else None,
            "grad_norms": [round(v, 4) for v in norms],
            "seconds_per_step": round(seconds, 4),
            "peak_allocated_mib": peak_mib(device),
        }
        engine = getattr(trainer.backend, "engine", None)
        if engine is not None:
            result["deepspeed_skipped_steps"] = engine.skipped_steps  # fp16 overflows
    if precision == "fp16":
        result["loss_scales"] = scales
        result["scale_drops"] = sum(1 for a, b in zip(scales, scales[1:], strict=False) if b < a)
    scale_note = f", loss scale {scales[0]:g} -> {scales[-1]:g}" if scales[0] else ""
    result["summary"] = (
        f"loss {losses[0]:.4f} -> {final:.4f} in {steps} steps{scale_note}, "
        f"{1000 * seconds:.0f} ms/step{fmt_mib(result['peak_allocated_mib'])}"
    )
    if model and result["family"] != model:
        raise StepFailed(f"{result['model']} is not the profile's {model} model", result)
    if not all(math.isfinite(v) for v in [*losses, final]):
        raise StepFailed("a loss is not finite", result)
    if not final < losses[0]:
        raise StepFailed(f"the loss did not fall ({losses[0]:.4f} -> {final:.4f})", result)
    return result


def trained_what(trainer: Any) -> dict[str, Any]:
    """Which model at which size trained, and in which dtypes (SDXL's VAE stays fp32 in fp16)."""
    trainable = {str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}
    return {
        "model": trainer.config.base_model.uri,
        "family": trainer.frozen.family,
        "resolution": trainer.training.resolution,
        "vae_dtype": str(trainer.frozen.vae.dtype),
        "trainable_dtypes": sorted(trainable),
    }


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic kernels where torch has them (warn, not fail, where it has none)."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def trainable_weights(trainer: Any) -> dict[str, Any]:
    """A float32 CPU copy of the trained weights (collective: gathers ZeRO-3 and FSDP shards)."""
    import torch

    module = trainer.trained_model
    return {
        name: p.detach().to("cpu", torch.float32, copy=True)
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """L2 norm of a - b over all tensors."""
    return math.sqrt(sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a))


def resume(ctx: Context, backend: str, precision: str) -> dict[str, Any]:
    """A checkpoint saved and loaded continues as if training had not stopped."""
    require_device(ctx)
    checkpoint = checkpoint_root(ctx) / f"gpu-check-resume-{backend}-{precision}"
    try:
        return _resume(ctx, backend, precision, checkpoint)
    finally:
        _remove(checkpoint)


def _resume(ctx: Context, backend: str, precision: str, checkpoint: Path) -> dict[str, Any]:
    import torch

    n = ctx.profile.resume_steps
    with deterministic(), built_trainer(ctx, backend, precision) as trainer:
        for _ in range(n):
            trainer.train_step()
        started = time.perf_counter()
        trainer.save_state(checkpoint)
        save_seconds = time.perf_counter() - started
        saved = trainer_weights_and_scale(trainer)
        straight_losses = [trainer.train_step().loss for _ in range(n)]
        straight = trainer_weights_and_scale(trainer)
        started = time.perf_counter()
        trainer.load_state(checkpoint)
        load_seconds = time.perf_counter() - started
        restored = trainer_weights_and_scale(trainer)
        restored_exactly = all(torch.equal(restored[0][k], saved[0][k]) for k in saved[0])
        restored_scale = restored[1] == saved[1]
        del restored
        resumed_losses = [trainer.train_step().loss for _ in range(n)]
        resumed = trainer_weights_and_scale(trainer)
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    bitwise = straight_losses == resumed_losses and all(
        torch.equal(straight[0][k], resumed[0][k]) for k in straight[0]
    )
    update = distance(straight[0], saved[0])
    divergence = distance(resumed[0], straight[0]) / update if update else math.inf
    loss_error = max(
        abs(a - b) / max(abs(b), 1e-12)
        for a, b in zip(resumed_losses, straight_losses, strict=True)
    )
    within = divergence <= RESUME_WEIGHT_TOLERANCE and loss_error <= RESUME_LOSS_TOLERANCE
    result = {
        "steps_before_and_after": n,
        "checkpoint_mib": round(size / 2**20, 1),
        "save_seconds": round(save_seconds, 2),
        "load_seconds": round(load_seconds, 2),
        "restored_weights_bitwise": restored_exactly,
        "restored_loss_scale": restored_scale,
        "straight_losses": straight_losses,
        "resumed_losses": resumed_losses,
        "bitwise": bitwise,
        "weight_divergence": divergence,
        "loss_relative_error": loss_error,
        "tolerance": {"weights": RESUME_WEIGHT_TOLERANCE, "loss": RESUME_LOSS_TOLERANCE},
        "loss_scale": straight[1],
    }
    verdict = "bitwise" if bitwise else f"within tolerance: {divergence:.1e} of the update"
    result["summary"] = (
        f"{verdict}; {size / 2**20:.0f} MiB saved in {save_seconds:.1f} s, "
        f"loaded in {load_seconds:.1f} s"
    )
    if not (restored_exactly and restored_scale):
        raise StepFailed("loading the checkpoint did not restore what was saved", result)
    if not (bitwise or within):
        raise StepFailed(
            f"the resumed run diverged: {divergence:.2e} of the update (tolerance "
            f"{RESUME_WEIGHT_TOLERANCE}), losses {loss_error:.2e} relative",
            result,
        )
    return result


def checkpoint_root(ctx: Context) -> Path:
    """Where resume writes its checkpoint: memory (/dev/shm) when it has room for SD1.5's
    weights and AdamW state (about 14 GB under ZeRO-3), so a slow disk does not eat the budget."""
    import shutil

    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > SHM_NEEDED:
        return shm
    return ctx.work_dir


def trainer_weights_and_scale(trainer: Any) -> tuple[dict[str, Any], float | None]:
    return trainable_weights(trainer), loss_scale(trainer.backend)


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def check_images(arrays: Any, pil_images: list[Any], caught: list[Any]) -> dict[str, Any]:
    """Finite, not constant, and nothing NaN was cast to pixels (diffusers warns then)."""
    import numpy as np

    invalid = [str(w.message) for w in caught if "invalid value" in str(w.message)]
    pixels = [float(np.asarray(image, dtype=np.float32).std()) for image in pil_images]
    result = {
        "images": len(pil_images),
        "finite": bool(np.isfinite(arrays).all()),
        "min": float(np.nanmin(arrays)),
        "max": float(np.nanmax(arrays)),
        "std": float(np.nanstd(arrays)),
        "pixel_std": [round(v, 2) for v in pixels],
        "cast_warnings": invalid,
    }
    problems = []
    if not result["finite"]:
        problems.append("non-finite values in the decoded images")
    if invalid:
        problems.append(f"NaN cast to pixels: {invalid[0]}")
    if not all(v > 0 for v in pixels):
        problems.append("a blank (constant) image")
    result["summary"] = (
        f"{len(pil_images)} images finite, values {result['min']:.2f}..{result['max']:.2f}, "
        f"std {result['std']:.3f}"
    )
    if problems:
        raise StepFailed("; ".join(problems), result)
    return result


def priors_fp16(ctx: Context) -> dict[str, Any]:
    """Class images in fp16 (the priors phase's dtype on a GPU) are finite and not blank."""
    import torch

    from bench.training import config_for
    from dreambooth_trainer.models.loading import load_pipeline
    from dreambooth_trainer.priors import PriorRequest, generate_batch

    require_device(ctx)
    config = config_for(settings(ctx), {})
    request = PriorRequest.from_config(config)
    # fp16 on the GPU, as the priors phase runs there; the smoke run asks the CPU for fp16 too.
    device = torch.device("cuda" if on_gpu() else "cpu")
    pipeline = load_pipeline(config.base_model, config.model_cache_dir(), torch_dtype=torch.float16)
    pipeline.to(device)
    indices = range(request.batch_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pil_images = generate_batch(pipeline, request, indices)
        arrays = generate_arrays(pipeline, request, indices)
    result = check_images(arrays, pil_images, caught)
    result.update(device=str(device), dtype="float16", steps=request.steps)
    del pipeline
    free_memory()
    return result


def generate_arrays(pipeline: Any, request: Any, indices: range) -> Any:
    """`generate_batch`'s call, decoded to floats instead of pixels (so NaN stays visible)."""
    import torch

    from dreambooth_trainer.models.generation import generate_images

    with torch.inference_mode():
        return generate_images(
            pipeline,
            [request.prompt] * len(indices),
            None,
            width=request.resolution,
            height=request.resolution,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            generators=[torch.Generator().manual_seed(request.seed + i) for i in indices],
            output_type="np",
        )


def inference_fp16(ctx: Context, model: str = "inference") -> dict[str, Any]:
    """The server's loader and engine in fp16: served images are finite and not blank.
    `model`: the profile's inference model ("inference") or its SDXL one ("sdxl")."""
    import torch

    from dreambooth_trainer.models.generation import generate_images
    from dreambooth_trainer.serve import artifact
    from dreambooth_trainer.serve.batching import Job
    from dreambooth_trainer.serve.engine import Text2ImageEngine
    from dreambooth_trainer.serve.schemas import Generation

    require_device(ctx)
    profile = ctx.profile
    cache = config_for_cache(ctx)
    uri, size = getattr(profile, f"{model}_model"), getattr(profile, f"{model}_size")
    width, height = (int(v) for v in size.split("x"))
    device = "cuda" if on_gpu() else "cpu"
    started = time.perf_counter()
    loaded = artifact.load(uri, cache_dir=cache, device=device, dtype="float16")
    load_seconds = time.perf_counter() - started
    engine = Text2ImageEngine(loaded.pipeline)
    generation = Generation(
        prompt="a photo of sks dog", negative_prompt="", n=2, width=width, height=height,
        steps=profile.inference_steps, guidance_scale=7.5, scheduler=None, seed=0,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.warm_up()
        started = time.perf_counter()
        pil_images = engine([Job(generation.batch_key, generation.n, generation)])[0]
        seconds = time.perf_counter() - started
        with torch.inference_mode():
            arrays = generate_images(
                loaded.pipeline,
                [generation.prompt] * generation.n,
                None,
                width=width,
                height=height,
                steps=generation.steps,
                guidance_scale=generation.guidance_scale,
                generators=[torch.Generator().manual_seed(s) for s in generation.seeds],
                output_type="np",
            )
    result = check_images(arrays, pil_images, caught)
    result.update(
        model=uri, device=device, dtype=str(loaded.pipeline.unet.dtype), size=size,
        steps=generation.steps, seconds=round(seconds, 3), load_seconds=round(load_seconds, 1),
    )  # fmt: skip
    result["summary"] += f"; {uri} {size}: {seconds:.2f} s for {generation.n}"
    del loaded, engine
    free_memory()
    return result
