"""Generate with the trained and the base pipeline, score both, write the report and the grid.

Both models draw image i of every prompt from the noise of seed + i, so the base model's scores
are the baseline the trained model's are compared with, image for image.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image

from dreambooth_contract.api import EvaluationScores, EvaluationStatus
from dreambooth_contract.layout import EVALUATION_GRID, EVALUATION_REPORT

from ..models.generation import generate_images
from . import metrics
from .encoders import Encoders
from .prompts import EvaluationPlan

REPORT_FILE = EVALUATION_REPORT
GRID_FILE = EVALUATION_GRID
# Table 1 of the paper, Stable Diffusion fine-tuned with DreamBooth on its 30 subjects: what a run
# on real weights can be compared with.
PAPER_SD_SCORES = {"dino": 0.668, "clipI": 0.803, "clipT": 0.305}


@dataclass
class Generations:
    """One model's images: per subject prompt, and of the class prompt (None without one)."""

    subject: list[list[Image.Image]]
    of_class: list[Image.Image] | None

    def rows(self) -> list[list[Image.Image]]:
        return self.subject + ([self.of_class] if self.of_class is not None else [])


@torch.inference_mode()
def generate(pipeline: DiffusionPipeline, plan: EvaluationPlan) -> Generations:
    """`images_per_prompt` images of each prompt, one prompt per pipeline call."""

    def images_of(prompt: str) -> list[Image.Image]:
        count = plan.images_per_prompt
        # CPU generators: the same noise whatever device the pipeline runs on.
        generators = [torch.Generator().manual_seed(plan.seed + i) for i in range(count)]
        return generate_images(
            pipeline,
            [prompt] * count,
            None,
            width=plan.resolution,
            height=plan.resolution,
            steps=plan.steps,
            guidance_scale=plan.guidance_scale,
            generators=generators,
        )

    subject = [images_of(prompt) for prompt in plan.subject_prompts]
    of_class = images_of(plan.class_prompt) if plan.class_prompt else None
    return Generations(subject, of_class)


def score(
    generations: Generations,
    real_embeddings: dict[str, torch.Tensor],
    plan: EvaluationPlan,
    encoders: Encoders,
) -> EvaluationScores:
    images = [image for row in generations.subject for image in row]
    texts = [text for text in plan.clip_texts for _ in range(plan.images_per_prompt)]
    dino = encoders.dino.embed_images(images)
    clip_images = encoders.clip.embed_images(images)
    pres = None
    if generations.of_class is not None:
        pres = metrics.prior_drift(
            encoders.dino.embed_images(generations.of_class), real_embeddings["dino"]
        )
    return EvaluationScores(
        dino=metrics.subject_fidelity(dino, real_embeddings["dino"]),
        clip_i=metrics.subject_fidelity(clip_images, real_embeddings["clip"]),
        clip_t=metrics.prompt_fidelity(encoders.clip.embed_texts(texts), clip_images),
        pres=pres,
        # The paper's DIV: images of the same subject prompt.
        div=encoders.diversity.score(generations.subject, encoders.dino),
    )


def comparison_grid(base: Generations, trained: Generations) -> Image.Image:
    """One row per prompt (subject prompts, then the class prompt): base images on the left,
    trained images on the right."""
    rows = [b + t for b, t in zip(base.rows(), trained.rows(), strict=True)]
    cells = [image for row in rows for image in row]
    return make_image_grid(cells, rows=len(rows), cols=len(rows[0]))


def evaluate(
    trained: DiffusionPipeline,
    base: DiffusionPipeline,
    real: list[Image.Image],
    plan: EvaluationPlan,
    encoders: Encoders,
    directory: Path,
    artifact_digest: str | None = None,
) -> EvaluationStatus:
    """Score both models; write <directory>/report.json and grid.png (the report names the
    artifact by `artifact_digest`, the digest of its manifest)."""
    real_embeddings = {
        "dino": encoders.dino.embed_images(real),
        "clip": encoders.clip.embed_images(real),
    }
    models = {"base": base, "trained": trained}
    generations = {name: generate(pipeline, plan) for name, pipeline in models.items()}
    scores = {
        name: score(images, real_embeddings, plan, encoders) for name, images in generations.items()
    }
    status = EvaluationStatus(
        trained=scores["trained"],
        base=scores["base"],
        diversity_method=encoders.diversity.method,
        images=sum(len(row) for row in generations["trained"].rows()),
    )
    directory.mkdir(parents=True, exist_ok=True)
    comparison_grid(generations["base"], generations["trained"]).save(directory / GRID_FILE)
    document = report(status, plan, artifact_digest)
    (directory / REPORT_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return status


def report(status: EvaluationStatus, plan: EvaluationPlan, artifact_digest: str | None) -> dict:
    return {
        **status.model_dump(mode="json", by_alias=True, exclude_none=True),
        **({"artifactDigest": artifact_digest} if artifact_digest else {}),
        "prompts": plan.subject_prompts,
        "clipTexts": plan.clip_texts,
        "classPrompt": plan.class_prompt,
        "imagesPerPrompt": plan.images_per_prompt,
        "steps": plan.steps,
        "guidanceScale": plan.guidance_scale,
        "seed": plan.seed,
        "resolution": plan.resolution,
        "paperStableDiffusion": PAPER_SD_SCORES,
    }
