"""What a multi-adapter inference server serves: the publication index the operator writes.

The server holds no Kubernetes token, so publication reaches it as a file: the operator writes
ONE index, PUBLICATIONS_FILE, into a ConfigMap mounted as a directory, and the server re-reads it
when it changes (kubelet swaps the whole `..data` symlink at once, so the server never sees half
an update).

One index rather than one file per model because:
- a publication set changes atomically: the server never serves half of a reconcile;
- the server's reconciler can write it level-triggered from the jobs that name the server
  (unpublishing is just leaving a job out), with no per-key patches to keep in step;
- model names ("NAMESPACE/JOB") contain "/", which ConfigMap keys may not.

    {"format": "dreambooth-publications/v1",
     "models": [{"name": "team-a/rex", "uri": "s3://bucket/team-a/rex/export",
                 "digest": "sha256:<64 hex>"}]}

A published model is served only while it is listed here, and only if its files match `digest`
(the job's status.artifact.digest).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PUBLICATIONS_FILE = "publications.json"
FORMAT = "dreambooth-publications/v1"
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
# The OpenAI `model` field the server accepts is at most this long (serve/config.MAX_ID_CHARS).
MAX_MODEL_NAME_CHARS = 256


def model_name(namespace: str, job: str) -> str:
    """The name a LoRA job's adapter is published under."""
    return f"{namespace}/{job}"


class PublishedModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1,
        max_length=MAX_MODEL_NAME_CHARS,
        pattern=r"^[^\s]+$",
        description="The OpenAI `model` value clients send, e.g. NAMESPACE/JOB.",
    )
    uri: str = Field(min_length=1, description="The LoRA export: s3://bucket/prefix or a path.")
    digest: str = Field(
        pattern=DIGEST_PATTERN, description="The export's manifest digest; any other is refused."
    )


class Publications(BaseModel):
    # Unknown fields are refused: a typo ("digets") in a hand-written index must not pass.
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["dreambooth-publications/v1"] = FORMAT
    models: tuple[PublishedModel, ...] = ()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: tuple[PublishedModel, ...]) -> tuple[PublishedModel, ...]:
        names = [model.name for model in models]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {duplicates}")
        return models

    def by_name(self) -> dict[str, PublishedModel]:
        return {model.name: model for model in self.models}


def parse(text: str) -> Publications:
    """The index in `text`; pydantic.ValidationError when it is not one."""
    return Publications.model_validate_json(text)


def render(publications: Publications) -> str:
    """The index as the operator writes it: the same bytes for the same set (sorted by name),
    so an unchanged set does not rewrite the ConfigMap."""
    ordered = sorted(publications.models, key=lambda model: model.name)
    body = {"format": publications.format, "models": [m.model_dump() for m in ordered]}
    return json.dumps(body, indent=2, sort_keys=True) + "\n"
