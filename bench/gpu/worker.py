"""Runs steps of the GPU check one after another in this process; the orchestrator watches it.

    python -m bench.gpu.worker --plan bench.gpu --profile gpu --work-dir DIR --events FILE STEP...

For each step it appends JSON lines to FILE: {"event": "start", "step": NAME} before the step,
{"event": "partial", ...} when a step has results so far (a figures step after each run), and
{"event": "end", "step": NAME, "status": "passed" | "failed" | "skipped", ...} after it. The
orchestrator (bench/gpu/__main__.py) enforces the budgets: it kills this process when a step
overruns and starts another worker for the steps left. Only the standard library is imported
here; each step imports what it needs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Skipped(Exception):
    """Raised by a step that cannot run here; the message is the reason."""


class StepFailed(Exception):
    """Raised by a step that ran but did not pass, with what it measured."""

    def __init__(self, message: str, result: dict[str, Any] | None = None):
        super().__init__(message)
        self.result = result or {}


@dataclass
class Context:
    """What a step gets: the profile, a scratch directory shared by all steps, and a way to
    report results so far (kept when the step is killed)."""

    profile: Any
    work_dir: Path
    events: Path
    step: str = ""

    @property
    def smoke(self) -> bool:
        return self.profile.name == "smoke"

    def partial(self, result: dict[str, Any]) -> None:
        emit(self.events, {"event": "partial", "step": self.step, "result": result})


def emit(events: Path, record: dict[str, Any]) -> None:
    with open(events, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record, default=str) + "\n")


def log_offset() -> int | None:
    """Where this step's output starts in the log (stderr is the orchestrator's log file)."""
    try:
        return os.lseek(sys.stderr.fileno(), 0, os.SEEK_CUR)
    except (OSError, ValueError):
        return None


def resolve(target: str):
    module_name, _, function = target.partition(":")
    return getattr(importlib.import_module(module_name), function)


def run_step(context: Context, step: Any) -> dict[str, Any]:
    """The step's end record (status, result or error)."""
    started = time.monotonic()
    record: dict[str, Any] = {"event": "end", "step": step.name}
    try:
        result = resolve(step.target)(context, **step.args)
        record.update(status="passed", result=result or {})
    except Skipped as skip:
        record.update(status="skipped", reason=str(skip))
    except StepFailed as failure:
        record.update(status="failed", error=str(failure), result=failure.result)
    except BaseException as error:  # noqa: BLE001 - a step's failure is data, not a crash
        traceback.print_exc()
        record.update(status="failed", error=f"{type(error).__name__}: {error}")
        if isinstance(error, KeyboardInterrupt):
            raise
    record["seconds"] = round(time.monotonic() - started, 2)
    release_memory()
    return record


def release_memory() -> None:
    """Give back what the step left cached on the GPU: the bench's runs start processes of
    their own that need the memory."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="bench.gpu")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("steps", nargs="+")
    args = parser.parse_args(argv)
    plan = importlib.import_module(args.plan)
    steps = {step.name: step for step in plan.STEPS}
    context = Context(plan.PROFILES[args.profile], args.work_dir, args.events)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name in args.steps:
        step = steps[name]
        context.step = name
        print(f"\n==== step {name} ====", file=sys.stderr, flush=True)
        emit(args.events, {"event": "start", "step": name, "log_offset": log_offset()})
        record = run_step(context, step)
        print(f"==== step {name}: {record['status']} ====", file=sys.stderr, flush=True)
        emit(args.events, record)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: steps raise bench.gpu.worker's
    # Skipped and StepFailed, which this copy's classes would not catch.
    from bench.gpu.worker import main as worker_main

    sys.exit(worker_main())
