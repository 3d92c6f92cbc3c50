"""Every phase with S3 for everything: base model, subject photos, class images, outputs, and
the evaluation's encoders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from torch.utils.tensorboard import SummaryWriter

from dreambooth_contract.api import EvaluationStatus
from dreambooth_contract.layout import EVALUATION_DIR, EXPORT_DIR, TRAINED_DIR
from dreambooth_operator.cli import main
from dreambooth_trainer import priors
from dreambooth_trainer.callbacks import Callback
from dreambooth_trainer.digest import MANIFEST, verify
from dreambooth_trainer.evaluation import random_encoders
from dreambooth_trainer.export import run_export
from dreambooth_trainer.locations import publish_dir
from dreambooth_trainer.models import random_models
from dreambooth_trainer.parallel import World
from dreambooth_trainer.progress import ENV_FILE
from dreambooth_trainer.storage import open_store
from dreambooth_trainer.train import PublishAsYouGo, TrainingInterrupted, run_training

from .conftest import SUBJECT_DIR

pytestmark = pytest.mark.trainer


def test_phases_read_and_write_s3(s3_server, s3_bucket, make_config, monkeypatch, tmp_path: Path):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"s3://{s3_bucket}"
    endpoint = s3_server.endpoint_url
    model = random_models.materialize("random://tiny-sd", tmp_path / "models")
    open_store(f"{bucket}/models/tiny", endpoint).upload_dir(model)
    for name in ("tiny-clip", "tiny-dino"):
        encoder = random_encoders.materialize(f"random://{name}", tmp_path / "models")
        open_store(f"{bucket}/models/{name}", endpoint).upload_dir(encoder)
    open_store(f"{bucket}/subject", endpoint).upload_dir(SUBJECT_DIR)

    config = make_config(
        {
            "baseModel": {"uri": f"{bucket}/models/tiny"},
            "instance": {"imagesUri": f"{bucket}/subject"},
            "training": {"maxSteps": 2},
            "evaluation": {
                "prompts": ["a photo of sks cube"],
                "imagesPerPrompt": 2,
                "steps": 1,
                "clipUri": f"{bucket}/models/tiny-clip",
                "dinoUri": f"{bucket}/models/tiny-dino",
            },
        }
    )
    config = config.model_copy(
        update={
            "output_uri": f"{bucket}/jobs/run",
            "prior_cache_uri": f"{bucket}/priors",
            "s3": config.s3.model_copy(update={"endpoint": endpoint}),
            "cache_dir": str(tmp_path / "cache"),  # this "pod" starts with nothing
        }
    )
    priors.run_priors(config)
    assert open_store(config.priors_uri, endpoint).exists(priors.MANIFEST)

    run_training(config, World(), progress=False)
    assert open_store(config.output(TRAINED_DIR), endpoint).list("unet")

    result = run_export(config)
    export = open_store(config.output(EXPORT_DIR), endpoint)
    downloaded = tmp_path / "downloaded"
    export.download_dir("", downloaded)
    assert export.exists(MANIFEST)
    assert verify(downloaded) == result.digest

    # The evaluation pod's command, on a cache without the export: it fetches it from S3, and
    # reports status.evaluation (here to a file, as `dreambooth run` does; to the job in a pod).
    config = config.model_copy(update={"cache_dir": str(tmp_path / "evaluation-pod")})
    config_file = tmp_path / "trainer.json"
    config_file.write_text(config.to_json())
    monkeypatch.setenv(ENV_FILE, str(tmp_path / "status.json"))
    evaluated = CliRunner().invoke(main, ["evaluate", "--config", str(config_file)])
    assert evaluated.exit_code == 0, evaluated.output
    reported = json.loads((tmp_path / "status.json").read_text())["evaluation"]
    evaluation = EvaluationStatus.model_validate(reported)
    assert evaluation.summary in evaluated.output
    assert evaluation.report_uri == config.output(EVALUATION_DIR, "report.json")
    outputs = open_store(config.output_uri, endpoint)
    report = json.loads(outputs.read_bytes(f"{EVALUATION_DIR}/report.json"))
    assert report["artifactDigest"] == result.digest
    assert outputs.exists(f"{EVALUATION_DIR}/grid.png")
    # Its TensorBoard file went up beside the training's.
    assert len([o for o in outputs.list("logs") if "events.out.tfevents" in o.key]) == 2


class StopAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.step == self.step:
            trainer.request_stop("preempted")


def test_an_interrupted_run_has_published_its_samples_and_logs(
    s3_server, s3_bucket, make_config, monkeypatch, tmp_path: Path
):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    endpoint = s3_server.endpoint_url
    validation = {"prompts": ["a photo of sks cube"], "interval": 2, "numInferenceSteps": 2}
    config = make_config({"training": {"maxSteps": 6, "validation": validation}})
    priors.run_priors(config)
    config = config.model_copy(
        update={
            "output_uri": f"s3://{s3_bucket}/jobs/preempted",
            "s3": config.s3.model_copy(update={"endpoint": endpoint}),
        }
    )
    with pytest.raises(TrainingInterrupted):
        run_training(config, World(), progress=False, callbacks=[StopAt(2)])
    output = open_store(config.output_uri, endpoint)
    assert output.exists("samples/step-000002.png")
    assert [o for o in output.list("logs") if "events.out.tfevents" in o.key]
    assert not output.list("trained")  # it did not finish


def test_publishing_as_you_go_uploads_only_what_is_new(make_config, tmp_path: Path):
    local = tmp_path / "staging"
    (local / "samples").mkdir(parents=True)
    (local / "samples" / "step-000002.png").write_bytes(b"first")
    config = make_config(output=tmp_path / "published")
    writer = SummaryWriter(str(local / "logs"))
    publisher = PublishAsYouGo(local, config, writer)
    uploads: list[list[str]] = []
    publisher.store.upload_files = lambda files: uploads.append(sorted(k for _, k in files))
    publisher.publish()
    publisher.publish()  # nothing new
    (local / "samples" / "step-000004.png").write_bytes(b"second")
    publisher.publish()
    writer.close()
    assert uploads[0][-1] == "samples/step-000002.png" and uploads[0][0].startswith("logs/")
    assert uploads[1:] == [["samples/step-000004.png"]]


def test_publishing_over_an_earlier_export_leaves_exactly_the_new_files(
    s3_server, s3_bucket, make_config, monkeypatch, tmp_path: Path
):
    """A re-run export into a prefix with leftovers (an fp16 variant, a single file no longer
    made) must not leave them: the server would refuse the artifact."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    config = make_config()
    s3 = config.s3.model_copy(update={"endpoint": s3_server.endpoint_url})
    uri = f"s3://{s3_bucket}/runs/leftovers/export"
    store = open_store(uri, s3_server.endpoint_url)
    for key in ("pipeline/unet/model.fp16.safetensors", "model.safetensors", MANIFEST):
        store.write_bytes(key, b"old")
    local = tmp_path / "export"
    (local / "pipeline" / "unet").mkdir(parents=True)
    (local / "pipeline" / "unet" / "model.safetensors").write_bytes(b"new")
    (local / MANIFEST).write_bytes(b"new manifest")

    publish_dir(local, uri, s3, last=MANIFEST, replace=True)

    assert [o.key for o in store.list()] == [MANIFEST, "pipeline/unet/model.safetensors"]
    assert store.read_bytes(MANIFEST) == b"new manifest"
