"""`dreambooth run` end to end, and bad input exits 2 naming the field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dreambooth_contract.api import EvaluationStatus
from dreambooth_contract.env import EXIT_BAD_INPUT, TERMINATION_LOG_ENV
from dreambooth_operator.cli import main
from dreambooth_trainer import cli as trainer_cli
from dreambooth_trainer.digest import verify

from .conftest import REPO

pytestmark = pytest.mark.trainer

EXAMPLE = REPO / "examples" / "local-tiny.yaml"


@pytest.fixture(autouse=True)
def model_cache(shared_dir: Path, monkeypatch):
    """Configs from a job name no cache_dir: keep the tests' models out of ~/.cache."""
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(shared_dir / "models"))


@pytest.fixture(autouse=True)
def plain_exit(monkeypatch) -> list[int]:
    """priors, train and export end with os._exit (cli.exit_without_teardown: no interpreter
    teardown); in this process a plain exit. The codes they ended with, in order."""
    codes: list[int] = []

    def exit_(code: int):
        codes.append(code)
        sys.exit(code)

    monkeypatch.setattr(trainer_cli, "exit_without_teardown", exit_)
    return codes


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_local_run_of_the_example(tmp_path: Path, plain_exit: list[int]):
    """README's first command: priors -> train -> export -> evaluate -> samples, into --output."""
    output = tmp_path / "out"
    result = invoke("run", str(EXAMPLE), "--output", str(output))
    assert result.exit_code == 0, result.output
    digest = verify(output / "export")
    assert f"digest: {digest}" in result.output
    assert (output / "samples" / "final.png").is_file()
    # the evaluation: status.evaluation printed as the operator would set it, report and grid
    printed = yaml.safe_load(
        result.output[result.output.index("evaluation:") :].split("\nseconds:")[0]
    )
    evaluation = EvaluationStatus.model_validate(printed["evaluation"])
    assert evaluation.report_uri == str(output / "evaluation" / "report.json")
    report = json.loads(Path(evaluation.report_uri).read_text())
    assert EvaluationStatus.model_validate(report).trained == evaluation.trained
    assert evaluation.trained != evaluation.base  # training changed what the model draws
    assert evaluation.trained.pres is not None and evaluation.diversity_method == "dino"
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]["evaluation"]
    rows = len(report["prompts"]) + 1  # and the class prompt
    assert evaluation.images == rows * spec["imagesPerPrompt"]
    with Image.open(evaluation.grid_uri) as grid:  # base left, trained right
        assert grid.size == (2 * spec["imagesPerPrompt"] * 64, rows * 64)
    # The export's manifest names the report; the report names the artifact by its digest.
    manifest = json.loads((output / "export" / "manifest.json").read_text())
    assert manifest["evaluation"] == {
        "report": "../evaluation/report.json",
        "grid": "../evaluation/grid.png",
    }
    assert report["artifactDigest"] == digest
    # TensorBoard: every score of both models at the last step, and the grid.
    logs = EventAccumulator(str(output / "logs"))
    logs.Reload()
    tags = logs.Tags()
    trained_dino = logs.Scalars("evaluation/trained/dino")
    assert [(e.step, round(e.value, 4)) for e in trained_dino] == [
        (
            yaml.safe_load(EXAMPLE.read_text())["spec"]["training"]["maxSteps"],
            evaluation.trained.dino,
        )
    ]
    for model in ("trained", "base"):
        for metric in ("dino", "clipI", "clipT", "pres", "div"):
            assert f"evaluation/{model}/{metric}" in tags["scalars"]
    assert "evaluation/grid" in tags["images"]
    example = yaml.safe_load(EXAMPLE.read_text())["spec"]["training"]
    steps, interval = example["maxSteps"], example["validation"]["interval"]
    grids = sorted(p.name for p in (output / "samples").glob("step-*.png"))
    assert grids == [f"step-{s:06d}.png" for s in range(interval, steps + 1, interval)]
    assert list((output / "logs").glob("events.out.tfevents.*"))
    config = json.loads((output / "config.json").read_text())
    assert config["outputUri"] == str(output)
    assert config["priorCacheUri"] == str(tmp_path / "priors")
    # the per-phase commands the pods run work on the config the run wrote
    config_file = str(output / "config.json")
    assert invoke("priors", "--config", config_file).exit_code == 0  # complete: nothing to do
    exported = invoke("export", "--config", config_file)
    assert exported.exit_code == 0 and exported.output.strip() == digest  # deterministic
    assert plain_exit == [0, 0]  # priors and export skipped the interpreter's teardown
    class_images = yaml.safe_load(EXAMPLE.read_text())["spec"]["priorPreservation"]
    assert len(list((tmp_path / "priors").glob("*/class-*.png"))) == class_images["numClassImages"]


