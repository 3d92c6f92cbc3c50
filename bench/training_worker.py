"""One training benchmark run, on every rank torchrun starts (bench/training.py launches it).

Rank 0 writes the run's figures as JSON to --out: throughput with the phase clock off, the
data/forward/backward/optimizer split with it on (it synchronizes CUDA at every phase), peak
memory and optimizer state (AdamW's moments) over the ranks, and model FLOPs (3 x the forward
pass's, counted by torch's FlopCounterMode) with their utilisation of the GPU's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.flop_counter import FlopCounterMode

from bench import Settings
from bench.training import SUBJECT_DIR, TrainingRun, config_for
from dreambooth_trainer.parallel import World
from dreambooth_trainer.timing import PHASES
from dreambooth_trainer.train import Trainer, build_trainer, class_images_dir

WARMUP_STEPS = 2
# Dense bf16/fp16 tensor-core peak of one GPU in TFLOP/s (vendor datasheets); the first name
# contained in torch.cuda.get_device_name() wins, so the PCIe H100 comes before the SXM one.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def forward_flops(trainer: Trainer) -> int:
    """FLOPs of one micro-batch's forward pass through the trained model on this rank.

    Counted without gradients and with a generator of its own, so the trainer's state is
    untouched; collective under ZeRO-3 and FSDP (the forward gathers parameters).
    """
    generator = torch.Generator().manual_seed(0)
    world = trainer.world
    batch = trainer.data.batch(
        0, trainer.training.batch_size, world.rank, world.world_size, generator
    )
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, trainer.backend.autocast():
        trainer.objective(trainer.model, batch, generator, world.device)
    return counter.get_total_flops()


def timed_steps(trainer: Trainer, steps: int, time_phases: bool) -> list:
    trainer.time_phases = time_phases
    return [trainer.train_step() for _ in range(steps)]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """CUDA: the allocator's peaks since the reset; CPU: the process's peak RSS (since start)."""
    if device.type == "cuda":
        return {
            "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
        }
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def optimizer_state_mib(trainer: Trainer) -> float:
    """This rank's optimizer state (AdamW's moments, 8-bit ones with their scales): the tensors
    the innermost torch optimizer holds, under the wrappers a backend puts around it (DeepSpeed's
    ZeRO optimizer keeps it in `.optimizer`). A peak RSS cannot show it on a small model."""
    optimizer = trainer.backend.lr_scheduler.optimizer  # every backend schedules its optimizer
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    tensors = (t for state in optimizer.state.values() for t in state.values())
    local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors)  # FSDP2's shards
    size = sum(t.numel() * t.element_size() for t in local if torch.is_tensor(t))
    return size / 2**20


def max_over_ranks(values: dict[str, float], digits: int = 1) -> dict[str, float]:
    if not dist.is_initialized():
        return {key: round(value, digits) for key, value in values.items()}
    gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, values)
    return {key: round(max(rank[key] for rank in gathered), digits) for key in values}


def phase_split(metrics: list) -> dict[str, float]:
    """Mean seconds per step in each phase; `other` is the rest (loss all-reduce, bookkeeping)."""
    split = {p: statistics.mean(m.phase_seconds.get(p, 0.0) for m in metrics) for p in PHASES}
    split["other"] = max(0.0, statistics.mean(m.seconds for m in metrics) - sum(split.values()))
    return {phase: round(seconds, 5) for phase, seconds in split.items()}


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def written_bytes(trainer: Trainer, scratch: Path) -> dict[str, int]:
    """Collective. Bytes of a checkpoint and of the trained weights, as written into `scratch`
    (a directory every rank sees) and removed again; rank 0's figures count."""
    sizes = {}
    for name, write in (
        ("checkpoint_bytes", trainer.save_state),
        ("trained_bytes", trainer.save_trained),
    ):
        directory = scratch / name
        write(directory)
        barrier()  # every rank's files are there before rank 0 counts them
        if trainer.world.is_main:
            sizes[name] = directory_bytes(directory)
            shutil.rmtree(directory)
    return sizes


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def measure(trainer: Trainer, steps: int) -> dict[str, Any]:
    device = trainer.world.device
    flops_per_step = (
        3 * forward_flops(trainer)  # backward costs about twice the forward
        * trainer.training.gradient_accumulation_steps
        * trainer.world.world_size
    )  # fmt: skip
    timed_steps(trainer, WARMUP_STEPS, time_phases=False)
    reset_peak_memory(device)
    started = time.perf_counter()
    timed_steps(trainer, steps, time_phases=False)
    steps_per_second = steps / (time.perf_counter() - started)
    split = phase_split(timed_steps(trainer, steps, time_phases=True))
    memory = max_over_ranks(peak_memory_mib(device))
    state = max_over_ranks({"optimizer_state_mib": optimizer_state_mib(trainer)}, digits=3)
    achieved = flops_per_step * steps_per_second / 1e12
    peak = peak_tflops(device)
    world_size = trainer.world.world_size
    return {
        "world_size": world_size,
        "backend_class": type(trainer.backend).__name__,
        "family": trainer.frozen.family,  # SD or SDXL, as read from the model
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "steps_per_second": round(steps_per_second, 3),
        "images_per_second": round(steps_per_second * trainer.images_per_step, 2),
        "step_seconds": round(1 / steps_per_second, 5),
        "phase_seconds": split,
        **memory,
        **state,  # per rank: the largest shard
        "model_tflop_per_step": significant(flops_per_step / 1e12),
        "achieved_tflops": significant(achieved),
        "mfu": significant(achieved / (peak * world_size)) if peak else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training-run", required=True, help="a TrainingRun as JSON")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=Settings.model)
    parser.add_argument("--resolution", type=int, default=Settings.resolution)
    parser.add_argument("--work-dir", type=Path, default=Settings().work_dir)
    parser.add_argument("--file-sizes", action="store_true", help="measure written files too")
    args = parser.parse_args()
    run = TrainingRun(**json.loads(args.training_run))
    settings = Settings(model=args.model, resolution=args.resolution, work_dir=args.work_dir)
    config = config_for(settings, run.training_spec())
    world = World.from_env()
    if run.backend != "single" and not world.distributed:
        world = replace(world, alone_with_backend=True)  # ZeRO or FSDP on a single GPU
    class_dir = class_images_dir(config, config.model_cache_dir())
    trainer = build_trainer(config, SUBJECT_DIR, class_dir, world)
    try:
        figures = measure(trainer, args.steps)
        if args.file_sizes:  # beside --out: in the launcher's scratch directory, removed with it
            figures.update(written_bytes(trainer, args.out.parent / "written"))
    finally:
        trainer.backend.close()
    if world.is_main:
        args.out.write_text(json.dumps({**asdict(run), **figures}))


if __name__ == "__main__":
    main()
