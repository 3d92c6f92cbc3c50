"""The DreamBoothServer API: one inference server, many subjects.

A server holds one base model and serves the LoRA adapters that finished jobs publish to it
(`spec.inference.server` of a DreamBoothJob), chosen per request by the OpenAI `model` field.
Its CRD schema is generated from these models like the job's (the operator's crd.py).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .api import (
    API_VERSION,
    DEFAULT_TRAINER_IMAGE,
    DNS_LABEL,
    JOB_NAME,
    ApiModel,
    BaseModelSpec,
    Condition,
    FieldRuleError,
    ObjectMeta,
    Quantity,
    ResourceRequirements,
    S3Spec,
    StatusModel,
    field,
)
from .sampling import MAX_GUIDANCE_SCALE, SchedulerName

SERVER_KIND = "DreamBoothServer"
SERVER_PLURAL = "dreamboothservers"
SERVER_SINGULAR = "dreamboothserver"
SERVER_SHORT_NAMES = ["dbs"]
# The server's children are "<server>-server" (Deployment, Service, ServiceAccount) and
# "<server>-publications" (the ConfigMap): both must stay valid DNS-1035 labels.
MAX_SERVER_NAME_LENGTH = 40
ANY_NAMESPACE = "*"


class DreamBoothServerSpec(ApiModel):
    base_model: BaseModelSpec = field(
        description="The model every published adapter applies to; a job whose baseModel differs "
        "is refused."
    )
    replicas: int = field(1, description="Server replicas.", ge=0, le=100)
    image: str = field(DEFAULT_TRAINER_IMAGE, description="Server image.", min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = field(
        "IfNotPresent", description="When to pull the image."
    )
    resources: ResourceRequirements = field(
        ResourceRequirements, description="Per-replica requests and limits."
    )
    gpus: int = field(1, description="GPUs per replica (0 for CPU).", ge=0, le=8)
    cache_size: Quantity = field(
        "50Gi", description="Size limit of each replica's download cache (base model, adapters)."
    )
    max_loaded_adapters: int = field(
        8,
        description="Adapters a replica keeps loaded; beyond that the least recently used is "
        "evicted and loaded again from storage when asked for.",
        ge=1,
        le=1000,
    )
    default_steps: int = field(
        25, description="Denoising steps of a request that names none.", ge=1, le=150
    )
    default_guidance_scale: float = field(
        7.5,
        description="Classifier-free guidance of a request that names none (<= 1 turns it off).",
        ge=0,
        le=MAX_GUIDANCE_SCALE,
    )
    default_scheduler: SchedulerName | None = field(
        None,
        description="Sampler of a request that names none (default: the base model's own "
        "scheduler); a request's `scheduler` field picks another.",
    )
    allowed_namespaces: list[str] = field(
        list,
        description="Namespaces whose jobs may publish here besides the server's own; "
        f'"{ANY_NAMESPACE}" allows every namespace.',
        max_length=1000,
    )
    s3: S3Spec = field(
        S3Spec,
        description="How the server reaches the adapters' storage (endpoint, region, and a "
        "Secret in the server's namespace).",
    )

    @field_validator("allowed_namespaces")
    @classmethod
    def _namespaces(cls, values: list[str]) -> list[str]:
        for value in values:
            if value != ANY_NAMESPACE and not (len(value) <= 63 and re.match(DNS_LABEL, value)):
                raise ValueError(
                    f"{value!r} is not a namespace name (a DNS label) nor {ANY_NAMESPACE!r}"
                )
        return values

    @model_validator(mode="after")
    def _no_vae_override(self) -> DreamBoothServerSpec:
        # The server decodes with the base model's own VAE; a field it ignored would lie.
        if self.base_model.vae_uri:
            raise FieldRuleError(
                "baseModel.vaeUri", "not for servers: they decode with the base model's own VAE"
            )
        return self

    def allows(self, server_namespace: str, namespace: str) -> bool:
        """Whether jobs of `namespace` may publish to this server."""
        return namespace == server_namespace or bool(
            {ANY_NAMESPACE, namespace} & set(self.allowed_namespaces)
        )


class ServedModel(StatusModel):
    name: str = field(description="The OpenAI `model` value (NAMESPACE/JOB).")
    digest: str = field(description="The adapter's export digest.")


class DreamBoothServerStatus(StatusModel):
    conditions: list[Condition] = field(list, description="Standard conditions (Ready).")
    ready_replicas: int = field(0, description="Ready server pods.", ge=0)
    endpoint: str | None = field(None, description="In-cluster URL of the server's Service.")
    models: list[ServedModel] = field(list, description="The adapters published here.")
    published: int = field(0, description="How many adapters are published.", ge=0)
    observed_generation: int | None = field(None, description="Spec generation acted on.", ge=0)
    updated_at: datetime | None = field(None, description="When the publications last changed.")

    @model_validator(mode="after")
    def _count(self) -> DreamBoothServerStatus:
        # Printer columns cannot count a list.
        self.published = len(self.models)
        return self


class ServerMeta(ObjectMeta):
    name: str = Field(
        description="Server name (DNS label).",
        min_length=1,
        max_length=MAX_SERVER_NAME_LENGTH,
        pattern=JOB_NAME,
    )


class DreamBoothServer(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    api_version: Literal["dreambooth.dev/v1alpha1"] = Field(
        API_VERSION, description=f"The versioned schema of this object: {API_VERSION}."
    )
    kind: Literal["DreamBoothServer"] = Field(
        SERVER_KIND, description=f"The REST resource this object represents: {SERVER_KIND}."
    )
    metadata: ServerMeta
    spec: DreamBoothServerSpec = Field(
        description="One base model serving many jobs' LoRA adapters: replicas, hardware, the "
        "adapter cache and which namespaces may publish."
    )
    status: DreamBoothServerStatus | None = Field(
        None, description="What the operator observed; written by it, not by users."
    )
