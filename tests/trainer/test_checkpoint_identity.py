"""A checkpoint belongs to the spec that trained it: another spec in the same outputUri is bad
input naming storage.outputUri, never a resume of (or, past maxSteps, an export of) its weights."""

from __future__ import annotations

import pytest

from dreambooth_contract.trainer_config import ConfigError
from dreambooth_trainer import priors
from dreambooth_trainer.callbacks import Callback
from dreambooth_trainer.parallel import World
from dreambooth_trainer.train import run_training

pytestmark = pytest.mark.trainer

TRAINING = {"maxSteps": 2, "checkpointing": {"interval": 2}}


class CountSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, trainer, metrics) -> None:
        self.steps += 1


def steps_trained(config) -> int:
    counter = CountSteps()
    run_training(config, World(), progress=False, callbacks=[counter])
    return counter.steps


def test_the_same_spec_resumes_and_another_is_refused(make_config, tmp_path):
    first = make_config({"training": TRAINING}, output=tmp_path / "shared-output")
    priors.run_priors(first)
    assert steps_trained(first) == 2

    # The same spec again (run locally, where storage is trusted): resumes at step 2, nothing
    # left to train. Under the operator only a checkpoint its status records is resumed.
    assert steps_trained(first) == 0

    # Where and how often checkpoints are written is no part of the weights.
    moved = make_config({"training": {**TRAINING, "checkpointing": {"interval": 1, "keep": 5}}},
                        output=tmp_path / "shared-output")  # fmt: skip
    assert steps_trained(moved) == 0

    other_lr = make_config(
        {"training": {**TRAINING, "learningRate": 2e-4}}, output=tmp_path / "shared-output"
    )
    with pytest.raises(ConfigError) as refused:
        run_training(other_lr, World(), progress=False)
    assert refused.value.field == "storage.outputUri"
    assert "checkpoint-00000002" in str(refused.value)
    assert "another training than this run's" in str(refused.value)

    other_prompt = make_config(
        {"training": TRAINING, "instance": {"prompt": "a photo of zwx cube"}},
        output=tmp_path / "shared-output",
    )
    with pytest.raises(ConfigError, match="another instance than"):
        run_training(other_prompt, World(), progress=False)
