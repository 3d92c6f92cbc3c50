"""Pure builders: a DreamBoothJob (+ what was observed) -> the manifests of its children.

No API calls here: every function returns plain dicts, so they are unit-tested by value and the
same spec always yields the same objects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from dreambooth_contract import env, names, publication
from dreambooth_contract.api import (
    API_VERSION,
    KIND,
    DreamBoothJob,
    ResourceRequirements,
    S3Spec,
)
from dreambooth_contract.server_api import SERVER_KIND, DreamBoothServer

Manifest = dict[str, Any]

# Time a trainer gets after SIGTERM to commit a checkpoint.
TERMINATION_GRACE_SECONDS = 120
# Size limits of the pods' /tmp (logs, metrics files, small staging) and /dev/shm (NCCL buffers,
# dataloader tensors): past them the kubelet evicts the pod instead of filling the node.
TMP_SIZE = "2Gi"
SHM_SIZE = "8Gi"

RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _controller(kind: str, meta) -> dict[str, Any]:
    """The ownerReference that makes the object `meta` describes its children's controller."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": meta.name,
        "uid": getattr(meta, "uid", None) or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owner_reference(job: DreamBoothJob) -> dict[str, Any]:
    return _controller(KIND, job.metadata)


def _metadata(job: DreamBoothJob, name: str, component: str | None = None, **labels: str) -> dict:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": names.labels(job.metadata.name, component, **labels),
        "ownerReferences": [owner_reference(job)],
    }


# ------------------------------------------------------------------------------ shared objects


def config_map(job: DreamBoothJob, trainer_config_json: str) -> Manifest:
    """The trainer config, produced from the spec; every pod of the job reads this one file."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, names.config_map(job.metadata.name)),
        "data": {env.CONFIG_FILE: trainer_config_json},
    }


def service_account(job: DreamBoothJob) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(job, names.service_account(job.metadata.name)),
    }


def inference_service_account(job: DreamBoothJob) -> Manifest:
    """The inference server answers unauthenticated requests, so it holds no Kubernetes
    credentials: an identity of its own, bound to no role, with no token mounted."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(
            job, names.inference_service_account(job.metadata.name), names.INFERENCE
        ),
        "automountServiceAccountToken": False,
    }


def status_role(job: DreamBoothJob) -> Manifest:
    """Least privilege: the job's pods may read and patch this one job's status, nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(job, names.status_role(job.metadata.name)),
        "rules": [
            {
                "apiGroups": [names.GROUP],
                "resources": ["dreamboothjobs/status"],
                "resourceNames": [job.metadata.name],
                "verbs": ["get", "patch"],
            }
        ],
    }


def status_role_binding(job: DreamBoothJob) -> Manifest:
    name = names.status_role(job.metadata.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(job, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": pod_service_account(job),
                "namespace": job.metadata.namespace,
            }
        ],
    }


def train_service(job: DreamBoothJob) -> Manifest:
    """Headless; publishes not-ready addresses so rank 0 resolves before it is Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names.train_service(job.metadata.name), names.TRAIN),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": names.selector(job.metadata.name, names.TRAIN),
            "ports": [
                {"name": "rendezvous", "port": env.RENDEZVOUS_PORT},
                {"name": "metrics", "port": env.TRAINER_METRICS_PORT},
            ],
        },
    }


def shared_objects(job: DreamBoothJob, trainer_config_json: str) -> list[Manifest]:
    """What every phase's pods need; created (idempotently) before any of them."""
    objects = [config_map(job, trainer_config_json), train_service(job)]
    if not job.spec.resources.service_account_name:
        objects.append(service_account(job))
    return [*objects, status_role(job), status_role_binding(job)]


def pod_service_account(job: DreamBoothJob) -> str:
    return job.spec.resources.service_account_name or names.service_account(job.metadata.name)


# ------------------------------------------------------------------------------ pods and Jobs

# The `dreambooth` subcommand each phase's pods run.
SUBCOMMANDS = {
    names.PRIORS: "priors",
    names.TRAIN: "train",
    names.EXPORT: "export",
    names.EVALUATE: "evaluate",
}
# Phases of one pod, and its name.
SINGLE_POD = {names.EXPORT: names.export_job, names.EVALUATE: names.evaluate_job}


