"""Evaluation: the paper's metrics from fixed embeddings, the tiny encoders, prompts, and the
evaluation of two pipelines (the full local run is in test_cli.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth_contract.api import EvaluationStatus
from dreambooth_contract.trainer_config import TrainerConfig
from dreambooth_trainer.evaluation import metrics
from dreambooth_trainer.evaluation.encoders import load_clip, load_dino, load_encoders
from dreambooth_trainer.evaluation.prompts import RECONTEXTUALIZATIONS, plan_for
from dreambooth_trainer.evaluation.run import GRID_FILE, REPORT_FILE, evaluate

from .conftest import BASE_SPEC, CLASS_PROMPT, INSTANCE_PROMPT, make_job, merged

ROOT2 = math.sqrt(2)

# -- metrics, from embeddings worked by hand --------------------------------------------------------


def test_subject_fidelity_is_the_mean_cosine_over_every_generated_real_pair():
    # generated g1 = (3, 0), g2 = (0, 2); real r1 = (1, 1), r2 = (5, 0). Lengths do not count:
    # cos(g1, r1) = 1/sqrt2, cos(g1, r2) = 1, cos(g2, r1) = 1/sqrt2, cos(g2, r2) = 0
    # mean = (1/sqrt2 + 1 + 1/sqrt2 + 0) / 4 = (sqrt2 + 1) / 4 = 0.603553...
    generated = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    real = torch.tensor([[1.0, 1.0], [5.0, 0.0]])
    assert metrics.subject_fidelity(generated, real) == pytest.approx((ROOT2 + 1) / 4)


def test_prompt_fidelity_pairs_each_image_with_its_own_prompt():
    # text t1 = (1, 0) with image i1 = (2, 0): cos 1; text t2 = (1, 1) with image i2 = (0, 1):
    # cos 1/sqrt2. mean = (1 + 1/sqrt2) / 2 = 0.853553... (every pair would give 0.603553...)
    texts = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    images = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert metrics.prompt_fidelity(texts, images) == pytest.approx((1 + 1 / ROOT2) / 2)
    with pytest.raises(ValueError, match="one text per image"):
        metrics.prompt_fidelity(texts, images[:1])


def test_prior_drift_is_how_close_class_images_come_to_the_subject():
    # class image c = (1, 0); real r1 = (0, 3): cos 0; r2 = (1, 1): cos 1/sqrt2.
    # mean = 1 / (2 sqrt2) = 0.353553...
    class_images = torch.tensor([[1.0, 0.0]])
    real = torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    assert metrics.prior_drift(class_images, real) == pytest.approx(1 / (2 * ROOT2))


def test_diversity_is_the_mean_pairwise_distance_within_each_prompt():
    # prompt A: a1 = (1, 0), a2 = (0, 1), a3 = (1, 1); distance = 1 - cos
    #   d(a1, a2) = 1, d(a1, a3) = d(a2, a3) = 1 - 1/sqrt2; mean = (3 - sqrt2) / 3 = 0.528595...
    # prompt B: b1 = (1, 0), b2 = (2, 0): the same direction, d = 0
    # DIV = mean over prompts = (3 - sqrt2) / 6 = 0.264297...
    group_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    group_b = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    div = metrics.diversity([group_a, group_b], metrics.cosine_distance)
    assert div == pytest.approx((3 - ROOT2) / 6)
    with pytest.raises(ValueError, match="at least two images"):
        metrics.diversity([group_a[:1]], metrics.cosine_distance)


def test_diversity_takes_any_distance_such_as_lpips():
    # a distance of |x - y| on scalars: pairs (0, 1), (0, 3), (1, 3) -> 1, 3, 2; mean 2
    group = torch.tensor([0.0, 1.0, 3.0])
    assert metrics.diversity([group], lambda a, b: (a - b).abs()) == pytest.approx(2.0)


# -- the tiny encoders ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("encoders")


def solid(color: tuple[int, int, int], size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), color)


IMAGES = [solid((255, 0, 0)), solid((0, 0, 255)), solid((255, 0, 0))]


def test_tiny_clip_embeds_images_and_prompts(cache: Path):
    clip = load_clip("random://tiny-clip", cache)
    images = clip.embed_images(IMAGES)
    assert images.shape == (3, clip.model.config.projection_dim)
    assert torch.equal(images[0], images[2]) and not torch.allclose(images[0], images[1])
    texts = clip.embed_texts([INSTANCE_PROMPT, f"{INSTANCE_PROMPT} on the beach in the snow"])
    assert texts.shape == (2, clip.model.config.projection_dim)
    # padding the shorter prompt to the longer one's length must not change its embedding
    assert torch.allclose(texts[0], clip.embed_texts([INSTANCE_PROMPT])[0], atol=1e-5)


def test_tiny_dino_embeds_images_by_their_cls_token(cache: Path):
    dino = load_dino("random://tiny-dino", cache)
    embeddings = dino.embed_images(IMAGES)
    assert embeddings.shape == (3, dino.model.config.hidden_size)
    assert torch.equal(embeddings[0], embeddings[2])
    assert not torch.allclose(embeddings[0], embeddings[1])


def test_encoders_load_from_a_local_directory_and_refuse_one_without_a_model(
    cache: Path, tmp_path: Path
):
    from dreambooth_trainer.evaluation import random_encoders

    directory = random_encoders.materialize("random://tiny-dino", cache)
    from_path = load_dino(str(directory), tmp_path / "unused-cache").embed_images(IMAGES[:1])
    from_uri = load_dino("random://tiny-dino", cache).embed_images(IMAGES[:1])
    assert torch.equal(from_path, from_uri)
    with pytest.raises(FileNotFoundError, match=r"no transformers model here \(config.json"):
        load_clip(str(tmp_path), cache)
    with pytest.raises(ValueError, match="unknown random encoder 'random://tiny-vit'"):
        load_dino("random://tiny-vit", cache)


# -- prompts ----------------------------------------------------------------------------------------


def config_with(evaluation: dict, cache_dir: Path | None = None) -> TrainerConfig:
    spec = merged(BASE_SPEC, {"evaluation": evaluation})
    config = TrainerConfig.from_job(make_job(spec))
    return config.model_copy(update={"cache_dir": str(cache_dir / "models") if cache_dir else None})


def test_default_prompts_recontextualize_the_instance_prompt():
    plan = plan_for(config_with({}))
    assert plan.subject_prompts[0] == INSTANCE_PROMPT
    assert plan.subject_prompts[1:] == [f"{INSTANCE_PROMPT} {c}" for c in RECONTEXTUALIZATIONS]
    # CLIP-T reads the class where the identifier was: CLIP has never seen "sks"
    assert plan.clip_texts[1] == f"{CLASS_PROMPT} {RECONTEXTUALIZATIONS[0]}"
    assert plan.all_prompts[-1] == CLASS_PROMPT


def test_given_prompts_replace_the_defaults_and_pres_needs_a_class_prompt():
    spec = merged(
        BASE_SPEC,
        {
            "priorPreservation": {"enabled": False, "classPrompt": None},
            "evaluation": {"prompts": ["sks cube, oil painting"]},
        },
    )
    plan = plan_for(TrainerConfig.from_job(make_job(spec)))
    assert plan.subject_prompts == plan.clip_texts == ["sks cube, oil painting"]
    assert plan.class_prompt is None and plan.all_prompts == ["sks cube, oil painting"]


# -- evaluating pipelines ---------------------------------------------------------------------------


@pytest.mark.trainer
@pytest.mark.parametrize("base", ["random://tiny-sd", "random://tiny-sdxl"])
def test_a_model_evaluated_against_itself_gains_nothing(shared_dir: Path, tmp_path: Path, base):
    """Both models draw the same noise, so the base model is a true baseline: the same pipeline
    on both sides scores the same. The report and the grid (base left, trained right) are
    written. SD and SDXL pipelines alike."""
    from dreambooth_trainer.evaluation.phase import load_subject_images
    from dreambooth_trainer.models.loading import load_pipeline

    evaluation = {
        "prompts": [INSTANCE_PROMPT, f"{INSTANCE_PROMPT} on the beach"],
        "imagesPerPrompt": 2,
        "steps": 2,
        "clipUri": "random://tiny-clip",
        "dinoUri": "random://tiny-dino",
    }
    config = config_with(evaluation, shared_dir)
    spec = config.base_model.model_copy(update={"uri": base})
    pipeline = load_pipeline(spec, config.model_cache_dir())
    encoders = load_encoders(config.evaluation, config.model_cache_dir())
    real = load_subject_images(config)
    status = evaluate(pipeline, pipeline, real, plan_for(config), encoders, tmp_path)

    assert status.trained == status.base
    assert status.trained.pres is not None  # the class prompt was generated too
    assert status.diversity_method == "dino" and status.images == 3 * 2
    assert status.summary == f"DINO {status.trained.dino:.3f} (+0.000)"
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert EvaluationStatus.model_validate(report) == status
    assert report["prompts"] == evaluation["prompts"] and report["classPrompt"] == CLASS_PROMPT
    with Image.open(tmp_path / GRID_FILE) as grid:  # 3 rows (2 prompts, class), 2 + 2 columns
        assert grid.size == (4 * 64, 3 * 64)


def test_a_failed_evaluation_is_reported_and_the_run_goes_on(shared_dir: Path, tmp_path: Path):
    """An encoder that will not load fails the evaluation only: the artifact stands."""
    from dreambooth_trainer.local import LocalRun, evaluate_artifact

    missing = tmp_path / "no-clip-here"
    config = config_with({"clipUri": str(missing), "dinoUri": "random://tiny-dino"}, shared_dir)
    run = LocalRun(tmp_path)
    evaluate_artifact(config, run)
    assert run.evaluation is None
    assert run.evaluation_error == (
        f"FileNotFoundError: {missing}: no transformers model here (config.json missing)"
    )
