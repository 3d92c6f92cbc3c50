"""Dynamic batching: merge concurrent compatible requests into one pipeline call.

One worker thread owns the model (a pipeline is not thread-safe, and one GPU runs one batch at
a time anyway). Request handlers `submit` jobs from the event loop and await the returned
future, so the loop stays free to accept, validate and reject requests while a batch runs.

Batch formation, per round:
1. take the oldest waiting job (FIFO: nothing starves);
2. add every waiting job with the same key (size, steps, guidance, scheduler) that still fits
   into `max_batch_size` images and whose group (its adapter, on a multi-adapter server) is
   already in the batch or still fits into `max_groups`, keeping the others queued in order;
3. if the batch is not full and no other job waits, wait up to `batch_timeout` for more
   compatible arrivals.
Under load the queue fills while a batch runs, so step 2 alone forms full batches; the timeout
only matters for the first requests of a burst. While jobs of other keys wait (other sizes, or
adapters beyond `max_groups`), the batch runs at once: waiting would idle the worker with work
queued.

Groups: one pipeline call can run several LoRA adapters, one per row (engine.py), but only as
many as the adapter cache holds loaded at once; `max_groups` is that bound (None: no bound).

Cancelling a job's future (its client went away, its deadline passed) takes it out of the queue
at once: it frees its queue slot and never reaches the model. A job already in a pipeline call
cannot be stopped; its result is dropped.

A single job larger than `max_batch_size` (n > max batch) runs alone rather than being split:
its images stay one call, so `max_batch_size=1` means "one request at a time".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P")


class QueueFull(Exception):
    """The queue holds `max_queue` waiting jobs; the caller should answer 429."""


class BatcherClosed(RuntimeError):
    """The server is shutting down."""


@dataclass(eq=False)
class Job(Generic[P]):
    """One request: `size` images of `key`'s kind, described by `payload`; `group` (the adapter
    it runs with) counts against the batcher's `max_groups`, None against nothing."""

    key: Hashable
    size: int
    payload: P
    group: Hashable = None
    future: Future = field(default_factory=Future)


class BatchObserver(Protocol):
    def on_queue_depth(self, depth: int) -> None: ...

    def on_batch(self, images: int) -> None: ...


class _NoObserver:
    def on_queue_depth(self, depth: int) -> None:
        pass

    def on_batch(self, images: int) -> None:
        pass


# Runs one batch (all jobs share a key; at most max_groups groups) and returns one result per
# job, in order.
BatchRunner = Callable[[Sequence[Job[Any]]], Sequence[Any]]


@dataclass
class BatchStats:
    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    # Bounded: a long-running server must not keep every batch size it ever ran.
    recent_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1024))


class DynamicBatcher:
    def __init__(
        self,
        run_batch: BatchRunner,
        *,
        max_batch_size: int,
        max_queue: int,
        batch_timeout_s: float,
        max_groups: int | None = None,
        observer: BatchObserver | None = None,
        name: str = "inference-worker",
    ):
        if max_groups is not None and max_groups < 1:
            raise ValueError("max_groups must be at least 1")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_groups = max_groups
        self.max_queue = max_queue
        self.batch_timeout_s = batch_timeout_s
        self._observer = observer or _NoObserver()
        self._queue: deque[Job[Any]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.stats = BatchStats()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # -- producer side (event loop) ------------------------------------------------------------
    def submit(self, job: Job[Any]) -> Future:
        """Queue `job` and return its future; QueueFull when `max_queue` jobs already wait."""
        with self._cond:
            if self._closed:
                raise BatcherClosed("the inference worker is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting")
            self._queue.append(job)
            self._observer.on_queue_depth(len(self._queue))
            self._cond.notify()
        job.future.add_done_callback(lambda future: self._discard(job, future))
        return job.future

    def _discard(self, job: Job[Any], future: Future) -> None:
        """A cancelled job leaves the queue (runs in the thread that cancelled it)."""
        if not future.cancelled():
            return
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:  # already taken into a batch: the worker drops it
                return
            self._observer.on_queue_depth(len(self._queue))

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs, fail the waiting ones, let the running batch finish."""
        with self._cond:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            self._observer.on_queue_depth(0)
            self._cond.notify_all()
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(BatcherClosed("the server is shutting down"))
        self._thread.join(timeout)

    # -- worker side ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._execute(batch)

    def _next_batch(self) -> list[Job[Any]] | None:
        """Block for the next batch (None once closed); cancelled jobs are dropped."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            head = self._queue.popleft()
            batch, images = [head], head.size
            deadline = time.monotonic() + self.batch_timeout_s
            while True:
                images = self._take_compatible(batch, images)
                remaining = deadline - time.monotonic()
                full = images >= self.max_batch_size
                # What _take_compatible left in the queue belongs to other batches.
                if full or remaining <= 0 or self._closed or self._queue:
                    break
                self._cond.wait(remaining)
            self._observer.on_queue_depth(len(self._queue))
        # A client that went away cancels its future; it must not cost a batch slot's compute.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _take_compatible(self, batch: list[Job[Any]], images: int) -> int:
        """Move waiting jobs with the batch's key that fit into it; return the image count."""
        key = batch[0].key
        groups = {job.group for job in batch} - {None}
        kept: deque[Job[Any]] = deque()
        while self._queue:
            job = self._queue.popleft()
            if (
                job.key == key
                and images + job.size <= self.max_batch_size
                and self._group_fits(job.group, groups)
            ):
                batch.append(job)
                images += job.size
                groups |= {job.group} - {None}
            else:
                kept.append(job)
        self._queue = kept
        return images

    def _group_fits(self, group: Hashable, groups: set[Hashable]) -> bool:
        if group is None or group in groups or self.max_groups is None:
            return True
        return len(groups) < self.max_groups

    def _execute(self, batch: list[Job[Any]]) -> None:
        images = sum(job.size for job in batch)
        self._record(images)
        self._observer.on_batch(images)
        try:
            results = self._run_batch(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"batch runner returned {len(results)} results for {len(batch)}")
        except Exception as exc:  # every waiter must hear about it, not hang
            log.exception("batch of %d images failed", images)
            for job in batch:
                job.future.set_exception(exc)
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)

    def _record(self, images: int) -> None:
        self.stats.batches += 1
        self.stats.images += images
        self.stats.largest_batch = max(self.stats.largest_batch, images)
        self.stats.recent_sizes.append(images)