def _resources(requirements: ResourceRequirements, gpus: int) -> dict[str, Any]:
    requests = {k: str(v) for k, v in requirements.requests.items()}
    limits = {k: str(v) for k, v in requirements.limits.items()}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _env(job: DreamBoothJob, rank: int, component: str) -> list[dict[str, Any]]:
    spec, meta = job.spec, job.metadata
    variables: list[dict[str, Any]] = [
        {"name": "NNODES", "value": str(spec.resources.nodes)},
        {"name": "NPROC_PER_NODE", "value": str(spec.resources.processes)},
        {"name": "NODE_RANK", "value": str(rank)},
        {"name": "MASTER_ADDR", "value": names.master_address(meta.name, meta.namespace)},
        {"name": "MASTER_PORT", "value": str(env.RENDEZVOUS_PORT)},
        {"name": env.JOB_NAME_ENV, "value": meta.name},
        {"name": env.JOB_NAMESPACE_ENV, "value": meta.namespace},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": env.METRICS_PORT_ENV, "value": str(env.TRAINER_METRICS_PORT)},
        # A read-only root filesystem: caches go to the emptyDir.
        {"name": "HOME", "value": "/cache"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": env.TERMINATION_LOG_ENV, "value": env.TERMINATION_LOG},
    ]
    if component == names.PRIORS:
        # Every process of a priors pod generates: prometheus_client's multiprocess mode lets
        # the first one serve their summed counts (on the pod's own /tmp emptyDir).
        variables.append({"name": "PROMETHEUS_MULTIPROC_DIR", "value": "/tmp/prometheus"})
    variables += _s3_credentials(spec.storage.s3)
    wandb = spec.tracking.wandb
    if wandb and wandb.api_key_secret and component in (names.TRAIN, names.EVALUATE):
        # The pods that log to W&B: the key from its Secret, never the value.
        secret = wandb.api_key_secret
        reference = {"name": secret.name, "key": secret.key}
        variables.append({"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": reference}})
    return variables


def _trainer_command(subcommand: str, torchrun: str) -> tuple[list[str], list[str]]:
    """torchrun with the operator's rendezvous variables, expanded by the kubelet ($(VAR))."""
    config = f"{env.CONFIG_MOUNT}/{env.CONFIG_FILE}"
    if torchrun == "none":
        return ["dreambooth"], [subcommand, "--config", config]
    if torchrun == "standalone":
        rendezvous = ["--standalone"]
    else:
        rendezvous = [
            "--nnodes=$(NNODES)",
            "--node-rank=$(NODE_RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
        ]
    # torchrun's own default gives workers 30 s after SIGTERM; ours need the pod's grace
    # period to commit a checkpoint.
    shutdown = f"--shutdown-timeout={TERMINATION_GRACE_SECONDS - 10}"
    args = [*rendezvous, "--nproc-per-node=$(NPROC_PER_NODE)", shutdown, "--no-python"]
    return ["torchrun"], [*args, "dreambooth", subcommand, "--config", config]


