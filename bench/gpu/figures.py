"""Figures steps of the GPU check: the `bench` modules' rows, for the profile's model.

`python -m bench --model random://sd15 --resolution 512 training priors inference` measures the
same things; these steps take the rows the check has time for (every backend in each precision,
the ZeRO-3 + gradient-checkpointing memory run, priors, inference), one budget per step. A
training step reports each run as it finishes, so a step cut short keeps the rows it had.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from typing import Any

from .checks import config_for_cache, require_device, settings
from .worker import Context, StepFailed

BNB_MISSING = "bitsandbytes is not installed here (its wheel was not carried)"
SMOKE_8BIT = "the smoke run measures the 32-bit row only (tests/trainer train 8-bit AdamW on CPUs)"


def gpus() -> int:
    """GPUs the bench runs get; the CPU smoke run stands in for one GPU, so that the parallel
    backends wrap the model in a process group of one as they do on a single GPU."""
    import torch

    return torch.cuda.device_count() or 1


def cublas_as_usual() -> None:
    """The bench's processes measure cuBLAS as training runs it, without the deterministic
    workspace the orchestrator sets for the resume check (this process's cuBLAS is set up)."""
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def label(run: Any) -> str:
    if run.method != "full":
        return f"{run.method} {run.backend}"
    if run.train_text_encoder and run.gradient_checkpointing:
        adam = "8-bit" if run.use_8bit_adam else "32-bit"
        return f"memory {run.backend} {adam}"
    return f"{run.backend} checkpointed" if run.gradient_checkpointing else run.backend


def measure_rows(ctx: Context, runs: list[Any], model: str = "") -> dict[str, Any]:
    """Each run through `bench.training.measure` (its own torchrun launch) on the profile's
    model, or its `model` one ("sdxl"); fails if one did."""
    from bench.training import measure, prepare_class_images

    require_device(ctx)
    prepare_class_images(settings(ctx, model))
    cublas_as_usual()
    rows: list[dict[str, Any]] = []
    for run in runs:
        if run.use_8bit_adam and not ctx.profile.memory_8bit:
            row = {"label": label(run), "precision": run.precision, "skipped": SMOKE_8BIT}
        elif run.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
            row = {"label": label(run), "precision": run.precision, "skipped": BNB_MISSING}
        else:
            figures = measure(run, settings(ctx, model), ctx.profile.figure_steps, gpus())
            row = {"label": label(run), **figures}
        rows.append(row)
        ctx.partial({"rows": rows})
    uri, resolution = ctx.profile.trained_model(model)
    result = {"model": uri, "resolution": resolution, "steps_measured": ctx.profile.figure_steps,
              "rows": rows}  # fmt: skip
    measured = [row for row in rows if "steps_per_second" in row]
    result["summary"] = "; ".join(
        f"{row['label']} {row['steps_per_second']:.2f} steps/s"
        + (f" MFU {row['mfu']:.0%}" if row.get("mfu") is not None else "")
        for row in measured
    )
    errors = [f"{row['label']}: {row['error']}" for row in rows if "error" in row]
    if model:  # the rows' own word for what they trained, not the settings'
        errors += [f"{row['label']}: trained a {row['family']} model, not {model}"
                   for row in measured if row["family"] != model]  # fmt: skip
    if errors:
        raise StepFailed("; ".join(errors), result)
    return result


def training(ctx: Context, precision: str) -> dict[str, Any]:
    """Throughput, step split, MFU and peak memory per backend in `precision`."""
    from bench.training import TrainingRun

    runs = [TrainingRun(backend=b, precision=precision) for b in ctx.profile.figure_backends]
    return measure_rows(ctx, runs)


def methods(ctx: Context) -> dict[str, Any]:
    """Full fine-tuning against LoRA, the same run otherwise: steps/s, memory, bytes written."""
    from bench.training import planned_runs

    require_device(ctx)
    return measure_rows(ctx, planned_runs(True, ctx.profile.on_gpu)["method"])


def sdxl(ctx: Context) -> dict[str, Any]:
    """The profile's SDXL model at its SDXL resolution, one process: LoRA (fp32 adapters), then
    full fine-tuning with gradient checkpointing, in the first precision (fp16 on a GPU)."""
    from bench.training import planned_runs

    full, lora = planned_runs(True, ctx.profile.on_gpu)["method"]
    return measure_rows(ctx, [lora, replace(full, gradient_checkpointing=True)], "sdxl")


def step_overhead(ctx: Context) -> dict[str, Any]:
    """Our step against the bare UNet step, caches on and off (`bench.overhead`)."""
    from bench.overhead import step_overhead as measure

    require_device(ctx)
    cublas_as_usual()
    result = measure(settings(ctx))
    result["summary"] = ", ".join(
        f"caches {state}: ours/bare {result[f'caches_{state}']['overhead_ratio']:.3f}"
        for state in ("on", "off")
    )
    return result


def step_variants(ctx: Context) -> dict[str, Any]:
    """TF32, fused AdamW, channels_last, regional compile, each alone (`bench.step_variants`).

    The smoke run compiles with torch.compile's "eager" backend: dynamo traces the blocks and
    the step runs them, without inductor's code generation (minutes on a CPU)."""
    from bench.step_variants import step_variants_rows

    require_device(ctx)
    cublas_as_usual()
    backend = "inductor" if ctx.profile.on_gpu else "eager"
    result = step_variants_rows(settings(ctx), backend, lambda rows: ctx.partial({"rows": rows}))
    parts = []
    for row in result["rows"]:
        compiled = row["speedups"]["compile"] != "off"
        parts.append(
            f"{row['variant']} x{row.get('speedup', 1):.2f}"
            + (f" (compile {row['compile_seconds']:.0f} s)" if compiled else "")
        )
    result["summary"] = ", ".join(parts)
    return result


def memory(ctx: Context) -> dict[str, Any]:
    """UNet + text encoder, batch 1, ZeRO-3, gradient checkpointing; 32-bit and 8-bit AdamW."""
    from bench.training import planned_runs

    require_device(ctx)
    return measure_rows(ctx, planned_runs(True, ctx.profile.on_gpu)["full_finetune_memory"])


def priors(ctx: Context) -> dict[str, Any]:
    """Class images/s at generation batch 1..16 (`bench.priors`)."""
    from bench.priors import class_images

    require_device(ctx)
    result = class_images(settings(ctx))
    rates = ", ".join(f"{r['images_per_second']:g}" for r in result["runs"])
    sizes = "/".join(str(r["batch_size"]) for r in result["runs"])
    result["summary"] = f"images/s at batch {sizes}: {rates} ({result['dtype']})"
    return result


def inference(ctx: Context) -> dict[str, Any]:
    """Images/s and latency at 1, 4, 8 clients, batching on and off (`bench.inference`)."""
    import torch

    from bench.inference import run

    require_device(ctx)
    profile = ctx.profile
    cublas_as_usual()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = run(
        quick=True,
        model=profile.inference_model,
        size=profile.inference_size,
        steps=profile.inference_steps,
        requests_per_client=profile.inference_requests,
        cache_dir=config_for_cache(ctx),
        device=device,
        modes=profile.inference_modes,
    )
    parts = []
    for mode, data in result["modes"].items():
        rates = "/".join(f"{row['images_per_s']:g}" for row in data["results"])
        parts.append(f"{mode} {rates}")
    speedup = result["batching_speedup_at_8_clients"]
    result["summary"] = f"images/s at 1/4/8 clients: {'; '.join(parts)}" + (
        f"; batching x{speedup} at 8" if speedup else ""
    )
    return result
