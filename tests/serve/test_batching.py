"""The dynamic batcher with a fake runner: which jobs share a call, and what callers get back."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest

from dreambooth_trainer.serve.batching import BatcherClosed, DynamicBatcher, Job, QueueFull

TIMEOUT = 10


class GatedRunner:
    """Records each batch; holds the worker inside a call until `release()`."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, jobs: Sequence[Job[str]]) -> list[str]:
        self.batches.append([job.payload for job in jobs])
        self.entered.set()
        assert self.gate.wait(TIMEOUT)
        if any(job.payload == "boom" for job in jobs):
            raise RuntimeError("the pipeline failed")
        return [job.payload.upper() for job in jobs]

    def release(self) -> None:
        self.gate.set()


@pytest.fixture
def runner() -> GatedRunner:
    return GatedRunner()


@pytest.fixture
def make(runner) -> Iterator:
    made: list[DynamicBatcher] = []

    def build(**options) -> DynamicBatcher:
        options = {"max_batch_size": 4, "max_queue": 16, "batch_timeout_s": 0.0, **options}
        batcher = DynamicBatcher(runner, **options)
        made.append(batcher)
        return batcher

    yield build
    runner.release()
    for batcher in made:
        batcher.close(timeout=TIMEOUT)


def job(payload: str, key: str = "64x64", size: int = 1, group: str | None = None) -> Job[str]:
    return Job(key=key, size=size, payload=payload, group=group)


def occupy(batcher: DynamicBatcher, runner: GatedRunner) -> Job[str]:
    """Put the worker inside a call, so that the next submissions queue up behind it."""
    first = job("first", key="other")
    batcher.submit(first)
    assert runner.entered.wait(TIMEOUT)
    return first


def test_compatible_jobs_share_a_call_and_each_gets_its_own_result(make, runner):
    batcher = make()
    occupy(batcher, runner)
    jobs = [job(p) for p in ("a", "b", "c")]
    futures = [batcher.submit(j) for j in jobs]
    runner.release()
    assert [f.result(TIMEOUT) for f in futures] == ["A", "B", "C"]
    assert runner.batches == [["first"], ["a", "b", "c"]]
    assert batcher.stats.largest_batch == 3


def test_incompatible_jobs_wait_for_their_own_batch_in_fifo_order(make, runner):
    batcher = make()
    occupy(batcher, runner)
    order = [job("a"), job("x", key="32x32"), job("b"), job("y", key="32x32")]
    futures = [batcher.submit(j) for j in order]
    runner.release()
    for future in futures:
        future.result(TIMEOUT)
    assert runner.batches[1:] == [["a", "b"], ["x", "y"]]


def test_a_batch_holds_at_most_max_groups_groups_and_ungrouped_jobs_join_any(make, runner):
    """Adapters are groups: a batch runs as many as the cache holds loaded (max_groups);
    requests for the bare base (no group) fit into every batch."""
    batcher = make(max_batch_size=8, max_groups=2)
    occupy(batcher, runner)
    order = [("r1", "rex"), ("f1", "fido"), ("b1", "bella"), ("base", None), ("r2", "rex")]
    order += [("b2", "bella")]
    futures = [batcher.submit(job(payload, group=group)) for payload, group in order]
    runner.release()
    for future in futures:
        future.result(TIMEOUT)
    assert runner.batches[1:] == [["r1", "f1", "base", "r2"], ["b1", "b2"]]


def test_without_max_groups_any_number_of_groups_share_a_batch(make, runner):
    batcher = make(max_batch_size=8)
    occupy(batcher, runner)
    futures = [batcher.submit(job(p, group=p)) for p in "abcde"]
    runner.release()
    for future in futures:
        future.result(TIMEOUT)
    assert runner.batches[1:] == [list("abcde")]


def test_batches_hold_at_most_max_batch_size_images(make, runner):
    batcher = make(max_batch_size=4)
    occupy(batcher, runner)
    futures = [batcher.submit(job(p, size=2)) for p in "abc"]
    big = batcher.submit(job("big", size=6))  # larger than a batch: runs alone, not split
    runner.release()
    for future in [*futures, big]:
        future.result(TIMEOUT)
    assert runner.batches[1:] == [["a", "b"], ["c"], ["big"]]
    assert list(batcher.stats.recent_sizes) == [1, 4, 2, 6]


