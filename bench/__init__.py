"""Benchmarks that print JSON: `python -m bench [--quick] [NAME ...]`.

A benchmark is a function `(settings: Settings) -> dict` registered with `@benchmark("name")` in
a module listed in MODULES; its dict goes under "benchmarks"/name in the output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Modules that register benchmarks; add yours here.
MODULES = [
    "bench.training",
    "bench.overhead",
    "bench.step_variants",
    "bench.priors",
    "bench.inference",
    "bench.multi_adapter",
    "bench.operator",
    "bench.lora_sizes",
    "bench.job_fixed_costs",
]


@dataclass(frozen=True)
class Settings:
    quick: bool = False
    model: str = "random://tiny-sd"
    resolution: int = 64
    work_dir: Path = field(default_factory=lambda: Path(".cache/bench"))


Benchmark = Callable[[Settings], dict[str, Any]]
BENCHMARKS: dict[str, Benchmark] = {}


def benchmark(name: str) -> Callable[[Benchmark], Benchmark]:
    def register(function: Benchmark) -> Benchmark:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} registered twice")
        BENCHMARKS[name] = function
        return function

    return register


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (`fraction` in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]
