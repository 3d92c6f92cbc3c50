"""Sharded backends on a toy model under `torchrun --nproc-per-node 2` (gloo on the CPU).

Each backend trains the same steps as a single process fed the whole global batch and must
match it: tightly in fp32, loosely in bf16 and fp16. Its state, handed to a fresh backend halfway through
(as files each rank would download, and as a state dict), must continue bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from dreambooth_trainer.parallel.base import World

from . import harness, toy

pytestmark = pytest.mark.distributed

PRECISIONS = ("no", "bf16", "fp16")
# torch autocasts to fp16 and scales losses on the CPU too; DeepSpeed's fp16 needs CUDA.
BACKEND_PRECISIONS = {
    "ddp": PRECISIONS,
    "zero2": ("no", "bf16"),
    "zero3": ("no", "bf16"),
    "fsdp": PRECISIONS,
}
RUNS = [(b, p) for b, precisions in BACKEND_PRECISIONS.items() for p in precisions]
STEPS = 4
ACCUMULATION = 2
WORLD_SIZE = 2
# (rtol, atol) against the single-process run in the same precision. bf16 rounds every
# activation (~3 digits), fp16 a little less; four AdamW steps of lr 1e-2 move weights by up
# to 4e-2.
TOLERANCE = {"no": (1e-5, 1e-5), "bf16": (2e-2, 1e-2), "fp16": (2e-2, 1e-2)}
HANDOFFS = ("via_files", "via_state_dict")


@pytest.fixture(scope="module")
def reference() -> dict[str, dict[str, Any]]:
    """One process, whole global batch, SingleProcessBackend (no sharding)."""
    runs = {}
    for precision in PRECISIONS:
        run = toy.straight("single", World(), precision, STEPS, ACCUMULATION, WORLD_SIZE)
        run.pop("backend")
        runs[precision] = run
    return runs


@pytest.fixture(scope="module")
def distributed(tmp_path_factory, deepspeed_ops) -> Callable[[str], dict[str, Any]]:
    """The toy worker's results for a backend (one torchrun per backend, on first use; a
    failed run fails the backend's other tests without running again)."""

    @functools.cache
    def outcome(backend: str) -> dict[str, Any] | Exception:
        out = tmp_path_factory.mktemp(backend)
        args = ["-m", "tests.distributed.toy", "--backend", backend, "--out", out]
        args += ["--precisions", ",".join(BACKEND_PRECISIONS[backend])]
        args += ["--steps", STEPS, "--accumulation", ACCUMULATION]
        try:
            harness.run(args, out / "torchrun.log", nproc=WORLD_SIZE, timeout=120)
        except Exception as error:  # noqa: BLE001 - handed to every test of this backend
            return error
        return torch.load(out / "result.pt", weights_only=False)

    def results(backend: str) -> dict[str, Any]:
        found = outcome(backend)
        if isinstance(found, Exception):
            raise found
        return found

    return results


@pytest.mark.parametrize("backend, precision", RUNS)
def test_matches_single_process(distributed, reference, backend, precision):
    results = distributed(backend)
    rtol, atol = TOLERANCE[precision]
    ours, ref = results[precision]["straight"], reference[precision]
    torch.testing.assert_close(ours["losses"], ref["losses"], rtol=rtol, atol=atol)
    assert ours["weights"].keys() == ref["weights"].keys()
    for name, expected in ref["weights"].items():
        actual = ours["weights"][name]
        assert actual.dtype == torch.float32, f"{backend}: {name} is not full precision"
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=f"{backend} {name}")
    moved = any(not torch.equal(ours["weights"][n], w) for n, w in toy.Toy().state_dict().items())
    assert moved, "training did not change the weights"


@pytest.mark.parametrize("handoff", HANDOFFS)
@pytest.mark.parametrize("backend, precision", RUNS)
def test_state_round_trips_bitwise(distributed, backend, precision, handoff):
    results = distributed(backend)
    straight, resumed = results[precision]["straight"], results[precision][handoff]
    assert resumed["losses"] == straight["losses"]
    for name, expected in straight["weights"].items():
        assert torch.equal(resumed["weights"][name], expected), f"{backend} {handoff}: {name}"
