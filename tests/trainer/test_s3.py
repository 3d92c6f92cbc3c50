"""Every phase with S3 for everything: base model, subject photos, class images, outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth_trainer import priors, random_models
from dreambooth_trainer.digest import MANIFEST, verify
from dreambooth_trainer.export import EXPORT_DIR, run_export
from dreambooth_trainer.parallel import World
from dreambooth_trainer.storage import open_store
from dreambooth_trainer.train import TRAINED_DIR, run_training

from .conftest import SUBJECT_DIR

pytestmark = pytest.mark.trainer


def test_phases_read_and_write_s3(s3_server, s3_bucket, make_config, monkeypatch, tmp_path: Path):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"s3://{s3_bucket}"
    endpoint = s3_server.endpoint_url
    model = random_models.materialize("random://tiny-sd", tmp_path / "models")
    open_store(f"{bucket}/models/tiny", endpoint).upload_dir(model)
    open_store(f"{bucket}/subject", endpoint).upload_dir(SUBJECT_DIR)

    config = make_config(
        {
            "baseModel": {"uri": f"{bucket}/models/tiny"},
            "instance": {"imagesUri": f"{bucket}/subject"},
            "training": {"maxSteps": 2},
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
