"""A priors pod as the operator runs it: `torchrun --standalone` of `dreambooth priors`, its
processes sharing the set with the other pods and counting images in one Prometheus series."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from dreambooth_trainer.metrics import PREFIX
from dreambooth_trainer.priors import PriorRequest, image_name

from . import harness
from .jobs import trainer_config

pytestmark = pytest.mark.distributed

SET = {
    "priorPreservation": {
        "enabled": True,
        "classPrompt": "a photo of cube",
        "numClassImages": 16,
        "generation": {"steps": 2, "batchSize": 2},
    }
}


def test_second_pod_generates_its_half_and_counts_it(tmp_path: Path):
    config = trainer_config("pod", str(tmp_path / "out"), tmp_path / "models", SET)
    config_file = tmp_path / "config.json"
    config_file.write_text(config.to_json())
    metrics_dir = tmp_path / "prometheus"
    env = {
        "NODE_RANK": "1",  # the second of two priors pods, with 2 processes: shards 2, 3 of 4
        "NNODES": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "DREAMBOOTH_METRICS_PORT": "off",  # the counts are read from the directory below
    }
    args = ["-m", "dreambooth_operator.cli", "priors", "--config", str(config_file)]
    harness.run(args, tmp_path / "torchrun.log", nproc=2, env=env, timeout=300)

    request = PriorRequest.from_config(config)
    mine = {i for shard in (2, 3) for batch in request.shard(shard, 4) for i in batch}
    written = {p.name for p in Path(config.priors_uri).glob("class-*.png")}
    assert len(mine) == 8 and written == {image_name(i) for i in mine}
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    text = generate_latest(registry).decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[f"{PREFIX}_prior_images_generated_total"] == len(mine)
    assert len(list(metrics_dir.glob("counter_*.db"))) == 2  # one file per process
