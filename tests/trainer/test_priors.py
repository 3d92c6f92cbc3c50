"""Class priors: deterministic per image index, shardable, resumable, committed by a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_contract.trainer_config import ConfigError
from dreambooth_trainer import priors
from dreambooth_trainer.parallel.base import World
from dreambooth_trainer.priors import PriorRequest, generate_shard, image_name
from dreambooth_trainer.storage import LocalStore
from dreambooth_trainer.train import build_trainer

from .conftest import SUBJECT_DIR

pytestmark = pytest.mark.trainer


@pytest.fixture
def request_of_eight(make_config) -> PriorRequest:
    config = make_config(
        {"priorPreservation": {"numClassImages": 8, "generation": {"batchSize": 4, "steps": 4}}}
    )
    return PriorRequest.from_config(config)


def pixels(directory: Path, count: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(directory / image_name(i))) for i in range(count)]


def test_two_halves_equal_one_pass(tiny_pipeline, request_of_eight, tmp_path: Path):
    one_pass, halves = tmp_path / "one", tmp_path / "halves"
    generate_shard(tiny_pipeline, request_of_eight, one_pass)
    # Each half runs in a fresh "process": the pipeline carries no state between them.
    generate_shard(tiny_pipeline, request_of_eight, halves, shard=1, shards=2)
    assert sorted(p.name for p in halves.iterdir()) == [image_name(i) for i in range(4, 8)]
    generate_shard(tiny_pipeline, request_of_eight, halves, shard=0, shards=2)
    for whole, half in zip(pixels(one_pass, 8), pixels(halves, 8), strict=True):
        assert np.array_equal(whole, half)
    # and the images are not all the same picture
    assert not np.array_equal(pixels(one_pass, 2)[0], pixels(one_pass, 2)[1])


def test_generation_resumes_where_it_stopped(tiny_pipeline, request_of_eight, tmp_path: Path):
    generate_shard(tiny_pipeline, request_of_eight, tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    lost = [image_name(1), image_name(6)]  # one image of each batch
    for name in lost:
        (tmp_path / name).unlink()
    written = generate_shard(tiny_pipeline, request_of_eight, tmp_path)
    assert sorted(p.name for p in written) == lost
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    for name, (content, mtime) in before.items():
        assert after[name][0] == content  # regenerated bit for bit
        if name not in lost:
            assert after[name][1] == mtime  # untouched


def test_complete_set_has_a_manifest_and_is_reused(make_config, monkeypatch):
    config = make_config({"priorPreservation": {"numClassImages": 3, "generation": {"seed": 11}}})
    directory = priors.run_priors(config, shard=1, shards=2)
    store = LocalStore(directory)
    assert not store.exists(priors.MANIFEST)  # shard 1 of 2 alone is not the set
    priors.run_priors(config, shard=0, shards=2)
    manifest = json.loads(store.read_bytes(priors.MANIFEST))
    assert manifest["key"] == config.priors_key
    assert [entry["path"] for entry in manifest["images"]] == [image_name(i) for i in range(3)]
    assert directory.name == config.priors_key
    # a second job with the same class settings reuses them without loading a model
    monkeypatch.setattr(priors, "load_pipeline", lambda *a, **k: pytest.fail("regenerated"))
    assert priors.run_priors(config) == directory


def test_no_priors_without_prior_preservation(make_config):
    config = make_config({"priorPreservation": {"enabled": False}})
    assert priors.run_priors(config) is None


def test_priors_pods_split_the_set_between_them():
    """2 pods x 3 torchrun processes: six distinct shards of six, whatever the pod."""
    shards = {
        priors.shard_from_env(
            {"RANK": str(local), "WORLD_SIZE": "3", "NODE_RANK": str(node), "NNODES": "2"}
        )
        for node in range(2)
        for local in range(3)
    }
    assert shards == {(index, 6) for index in range(6)}
    assert priors.shard_from_env({}) == (0, 1)  # `dreambooth priors` run by hand


def test_each_process_of_a_priors_pod_generates_on_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU here: only the choice
    assert priors.generation_device({"LOCAL_RANK": "3"}) == (torch.device("cuda", 3), torch.float16)
    assert priors.generation_device({})[0] == torch.device("cuda", 0)


def own_class_images(directory: Path, count: int) -> Path:
    """`count` real-looking class photos of the user's (flat colours, 80x64: cropped to 64)."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (80, 64), (index * 40, 90, 200 - index * 20)).save(
            directory / f"own-{index}.jpg"
        )
    return directory


@pytest.mark.parametrize(("supplied", "generated"), [(5, 3), (8, 0), (10, 0)])
def test_own_class_images_leave_only_the_shortfall_to_generate(
    make_config, tmp_path, monkeypatch, supplied, generated
):
    """numClassImages 8: with 5 supplied exactly 3 are generated; with 8 (or more) none, and
    no model is loaded. The class set the trainer reads is the user's, then the generated."""
    own = own_class_images(tmp_path / "own", supplied)
    config = make_config(
        {
            "priorPreservation": {
                "numClassImages": 8,
                "classImagesUri": str(own),
                "generation": {"seed": 23},  # a set of its own: not shared with other tests
            }
        }
    )
    written: list[int] = []
    if not generated:
        monkeypatch.setattr(priors, "load_pipeline", lambda *a, **k: pytest.fail("generated"))
    class_dir = priors.run_priors(config, on_written=written.append)
    assert sum(written) == generated
    if generated:
        assert sorted(p.name for p in class_dir.glob("class-*.png")) == [
            image_name(i) for i in range(generated)
        ]
        assert not (class_dir / priors.MANIFEST).exists()  # a partial set is not committed
    else:
        assert class_dir is None
    trainer = build_trainer(config, SUBJECT_DIR, class_dir, World())
    assert len(trainer.data.classes.latents) == 8


def test_class_images_uri_without_images_names_the_field(make_config, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a photo")
    config = make_config({"priorPreservation": {"classImagesUri": str(tmp_path / "empty")}})
    with pytest.raises(ConfigError) as refused:
        priors.run_priors(config)
    assert refused.value.field == "priorPreservation.classImagesUri"
    assert "no images" in str(refused.value)
