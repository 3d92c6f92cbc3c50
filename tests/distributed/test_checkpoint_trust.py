"""Under torchrun with DeepSpeed, whose checkpoint files are pickles: a checkpoint replaced
consistently in storage (files and manifest) is refused on every rank before DeepSpeed loads
anything, while the genuine one resumes (see trust_worker.py for the steps)."""

from __future__ import annotations

import json

import pytest

from . import harness

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory, deepspeed_ops) -> list[dict]:
    out = tmp_path_factory.mktemp("trust")
    args = ["-m", "tests.distributed.trust_worker", "--out", out]
    harness.run(args, out / "torchrun.log", nproc=WORLD_SIZE, timeout=180)
    return [json.loads((out / f"result-rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def test_the_recorded_checkpoint_resumes_under_deepspeed(results):
    for rank in results:
        assert rank["genuine"] == {"step": 2, "loads": 1}


def test_a_consistently_replaced_checkpoint_is_refused_on_every_rank_before_deepspeed_loads(
    results,
):
    for rank in results:
        assert rank["refused"] is not None, "resumed from the planted checkpoint"
        assert rank["refused"]["field"] == "storage.outputUri"
        assert "checkpoint-00000002 is the checkpoint recorded in" in rank["refused"]["message"]
        assert rank["after_refusal"] == {"loads": 0, "marker": False, "step": 0}


def test_the_planted_checkpoint_does_run_code_when_storage_is_trusted(results):
    """The control: what the refusal prevents is real."""
    for rank in results:
        assert rank["unanchored"] == {"loads": 1, "marker": True}, rank.get("unanchored_error")
