"""The trainer's configuration: the DreamBoothJob spec sections it needs plus runtime settings.

The operator builds it with `TrainerConfig.from_job(job)` and ships `config.to_json()` in a
ConfigMap; every trainer pod reads it back with `TrainerConfig.model_validate_json`. The spec
sections are the API models themselves (api.py is the single source of truth), so a field added
there reaches the trainer without being declared twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import Field, field_validator, model_validator

from .api import (
    DNS_LABEL,
    ApiModel,
    BaseModelSpec,
    DreamBoothJob,
    EvaluationSpec,
    ExportSpec,
    FieldRuleError,
    InstanceSpec,
    PriorPreservationSpec,
    S3Spec,
    SubjectSpec,
    TrackingSpec,
    TrainingSpec,
    ValidationSpec,
    no_dot_segments,
)
from .env import CACHE_DIR_ENV, DEFAULT_CACHE_DIR
from .layout import PRIORS_DIR, join_uri
from .priors_key import cache_key

REMOTE_SCHEMES = ("s3://", "random://")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config that cannot run; `field` is the wire-format path, e.g. instance.imagesUri."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class TrainerConfig(ApiModel):
    """What one trainer process needs; spec sections verbatim, effective values resolved."""

    job_name: str = Field(description="DreamBoothJob name.", pattern=DNS_LABEL, max_length=63)
    namespace: str | None = Field(None, description="DreamBoothJob namespace (None locally).")
    base_model: BaseModelSpec
    # The first (or only) subject, and its class in prior_preservation: what the phases that
    # look at one subject (export metadata, evaluation) read. All of them: subjects.py.
    instance: InstanceSpec
    prior_preservation: PriorPreservationSpec
    subjects: list[SubjectSpec] = Field(
        [], description="spec.subjects (paths resolved); empty when the job has one instance."
    )
    training: TrainingSpec
    nodes: int = Field(1, ge=1, description="torchrun nodes (training pods).")
    processes_per_node: int = Field(1, ge=1, description="torchrun processes per node.")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per training pod (0: CPU training).")
    output_uri: str = Field(description="Checkpoints, trained weights, export, samples, logs.")
    prior_cache_uri: str = Field(description="Root of the content-addressed class-image cache.")
    s3: S3Spec = Field(S3Spec(), description="Endpoint and region; credentials from env only.")
    cache_dir: str | None = Field(
        None, description=f"Model download/build cache; default ${CACHE_DIR_ENV} or ~/.cache."
    )
    export: ExportSpec = Field(ExportSpec(), description="What the export phase writes.")
    evaluation: EvaluationSpec = Field(
        EvaluationSpec(), description="The evaluation phase (spec.evaluation)."
    )
    tracking: TrackingSpec = Field(
        TrackingSpec(),
        description="Experiment tracking (spec.tracking), without the API key's Secret.",
    )
    export_fp16_variant: bool = Field(
        False, description="Also export fp16 weights (diffusers variant) and an fp16 single file."
    )

    # As in the spec: a config from an older operator must not reach the storage with them.
    _uri_segments = field_validator("output_uri", "prior_cache_uri", mode="before")(no_dot_segments)

    @model_validator(mode="after")
    def _no_secret_reference(self) -> TrainerConfig:
        # Trainer pods get credentials as environment variables; the config never names them.
        if self.s3.credentials_secret is not None:
            raise FieldRuleError("s3.credentialsSecret", "must not be set in a trainer config")
        return self

    @classmethod
    def from_job(cls, job: DreamBoothJob, base_dir: Path | None = None) -> TrainerConfig:
        """THE mapping from a DreamBoothJob to the trainer's config.

        `base_dir` resolves relative local paths (a local run passes the YAML file's directory);
        the operator passes None and pods see the paths as written.
        """
        spec = job.spec

        def resolve(uri: str) -> str:
            return resolve_local_uri(uri, base_dir) if base_dir is not None else uri

        model_uri = spec.base_model.uri
        if is_local_model(model_uri):
            model_uri = resolve(model_uri)

        training = spec.training.model_copy(
            update={"learning_rate": spec.training.effective_learning_rate}
        )
        output_uri = resolve(spec.storage.output_uri)
        prior_cache_uri = (
            resolve(spec.storage.prior_cache_uri)
            if spec.storage.prior_cache_uri
            else sibling_uri(output_uri, PRIORS_DIR)
        )
        vae_uri = spec.base_model.vae_uri
        if vae_uri and is_local_model(vae_uri):
            vae_uri = resolve(vae_uri)
        base_model = spec.base_model.model_copy(update={"uri": model_uri, "vae_uri": vae_uri})
        subjects = [
            subject.model_copy(
                update={
                    "images_uri": resolve(subject.images_uri),
                    "class_images_uri": subject.class_images_uri
                    and resolve(subject.class_images_uri),
                }
            )
            for subject in spec.subjects
        ]
        first = subjects[0] if subjects else None
        instance = (
            InstanceSpec(**first.model_dump(include=set(InstanceSpec.model_fields)))
            if first
            else spec.instance.model_copy(update={"images_uri": resolve(spec.instance.images_uri)})
        )
        class_images_uri = first.class_images_uri if first else None
        if not first and spec.prior_preservation.class_images_uri:
            class_images_uri = resolve(spec.prior_preservation.class_images_uri)
        prior_preservation = spec.prior_preservation.model_copy(
            update={"class_images_uri": class_images_uri}
            | ({"class_prompt": first.class_prompt} if first else {})
        )
        evaluation = spec.evaluation.model_copy(
            update={
                name: resolve(getattr(spec.evaluation, name))
                for name in ("clip_uri", "dino_uri")
                if is_local_model(getattr(spec.evaluation, name))
            }
        )
        # The pods get the key from the Secret as a variable; the config need not name it.
        wandb = spec.tracking.wandb
        tracking = spec.tracking.model_copy(
            update={"wandb": wandb and wandb.model_copy(update={"api_key_secret": None})}
        )
        return cls(
            job_name=job.metadata.name,
            namespace=job.metadata.namespace,
            base_model=base_model,
            instance=instance,
            prior_preservation=prior_preservation,
            subjects=subjects,
            training=training,
            evaluation=evaluation,
            tracking=tracking,
            nodes=spec.resources.nodes,
            processes_per_node=spec.resources.processes,
            gpus_per_node=spec.resources.gpus_per_node,
            output_uri=output_uri,
            prior_cache_uri=prior_cache_uri,
            s3=spec.storage.s3.model_copy(update={"credentials_secret": None}),
            export=spec.export,
        )

    def to_json(self) -> str:
        """The wire format (camelCase, like the CR); `model_validate_json` reads it back."""
        return self.model_dump_json(by_alias=True, indent=2)

    # -- derived values ------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    @property
    def validation(self) -> ValidationSpec:
        return self.training.validation

    @property
    def sample_prompts(self) -> list[str]:
        """What sample grids render: validation.prompts, or with several subjects and none
        given, each subject's prompt (one sample per subject)."""
        return self.validation.prompts or [subject.prompt for subject in self.subjects]

    @property
    def uses_priors(self) -> bool:
        return self.prior_preservation.enabled

    @property
    def priors_key(self) -> str:
        return cache_key(self.base_model, self.prior_preservation, self.training.resolution)

    @property
    def priors_uri(self) -> str:
        return join_uri(self.prior_cache_uri, self.priors_key)

    def output(self, *parts: str) -> str:
        """URI of a path inside the output location (see layout)."""
        return join_uri(self.output_uri, *parts)

    def weights_identity(self) -> dict[str, str]:
        """What determines the trained weights, part by part, each as a short digest: a run
        resumes only from checkpoints written with the same parts (see checkpoint_manager.py).
        Where and how often checkpoints and samples are written is left out."""
        parts = {
            "baseModel": self.base_model.model_dump(mode="json", by_alias=True),
            "instance": self.instance.model_dump(mode="json", by_alias=True),
            "priorPreservation": self.prior_preservation.model_dump(mode="json", by_alias=True),
            "training": self.training.model_dump(
                mode="json", by_alias=True, exclude={"checkpointing", "validation"}
            ),
        }
        if self.subjects:  # one subject keeps the parts (and checkpoints) it always had
            # A subject's name only labels its metrics: renaming it keeps the checkpoints.
            parts["subjects"] = [
                s.model_dump(mode="json", by_alias=True, exclude={"name"}) for s in self.subjects
            ]
        return {name: _digest(value) for name, value in parts.items()}

    def model_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)).expanduser()


# -- URIs ------------------------------------------------------------------------------------------


def is_remote(uri: str) -> bool:
    return uri.startswith(REMOTE_SCHEMES)


def is_local_model(uri: str) -> bool:
    """Local model paths start with '/', '.' or '~'; 'org/name' is a hub id (api.MODEL_URI)."""
    return uri.startswith(("/", ".", "~"))


def resolve_local_uri(uri: str, base_dir: Path) -> str:
    """Make a local path absolute against `base_dir`; s3:// and random:// URIs pass through."""
    if is_remote(uri):
        return uri
    path = Path(uri).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def sibling_uri(uri: str, name: str) -> str:
    """`<uri>/../<name>` (the API's default prior cache), computed for s3 and paths alike."""
    scheme, _, path = uri.rpartition("://")
    parent = str(PurePosixPath(path.rstrip("/")).parent)
    if scheme and "/" not in path.strip("/"):
        raise ConfigError(
            "storage.outputUri", f"needs a prefix below the bucket to place priors beside ({uri})"
        )
    return f"{scheme}://{parent}/{name}" if scheme else str(PurePosixPath(parent) / name)
