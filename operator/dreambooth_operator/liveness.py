"""Liveness: the operator is alive while no reconcile pass has run for longer than a pass can.

Every API call of a pass has a timeout (kube.py), so a pass that runs on past `limit` is stuck
in something no timeout covers; the liveness probe then fails and the kubelet restarts the
operator, instead of `/healthz` reporting healthy while a job is never reconciled again.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class PassTracker:
    """The start times of the reconcile passes in progress."""

    limit: float  # seconds a pass may take
    clock: Callable[[], float] = time.monotonic
    _running: dict[int, tuple[str, float]] = field(default_factory=dict)
    _tokens: Iterator[int] = field(default_factory=itertools.count)

    @contextmanager
    def running(self, what: str) -> Iterator[None]:
        token = next(self._tokens)
        self._running[token] = (what, self.clock())
        try:
            yield
        finally:
            del self._running[token]

    def stuck(self) -> list[str]:
        """What has run longer than `limit`, each with how long, oldest first."""
        now = self.clock()
        ages = sorted(((now - started, what) for what, started in self._running.values()))
        return [f"{what} for {age:.0f}s" for age, what in reversed(ages) if age > self.limit]
