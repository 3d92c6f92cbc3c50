"""Weights & Biases in offline mode (no network): `dreambooth run` of a tiny job logs one run
per job, read back here from its offline run directories: the training scalars, the sample
grids, the evaluation's scores and grid; and never the API key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dreambooth_operator.cli import main
from tests.support.wandb_offline import read_runs

from .conftest import REPO

pytestmark = pytest.mark.trainer

EXAMPLE = REPO / "examples" / "local-tiny.yaml"
API_KEY = "canary-wandb-api-key-0123456789abcdef0123"  # a key's shape (40 characters)
SCORES = ("dino", "clipI", "clipT", "pres", "div")


def tiny_job(tmp_path: Path) -> Path:
    """The local example, logging to W&B, cut to a few steps."""
    document = yaml.safe_load(EXAMPLE.read_text())
    spec = document["spec"]
    spec["instance"]["imagesUri"] = str(REPO / "examples" / "local" / "subject")
    spec["priorPreservation"] |= {"numClassImages": 2, "generation": {"steps": 2}}
    validation = spec["training"]["validation"] | {"interval": 2, "numInferenceSteps": 2}
    spec["training"] |= {"maxSteps": 4, "validation": validation}
    spec["evaluation"] |= {"prompts": ["a photo of sks cube"], "steps": 2}
    spec["tracking"] = {"wandb": {"project": "dreambooth-tests", "runName": "tiny"}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_a_tiny_job_logs_scalars_samples_and_evaluation_to_wandb_offline(
    tmp_path: Path, shared_dir: Path, monkeypatch
):
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(shared_dir / "models"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)  # as the operator sets it from the Secret
    monkeypatch.setenv("WANDB_SILENT", "true")
    output = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["run", str(tiny_job(tmp_path)), "--output", str(output)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output

    train, evaluate = read_runs(output / "logs" / "wandb")  # one per process that logged
    for run in (train, evaluate):  # the same run: the evaluation pod resumes the training's
        assert (run.project, run.name) == ("dreambooth-tests", "tiny")
        assert run.run_id == train.run_id and run.run_id.startswith("local-tiny-")
    assert (train.job_type, evaluate.job_type) == ("train", "evaluate")
    # The same scalars TensorBoard gets, every step.
    steps = [row for row in train.history if "loss/total" in row]
    assert [row["_step"] for row in steps] == [1, 2, 3, 4]
    assert {"loss/instance", "loss/prior", "train/learning_rate"} <= set(steps[0])
    # The sample grids of steps 2 and 4, as images.
    samples = [row for row in train.history if "samples/path" in row]
    assert [row["_step"] for row in samples] == [2, 4]
    assert all(row["samples/_type"] == "image-file" for row in samples)
    assert len([p for p in train.images if p.name.startswith("samples_")]) == 2
    # The evaluation: both models' scores, in history and summary, and its grid.
    (scores,) = [row for row in evaluate.history if "evaluation/trained/dino" in row]
    for model in ("trained", "base"):
        for metric in SCORES:
            key = f"evaluation/{model}/{metric}"
            assert isinstance(scores[key], float) and evaluate.summary[key] == scores[key]
    assert scores["evaluation/grid/_type"] == "image-file"
    assert [p.parent.name for p in evaluate.images] == ["evaluation"]
    printed = yaml.safe_load(
        result.output[result.output.index("evaluation:") :].split("\nseconds:")[0]
    )
    assert scores["evaluation/trained/dino"] == printed["evaluation"]["trained"]["dino"]
    method = printed["evaluation"]["diversityMethod"]
    assert evaluate.summary["evaluation/diversityMethod"] == method
    # The key is nowhere in what the run wrote (W&B's own logs and files included).
    leaks = [p for p in output.rglob("*") if p.is_file() and API_KEY.encode() in p.read_bytes()]
    assert not leaks, leaks
