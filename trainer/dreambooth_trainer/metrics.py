"""Trainer Prometheus metrics, served over HTTP by rank 0.

Names follow Prometheus conventions (``promtool check metrics``): the ``dreambooth_trainer_``
prefix, base units, ``_seconds`` for durations, ``_total`` for counters (prometheus_client
appends it to counter names).

Environment: ``DREAMBOOTH_METRICS_PORT`` (set by the operator's pod builder) is the port rank 0
serves ``/metrics`` on (default: the contract's ``TRAINER_METRICS_PORT``, 9400); ``0``, ``off``
or ``false`` disables the exporter.

Each ``TrainerMetrics`` has its own registry (not the process-global one), so tests and a
local run that trains twice in one process do not collide on duplicate names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from dreambooth_contract.env import METRICS_PORT_ENV, TRAINER_METRICS_PORT

log = logging.getLogger(__name__)

PREFIX = "dreambooth_trainer"
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable
DISABLED = frozenset({"", "0", "off", "false", "no"})
# Checkpoint saves range from under a second (tiny model, local disk) to many minutes
# (SD1.5 with optimizer state to S3).
SAVE_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)


class TrainerMetrics:
    """The trainer's collectors; rank 0 updates them, the exporter serves them."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.step = Gauge(f"{PREFIX}_step", "Optimizer steps done.", registry=r)
        self.total_steps = Gauge(f"{PREFIX}_total_steps", "Optimizer steps planned.", registry=r)
        self.loss = Gauge(f"{PREFIX}_loss", "Training loss of the latest step.", registry=r)
        self.subject_loss = Gauge(
            f"{PREFIX}_subject_instance_loss",
            "Instance loss of each subject at the latest step (jobs with several subjects).",
            ["subject"],
            registry=r,
        )
        self.images_per_second = Gauge(
            f"{PREFIX}_images_per_second", "Training throughput in images per second.", registry=r
        )
        self.compile_seconds = Gauge(
            f"{PREFIX}_compile_seconds",
            "What torch.compile added to this process's first step (training.compile).",
            registry=r,
        )
        self.checkpoint_step = Gauge(
            f"{PREFIX}_checkpoint_step", "Step of the newest committed checkpoint.", registry=r
        )
        self.checkpoint_save_seconds = Histogram(
            f"{PREFIX}_checkpoint_save_seconds",
            "Time to write and commit a checkpoint.",
            buckets=SAVE_BUCKETS,
            registry=r,
        )

    def observe_step(
        self,
        step: int,
        loss: float | None = None,
        images_per_second: float | None = None,
        subject_losses: dict[str, float] | None = None,
    ) -> None:
        """Record one optimizer step (loss, throughput and each subject's loss when known)."""
        self.step.set(step)
        if loss is not None:
            self.loss.set(loss)
        for subject, subject_loss in (subject_losses or {}).items():
            self.subject_loss.labels(subject=subject).set(subject_loss)
        if images_per_second is not None:
            self.images_per_second.set(images_per_second)

    @contextmanager
    def checkpoint_save(self, step: int) -> Iterator[None]:
        """Time a checkpoint save; the step is recorded only if the save succeeded."""
        with self.checkpoint_save_seconds.time():
            yield
        self.checkpoint_step.set(step)


class PriorMetrics:
    """The priors phase's counter.

    A priors pod runs one process per GPU. With ``PROMETHEUS_MULTIPROC_DIR`` set (the operator
    sets it on priors pods) every process writes its count to a file there and the pod's first
    process serves their sum (prometheus_client's multiprocess mode); without it, the first
    process serves its own count.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.images_generated = Counter(
            f"{PREFIX}_prior_images_generated",
            "Class images generated for prior preservation.",
            registry=self.registry,
        )

    def served_registry(self) -> CollectorRegistry:
        """What the pod's exporter serves: every process's counts in multiprocess mode."""
        directory = os.environ.get(MULTIPROCESS_DIR_ENV)
        if not directory:
            return self.registry
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        return registry


def prepare_multiprocess_dir() -> None:
    """Create ``PROMETHEUS_MULTIPROC_DIR`` if it is set: counters write there once created."""
    directory = os.environ.get(MULTIPROCESS_DIR_ENV)
    if directory:
        os.makedirs(directory, exist_ok=True)


def metrics_port_from_env() -> int | None:
    """The exporter port from ``DREAMBOOTH_METRICS_PORT``, or None when disabled."""
    value = os.environ.get(METRICS_PORT_ENV, str(TRAINER_METRICS_PORT)).strip().lower()
    return None if value in DISABLED else int(value)


def start_exporter(
    metrics: TrainerMetrics | CollectorRegistry,
    rank: int = 0,
    port: int | None = None,
    addr: str = "0.0.0.0",
) -> WSGIServer | None:
    """Serve ``/metrics`` on rank 0 (port from the argument, else the environment; 0 = any).

    Other ranks return None: one scrape target per job keeps the series unambiguous. Returns the
    server (``.shutdown()`` stops it), or None when disabled or not rank 0.
    """
    if rank != 0:
        return None
    port = metrics_port_from_env() if port is None else port
    if port is None:
        return None
    registry = metrics if isinstance(metrics, CollectorRegistry) else metrics.registry
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    log.info("trainer metrics on http://%s:%d/metrics", addr, server.server_port)
    return server


@contextmanager
def exporting(metrics: TrainerMetrics | CollectorRegistry, rank: int = 0) -> Iterator[None]:
    """`start_exporter` for the length of a block; a taken port (another trainer process on
    this host) costs the metrics, not the work."""
    try:
        server = start_exporter(metrics, rank)
    except OSError as exc:
        log.warning("metrics not served: %s", exc)
        server = None
    try:
        yield
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