def pod_template(
    job: DreamBoothJob, component: str, rank: int, attempt: int, gpus: int
) -> dict[str, Any]:
    spec, job_name = job.spec, job.metadata.name
    torchrun = {names.TRAIN: "rendezvous", names.PRIORS: "standalone"}.get(component, "none")
    if component == names.PRIORS and spec.resources.processes == 1:
        # One generating process: torchrun would only add its own start and exit (2-5 s of a
        # pod's life). The shard is then NODE_RANK of NNODES (priors.shard_from_env).
        torchrun = "none"
    command, args = _trainer_command(SUBCOMMANDS[component], torchrun)
    pod_labels = names.labels(
        job_name, component, **{names.LABEL_RANK: str(rank), names.LABEL_ATTEMPT: str(attempt)}
    )
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": pod_service_account(job),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "securityContext": RESTRICTED_POD_SECURITY,
        "containers": [
            {
                "name": "trainer",
                "image": spec.resources.image,
                "imagePullPolicy": spec.resources.image_pull_policy,
                "command": command,
                "args": args,
                "env": _env(job, rank, component),
                "ports": [
                    {"name": "rendezvous", "containerPort": env.RENDEZVOUS_PORT},
                    {"name": "metrics", "containerPort": env.TRAINER_METRICS_PORT},
                ],
                "resources": _resources(spec.resources.resources, gpus),
                "securityContext": RESTRICTED_CONTAINER_SECURITY,
                "terminationMessagePath": env.TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [
                    {"name": "config", "mountPath": env.CONFIG_MOUNT, "readOnly": True},
                    {"name": "cache", "mountPath": "/cache"},
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": names.config_map(job_name)}},
            *_scratch_volumes(job.spec.resources.cache_size),
            # NCCL and dataloader workers need more shared memory than the 64Mi default; it
            # counts against the pod's memory, so it is bounded too.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
        ],
    }
    if component == names.TRAIN:
        pod_spec["hostname"] = names.rank_job(job_name, names.TRAIN, rank)
        pod_spec["subdomain"] = names.train_service(job_name)
    for key, value in (
        ("nodeSelector", spec.resources.node_selector),
        (
            "tolerations",
            [t.model_dump(by_alias=True, exclude_none=True) for t in spec.resources.tolerations],
        ),
        ("priorityClassName", spec.resources.priority_class_name),
    ):
        if value:
            pod_spec[key] = value
    return {"metadata": {"labels": pod_labels}, "spec": pod_spec}


def _gpus(job: DreamBoothJob, component: str) -> int:
    """Export copies weights (no GPU); the evaluation generates images on one GPU at most
    (none for a CPU job); priors and training pods get every GPU of their node."""
    gpus = job.spec.resources.gpus_per_node
    return {names.EXPORT: 0, names.EVALUATE: min(gpus, 1)}.get(component, gpus)


def batch_job(job: DreamBoothJob, component: str, rank: int, attempt: int) -> Manifest:
    """One pod, no retries: the operator decides about restarts (of the whole gang)."""
    name = (
        SINGLE_POD[component](job.metadata.name)
        if component in SINGLE_POD
        else names.rank_job(job.metadata.name, component, rank)
    )
    gpus = _gpus(job, component)
    passed = {k: v for k, v in job.metadata.labels.items() if k in names.PASS_THROUGH_LABELS}
    metadata = _metadata(
        job,
        name,
        component,
        **{names.LABEL_RANK: str(rank), names.LABEL_ATTEMPT: str(attempt)},
        **passed,
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "parallelism": 1,
            "completions": 1,
            "backoffLimit": 0,
            "template": pod_template(job, component, rank, attempt, gpus),
        },
    }


def phase_jobs(job: DreamBoothJob, component: str, attempt: int) -> list[Manifest]:
    """All batch Jobs of a phase: one per node for priors and training, one for export and
    one for the evaluation."""
    ranks = 1 if component in SINGLE_POD else job.spec.resources.nodes
    return [batch_job(job, component, rank, attempt) for rank in range(ranks)]


# ------------------------------------------------------------------------------ inference

INFERENCE_PORT = 8000
ANNOTATION_TEMPLATE_HASH = f"{names.GROUP}/template-hash"
ANNOTATION_ARTIFACT_DIGEST = f"{names.GROUP}/artifact-digest"


def _template_hash(template: dict[str, Any]) -> str:
    """Stable hash of what we asked for, so a changed spec or artifact is seen without diffing."""
    encoded = json.dumps(template, sort_keys=True).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def _serve_args(
    job: DreamBoothJob, artifact_uri: str, digest: str, base_model: str | None
) -> list[str]:
    if base_model is None:
        args = ["serve", "--model", artifact_uri, "--digest", digest]
    else:
        # A LoRA export: the base as recorded by the export, the adapter checked by its digest.
        args = ["serve", "--model", base_model, "--adapter", artifact_uri, "--digest", digest]
    inference = job.spec.inference
    return [
        *args,
        "--served-model-name",
        job.metadata.name,
        *_s3_args(job.spec.storage.s3),
        *_device_args(inference.gpus, inference.resources),
    ]


