"""Prometheus collectors of the inference server, on a registry of its own.

A registry per app (not the global one) lets tests and benchmarks run several servers in one
process without "duplicated timeseries" errors.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# SD requests take from tens of milliseconds (tiny model) to a minute (50 steps at 1024 px).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.request_duration = Histogram(
            "dreambooth_inference_request_duration_seconds",
            "Time to answer an image generation request that succeeded (queueing included).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images_generated = Counter(
            "dreambooth_inference_images_generated",
            "Images generated.",
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

    # BatchObserver (batching.py): the worker reports here without knowing about Prometheus.
    def on_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def on_batch(self, images: int) -> None:
        self.batch_size.observe(images)
