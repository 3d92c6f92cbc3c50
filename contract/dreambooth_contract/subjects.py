"""A job's subjects and their classes, the same for one `instance` and for `subjects`.

A job with `instance` has one subject, whose class is priorPreservation.classPrompt (and its
own class images priorPreservation.classImagesUri); a job with `subjects` has each subject name
its class. Either way the trainer sees a list of `Subject`s and the distinct classes they
belong to (`ClassSet`s): each class has its own class-image set under its own content-addressed
key, so a job with any one of the classes reuses that set.
"""

from __future__ import annotations

from dataclasses import dataclass

from .api import PriorPreservationSpec, SubjectSpec
from .layout import join_uri
from .priors_key import cache_key
from .trainer_config import TrainerConfig


@dataclass(frozen=True)
class ClassSet:
    """One class: its prompt, the prior-preservation settings that generate its images, and
    where they lie."""

    index: int
    priors: PriorPreservationSpec  # class_prompt and class_images_uri are this class's
    key: str
    uri: str
    images_field: str  # the field naming its own class images (classImagesUri)

    @property
    def prompt(self) -> str:
        return self.priors.class_prompt or ""


@dataclass(frozen=True)
class Subject:
    """One subject: its photos, prompt and captions (`spec`), and its class (None without
    prior preservation)."""

    index: int
    spec: SubjectSpec
    field: str  # the spec path of the subject, e.g. "instance" or "subjects[1]"
    class_index: int | None

    @property
    def name(self) -> str:
        """Its label in metrics and logs."""
        return self.spec.label(self.index)

    @property
    def images_field(self) -> str:
        return f"{self.field}.imagesUri"


def subjects_of(config: TrainerConfig) -> list[Subject]:
    """Every subject of the job, in spec order."""
    classes = {class_set.prompt: class_set.index for class_set in classes_of(config)}
    if not config.subjects:
        priors = config.prior_preservation
        spec = SubjectSpec(
            **config.instance.model_dump(),
            class_prompt=priors.class_prompt,
            class_images_uri=priors.class_images_uri,
        )
        return [Subject(0, spec, "instance", 0 if config.uses_priors else None)]
    return [
        Subject(i, spec, f"subjects[{i}]", classes.get(spec.class_prompt or ""))
        for i, spec in enumerate(config.subjects)
    ]


def classes_of(config: TrainerConfig) -> list[ClassSet]:
    """The distinct classes of the subjects (first appearance first); none without priors."""
    if not config.uses_priors:
        return []
    priors = config.prior_preservation
    if not config.subjects:
        return [_class_set(config, 0, priors, "priorPreservation.classImagesUri")]
    classes: dict[str, ClassSet] = {}
    for i, subject in enumerate(config.subjects):
        prompt = subject.class_prompt or ""
        if prompt not in classes:
            own = priors.model_copy(
                update={"class_prompt": prompt, "class_images_uri": subject.class_images_uri}
            )
            field = f"subjects[{i}].classImagesUri"
            classes[prompt] = _class_set(config, len(classes), own, field)
    return list(classes.values())


def _class_set(
    config: TrainerConfig, index: int, priors: PriorPreservationSpec, images_field: str
) -> ClassSet:
    key = cache_key(config.base_model, priors, config.training.resolution)
    return ClassSet(index, priors, key, join_uri(config.prior_cache_uri, key), images_field)
