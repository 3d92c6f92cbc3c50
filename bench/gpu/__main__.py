"""python -m bench.gpu OUTDIR [--smoke] [--only PREFIX ...]: run the GPU check's steps.

bench/gpu/run.sh is the entry point (it installs the wheelhouse on a GPU machine first). This
orchestrator imports only the standard library (and psutil when present): it starts a worker
(bench.gpu.worker) with the steps still to run, follows the worker's events, kills it when the
current step passes its budget or the run's deadline, records that step as failed (with the
results it had reported and its log's tail), and starts a new worker for the rest. After every
step it rewrites OUTDIR/gpu-check.json, so that even a run cut short leaves its report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import LOG_FILE, REPORT_FILE
from .summary import render

REPO = Path(__file__).resolve().parents[2]
POLL_SECONDS = 0.2
KILL_GRACE_SECONDS = 10.0
LOG_TAIL_LINES = 30


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("outdir", type=Path, help="where gpu-check.json and steps.log go")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PREFIX",
        help="run only the steps whose names start with PREFIX (repeatable)",
    )
    parser.add_argument("--plan", default="bench.gpu", help=argparse.SUPPRESS)
    parser.add_argument(
        "--setup-seconds",
        type=float,
        default=0.0,
        help="seconds run.sh spent before this (installing wheels): counted in the run's budget",
    )
    parser.add_argument("--work-dir", type=Path, help="scratch (default: a temporary directory)")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    return parser.parse_args(argv)


class Run:
    """One run: the steps' records so far, and the report file."""

    def __init__(
        self, plan: Any, profile: Any, selected: list[Any], outdir: Path, setup_seconds: float
    ):
        self.plan, self.profile, self.selected, self.outdir = plan, profile, selected, outdir
        self.started_at = datetime.datetime.now(datetime.timezone.utc)
        self.started = time.monotonic() - setup_seconds
        self.setup_seconds = setup_seconds
        self.deadline = self.started + profile.total_seconds
        self.records: dict[str, dict[str, Any]] = {}
        self.log = outdir / LOG_FILE

    def record(self, name: str, record: dict[str, Any]) -> None:
        record = {key: value for key, value in record.items() if key not in ("event", "step")}
        self.records[name] = {"name": name, **record}
        self.write()

    def report(self, selected: list[Any]) -> dict[str, Any]:
        steps = [self.records[s.name] for s in selected if s.name in self.records]
        counts = {status: 0 for status in ("passed", "failed", "skipped")}
        for step in steps:
            counts[step["status"]] += 1
        environment = self.records.get("environment", {}).get("result", {})
        return {
            "check": "gpu",
            "mode": self.profile.name,
            "started": self.started_at.isoformat(timespec="seconds"),
            "wall_seconds": round(time.monotonic() - self.started, 1),
            "setup_seconds": round(self.setup_seconds, 1),
            "budget_seconds": self.profile.total_seconds,
            "profile": {
                key: value for key, value in vars(self.profile).items() if not key.startswith("_")
            },
            "environment": environment,
            "counts": counts,
            "steps": steps,
        }

    def write(self) -> None:
        path = self.outdir / REPORT_FILE
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(self.report(self.selected), indent=2, default=str) + "\n")
        partial.replace(path)