SDXL_EXAMPLES = {
    "full": ("local-tiny-sdxl.yaml", "pipeline/text_encoder_2/model.safetensors"),
    "lora": ("local-tiny-sdxl-lora.yaml", "pytorch_lora_weights.safetensors"),
}


@pytest.mark.parametrize("example, exported", SDXL_EXAMPLES.values(), ids=SDXL_EXAMPLES.keys())
def test_local_run_of_the_sdxl_examples(tmp_path: Path, example: str, exported: str):
    """The SDXL examples end to end, shortened (4 steps, no evaluation: the full examples take
    about 50 s each on one core); the SDXL training itself is tested in test_sdxl.py."""
    document = yaml.safe_load((REPO / "examples" / example).read_text())
    spec = document["spec"]
    spec["instance"]["imagesUri"] = str(REPO / "examples" / "local" / "subject")
    spec["priorPreservation"].update(numClassImages=2, generation={"steps": 2, "batchSize": 2})
    training = spec["training"]
    training.update(maxSteps=4, checkpointing={"interval": 2})
    training["validation"].update(interval=4, numInferenceSteps=2)
    spec["evaluation"] = {"enabled": False}
    output = tmp_path / "out"
    result = invoke("run", str(write(tmp_path / "job.json", document)), "--output", str(output))
    assert result.exit_code == 0, result.output
    verify(output / "export")
    assert (output / "export" / exported).is_file()
    assert (output / "samples" / "final.png").is_file()


def write(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document))
    return path


def test_invalid_job_exits_2_naming_the_field(tmp_path: Path):
    job = yaml.safe_load(EXAMPLE.read_text())
    job["spec"]["training"]["mixedPrecision"] = "fp16"  # no GPUs in this job
    result = invoke("run", str(write(tmp_path / "job.yaml", job)))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "spec.training.mixedPrecision" in result.output


def trainer_config(tmp_path: Path) -> dict:
    from dreambooth_trainer.local import load_config

    return json.loads(load_config(EXAMPLE, tmp_path / "out").to_json())


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda c: c["training"].update(resolution=100), "training.resolution"),
        (lambda c: c["training"].update(learningRat=1e-4), "training.learningRat"),
        (lambda c: c.pop("instance"), "instance"),
    ],
    ids=["bad-value", "unknown-field", "missing-section"],
)
def test_invalid_config_exits_2_naming_the_field(tmp_path: Path, change, field):
    config = trainer_config(tmp_path)
    change(config)
    for command in ("train", "priors", "export", "evaluate"):
        result = invoke(command, "--config", str(write(tmp_path / "config.json", config)))
        assert result.exit_code == EXIT_BAD_INPUT, (command, result.output)
        assert field in result.output


def test_missing_subject_images_exit_2_naming_the_field(tmp_path: Path):
    config = trainer_config(tmp_path)
    config["instance"]["imagesUri"] = str(tmp_path / "nothing-here")
    config["priorPreservation"]["enabled"] = False
    result = invoke("train", "--config", str(write(tmp_path / "config.json", config)))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "instance.imagesUri" in result.output


def test_a_failed_evaluation_leaves_its_reason_as_the_termination_message(
    tmp_path: Path, monkeypatch
):
    """The operator reads the evaluation pod's termination message into the Evaluated
    condition: here, an export that is not there."""
    message = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(message))
    config = write(tmp_path / "config.json", trainer_config(tmp_path))
    result = CliRunner().invoke(main, ["evaluate", "--config", str(config)])
    assert result.exit_code == 1 and isinstance(result.exception, FileNotFoundError)
    assert message.read_text().startswith("FileNotFoundError: ")
    assert "manifest.json" in message.read_text()


def test_bad_shard_exits_2(tmp_path: Path):
    config = write(tmp_path / "config.json", trainer_config(tmp_path))
    result = invoke("priors", "--config", str(config), "--shard", "2/2")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--shard" in result.output
