"""A stand-in plan for the GPU check's orchestrator (test_gpu_check.py): steps that pass, hang,
raise, die, skip, report partial results, all in milliseconds and without torch."""

from __future__ import annotations

import os
import time
from dataclasses import replace

from bench.gpu import GPU, SMOKE, Step
from bench.gpu.worker import Skipped

# "smoke": room for every step; "gpu": a deadline that cuts the run short.
PROFILES = {"smoke": replace(SMOKE, total_seconds=120.0), "gpu": replace(GPU, total_seconds=6.0)}
HERE = __name__


def ok(ctx, value: int = 1):
    return {"value": value, "summary": f"value {value}"}


def hang(ctx):
    ctx.partial({"rows": [{"label": "first", "steps_per_second": 1.0}]})
    time.sleep(600)


def boom(ctx):
    raise ValueError("boom")


def dies(ctx):
    os._exit(3)


def skips(ctx):
    raise Skipped("nothing to run here")


def _step(name: str, function: str, budget: float = 30.0, **kwargs) -> Step:
    return Step(name, f"{HERE}:{function}", {"smoke": budget, "gpu": budget}, **kwargs)


STEPS = [
    _step("first", "ok"),
    _step("hang", "hang", budget=2.0),
    _step("after-hang", "ok", args={"value": 2}),
    _step("boom", "boom"),
    _step("dies", "dies"),
    _step("after-death", "ok", args={"value": 3}),
    _step("skips", "skips"),
    _step("not-here", "ok", skip={"*": "not built yet: no such thing"}),
    _step("deadline", "hang", budget=60.0),
    _step("last", "ok"),
]
