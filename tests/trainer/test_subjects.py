"""Several subjects in one job: each trained with its own prompt and class, every step."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dreambooth_contract.subjects import classes_of
from dreambooth_contract.trainer_config import ConfigError, TrainerConfig
from dreambooth_operator.cli import main
from dreambooth_trainer import cli as trainer_cli
from dreambooth_trainer import data, priors
from dreambooth_trainer.metrics import TrainerMetrics
from dreambooth_trainer.parallel.base import World
from dreambooth_trainer.priors import MANIFEST
from dreambooth_trainer.train import build_trainer

from .conftest import BASE_SPEC, CLASS_PROMPT, INSTANCE_PROMPT, REPO, SUBJECT_DIR, make_job

pytestmark = pytest.mark.trainer

# The second subject of examples/local-tiny-subjects.yaml: a blue ball on three backgrounds.
BALLS = REPO / "examples" / "local" / "ball"
BALL_PROMPT, BALL_CLASS = "a photo of zwx ball", "a photo of ball"
# Both classes' sets: few, small and quick to draw (the key includes all of it).
PRIORS = {
    "numClassImages": 2,
    "generation": {"steps": 2, "guidanceScale": 5.0, "batchSize": 2, "seed": 11},
}


def subjects_spec(balls: Path, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """BASE_SPEC with two subjects of two classes instead of its instance."""
    spec = copy.deepcopy(BASE_SPEC)
    del spec["instance"]
    spec["priorPreservation"] = copy.deepcopy(PRIORS)
    spec["subjects"] = [
        {
            "name": "cube",
            "imagesUri": str(SUBJECT_DIR),
            "prompt": INSTANCE_PROMPT,
            "classPrompt": CLASS_PROMPT,
        },
        {"name": "ball", "imagesUri": str(balls), "prompt": BALL_PROMPT, "classPrompt": BALL_CLASS},
    ]
    spec["training"].update({"batchSize": 2, **(training or {})})
    return spec


def config_of(spec: dict[str, Any], shared_dir: Path, output: Path) -> TrainerConfig:
    spec = {**spec, "storage": {"outputUri": str(output), "priorCacheUri": str(shared_dir / "p")}}
    config = TrainerConfig.from_job(make_job(spec))
    return config.model_copy(update={"cache_dir": str(shared_dir / "models")})


def test_each_micro_batch_holds_every_subject_with_its_own_class(shared_dir: Path, tmp_path: Path):
    config = config_of(subjects_spec(BALLS), shared_dir, tmp_path / "o")
    trainer = build_trainer(config, SUBJECT_DIR, priors.run_priors(config), World())
    dataset, frozen = trainer.data, trainer.frozen
    assert [len(s.latents) for s in dataset.subjects] == [4, 3]  # 4 cube photos, 3 balls
    assert [len(s.latents) for s in dataset.class_sets] == [2, 2]

    batch = dataset.batch(5, 2, 0, 1, torch.Generator().manual_seed(0))
    assert batch.subject_of_row == [0, 1] and batch.subjects == 2

    def encoded(prompt: str) -> torch.Tensor:
        return data.encode_prompt(frozen.text_encoder, data.tokenize(frozen.tokenizer, [prompt]))

    # instance rows: cube, ball; class rows: each subject's class, in the same order
    rows = [encoded(p) for p in (INSTANCE_PROMPT, BALL_PROMPT, CLASS_PROMPT, BALL_CLASS)]
    torch.testing.assert_close(batch.condition, torch.cat(rows))


def test_two_subjects_of_two_classes_run_end_to_end(shared_dir: Path, tmp_path: Path, monkeypatch):
    """`dreambooth run` of a two-subject job: both class sets generated, each subject's
    instance loss falls, a sample per subject; a second job of one class reuses its set."""
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(shared_dir / "models"))
    monkeypatch.setattr(trainer_cli, "exit_without_teardown", sys.exit)
    steps = 30
    spec = subjects_spec(
        BALLS,
        {"maxSteps": steps, "learningRate": 2e-3, "checkpointing": {"interval": steps}},
    )
    spec["evaluation"] = {"enabled": False}
    spec["storage"] = {"outputUri": str(tmp_path / "out")}
    job = {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob"}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({**job, "metadata": {"name": "two"}, "spec": spec}))

    result = CliRunner().invoke(main, ["run", str(job_file)], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    # Each class has its own committed set under its own key.
    sets = sorted(p.parent.name for p in (tmp_path / "priors").glob(f"*/{MANIFEST}"))
    config = config_of(spec, shared_dir, tmp_path / "out")
    assert sets == sorted(c.key for c in classes_of(config)) and len(sets) == 2
    # Each subject's instance loss, as TensorBoard has it, falls.
    logs = EventAccumulator(str(tmp_path / "out" / "logs"))
    logs.Reload()
    for name in ("cube", "ball"):
        losses = [event.value for event in logs.Scalars(f"loss/instance/{name}")]
        assert len(losses) == steps
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.5 * first, (name, first, last)
    # One sample per subject (validation.prompts is empty): during training, and at the end.
    for grid_file in (f"step-{steps:06d}.png", "final.png"):
        with Image.open(tmp_path / "out" / "samples" / grid_file) as grid:
            assert grid.size == (2 * 64, 64)

    # A job with one of the classes (the same generation settings) generates nothing.
    monkeypatch.setattr(priors, "load_pipeline", lambda *a, **k: pytest.fail("generated"))
    one = copy.deepcopy(BASE_SPEC)
    one["instance"] = {"imagesUri": str(BALLS), "prompt": "a photo of qrx ball"}
    one["priorPreservation"] = {**copy.deepcopy(PRIORS), "classPrompt": BALL_CLASS}
    second = TrainerConfig.from_job(
        make_job({**one, "storage": {"outputUri": str(tmp_path / "second" / "out")}})
    )
    second = second.model_copy(update={"prior_cache_uri": str(tmp_path / "priors")})
    reused = priors.run_priors(second)
    assert reused is not None and reused.name == classes_of(config)[1].key
    assert second.priors_key == classes_of(config)[1].key


def test_each_subjects_loss_is_a_prometheus_gauge_labelled_by_subject():
    metrics = TrainerMetrics()
    metrics.observe_step(3, 0.5, 10.0, {"cube": 0.25, "ball": 0.75})
    value = metrics.registry.get_sample_value
    name = "dreambooth_trainer_subject_instance_loss"
    assert value(name, {"subject": "cube"}) == 0.25
    assert value(name, {"subject": "ball"}) == 0.75


def test_priors_shards_deal_every_class_batches_round_robin(
    shared_dir: Path, tmp_path: Path, monkeypatch
):
    """One batch per class, two shards: each shard draws one class's set, and between them
    both sets are complete. Each shard loads the model once, for the class it draws."""
    spec = subjects_spec(BALLS)
    spec["priorPreservation"]["generation"]["seed"] = 12  # sets of their own
    config = config_of(spec, shared_dir, tmp_path / "o")
    cube, ball = (Path(c.uri) for c in classes_of(config))
    loads: list[str] = []
    load_pipeline = priors.load_pipeline
    monkeypatch.setattr(
        priors, "load_pipeline", lambda *a, **k: loads.append(a[0].uri) or load_pipeline(*a, **k)
    )
    written: list[int] = []
    priors.run_priors(config, shard=1, shards=2, on_written=written.append)
    assert written == [2] and not list(cube.glob("class-*")) and (ball / MANIFEST).is_file()
    priors.run_priors(config, shard=0, shards=2, on_written=written.append)
    assert written == [2, 2] and (cube / MANIFEST).is_file()
    assert len(loads) == 2


def test_a_bad_photo_of_a_later_subject_names_that_subject(shared_dir: Path, tmp_path: Path):
    """What `dreambooth validate` says of local photos, loading says of any (s3:// too)."""
    balls = Path(shutil.copytree(BALLS, tmp_path / "balls"))
    (balls / "bad.png").write_bytes(b"not a picture\n" * 8)
    spec = subjects_spec(balls)
    spec["priorPreservation"] = {"enabled": False}
    config = config_of(spec, shared_dir, tmp_path / "o")
    with pytest.raises(ConfigError) as raised:
        data.build_data(config, None, None, None, [SUBJECT_DIR, balls], [])
    assert raised.value.field == "subjects[1].imagesUri" and "bad.png" in raised.value.message


def test_a_subjects_name_labels_it_but_is_not_part_of_what_the_weights_depend_on(
    shared_dir: Path, tmp_path: Path
):
    spec = subjects_spec(BALLS)
    identity = config_of(spec, shared_dir, tmp_path / "o").weights_identity()
    renamed = copy.deepcopy(spec)
    renamed["subjects"][1]["name"] = "bouncy"
    assert config_of(renamed, shared_dir, tmp_path / "o").weights_identity() == identity
    reworded = copy.deepcopy(spec)
    reworded["subjects"][1]["prompt"] = "a picture of zwx ball"
    assert config_of(reworded, shared_dir, tmp_path / "o").weights_identity() != identity
