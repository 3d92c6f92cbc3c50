"""Multi-adapter serving benchmark: 8 clients spread over 10 LoRA adapters on one server, the
adapter cache holding all 10 and holding 4, against the same load on single-adapter servers;
and what loading and switching an adapter costs.

Servers, each `dreambooth serve` in its own process on one tiny random base (bench.inference's
settings: 64 px, 10 steps, one torch thread, dynamic batching up to 8 images):
- `adapter`: `--adapter`, one LoRA export applied at start: the single-adapter server;
- `published_1`: `--publications` with one model published: the multi-adapter code path with
  nothing to spread over;
- `published_10_cache_10`, `published_10_cache_4`: ten published, `--max-loaded-adapters` 10, 4.

All four run at once and are measured in turns, round after round with the order rotating, so
a change in the machine's load falls on all of them alike. Every round gives each server the
same requests: 8 closed-loop clients, each request for a model drawn (seeded) from the ten; the
single-adapter servers get the same requests for their one model. Before the first round each
server answers every one of its models once (verified, loaded: the cache-10 server then holds
all ten).

Adapter load time is the servers' own histogram (dreambooth_inference_adapter_load_duration_
seconds); the cost of making a loaded adapter the active one (a swap) and of a miss that evicts
is timed here, in this process, on the same AdapterCache the server's worker calls per batch.

    python -m bench.multi_adapter [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import Settings, benchmark, percentile
from bench.inference import (
    MODEL,
    STEPS,
    ModelChooser,
    drive,
    scrape,
    server,
    throughput,
)

ADAPTERS = 10
CLIENTS = 8
CACHE_SIZES = (10, 4)
MAX_BATCH_SIZE = 8
# The target: with every adapter cached, at least this share of the single-adapter
# server's images/s.
TARGET_SHARE = 0.8

LOADS = "dreambooth_inference_adapter_loads_total"
EVICTIONS = "dreambooth_inference_adapter_evictions_total"
HITS = 'dreambooth_inference_adapter_cache_lookups_total{result="hit"}'
MISSES = 'dreambooth_inference_adapter_cache_lookups_total{result="miss"}'
LOAD_SECONDS = "dreambooth_inference_adapter_load_duration_seconds_sum"
LOAD_COUNT = "dreambooth_inference_adapter_load_duration_seconds_count"
BATCHES = "dreambooth_inference_batch_size_count"
BATCHED_IMAGES = "dreambooth_inference_batch_size_sum"
COUNTED = (LOADS, EVICTIONS, HITS, MISSES, LOAD_SECONDS, LOAD_COUNT, BATCHES, BATCHED_IMAGES)


@dataclass(frozen=True)
class Plan:
    adapters: int = ADAPTERS
    clients: int = CLIENTS
    cache_sizes: tuple[int, ...] = CACHE_SIZES
    # Many short rounds rather than a few long ones: the servers are compared round by round,
    # and a shorter round leaves the machine's load less time to change within it.
    rounds: int = 8
    requests_per_client: int = 6  # per round
    swap_repeats: int = 20

    @classmethod
    def for_settings(cls, quick: bool) -> Plan:
        return cls(rounds=3, requests_per_client=4, swap_repeats=5) if quick else cls()


@dataclass(frozen=True)
class Served:
    """One server under test: how it is started and which models its clients name."""

    name: str
    args: tuple[str, ...]
    models: tuple[str | None, ...]  # None: the server's own model (--adapter)


def model_names(count: int) -> list[str]:
    return [f"bench/subject-{i}" for i in range(count)]


def spread(models: tuple[str | None, ...], plan: Plan, seed: int) -> ModelChooser:
    """Each client's requests over `models`, drawn with `seed`: the same draws for every server
    (a single-model server gets its one model for each)."""
    rng = random.Random(seed)
    draws = [
        [rng.randrange(plan.adapters) for _ in range(plan.requests_per_client)]
        for _ in range(plan.clients)
    ]
    return lambda client, i: models[draws[client][i] % len(models)]


def round_robin(models: tuple[str | None, ...], clients: int) -> ModelChooser:
    """Request i of client c names model (i x clients + c) mod n: every model, in turn."""
    return lambda client, i: models[(i * clients + client) % len(models)]


def make_exports(base: Path, directory: Path, count: int) -> list[Path]:
    """`count` LoRA exports for `base` (different seeds), as the export phase writes them."""
    from tests.support.lora import export_for

    return [export_for(base, directory / f"adapter-{i}", seed=i + 1) for i in range(count)]


def servers(base: Path, exports: list[Path], plan: Plan, scratch: Path) -> list[Served]:
    from tests.support.lora import publish

    names = model_names(len(exports))
    one, every = scratch / "published-1", scratch / f"published-{len(exports)}"
    for directory, published in ((one, names[:1]), (every, names)):
        directory.mkdir()
        publish(directory, dict(zip(published, exports[: len(published)], strict=True)))
    served = [
        Served("adapter", ("--adapter", str(exports[0])), (None,)),
        Served("published_1", ("--publications", str(one)), (names[0],)),
    ]
    served += [
        Served(
            f"published_{len(exports)}_cache_{size}",
            ("--publications", str(every), "--max-loaded-adapters", str(size)),
            tuple(names),
        )
        for size in plan.cache_sizes
    ]
    return served


def counted(url: str) -> dict[str, float]:
    samples = scrape(url)
    return {name: samples.get(name, 0.0) for name in COUNTED}


def one_round(url: str, served: Served, plan: Plan, seed: int) -> dict[str, Any]:
    before = counted(url)
    wall, latencies = drive(
        url,
        plan.clients,
        plan.requests_per_client,
        model_for=spread(served.models, plan, seed),
    )
    after = counted(url)
    return {
        "wall_s": wall,
        "latencies": latencies,
        **{name: after[name] - before[name] for name in COUNTED},
    }


def summarize(served: Served, rounds: list[dict[str, Any]], lifetime: dict[str, float]) -> dict:
    latencies = [latency for r in rounds for latency in r["latencies"]]
    total = {name: sum(r[name] for r in rounds) for name in COUNTED}
    return {
        "models": len(served.models),
        "args": list(served.args),
        **throughput(sum(r["wall_s"] for r in rounds), latencies),
        "images_per_s_by_round": [round(len(r["latencies"]) / r["wall_s"], 2) for r in rounds],
        "mean_batch_size": round(total[BATCHED_IMAGES] / total[BATCHES], 2),
        "adapter_cache_hits": int(total[HITS]),
        "adapter_cache_misses": int(total[MISSES]),
        "adapter_loads": int(total[LOADS]),
        "adapter_evictions": int(total[EVICTIONS]),
        "adapter_load_mean_s": _mean(total[LOAD_SECONDS], total[LOAD_COUNT]),
        # Warm-up included: the cache-10 server's ten first loads are here.
        "lifetime_adapter_loads": int(lifetime[LOADS]),
        "lifetime_adapter_load_mean_s": _mean(lifetime[LOAD_SECONDS], lifetime[LOAD_COUNT]),
    }


def _mean(total: float, count: float) -> float | None:
    return round(total / count, 4) if count else None


def measure_servers(
    under_test: list[Served], base: Path, plan: Plan, cache: Path, phases: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Start every server, warm each up, then measure them in turns, `plan.rounds` times."""
    rounds: dict[str, list[dict[str, Any]]] = {served.name: [] for served in under_test}
    with contextlib.ExitStack() as stack:
        with timed_phase(phases, "start_servers"):
            urls = {
                served.name: stack.enter_context(
                    server(MAX_BATCH_SIZE, cache, str(base), STEPS, served.args)
                )
                for served in under_test
            }
        with timed_phase(phases, "warm_up"):
            for served in under_test:  # every model once: verified, and loaded where it fits
                requests = math.ceil(len(served.models) / plan.clients) + 1
                chooser = round_robin(served.models, plan.clients)
                drive(urls[served.name], plan.clients, requests, model_for=chooser)
        with timed_phase(phases, "rounds"):
            for number in range(plan.rounds):
                shift = number % len(under_test)
                for served in under_test[shift:] + under_test[:shift]:
                    rounds[served.name].append(one_round(urls[served.name], served, plan, number))
        lifetime = {name: counted(url) for name, url in urls.items()}
    return {
        served.name: summarize(served, rounds[served.name], lifetime[served.name])
        for served in under_test
    }


