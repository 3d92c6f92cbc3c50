"""Each step speed-up alone against the plain step: TF32, fused AdamW, channels_last, regional
torch.compile (dreambooth_trainer.speedups), and what a job gets by default.

A variant is a trainer of its own (compile and channels_last change the model in place), built
with the variant's `Speedups` and timed through `Trainer.train_step` in blocks that alternate
with blocks of a plain trainer of the same precision (as `step_overhead` does), so that whatever
else the machine does falls on both alike; `speedup` is the ratio of the median blocks (> 1: the
variant is faster). The variant's first step is timed alone: `compile_seconds` is what it took
beyond the median step, for the variant that compiles.

TF32 changes fp32 matmuls only, so it is compared in fp32 (`fp32_tf32`), on one trainer whose
process-wide matmul precision flips between blocks; on a GPU only: the flag is CUDA's.

    python -m bench step_variants [--quick] [--model random://sd15 --resolution 512]
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import Settings, benchmark
from .overhead import Rounds, build, precision_for, time_block
from .training import prepare_class_images

QUICK = Rounds(warmup=2, blocks=3, steps=5)
FULL = Rounds(warmup=3, blocks=7, steps=20)
TF32_ON_CPU = "TF32 is a CUDA setting: nothing to compare on a CPU"


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str  # the job's mixedPrecision
    speedups: Any  # dreambooth_trainer.speedups.Speedups, or None: what the job gets

    @property
    def same_model(self) -> bool:
        """Only the process-wide matmul precision differs from the plain trainer's: time the
        plain trainer itself with it (a second model would only take memory)."""
        from dreambooth_trainer.speedups import Speedups

        return self.speedups is not None and self.speedups == Speedups(tf32=self.speedups.tf32)


def variants(on_gpu: bool, compile_backend: str) -> list[Variant]:
    """The variants, grouped by precision (one plain trainer each), regional compile last: it
    takes longest, and a step cut short keeps the rows before it."""
    from dreambooth_trainer.speedups import Speedups

    mixed = precision_for(on_gpu)
    rows = [Variant("fp32_tf32", "no", Speedups(tf32=True))] if on_gpu else []
    rows += [
        Variant("defaults", mixed, None),
        Variant("fused_adamw", mixed, Speedups(fused_adamw=True)),
        Variant("channels_last", mixed, Speedups(channels_last=True)),
        Variant(
            "compile_regional",
            mixed,
            Speedups(compile="regional", compile_backend=compile_backend),
        ),
    ]
    return rows


def activate(trainer, speedups) -> Callable[[], Any]:
    """`trainer`'s step, with `speedups`' matmul precision set (it is process-wide)."""
    from dreambooth_trainer.speedups import apply_matmul_precision

    apply_matmul_precision(speedups, trainer.world.device)
    return trainer.train_step


def compare(plain, variant, speedups, rounds: Rounds) -> dict[str, Any]:
    """Alternating blocks of the plain trainer and the variant's (the same trainer when only
    the matmul precision differs); the variant's first step timed alone."""
    from dreambooth_trainer.speedups import compile_seconds

    first = time_block(activate(variant, speedups), 1).wall
    for _ in range(rounds.warmup):
        activate(variant, speedups)()
        activate(plain, plain.speedups)()
    ours, plains = [], []
    for _ in range(rounds.blocks):
        ours.append(time_block(activate(variant, speedups), rounds.steps).wall)
        plains.append(time_block(activate(plain, plain.speedups), rounds.steps).wall)
    median, plain_median = statistics.median(ours), statistics.median(plains)
    return {
        "steps_per_second": round(1 / median, 3),
        "plain_steps_per_second": round(1 / plain_median, 3),
        "speedup": round(plain_median / median, 3),
        "block_speedups": [round(p / o, 3) for p, o in zip(plains, ours, strict=True)],
        "first_step_seconds": round(first, 3),
        "compile_seconds": round(compile_seconds(first, [median]), 2),
    }


def describe(variant: Variant, speedups) -> dict[str, Any]:
    row = {
        "variant": variant.name,
        "precision": variant.precision,
        "speedups": {
            "tf32": speedups.tf32,
            "fused_adamw": speedups.fused_adamw,
            "channels_last": speedups.channels_last,
            "compile": speedups.compile,
        },
    }
    if speedups.compile != "off":
        row["compile_backend"] = str(speedups.compile_backend)
    return row


def close(trainer) -> None:
    import torch

    trainer.backend.close()
    torch.compiler.reset()  # compiled blocks hold their model; the next variant starts clean
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def step_variants_rows(
    settings: Settings,
    compile_backend: str = "inductor",
    report: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
) -> dict[str, Any]:
    """Every variant's row against the plain trainer of its precision; `report` hears the
    rows so far after each one."""
    import torch

    from dreambooth_trainer.speedups import Speedups

    on_gpu = torch.cuda.is_available()
    rounds = QUICK if settings.quick else FULL
    prepare_class_images(settings)
    rows: list[dict[str, Any]] = []
    plain = None
    try:
        for variant in variants(on_gpu, compile_backend):
            if plain is None or plain.config.training.mixed_precision != variant.precision:
                if plain is not None:
                    close(plain)
                plain = build(settings, True, variant.precision, speedups=Speedups())
            if variant.same_model:
                trainer, speedups = plain, variant.speedups
            else:
                trainer = build(settings, True, variant.precision, speedups=variant.speedups)
                speedups = trainer.speedups
            try:
                figures = compare(plain, trainer, speedups, rounds)
            finally:
                if trainer is not plain:
                    close(trainer)
            if speedups.compile == "off":
                del figures["compile_seconds"]  # the first step's extra work is no compiling
            rows.append({**describe(variant, speedups), **figures})
            report(rows)
    finally:
        if plain is not None:
            close(plain)
    result: dict[str, Any] = {"rounds": rounds.__dict__, "rows": rows}
    if not on_gpu:
        result["tf32"] = TF32_ON_CPU
    return result


@benchmark("step_variants")
def step_variants(settings: Settings) -> dict[str, Any]:
    """TF32, fused AdamW, channels_last and regional compile, each alone, and the job's
    defaults, against the plain step."""
    return step_variants_rows(settings)
