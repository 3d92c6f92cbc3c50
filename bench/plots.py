"""PNG plots of a `python -m bench` report, where a curve says more than a number."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display here or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

PHASES = ("data", "forward", "backward", "optimizer", "other")


def priors_figure(result: dict[str, Any], device: str) -> Figure:
    runs = result["runs"]
    figure, axes = plt.subplots(figsize=(5, 3.2))
    axes.plot([r["batch_size"] for r in runs], [r["images_per_second"] for r in runs], "o-")
    axes.set_xscale("log", base=2)
    axes.set(xlabel="generation batch size", ylabel="class images / s")
    axes.set_title(f"priors, {result['inference_steps']} steps ({device})")
    return figure


def inference_figure(result: dict[str, Any], device: str) -> Figure:
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(8, 3.2))
    for mode, data in result["modes"].items():
        rows = data["results"]
        clients = [r["concurrency"] for r in rows]
        label = f"{mode} (max batch {data['max_batch_size']})"
        throughput.plot(clients, [r["images_per_s"] for r in rows], "o-", label=label)
        latency.plot(clients, [r["latency_p95_s"] for r in rows], "o-", label=label)
    throughput.set(xlabel="concurrent clients", ylabel="images / s")
    latency.set(xlabel="concurrent clients", ylabel="p95 latency (s)")
    throughput.legend(fontsize="small")
    figure.suptitle(f"inference server ({device})")
    return figure


def training_figure(result: dict[str, Any], device: str) -> Figure:
    runs = [r for r in result["sweeps"]["backends"] if "error" not in r]
    labels = [f"{r['backend']} {r['precision']} x{r['world_size']}" for r in runs]
    figure, axes = plt.subplots(figsize=(7, 0.5 * len(runs) + 1.5))
    left = [0.0] * len(runs)
    for phase in PHASES:
        widths = [1000 * r["phase_seconds"][phase] for r in runs]
        axes.barh(labels, widths, left=left, label=phase)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    axes.set(xlabel="ms per optimizer step")
    axes.invert_yaxis()
    axes.legend(fontsize="small", ncols=len(PHASES), loc="lower center", bbox_to_anchor=(0.5, 1))
    figure.suptitle(f"training step by backend ({device})", y=1.08)
    return figure


FIGURES: dict[str, Callable[[dict[str, Any], str], Figure]] = {
    "priors": priors_figure,
    "inference": inference_figure,
    "training": training_figure,
}


def write_plots(report: dict[str, Any], directory: Path) -> list[str]:
    """One PNG per benchmark in `report` that has a figure; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    device = report["environment"]["device"]
    written = []
    for name, result in report["benchmarks"].items():
        if name not in FIGURES or "skipped" in result:
            continue
        figure = FIGURES[name](result, device)
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(str(path))
    return written
