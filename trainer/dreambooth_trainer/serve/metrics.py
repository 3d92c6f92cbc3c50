"""Prometheus collectors of the inference server, on a registry of its own.

A registry per app (not the global one) lets tests and benchmarks run several servers in one
process without "duplicated timeseries" errors.

Per-model series (`model` label) stay bounded: the first `max_model_labels` models a server
answers for get their own label value, every later one shares OTHER_MODELS (ModelLabels), so
publishing thousands of adapters cannot explode Prometheus' series count.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# SD requests take from tens of milliseconds (tiny model) to a minute (50 steps at 1024 px).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Loading a LoRA adapter: tens of milliseconds (tiny) to seconds (SDXL, from a slow disk).
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
MAX_MODEL_LABELS = 50
OTHER_MODELS = "other"


class ModelLabels:
    """The `model` label value of a model name: itself for the first `limit` names, then
    OTHER_MODELS. Names are only ever those the server serves (the base or a published one),
    never a client's arbitrary string."""

    def __init__(self, limit: int = MAX_MODEL_LABELS):
        self.limit = limit
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, model: str) -> str:
        with self._lock:
            if model in self._named:
                return model
            if len(self._named) < self.limit:
                self._named.add(model)
                return model
        return OTHER_MODELS


class ServeMetrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, max_model_labels: int = MAX_MODEL_LABELS
    ):
        self.registry = registry or CollectorRegistry()
        self.model_label = ModelLabels(max_model_labels)
        self.request_duration = Histogram(
            "dreambooth_inference_request_duration_seconds",
            "Time to answer an image generation request that succeeded (queueing included), "
            "by model; its _count is the requests served.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images_generated = Counter(
            "dreambooth_inference_images_generated",
            "Images generated, by model.",
            ["model"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "dreambooth_inference_queue_depth",
            "Requests waiting for the inference worker.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "dreambooth_inference_batch_size",
            "Images per pipeline call (one UNet batch).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "dreambooth_inference_requests_rejected",
            "Error answers by reason: invalid, unauthorized, too_large, queue_full, not_ready, "
            "timeout, client_closed or error.",
            ["reason"],
            registry=self.registry,
        )
        self.abandoned = Counter(
            "dreambooth_inference_requests_abandoned",
            "Requests given up (reason: client_disconnected or deadline); stage queued: the "
            "work was dropped unstarted, running: it was already in a pipeline call.",
            ["reason", "stage"],
            registry=self.registry,
        )
        self.model_ready = Gauge(
            "dreambooth_inference_model_ready",
            "1 once the model is loaded and requests are served.",
            registry=self.registry,
        )
        self.models_published = Gauge(
            "dreambooth_inference_models_published",
            "Models (adapters) published to this server.",
            registry=self.registry,
        )
        self.adapters_loaded = Gauge(
            "dreambooth_inference_adapters_loaded",
            "LoRA adapters loaded on the base pipeline now.",
            registry=self.registry,
        )
        self.adapter_loads = Counter(
            "dreambooth_inference_adapter_loads",
            "LoRA adapters loaded onto the base pipeline.",
            registry=self.registry,
        )
        self.adapter_evictions = Counter(
            "dreambooth_inference_adapter_evictions",
            "LoRA adapters unloaded (least recently used, or unpublished).",
            registry=self.registry,
        )
        self.adapter_cache = Counter(
            "dreambooth_inference_adapter_cache_lookups",
            "Batches that needed an adapter, by result: hit (loaded) or miss (loaded for it).",
            ["result"],
            registry=self.registry,
        )
        self.adapter_load_duration = Histogram(
            "dreambooth_inference_adapter_load_duration_seconds",
            "Time to load one LoRA adapter onto the base pipeline (its batch waits for it).",
            buckets=LOAD_BUCKETS,
            registry=self.registry,
        )

    def expose(self, model: str) -> None:
        """Show `model`'s series at 0 before its first request (rates need a starting point)."""
        label = self.model_label(model)
        self.images_generated.labels(model=label)
        self.request_duration.labels(model=label)

    def served(self, model: str, images: int, seconds: float) -> None:
        """A request for `model` answered with `images` images after `seconds`."""
        label = self.model_label(model)
        self.images_generated.labels(model=label).inc(images)
        self.request_duration.labels(model=label).observe(seconds)

    # AdapterObserver (adapters.py)
    def on_adapter_load(self, seconds: float) -> None:
        self.adapter_loads.inc()
        self.adapter_load_duration.observe(seconds)

    def on_adapter_eviction(self) -> None:
        self.adapter_evictions.inc()

    def on_adapter_cache(self, hit: bool) -> None:
        self.adapter_cache.labels(result="hit" if hit else "miss").inc()

    def on_adapters_loaded(self, count: int) -> None:
        self.adapters_loaded.set(count)

    # BatchObserver (batching.py): the worker reports here without knowing about Prometheus.
    def on_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def on_batch(self, images: int) -> None:
        self.batch_size.observe(images)