def test_max_batch_size_one_runs_one_request_at_a_time(make, runner):
    batcher = make(max_batch_size=1)
    occupy(batcher, runner)
    futures = [batcher.submit(job(p)) for p in "abc"]
    runner.release()
    for future in futures:
        future.result(TIMEOUT)
    assert runner.batches[1:] == [["a"], ["b"], ["c"]]


def test_timeout_lets_later_arrivals_join_the_batch(make, runner):
    runner.release()
    batcher = make(batch_timeout_s=5.0, max_batch_size=3)
    futures = [batcher.submit(job(p)) for p in "abc"]  # the third one fills the batch: no wait
    assert [f.result(TIMEOUT) for f in futures] == ["A", "B", "C"]
    assert runner.batches == [["a", "b", "c"]]


def test_a_batch_does_not_wait_for_arrivals_while_other_work_waits(make, runner):
    """With requests of other keys queued (another adapter, another size), holding the worker
    for compatible arrivals would leave it idle with work to do."""
    runner.release()
    batcher = make(batch_timeout_s=10 * TIMEOUT, max_batch_size=4)  # longer than we wait
    first = batcher.submit(job("a"))
    batcher.submit(job("x", key="32x32"))  # its own batch may wait: nothing queues behind it
    assert first.result(TIMEOUT) == "A"
    assert runner.batches[0] == ["a"]


def test_full_queue_refuses_instead_of_growing(make, runner):
    batcher = make(max_queue=2)
    occupy(batcher, runner)
    batcher.submit(job("a"))
    batcher.submit(job("b"))
    assert batcher.depth == 2
    with pytest.raises(QueueFull):
        batcher.submit(job("c"))


def test_a_failed_call_fails_every_job_of_the_batch_only(make, runner):
    batcher = make()
    occupy(batcher, runner)
    doomed = [batcher.submit(job(p)) for p in ("boom", "b")]
    fine = batcher.submit(job("c", key="32x32"))
    runner.release()
    for future in doomed:
        with pytest.raises(RuntimeError, match="the pipeline failed"):
            future.result(TIMEOUT)
    assert fine.result(TIMEOUT) == "C"


def test_cancelled_jobs_cost_no_compute(make, runner):
    batcher = make()
    occupy(batcher, runner)
    gone = batcher.submit(job("gone"))
    kept = batcher.submit(job("kept"))
    assert gone.cancel()  # the client went away while it waited
    runner.release()
    assert kept.result(TIMEOUT) == "KEPT"
    assert runner.batches[1:] == [["kept"]]


def test_a_cancelled_job_leaves_the_queue_at_once_and_frees_its_slot(make, runner):
    depths: list[int] = []

    class Observer:
        def on_queue_depth(self, depth: int) -> None:
            depths.append(depth)

        def on_batch(self, images: int) -> None:
            pass

    batcher = make(max_queue=2, observer=Observer())
    occupy(batcher, runner)
    gone = batcher.submit(job("gone"))
    kept = batcher.submit(job("kept"))
    assert batcher.depth == 2
    assert gone.cancel()  # e.g. its client disconnected, its deadline passed
    assert batcher.depth == 1 and depths[-1] == 1
    late = batcher.submit(job("late"))  # the slot is free again: no QueueFull
    runner.release()
    assert (kept.result(TIMEOUT), late.result(TIMEOUT)) == ("KEPT", "LATE")
    assert runner.batches[1:] == [["kept", "late"]]


def test_close_fails_waiting_jobs_and_refuses_new_ones(make, runner):
    batcher = make()
    first = occupy(batcher, runner)
    waiting = batcher.submit(job("a"))
    closer = threading.Thread(target=batcher.close)
    closer.start()
    with pytest.raises(BatcherClosed):
        waiting.result(TIMEOUT)
    runner.release()  # the running batch still completes
    closer.join(TIMEOUT)
    assert first.future.result(TIMEOUT) == "FIRST"
    with pytest.raises(BatcherClosed):
        batcher.submit(job("late"))
