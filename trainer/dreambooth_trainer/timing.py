"""Where a training step's time goes: data, forward, backward, optimizer."""

from __future__ import annotations

import time

import torch

PHASES = ("data", "forward", "backward", "optimizer")


class PhaseClock:
    """Charges the wall time since the previous lap to a phase.

    CUDA kernels run asynchronously, so each lap first waits for the device: the time of the
    work a phase queued lands on that phase. Waiting stalls the pipeline a little, so the
    clock is off unless asked for (the benchmark turns it on); off, `lap` does nothing.
    """

    def __init__(self, device: torch.device, enabled: bool):
        self.device = device
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now