def log_tail(log: Path, offset: int, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with open(log, "rb") as stream:
            stream.seek(offset)
            text = stream.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGTERM to the worker and everything it started (torchrun and its ranks, a server), then
    SIGKILL to whatever is left after a grace period."""
    try:
        import psutil

        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
    except Exception:  # noqa: BLE001 - no psutil, or the worker is already gone
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        for member in family:
            with contextlib.suppress(Exception):
                member.send_signal(sig)
        try:
            process.wait(KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            # The worker is gone; make sure its children are too.
            for member in family:
                with contextlib.suppress(Exception):
                    member.kill()
            return


class Events:
    """Reads the JSON lines a worker appends to its events file."""

    def __init__(self, path: Path):
        self.path, self.offset, self.buffer = path, 0, ""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as stream:
                stream.seek(self.offset)
                chunk = stream.read()
                self.offset = stream.tell()
        except FileNotFoundError:
            return []
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split("\n")
        return [json.loads(line) for line in lines if line.strip()]


def worker_env(profile: Any) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Nothing can be downloaded on the device machine (nor in CI): never try.
    env.setdefault("HF_HUB_OFFLINE", "1")
    if not profile.on_gpu:
        # The tiny model's tensors are too small for intra-op threads, and a busy 2-core CI
        # machine makes spinning OpenMP threads wait on each other.
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # lets resume ask for determinism
    return env


def run_worker(run: Run, steps: list[Any], work_dir: Path) -> None:
    """Start a worker for `steps`; follow it until it ends or is killed; record what it did."""
    plan, profile = run.plan, run.profile
    with tempfile.NamedTemporaryFile(prefix="events-", suffix=".jsonl", dir=work_dir) as events:
        argv = [sys.executable, "-m", "bench.gpu.worker", "--plan", plan.__name__]
        argv += ["--profile", profile.name, "--work-dir", str(work_dir), "--events", events.name]
        argv += [step.name for step in steps]
        by_name = {step.name: step for step in steps}
        with open(run.log, "ab") as log:
            process = subprocess.Popen(
                argv, cwd=REPO, env=worker_env(profile), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        reader = Events(Path(events.name))
        current: str | None = None
        since = time.monotonic()  # the first step's clock starts with the worker
        offset = run.log.stat().st_size
        partial: dict[str, Any] = {}
        while True:
            exited = process.poll() is not None
            for event in reader.read():
                kind, name = event["event"], event["step"]
                if kind == "start":
                    current, partial = name, {}
                    since = time.monotonic()
                    offset = event.get("log_offset")
                    if offset is None:
                        offset = run.log.stat().st_size
                elif kind == "partial":
                    partial = event.get("result", {})
                elif kind == "end":
                    record = {**event, "budget_seconds": by_name[name].budget_for(profile.name)}
                    if record["status"] == "failed":
                        record["log_tail"] = log_tail(run.log, offset)
                    run.record(name, record)
                    current = None
                    since = time.monotonic()
            pending = [s for s in steps if s.name not in run.records]
            if exited or not pending:
                break
            name = current or pending[0].name
            budget = by_name[name].budget_for(profile.name)
            elapsed = time.monotonic() - since
            if elapsed > budget or time.monotonic() > run.deadline:
                why = (
                    f"over its budget of {budget:.0f} s"
                    if elapsed > budget
                    else f"stopped at the run's deadline ({profile.total_seconds:.0f} s in all)"
                )
                kill_tree(process)
                run.record(name, failed(budget, elapsed, why, partial, log_tail(run.log, offset)))
                return
            time.sleep(POLL_SECONDS)
        process.wait()
        if current is not None:  # the worker died inside a step
            code = process.returncode
            why = f"the worker died (exit {code}) during the step"
            elapsed = time.monotonic() - since
            budget = by_name[current].budget_for(profile.name)
            run.record(current, failed(budget, elapsed, why, partial, log_tail(run.log, offset)))


def failed(
    budget: float, elapsed: float, error: str, partial: dict[str, Any], tail: list[str]
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "status": "failed",
        "error": error,
        "seconds": round(elapsed, 2),
        "budget_seconds": budget,
        "log_tail": tail,
    }
    if partial:
        record["result"] = partial
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = importlib.import_module(args.plan)
    profile = plan.PROFILES["smoke" if args.smoke else "gpu"]
    selected = [s for s in plan.STEPS if not args.only or s.name.startswith(tuple(args.only))]
    if args.list:
        for step in selected:
            reason = step.skip_reason(profile.name)
            budget = f"{step.budget_for(profile.name):>5.0f} s"
            print(f"{step.name:<24} {budget}  {'skipped: ' + reason if reason else ''}".rstrip())
        return 0
    if not selected:
        print(f"no step starts with {args.only}", file=sys.stderr)
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    run = Run(plan, profile, selected, args.outdir, args.setup_seconds)
    run.log.write_bytes(b"")
    with contextlib.ExitStack() as stack:
        work_dir = args.work_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-"))
        )
        work_dir.mkdir(parents=True, exist_ok=True)
        for step in selected:
            reason = step.skip_reason(profile.name)
            if reason:
                run.record(step.name, {"status": "skipped", "reason": reason, "seconds": 0.0})
        while True:
            pending = [s for s in selected if s.name not in run.records]
            if not pending:
                break
            if time.monotonic() > run.deadline - 1:
                for step in pending:
                    run.record(step.name, not_run(profile))
                break
            before = len(run.records)
            run_worker(run, pending, work_dir)
            if len(run.records) == before:  # a worker that did nothing: do not loop forever
                run.record(pending[0].name, worker_gave_up(run))
    report = run.report(selected)
    run.write()
    print(render(report))
    return 1 if report["counts"]["failed"] else 0


def not_run(profile: Any) -> dict[str, Any]:
    return {
        "status": "failed",
        "error": f"not run: the run's {profile.total_seconds:.0f} s were spent",
        "seconds": 0.0,
    }


def worker_gave_up(run: Run) -> dict[str, Any]:
    return {
        "status": "failed",
        "error": "the worker exited before starting this step",
        "seconds": 0.0,
        "log_tail": log_tail(run.log, 0),
    }


if __name__ == "__main__":
    sys.exit(main())
