"""What an evaluation generates: prompts of the subject, and the class prompt for PRES.

The paper scores each subject on 25 prompts: recontextualizations ("a [V] dog on the beach"),
accessories and property changes. The default here is a handful of its recontextualizations
around the instance prompt, enough for stable means at a small cost; `evaluation.prompts`
replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass

from dreambooth_contract.trainer_config import TrainerConfig

RECONTEXTUALIZATIONS = (
    "on the beach",
    "in the snow",
    "in the jungle",
    "with a city in the background",
)


def default_subject_prompts(instance_prompt: str) -> list[str]:
    return [instance_prompt] + [f"{instance_prompt} {where}" for where in RECONTEXTUALIZATIONS]


def clip_text(prompt: str, instance_prompt: str, class_prompt: str | None) -> str:
    """The text CLIP-T compares an image of `prompt` with: the instance prompt replaced by the
    class prompt ("a photo of sks dog on the beach" -> "a photo of dog on the beach"). CLIP has
    never seen the identifier; what it can judge is whether the image shows the prompt's scene
    with a member of the class. Prompts without the instance prompt are compared as written."""
    if not class_prompt:
        return prompt
    return prompt.replace(instance_prompt, class_prompt)


@dataclass(frozen=True)
class EvaluationPlan:
    """Everything that decides which images are generated (the same for both models)."""

    subject_prompts: list[str]
    clip_texts: list[str]  # one per subject prompt
    class_prompt: str | None
    images_per_prompt: int
    steps: int
    guidance_scale: float
    seed: int
    resolution: int

    @property
    def all_prompts(self) -> list[str]:
        """Subject prompts, then the class prompt when there is one: the grid's rows."""
        return self.subject_prompts + ([self.class_prompt] if self.class_prompt else [])


def plan_for(config: TrainerConfig) -> EvaluationPlan:
    spec = config.evaluation
    instance_prompt = config.instance.prompt
    # A class prompt given with the prior loss off still says what the subject is.
    class_prompt = config.prior_preservation.class_prompt
    subject_prompts = list(spec.prompts) or default_subject_prompts(instance_prompt)
    return EvaluationPlan(
        subject_prompts=subject_prompts,
        clip_texts=[clip_text(p, instance_prompt, class_prompt) for p in subject_prompts],
        class_prompt=class_prompt,
        images_per_prompt=spec.images_per_prompt,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        seed=spec.seed,
        resolution=config.training.resolution,
    )
