"""Inference benchmark: images/s and latency at 1, 4 and 8 concurrent clients, dynamic batching
on (max batch 8) versus one request at a time (max batch 1).

Each mode runs the real server (`python -m dreambooth_trainer.serve`, the `dreambooth serve`
command) as its own process on the tiny random model, so the clients never share a GIL with it;
closed-loop clients (each sends its next request when the previous one is answered) drive it
over HTTP. Prints JSON:

    python -m bench.inference [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench import Settings, benchmark, percentile

MODEL = "random://tiny-sd"
SIZE = "64x64"
# Enough denoising steps that the UNet, not HTTP, dominates (real requests use 20 to 50).
STEPS = 10
CONCURRENCY = (1, 4, 8)
MODES = {"batching": 8, "one_at_a_time": 1}  # mode -> --max-batch-size
# One intra-op thread: on a small shared CPU, more threads than free cores makes every op wait
# for a descheduled thread, which would measure the neighbours, not the server.
CPU_THREADS = 1
START_TIMEOUT = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(
    max_batch_size: int,
    cache_dir: Path,
    model: str = MODEL,
    steps: int = STEPS,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """`dreambooth serve` on a free loopback port (`extra_args` added to its command line);
    yields its URL once /readyz says 200."""
    port = _free_port()
    argv = [sys.executable, "-m", "dreambooth_trainer.serve", "--model", model]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    argv += ["--max-batch-size", str(max_batch_size), "--max-queue", "256"]
    argv += ["--cpu-threads", str(CPU_THREADS), "--default-steps", str(steps), *extra_args]
    env = {**os.environ, "DREAMBOOTH_CACHE": str(cache_dir)}
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not _ready(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"server did not start:\n{log.read().decode()[-3000:]}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def scrape(url: str) -> dict[str, float]:
    """Every sample on the server's /metrics, by name with its labels as exposed."""
    samples = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _batch_totals(url: str) -> tuple[float, float]:
    """(pipeline calls, images in them) so far, from the server's batch-size histogram."""
    samples = scrape(url)
    return (
        samples["dreambooth_inference_batch_size_count"],
        samples["dreambooth_inference_batch_size_sum"],
    )


# The `model` of a client's i-th request (client id, i); None: the server's own model.
ModelChooser = Callable[[int, int], str | None]


async def _client(
    http: httpx.AsyncClient,
    client_id: int,
    requests: int,
    size: str,
    steps: int,
    model_for: ModelChooser | None,
) -> list[float]:
    latencies = []
    for i in range(requests):
        body: dict[str, Any] = {
            "prompt": "a photo of sks dog",
            "size": size,
            "num_inference_steps": steps,
            "seed": client_id * 1000 + i,
        }
        if model_for is not None:
            body["model"] = model_for(client_id, i)
        started = time.perf_counter()
        response = await http.post("/v1/images/generations", json=body)
        response.raise_for_status()
        latencies.append(time.perf_counter() - started)
    return latencies


async def _load(
    url: str,
    concurrency: int,
    requests_per_client: int,
    size: str,
    steps: int,
    model_for: ModelChooser | None,
) -> tuple[float, list[float]]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        started = time.perf_counter()
        per_client = await asyncio.gather(
            *(
                _client(http, c, requests_per_client, size, steps, model_for)
                for c in range(concurrency)
            )
        )
        wall = time.perf_counter() - started
    return wall, [latency for latencies in per_client for latency in latencies]


def drive(
    url: str,
    concurrency: int,
    requests_per_client: int,
    size: str = SIZE,
    steps: int = STEPS,
    model_for: ModelChooser | None = None,
) -> tuple[float, list[float]]:
    """`concurrency` closed-loop clients (each sends its next request when the previous one is
    answered), `requests_per_client` each: (wall seconds, every request's latency)."""
    return asyncio.run(_load(url, concurrency, requests_per_client, size, steps, model_for))


def throughput(wall: float, latencies: list[float]) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "images_per_s": round(len(latencies) / wall, 2),
        "latency_p50_s": round(percentile(latencies, 0.50), 4),
        "latency_p95_s": round(percentile(latencies, 0.95), 4),
    }


def measure(
    url: str, concurrency: int, requests_per_client: int, size: str = SIZE, steps: int = STEPS
) -> dict[str, Any]:
    drive(url, concurrency, 2, size, steps)  # warm-up: first calls at this batch size
    calls_before, images_before = _batch_totals(url)
    wall, latencies = drive(url, concurrency, requests_per_client, size, steps)
    calls_after, images_after = _batch_totals(url)
    return {
        "concurrency": concurrency,
        **throughput(wall, latencies),
        "mean_batch_size": round((images_after - images_before) / (calls_after - calls_before), 2),
    }


def run(
    quick: bool = False,
    model: str = MODEL,
    size: str = SIZE,
    steps: int = STEPS,
    requests_per_client: int | None = None,
    cache_dir: Path | None = None,
    device: str = "cpu",
    modes: tuple[str, ...] = tuple(MODES),
) -> dict[str, Any]:
    """The tiny model on the CPU by default; the GPU check passes the SD1.5 architecture at
    512 px, and the cache directory where that model was already built (`device` is a label:
    the server takes the GPU when it sees one)."""
    if requests_per_client is None:
        requests_per_client = 6 if quick else 24
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as scratch:
        cache = cache_dir or Path(scratch)
        for mode in modes:
            with server(MODES[mode], cache, model, steps) as url:
                results[mode] = [
                    measure(url, c, requests_per_client, size, steps) for c in CONCURRENCY
                ]
    at_8 = {mode: rows[-1]["images_per_s"] for mode, rows in results.items()}
    speedup = (
        round(at_8["batching"] / at_8["one_at_a_time"], 2) if len(at_8) == len(MODES) else None
    )
    return {
        "benchmark": "inference",
        "model": model,
        "size": size,
        "steps": steps,
        "device": device,
        "cpu_threads": CPU_THREADS,
        "requests_per_client": requests_per_client,
        "modes": {
            mode: {"max_batch_size": MODES[mode], "results": rows} for mode, rows in results.items()
        },
        "batching_speedup_at_8_clients": speedup,
    }


@benchmark("inference")
def inference_benchmark(settings: Settings) -> dict[str, Any]:
    """`--model` and `--resolution` as for training: e.g. random://tiny-sdxl at 64 px."""
    side = settings.resolution
    return run(settings.quick, model=settings.model, size=f"{side}x{side}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per client")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))


if __name__ == "__main__":
    main()
