"""Deciding, purely, for a DreamBoothServer: the server + what exists -> a Decision.

The server's children are a Deployment, a Service, a token-less ServiceAccount and the
ConfigMap holding the publication index. The index is derived, every pass, from the jobs that
name the server (`PublicationRequest`s from the operator's index of jobs): a job is in it while
it serves a LoRA export trained on the server's base model, from a namespace the server allows,
not suspended and not being deleted. Unpublishing is leaving a job out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dreambooth_contract import names, publication
from dreambooth_contract.publication import Publications, PublishedModel
from dreambooth_contract.server_api import DreamBoothServer, DreamBoothServerStatus, ServedModel

from . import builders
from .publishing import PublicationRequest, ServerView, refusal
from .reconcile import (
    EVENT_NORMAL,
    Action,
    ChildDeployment,
    Create,
    Event,
    Update,
    keep_serving,
    with_condition,
)

COND_READY = "Ready"


@dataclass(frozen=True)
class AnnotatePods:
    """Annotate the server's pods: a pod update makes the kubelet refresh its ConfigMap volumes
    at once (else on its periodic sync, about a minute later)."""

    selector: dict[str, str]
    annotations: dict[str, str]


@dataclass(frozen=True)
class ServerObserved:
    now: datetime
    deployment: ChildDeployment | None = None
    service: bool = False
    index: str | None = None  # the ConfigMap's publication index; None: no ConfigMap
    requests: tuple[PublicationRequest, ...] = ()


@dataclass
class ServerDecision:
    status: DreamBoothServerStatus
    actions: list[Action | AnnotatePods] = field(default_factory=list)

    def status_patch(self) -> dict[str, Any]:
        return self.status.model_dump(mode="json", by_alias=True, exclude_none=True)


def view_of(server: DreamBoothServer) -> ServerView:
    """The server as a job's reconcile sees it."""
    status = server.status or DreamBoothServerStatus()
    namespace = server.metadata.namespace or ""
    return ServerView(
        namespace=namespace,
        name=server.metadata.name,
        uid=getattr(server.metadata, "uid", None) or "",
        base_model=server.spec.base_model.uri,
        base_revision=server.spec.base_model.revision,
        allowed_namespaces=tuple(server.spec.allowed_namespaces),
        endpoint=builders.server_endpoint(namespace, server.metadata.name),
        ready_replicas=status.ready_replicas,
        models=tuple((m.name, m.digest) for m in status.models),
    )


def published(server: DreamBoothServer, requests: Iterable[PublicationRequest]) -> Publications:
    """What the server serves: every job that asks and that it takes."""
    view = view_of(server)
    models = [
        PublishedModel(
            name=publication.model_name(r.namespace, r.job),
            uri=r.artifact_uri or "",
            digest=r.artifact_digest or "",
        )
        for r in requests
        if r.ready and refusal(view, r.namespace, r.base_model, r.base_revision) is None
    ]
    return Publications(models=tuple(sorted(models, key=lambda m: m.name)))


def index_digest(index: str) -> str:
    return "sha256:" + hashlib.sha256(index.encode()).hexdigest()


def reconcile_server(server: DreamBoothServer, observed: ServerObserved) -> ServerDecision:
    """The server's new status and the actions that make its children match its spec."""
    before = server.status or DreamBoothServerStatus()
    generation = getattr(server.metadata, "generation", None)
    actions: list[Action | AnnotatePods] = []
    models = published(server, observed.requests)
    index = publication.render(models)
    actions += _publish(server, observed.index, index, models, before)
    running, ready = keep_serving(
        builders.server_deployment(server),
        observed.deployment,
        service=None if observed.service else builders.server_service(server),
        service_account=builders.server_service_account(server),
    )
    actions += running
    served = [ServedModel(name=m.name, digest=m.digest) for m in models.models]
    status = DreamBoothServerStatus(
        conditions=before.conditions,
        ready_replicas=ready,
        endpoint=builders.server_endpoint(server.metadata.namespace or "", server.metadata.name),
        models=served,
        observed_generation=generation,
        updated_at=before.updated_at if served == before.models else observed.now,
    )
    replicas = server.spec.replicas
    is_ready = ready >= min(replicas, 1)
    status.conditions, event = with_condition(
        status.conditions,
        COND_READY,
        is_ready,
        "Ready" if is_ready else "Starting",
        f"{ready}/{replicas} replicas ready, {len(served)} adapters published",
        observed.now,
        generation,
    )
    actions += [event] if event else []
    return ServerDecision(status, actions)


def _publish(
    server: DreamBoothServer,
    current: str | None,
    wanted: str,
    models: Publications,
    before: DreamBoothServerStatus,
) -> list[Action | AnnotatePods]:
    """Write the index (`wanted`, rendered from `models`) when it changed, nudge the pods, and
    tell what changed."""
    actions: list[Action | AnnotatePods] = []
    config_map = builders.publications_config_map(server, wanted)
    if current is None:
        actions.append(Create(config_map))
    elif current != wanted:
        actions.append(Update(config_map))
    if current is not None and current != wanted:
        selector = names.server_selector(server.metadata.name)
        actions.append(
            AnnotatePods(selector, {names.ANNOTATION_PUBLICATIONS: index_digest(wanted)})
        )
    was = {m.name: m.digest for m in before.models}
    now = {m.name: m.digest for m in models.models}
    for name in sorted(set(was) | set(now)):
        if was.get(name) == now.get(name):
            continue
        if name in now:
            message = f"published {name} ({now[name]})"
            actions.append(Event(EVENT_NORMAL, "Published", message))
        else:
            actions.append(Event(EVENT_NORMAL, "Unpublished", f"unpublished {name}"))
    return actions


def invalid(
    document: dict[str, Any], now: datetime, problems: list[str], reason: str = "InvalidSpec"
) -> ServerDecision:
    """A server spec the models refuse (a rule the CRD schema cannot express), or a child the
    API server refused: Ready False with their words; the children are left as they are."""
    meta = document.get("metadata") or {}
    before = DreamBoothServerStatus.model_validate(document.get("status") or {})
    conditions, event = with_condition(
        before.conditions,
        COND_READY,
        False,
        reason,
        "; ".join(problems),
        now,
        meta.get("generation"),
        warn=True,
    )
    status = before.model_copy(update={"conditions": conditions})
    return ServerDecision(status, [event] if event else [])
