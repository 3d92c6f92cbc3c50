"""The training target follows the base model's prediction type; an unknown one is bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler

from dreambooth_contract import env
from dreambooth_contract.env import EXIT_BAD_INPUT
from dreambooth_contract.trainer_config import ConfigError
from dreambooth_operator.cli import main
from dreambooth_trainer import cli as trainer_cli
from dreambooth_trainer.local import load_config
from dreambooth_trainer.loss import DreamBoothObjective
from dreambooth_trainer.models import random_models

from .conftest import REPO

pytestmark = pytest.mark.trainer

EXAMPLE = REPO / "examples" / "local-tiny.yaml"


def test_the_target_is_noise_for_epsilon_and_velocity_for_v_prediction():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 500])
    epsilon = DreamBoothObjective(DDPMScheduler(prediction_type="epsilon"))
    assert torch.equal(epsilon.target(latents, noise, timesteps), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    expected = v.get_velocity(latents, noise, timesteps)
    assert torch.equal(DreamBoothObjective(v).target(latents, noise, timesteps), expected)


@pytest.mark.parametrize("prediction_type", ["sample", "v-prediction"])
def test_an_unknown_prediction_type_is_refused_when_the_objective_is_set_up(prediction_type):
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    with pytest.raises(ConfigError) as raised:
        DreamBoothObjective(scheduler)
    message = str(raised.value)
    assert f"Unknown prediction type '{prediction_type}'" in message
    assert "'epsilon', 'v_prediction'" in message
    assert raised.value.field == "baseModel.uri"
    assert isinstance(raised.value, ValueError)  # what diffusers' train_dreambooth.py raises


@pytest.mark.parametrize("phase", ["priors", "train"])
def test_phases_exit_2_on_a_base_model_with_an_unknown_prediction_type(
    phase, tmp_path: Path, monkeypatch
):
    """A bad base model is bad input (InvalidConfig, no restarts), not a failed run: refused
    as it loads, so priors (which runs first) refuse it too, before generating anything."""
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    # `train` ends with os._exit (cli.exit_without_teardown); in this process a plain exit.
    monkeypatch.setattr(trainer_cli, "exit_without_teardown", sys.exit)
    base = tmp_path / "base"
    shutil.copytree(random_models.materialize("random://tiny-sd", tmp_path / "models"), base)
    scheduler_config = base / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_config.read_text())
    scheduler["prediction_type"] = "sample"
    scheduler_config.write_text(json.dumps(scheduler))
    config = json.loads(load_config(EXAMPLE, tmp_path / "out").to_json())
    config["baseModel"]["uri"] = str(base)
    config["priorPreservation"]["enabled"] = phase == "priors"
    config["training"]["maxSteps"] = 1
    termination_log = tmp_path / "termination-log"
    monkeypatch.setenv(env.TERMINATION_LOG_ENV, str(termination_log))
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))

    result = CliRunner().invoke(main, [phase, "--config", str(config_file)])

    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "Unknown prediction type 'sample'" in result.output
    assert "'epsilon', 'v_prediction'" in result.output
    # The termination message is what tells the operator (under torchrun, exit code 1).
    message = termination_log.read_text()
    assert message.startswith(env.BAD_INPUT_PREFIX)
    assert "baseModel.uri" in message
    assert not (tmp_path / "out" / "trained").exists()
