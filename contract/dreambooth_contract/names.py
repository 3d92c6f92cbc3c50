"""Deterministic names and labels of everything a DreamBoothJob owns.

Never generateName: a retried create must hit 409 (already there), not make a twin.
"""

from __future__ import annotations

from .api import GROUP

LABEL_JOB = f"{GROUP}/job"
LABEL_SERVER = f"{GROUP}/server"  # what a DreamBoothServer owns carries this instead
LABEL_COMPONENT = f"{GROUP}/component"
LABEL_RANK = f"{GROUP}/rank"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "dreambooth-operator"
# Labels copied from the DreamBoothJob to its batch Jobs (queueing systems look for them).
PASS_THROUGH_LABELS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")

ANNOTATION_APPLIED_SPEC = f"{GROUP}/applied-spec"

PRIORS = "priors"
TRAIN = "train"
EXPORT = "export"
EVALUATE = "evaluate"
INFERENCE = "inference"
SERVER = "server"
# Annotated on a server's pods with the publication index's digest after each change: a pod
# update makes the kubelet refresh the pod's ConfigMap volumes now, not on its next periodic sync.
ANNOTATION_PUBLICATIONS = f"{GROUP}/publications-digest"


def config_map(job: str) -> str:
    return f"{job}-config"


def service_account(job: str) -> str:
    return f"{job}-trainer"


def status_role(job: str) -> str:
    return f"{job}-status-writer"


def rank_job(job: str, component: str, rank: int) -> str:
    return f"{job}-{component}-{rank}"


def export_job(job: str) -> str:
    return f"{job}-{EXPORT}"


def evaluate_job(job: str) -> str:
    return f"{job}-{EVALUATE}"


def train_service(job: str) -> str:
    """Headless Service whose subdomain gives rank 0 a stable DNS name."""
    return f"{job}-{TRAIN}"


def inference(job: str) -> str:
    return f"{job}-{INFERENCE}"


def inference_service_account(job: str) -> str:
    """The inference pods' identity: no permissions, no token (see builders)."""
    return f"{job}-{INFERENCE}"


def master_address(job: str, namespace: str) -> str:
    return f"{rank_job(job, TRAIN, 0)}.{train_service(job)}.{namespace}.svc"


def selector(job: str, component: str | None = None) -> dict[str, str]:
    labels = {LABEL_JOB: job}
    if component:
        labels[LABEL_COMPONENT] = component
    return labels


def labels(job: str, component: str | None = None, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dreambooth",
        "app.kubernetes.io/instance": job,
        LABEL_MANAGED_BY: MANAGER,
        **selector(job, component),
        **extra,
    }


def server(name: str) -> str:
    """A DreamBoothServer's Deployment, Service and ServiceAccount."""
    return f"{name}-{SERVER}"


def publications(name: str) -> str:
    """The ConfigMap holding a DreamBoothServer's publication index."""
    return f"{name}-publications"


def server_selector(name: str) -> dict[str, str]:
    return {LABEL_SERVER: name, LABEL_COMPONENT: SERVER}


def server_labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "dreambooth-server",
        "app.kubernetes.io/instance": name,
        LABEL_MANAGED_BY: MANAGER,
        **server_selector(name),
    }
