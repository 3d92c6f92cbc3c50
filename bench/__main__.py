"""python -m bench [--quick] [--model URI] [--resolution PX] [NAME ...] -> JSON on stdout,
PNG plots in --plots."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

from . import BENCHMARKS, MODULES, Settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and sizes")
    parser.add_argument("--model", default=Settings.model, help="e.g. random://sd15 on a GPU")
    parser.add_argument("--resolution", type=int, default=Settings.resolution)
    parser.add_argument("--work-dir", type=Path, default=Settings().work_dir)
    parser.add_argument(
        "--plots", type=Path, help="directory for the PNG plots (default: <work-dir>/plots)"
    )
    parser.add_argument("--list", action="store_true", help="list benchmarks and exit")
    return parser.parse_args(argv)


def environment(settings: Settings) -> dict:
    import torch

    from .hardware import cpu_description

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": device,
        "cpu": cpu_description(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": settings.model,
        "resolution": settings.resolution,
        "quick": settings.quick,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for module in MODULES:
        importlib.import_module(module)
    if args.list:
        print("\n".join(sorted(BENCHMARKS)))
        return 0
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmarks {unknown}; known: {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    settings = Settings(args.quick, args.model, args.resolution, args.work_dir)
    results = {}
    # stdout is for the JSON alone; libraries that print (DeepSpeed does) go to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        for name in args.names or sorted(BENCHMARKS):
            started = time.perf_counter()
            results[name] = BENCHMARKS[name](settings)
            results[name]["wall_seconds"] = round(time.perf_counter() - started, 2)
    report = {"environment": environment(settings), "benchmarks": results}
    from .plots import write_plots  # matplotlib: only once there is something to draw

    report["plots"] = write_plots(report, args.plots or settings.work_dir / "plots")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
