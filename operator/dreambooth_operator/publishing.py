"""Who may publish to a DreamBoothServer, as both sides decide it (pure).

The job's reconcile refuses a job the server would not take (so that its user learns why, in a
condition, before the training is paid for); the server's reconcile publishes only the jobs it
takes. Both ask `refusal`, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from dreambooth_contract.api import Phase

REASON_BASE_MODEL_MISMATCH = "BaseModelMismatch"
REASON_NAMESPACE_NOT_ALLOWED = "NamespaceNotAllowed"


@dataclass(frozen=True)
class ServerView:
    """A DreamBoothServer as the operator's index holds it."""

    namespace: str
    name: str
    uid: str
    base_model: str
    base_revision: str | None
    allowed_namespaces: tuple[str, ...]
    endpoint: str
    ready_replicas: int = 0
    models: tuple[tuple[str, str], ...] = ()  # (model name, digest) as its status lists them

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def allows(self, namespace: str) -> bool:
        return namespace == self.namespace or bool({"*", namespace} & set(self.allowed_namespaces))

    def serves(self, model: str, digest: str) -> bool:
        return (model, digest) in self.models


@dataclass(frozen=True)
class PublicationRequest:
    """A DreamBoothJob that names a server, reduced to what publishing needs."""

    namespace: str
    job: str
    uid: str
    base_model: str
    base_revision: str | None
    phase: str | None = None
    suspended: bool = False
    deleting: bool = False
    artifact_kind: str | None = None
    artifact_uri: str | None = None
    artifact_digest: str | None = None

    @property
    def ready(self) -> bool:
        """Exported as an adapter and wanted: serving, not suspended, not being deleted."""
        return (
            self.phase == Phase.serving.value
            and not self.suspended
            and not self.deleting
            and self.artifact_kind == "lora"
            and bool(self.artifact_uri and self.artifact_digest)
        )


def _revision(revision: str | None) -> str:
    return f"@{revision}" if revision else ""


def refusal(
    server: ServerView, namespace: str, base_model: str, base_revision: str | None
) -> tuple[str, str] | None:
    """(reason, message) why the server does not take a job of `namespace` trained on this
    base model; None when it does."""
    if not server.allows(namespace):
        return REASON_NAMESPACE_NOT_ALLOWED, (
            f"DreamBoothServer {server.ref} does not allow jobs of namespace {namespace} "
            "(spec.allowedNamespaces)"
        )
    if (base_model, base_revision) != (server.base_model, server.base_revision):
        return REASON_BASE_MODEL_MISMATCH, (
            f"the job's base model {base_model}{_revision(base_revision)} differs from "
            f"DreamBoothServer {server.ref}'s {server.base_model}{_revision(server.base_revision)}"
            "; an adapter applies only to the model it was trained on"
        )
    return None
