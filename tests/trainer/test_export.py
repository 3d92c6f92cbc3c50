"""The artifact: loads with from_pretrained and from_single_file, and its digest holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from dreambooth_contract.layout import PIPELINE_DIR, TRAINED_DIR
from dreambooth_trainer import priors
from dreambooth_trainer.digest import MANIFEST, DigestMismatch, verify
from dreambooth_trainer.export import (
    SINGLE_FILE,
    SINGLE_FILE_FP16,
    export_pipeline,
    run_export,
)
from dreambooth_trainer.methods.full import with_trained_weights
from dreambooth_trainer.models.loading import load_pipeline
from dreambooth_trainer.parallel import World
from dreambooth_trainer.train import build_trainer

from .conftest import SUBJECT_DIR

pytestmark = pytest.mark.trainer


@pytest.fixture
def trained(make_config):
    """A briefly trained tiny model, text encoder included (so export must carry it)."""
    config = make_config({"training": {"maxSteps": 2, "trainTextEncoder": True}})
    trainer = build_trainer(config, SUBJECT_DIR, priors.run_priors(config), World())
    trainer.fit()
    return config, trainer


@pytest.fixture
def artifact(trained, tmp_path: Path) -> tuple[Path, StableDiffusionPipeline]:
    _, trainer = trained
    pipeline = trainer.pipeline()
    export_pipeline(pipeline, tmp_path / "export", fp16_variant=False)
    return tmp_path / "export", pipeline


def generate(pipeline: StableDiffusionPipeline):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline("a photo of sks cube", num_inference_steps=2, height=64, width=64).images[0]


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert expected_state.keys() == actual_state.keys()
    for key, tensor in expected_state.items():
        assert torch.equal(tensor, actual_state[key].to(tensor.dtype)), key


def test_pipeline_loads_with_from_pretrained_and_generates(artifact):
    directory, trained_pipeline = artifact
    loaded = StableDiffusionPipeline.from_pretrained(directory / PIPELINE_DIR)
    for name in ("unet", "text_encoder", "vae"):
        assert_same_weights(getattr(trained_pipeline, name), getattr(loaded, name))
    assert generate(loaded).size == (64, 64)


def test_single_file_loads_with_from_single_file_and_generates(artifact):
    directory, trained_pipeline = artifact
    loaded = StableDiffusionPipeline.from_single_file(
        directory / SINGLE_FILE,
        config=str(directory / PIPELINE_DIR),  # offline: component configs from the export
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    for name in ("unet", "text_encoder", "vae"):
        assert_same_weights(getattr(trained_pipeline, name), getattr(loaded, name))
    assert generate(loaded).size == (64, 64)


@pytest.mark.filterwarnings("ignore:.*torch_dtype.*:FutureWarning")
def test_fp16_variant(trained, tmp_path: Path):
    _, trainer = trained
    export_pipeline(trainer.pipeline(), tmp_path, fp16_variant=True)
    half = StableDiffusionPipeline.from_pretrained(
        tmp_path / PIPELINE_DIR, variant="fp16", torch_dtype=torch.float16
    )
    assert half.unet.dtype == torch.float16
    single = StableDiffusionPipeline.from_single_file(
        tmp_path / SINGLE_FILE_FP16,
        config=str(tmp_path / PIPELINE_DIR),
        local_files_only=True,
        torch_dtype=torch.float16,
    )
    assert_same_weights(half.unet, single.unet)
    assert (tmp_path / SINGLE_FILE_FP16).stat().st_size < (tmp_path / SINGLE_FILE).stat().st_size


def test_digest_covers_every_file(artifact, tmp_path: Path):
    directory, _ = artifact
    manifest = json.loads((directory / MANIFEST).read_text())
    assert verify(directory) == manifest["digest"]
    assert {f["path"] for f in manifest["files"]} >= {
        SINGLE_FILE,
        f"{PIPELINE_DIR}/model_index.json",
    }
    copy = shutil.copytree(directory, tmp_path / "copy")
    assert verify(copy) == manifest["digest"]  # content-addressed: location does not matter

    weights = copy / SINGLE_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(DigestMismatch, match=SINGLE_FILE):
        verify(copy)
    (copy / "extra.txt").write_text("not in the manifest")
    with pytest.raises(DigestMismatch, match="extra.txt"):
        verify(copy)


def test_export_phase_uses_the_trained_weights(trained):
    config, trainer = trained
    trainer.save_trained(Path(config.output(TRAINED_DIR)))
    result = run_export(config)
    assert result.digest == verify(result.directory)
    loaded = StableDiffusionPipeline.from_pretrained(result.directory / PIPELINE_DIR)
    assert_same_weights(trainer.trained_model.unet, loaded.unet)
    assert_same_weights(trainer.trained_model.text_encoder, loaded.text_encoder)


def test_export_phase_needs_training_first(make_config):
    with pytest.raises(FileNotFoundError, match="train first"):
        run_export(make_config())


def test_digest_does_not_depend_on_where_things_were(trained, tmp_path: Path):
    """Same weights, different directories: the same artifact, the same digest."""
    config, trainer = trained
    digests = set()
    for place in ("a", "b"):
        trainer.save_trained(tmp_path / place / "trained")
        base = load_pipeline(config.base_model, config.model_cache_dir())
        pipeline = with_trained_weights(base, tmp_path / place / "trained")
        digests.add(export_pipeline(pipeline, tmp_path / place / "export")["digest"])
    assert len(digests) == 1


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: p.scheduler.register_to_config(prediction_type="v_prediction"), "predicts v"),
        (lambda p: setattr(p.text_encoder.config, "hidden_act", "gelu"), "not OpenAI CLIP"),
    ],
    ids=["v-prediction", "openclip-text-encoder"],
)
def test_no_single_file_where_the_sd1_layout_would_mislead(
    trained, tmp_path: Path, caplog, change, reason
):
    """An SD2-style model exports its diffusers pipeline, and no single file that would load
    as a broken SD1 model."""
    _, trainer = trained
    pipeline = trainer.pipeline()
    change(pipeline)
    manifest = export_pipeline(pipeline, tmp_path, fp16_variant=True)
    assert not (tmp_path / SINGLE_FILE).exists() and not (tmp_path / SINGLE_FILE_FP16).exists()
    assert (tmp_path / PIPELINE_DIR / "model_index.json").is_file()
    assert not [f for f in manifest["files"] if f["path"] in (SINGLE_FILE, SINGLE_FILE_FP16)]
    assert reason in caplog.text