def _scratch_volumes(cache_size: int | str) -> list[dict[str, Any]]:
    """The cache and /tmp of a pod (its root filesystem is read-only), each with a size limit
    so one pod cannot fill its node's disk."""
    return [
        {"name": "cache", "emptyDir": {"sizeLimit": str(cache_size)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}},
    ]


def _cpu_cores(quantity: int | str) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _s3_credentials(s3: S3Spec) -> list[dict[str, Any]]:
    """The S3 keys as environment variables read from the spec's Secret (never the values)."""
    secret = s3.credentials_secret
    if not secret:
        return []
    return [
        {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}}
        for variable, key in (
            ("AWS_ACCESS_KEY_ID", secret.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", secret.secret_access_key_key),
        )
    ]


def _s3_args(s3: S3Spec) -> list[str]:
    args: list[str] = []
    for flag, value in (("--s3-endpoint", s3.endpoint), ("--s3-region", s3.region)):
        if value:
            args += [flag, value]
    return args


def _device_args(gpus: int, resources: ResourceRequirements) -> list[str]:
    if gpus:
        return []
    # A pod that asked for no GPU may still see the node's GPUs (runtimes that expose all of
    # them to every container): "auto" would take one that is not the pod's.
    args = ["--device", "cpu"]
    cpu_limit = resources.limits.get("cpu")
    if cpu_limit is not None:
        # torch sizes its thread pool from the node's cores; more threads than the pod's CPU
        # limit makes every call many times slower.
        args += ["--cpu-threads", str(max(1, int(_cpu_cores(cpu_limit))))]
    return args


@dataclass(frozen=True)
class ServerPod:
    """What differs between a job's own inference pods and a DreamBoothServer's."""

    labels: dict[str, str]
    service_account: str
    image: str
    image_pull_policy: str
    args: list[str]
    env: list[dict[str, Any]]
    resources: dict[str, Any]
    volumes: list[dict[str, Any]]
    mounts: list[dict[str, Any]] = dataclass_field(default_factory=list)