def share(served: dict[str, Any], single: dict[str, Any]) -> dict[str, Any]:
    """`served`'s images/s over `single`'s: overall, and round by round (the two measured
    minutes apart at most, under about the same load) with their median."""
    rounds = zip(served["images_per_s_by_round"], single["images_per_s_by_round"], strict=True)
    by_round = [round(a / b, 3) for a, b in rounds]
    return {
        "overall": round(served["images_per_s"] / single["images_per_s"], 3),
        "by_round": by_round,
        "median_of_rounds": percentile(by_round, 0.5),
    }


@contextlib.contextmanager
def timed_phase(phases: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    phases[name] = round(time.perf_counter() - started, 1)


def _timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _seconds(values: list[float]) -> dict[str, float]:
    return {
        "p50_s": round(percentile(values, 0.5), 5),
        "p95_s": round(percentile(values, 0.95), 5),
        "count": len(values),
    }


def measure_switching(base: Path, exports: list[Path], plan: Plan, cache: Path) -> dict:
    """AdapterCache.activate, as the worker calls it before each batch: a first load, a swap to
    another loaded adapter, the same adapter again, and a miss that evicts (the smallest cache)."""
    from dreambooth_contract.publication import PublishedModel
    from dreambooth_trainer import digest
    from dreambooth_trainer.serve import artifact
    from dreambooth_trainer.serve.adapters import AdapterCache, AdapterVerifier

    verifier = AdapterVerifier(cache, base=artifact.resolve_base(str(base), cache))
    adapters = [
        verifier.verify(PublishedModel(name=name, uri=str(path), digest=digest.verify(path)))
        for name, path in zip(model_names(len(exports)), exports, strict=True)
    ]

    def cache_of(size: int) -> AdapterCache:
        return AdapterCache(artifact.load_base(verifier.base, "cpu", "float32"), size)

    every = cache_of(len(adapters))
    first_loads = [_timed(lambda a=a: every.activate(a)) for a in adapters]
    swaps = [
        _timed(lambda a=a: every.activate(a)) for _ in range(plan.swap_repeats) for a in adapters
    ]
    same = [_timed(lambda: every.activate(adapters[0])) for _ in range(plan.swap_repeats)]
    small = cache_of(min(plan.cache_sizes))
    for adapter in adapters:  # fill it: the misses below each evict one
        small.activate(adapter)
    misses = [
        _timed(lambda a=a: small.activate(a))
        for _ in range(max(1, plan.swap_repeats // 4))
        for a in adapters  # in turn: with fewer slots than adapters, every one is a miss
    ]
    return {
        "first_load": _seconds(first_loads),
        "swap_to_loaded": _seconds(swaps),
        "same_adapter": _seconds(same),
        "miss_with_eviction": _seconds(misses),
    }


def run(quick: bool = False, plan: Plan | None = None) -> dict[str, Any]:
    from dreambooth_trainer.models import random_models

    plan = plan or Plan.for_settings(quick)
    load_before = os.getloadavg()
    phases: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-multi-adapter-") as scratch_dir:
        scratch = Path(scratch_dir)
        with timed_phase(phases, "make_adapters"):
            base = random_models.materialize(MODEL, scratch / "cache")
            exports = make_exports(base, scratch, plan.adapters)
        with timed_phase(phases, "switching"):
            switching = measure_switching(base, exports, plan, scratch / "cache")
        under_test = servers(base, exports, plan, scratch)
        results = measure_servers(under_test, base, plan, scratch / "cache", phases)
    full_cache = results[f"published_{plan.adapters}_cache_{max(plan.cache_sizes)}"]
    shares = {single: share(full_cache, results[single]) for single in ("adapter", "published_1")}
    return {
        "benchmark": "multi_adapter",
        "model": MODEL,
        "steps": STEPS,
        "max_batch_size": MAX_BATCH_SIZE,
        "plan": asdict(plan),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "servers": results,
        "switching": switching,
        # images/s with every adapter cached over that of each single-adapter server
        "full_cache_share_of_single": shares,
        "target_share": TARGET_SHARE,
        "target_met": min(s["overall"] for s in shares.values()) >= TARGET_SHARE,
        "phase_seconds": phases,
    }


@benchmark("multi_adapter")
def multi_adapter_benchmark(settings: Settings) -> dict[str, Any]:
    return run(settings.quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    args = parser.parse_args()
    # stdout is for the JSON alone (DeepSpeed, imported with the trainer, prints there).
    with contextlib.redirect_stdout(sys.stderr):
        report = run(args.quick)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