def _server_template(pod: ServerPod) -> dict[str, Any]:
    """An OpenAI-compatible image server: probes, hardening, no Kubernetes token."""
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5}
    container = {
        "name": "server",
        "image": pod.image,
        "imagePullPolicy": pod.image_pull_policy,
        "command": ["dreambooth"],
        "args": [*pod.args, "--host", "0.0.0.0", "--port", str(INFERENCE_PORT)],
        "env": [
            # A read-only root filesystem: caches go to the emptyDir.
            {"name": "HOME", "value": "/cache"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *pod.env,
        ],
        "ports": [{"name": "http", "containerPort": INFERENCE_PORT}],
        "readinessProbe": probe,
        "startupProbe": {**probe, "failureThreshold": 120},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
        "resources": pod.resources,
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        "volumeMounts": [
            {"name": "cache", "mountPath": "/cache"},
            {"name": "tmp", "mountPath": "/tmp"},
            *pod.mounts,
        ],
    }
    return {
        "metadata": {"labels": pod.labels},
        "spec": {
            "serviceAccountName": pod.service_account,
            "automountServiceAccountToken": False,
            "securityContext": RESTRICTED_POD_SECURITY,
            "containers": [container],
            "volumes": pod.volumes,
        },
    }


def _server_deployment(
    metadata: dict[str, Any],
    replicas: int,
    selector: dict[str, str],
    template: dict[str, Any],
    **annotations: str,
) -> Manifest:
    """A Deployment annotated with the hash of what was asked for (a change is an Update)."""
    metadata["annotations"] = {
        ANNOTATION_TEMPLATE_HASH: _template_hash({"replicas": replicas, **template}),
        **annotations,
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {"replicas": replicas, "selector": {"matchLabels": selector}, "template": template},
    }


def inference_deployment(
    job: DreamBoothJob, artifact_uri: str, digest: str, base_model: str | None = None
) -> Manifest:
    """Serves exactly one exported artifact; a new digest rolls the Deployment.

    With `base_model` the artifact is a LoRA adapter, served on that base model.
    """
    spec, job_name = job.spec, job.metadata.name
    inference = spec.inference
    pod = ServerPod(
        labels=names.labels(job_name, names.INFERENCE),
        service_account=names.inference_service_account(job_name),
        image=inference.image or spec.resources.image,
        image_pull_policy=spec.resources.image_pull_policy,
        args=_serve_args(job, artifact_uri, digest, base_model),
        env=_s3_credentials(spec.storage.s3),
        resources=_resources(inference.resources, inference.gpus),
        volumes=_scratch_volumes(job.spec.resources.cache_size),
    )
    return _server_deployment(
        _metadata(job, names.inference(job_name), names.INFERENCE),
        inference.replicas,
        names.selector(job_name, names.INFERENCE),
        _server_template(pod),
        **{ANNOTATION_ARTIFACT_DIGEST: digest},
    )


def inference_service(job: DreamBoothJob) -> Manifest:
    job_name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names.inference(job_name), names.INFERENCE),
        "spec": {
            "selector": names.selector(job_name, names.INFERENCE),
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def inference_endpoint(job: DreamBoothJob) -> str:
    return f"http://{names.inference(job.metadata.name)}.{job.metadata.namespace}.svc"


# ------------------------------------------------------------------------------ DreamBoothServer

PUBLICATIONS_MOUNT = "/etc/dreambooth/publications"


def _server_metadata(server: DreamBoothServer, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": server.metadata.namespace,
        "labels": names.server_labels(server.metadata.name),
        "ownerReferences": [_controller(SERVER_KIND, server.metadata)],
    }


def publications_config_map(server: DreamBoothServer, index: str) -> Manifest:
    """The publication index (contract publication.py), mounted into every server pod."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _server_metadata(server, names.publications(server.metadata.name)),
        "data": {publication.PUBLICATIONS_FILE: index},
    }


def server_service_account(server: DreamBoothServer) -> Manifest:
    """Bound to no role, no token mounted: publications reach the server as a file."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _server_metadata(server, names.server(server.metadata.name)),
        "automountServiceAccountToken": False,
    }


def server_deployment(server: DreamBoothServer) -> Manifest:
    """The base model, serving whatever the mounted index publishes. A change of the index is
    not a change of the Deployment: the pods re-read the file, nothing restarts."""
    spec, name = server.spec, server.metadata.name
    args = [
        "serve",
        "--model",
        spec.base_model.uri,
        "--publications",
        PUBLICATIONS_MOUNT,
        "--max-loaded-adapters",
        str(spec.max_loaded_adapters),
        "--default-steps",
        str(spec.default_steps),
        "--default-guidance-scale",
        str(spec.default_guidance_scale),
        *(["--default-scheduler", spec.default_scheduler] if spec.default_scheduler else []),
        *_s3_args(spec.s3),
        *_device_args(spec.gpus, spec.resources),
    ]
    pod = ServerPod(
        labels=names.server_labels(name),
        service_account=names.server(name),
        image=spec.image,
        image_pull_policy=spec.image_pull_policy,
        args=args,
        env=_s3_credentials(spec.s3),
        resources=_resources(spec.resources, spec.gpus),
        volumes=[
            *_scratch_volumes(spec.cache_size),
            {"name": "publications", "configMap": {"name": names.publications(name)}},
        ],
        mounts=[{"name": "publications", "mountPath": PUBLICATIONS_MOUNT, "readOnly": True}],
    )
    return _server_deployment(
        _server_metadata(server, names.server(name)),
        spec.replicas,
        names.server_selector(name),
        _server_template(pod),
    )


def server_service(server: DreamBoothServer) -> Manifest:
    name = server.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _server_metadata(server, names.server(name)),
        "spec": {
            "selector": names.server_selector(name),
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }


def server_endpoint(namespace: str, name: str) -> str:
    return f"http://{names.server(name)}.{namespace}.svc"
