"""Thin kopf handlers: observe (from kopf's in-memory indexes), reconcile (pure), act (kube.py).

One daemon per DreamBoothJob loops reconcile -> act -> wait, woken early by events of the
job's children. Observing reads kopf indexes fed by watches, so a reconcile costs no list calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, NamedTuple

import click
import kopf

from dreambooth_contract import names
from dreambooth_contract.api import GROUP, PLURAL, VERSION, DreamBoothJob
from dreambooth_contract.validation import JobInvalid, parse_job

from . import builders, kube, liveness, metrics
from .reconcile import (
    COND_FAILED,
    COND_TRAINING_STARTED,
    ChildDeployment,
    ChildJob,
    ChildPod,
    Create,
    Decision,
    Delete,
    DeleteSelf,
    Event,
    Observed,
    Update,
    effective_spec,
    immutable_changes,
    reconcile,
)
from .trainer_inputs import trainer_inputs

log = logging.getLogger(__name__)

TERMINAL_PHASES = ("Succeeded", "Failed")
RESYNC_SECONDS = 10.0  # level-triggered safety net on top of child events
FINISHED_RESYNC_SECONDS = 60.0
# A pass makes a handful of API calls, each bounded by kube.TIMEOUT (and urllib3's retries of a
# GET): one still running after this long is stuck, and the liveness probe says so.
STUCK_PASS_SECONDS = 600
OWNED = {names.LABEL_MANAGED_BY: names.MANAGER}

_wakeups: dict[tuple[str, str], asyncio.Event] = {}


# What the operator watches besides DreamBoothJobs: only objects it made (the API server
# filters by label, so the operator neither receives nor remembers anything else).
CHILD_RESOURCES = (("batch", "v1", "jobs"), ("", "v1", "pods"), ("apps", "v1", "deployments"),
                   ("", "v1", "services"))  # fmt: skip


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Fixed once: changing these later would orphan the state kopf stored under the old names.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    # kopf's own short calls (status patches, events): bounded like ours in kube.py.
    settings.networking.connect_timeout, settings.networking.request_timeout = kube.TIMEOUT
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 32
    if memo.get("filter_children", True):
        managed = ",".join(f"{key}={value}" for key, value in OWNED.items())
        for resource in CHILD_RESOURCES:
            settings.watching.label_selectors[resource] = managed
    kube.load_config()


@kopf.on.probe(id="reconcile")
def no_stuck_pass(memo: kopf.Memo, **_: Any) -> str:
    """Fails /healthz (so the kubelet restarts the operator) while a pass is stuck."""
    stuck = memo.passes.stuck()
    if stuck:
        raise kopf.PermanentError(f"reconcile stuck: {'; '.join(stuck)}")
    return "ok"


# ------------------------------------------------------------------------------ indexes


@kopf.index("batch", "v1", "jobs", labels=OWNED)
def owned_jobs(namespace: str, name: str, labels: dict, status: dict, meta: dict, **_: Any):
    succeeded = (status.get("succeeded") or 0) > 0
    failed = (status.get("failed") or 0) > 0
    return {
        (namespace, labels[names.LABEL_JOB]): ChildJob(
            name=name,
            component=labels.get(names.LABEL_COMPONENT, ""),
            rank=int(labels.get(names.LABEL_RANK, 0)),
            attempt=int(labels.get(names.LABEL_ATTEMPT, 0)),
            succeeded=succeeded,
            failed=failed,
            deleting=bool(meta.get("deletionTimestamp")),
            uid=meta.get("uid", ""),
            owner_uid=_controller_uid(meta),
        )
    }


def _controller_uid(meta: dict) -> str:
    """The UID of the object's controller (its ownerReference with controller: true)."""
    refs = meta.get("ownerReferences") or []
    return next((r.get("uid", "") for r in refs if r.get("controller")), "")


@kopf.index("", "v1", "pods", labels=OWNED)
def owned_pods(namespace: str, name: str, labels: dict, status: dict, meta: dict, **_: Any):
    terminated = (
        next(
            (
                s.get("state", {}).get("terminated")
                for s in status.get("containerStatuses") or []
                if s.get("state", {}).get("terminated")
            ),
            None,
        )
        or {}
    )
    return {
        (namespace, labels[names.LABEL_JOB]): ChildPod(
            name=name,
            component=labels.get(names.LABEL_COMPONENT, ""),
            rank=int(labels.get(names.LABEL_RANK, 0)),
            attempt=int(labels.get(names.LABEL_ATTEMPT, 0)),
            phase=status.get("phase", "Pending"),
            exit_code=terminated.get("exitCode"),
            message=terminated.get("message") or "",
            owner_uid=_controller_uid(meta),
        )
    }


@kopf.index("apps", "v1", "deployments", labels=OWNED)
def owned_deployments(namespace: str, labels: dict, meta: dict, status: dict, **_: Any):
    annotations = meta.get("annotations") or {}
    return {
        (namespace, labels[names.LABEL_JOB]): ChildDeployment(
            template_hash=annotations.get(builders.ANNOTATION_TEMPLATE_HASH, ""),
            ready_replicas=status.get("readyReplicas") or 0,
            owner_uid=_controller_uid(meta),
        )
    }


@kopf.index("", "v1", "services", labels={**OWNED, names.LABEL_COMPONENT: names.INFERENCE})
def owned_inference_services(namespace: str, labels: dict, meta: dict, **_: Any):
    """The UID of the DreamBoothJob that owns the job's inference Service."""
    return {(namespace, labels[names.LABEL_JOB]): _controller_uid(meta)}


class OutputClaim(NamedTuple):
    """A live job writing to an outputUri; the earliest created keeps it."""

    created: str
    namespace: str
    name: str
    uid: str


@kopf.index(GROUP, VERSION, PLURAL)
def live_outputs(namespace: str, name: str, spec: dict, status: dict, meta: dict, **_: Any):
    """outputUri -> the jobs not yet finished that write there."""
    if status.get("phase") in TERMINAL_PHASES:
        return None
    uri = ((spec.get("storage") or {}).get("outputUri") or "").rstrip("/")
    claim = OutputClaim(meta.get("creationTimestamp", ""), namespace, name, meta.get("uid", ""))
    return {uri: claim} if uri else None


def output_taken_by(uid: str, claims: Iterable[OutputClaim]) -> str | None:
    """The live job created before this one that writes to the same outputUri, if any."""
    ranked = sorted(claims)  # by creation time, then namespace and name
    first = next(iter(ranked), None)
    if first is None or first.uid == uid or all(c.uid != uid for c in ranked):
        return None
    return f"{first.namespace}/{first.name}"


@kopf.index(GROUP, VERSION, PLURAL)
def job_phases(namespace: str, name: str, status: dict, **_: Any):
    return {(namespace, name): status.get("phase") or "Pending"}


def _wake(namespace: str, labels: dict) -> None:
    wakeup = _wakeups.get((namespace, labels.get(names.LABEL_JOB, "")))
    if wakeup:
        wakeup.set()


@kopf.on.event("batch", "v1", "jobs", labels=OWNED)
def job_changed(namespace: str, labels: dict, **_: Any) -> None:
    _wake(namespace, labels)


@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
def deployment_changed(namespace: str, labels: dict, **_: Any) -> None:
    _wake(namespace, labels)


@kopf.on.event("", "v1", "services", labels={**OWNED, names.LABEL_COMPONENT: names.INFERENCE})
def service_changed(namespace: str, labels: dict, **_: Any) -> None:
    _wake(namespace, labels)


@kopf.on.event("", "v1", "pods", labels=OWNED)
def pod_changed(namespace: str, labels: dict, **_: Any) -> None:
    _wake(namespace, labels)


@kopf.on.create(GROUP, VERSION, PLURAL)
def job_created(**_: Any) -> None:
    metrics.JOBS_CREATED.inc()


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def spec_changed(namespace: str, name: str, **_: Any) -> None:
    _wake(namespace, {names.LABEL_JOB: name})


# ------------------------------------------------------------------------------ the daemon


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=5.0)
async def drive(
    stopped: kopf.DaemonStopped,
    namespace: str,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    owned_jobs: kopf.Index,
    owned_pods: kopf.Index,
    owned_deployments: kopf.Index,
    owned_inference_services: kopf.Index,
    live_outputs: kopf.Index,
    **_: Any,
) -> None:
    key = (namespace, name)
    wakeup = _wakeups.setdefault(key, asyncio.Event())
    try:
        while not stopped:
            wakeup.clear()
            started = time.perf_counter()
            uid = body["metadata"].get("uid", "")
            output_uri = (body["spec"].get("storage") or {}).get("outputUri", "").rstrip("/")
            children = children_of(
                uid,
                owned_jobs.get(key, ()),
                owned_pods.get(key, ()),
                owned_deployments.get(key, ()),
                owned_inference_services.get(key, ()),
                output_taken_by(uid, live_outputs.get(output_uri, ())),
            )
            with memo.passes.running(f"{namespace}/{name}"):
                finished = await asyncio.to_thread(
                    reconcile_once, copy.deepcopy(dict(body)), children
                )
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
            timeout = FINISHED_RESYNC_SECONDS if finished else RESYNC_SECONDS
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=timeout)
    finally:
        _wakeups.pop(key, None)


class Children(NamedTuple):
    """What the indexes hold for one job."""

    jobs: tuple[ChildJob, ...]
    pods: tuple[ChildPod, ...]
    deployment: ChildDeployment | None
    inference_service: bool
    output_taken_by: str | None = None  # see Observed


def children_of(
    uid: str,
    jobs: Iterable[ChildJob],
    pods: Iterable[ChildPod],
    deployments: Iterable[ChildDeployment],
    inference_services: Iterable[str],
    output_taken_by: str | None = None,
) -> Children:
    """What the job with this UID owns, of what the indexes hold under its name.

    Names and labels are not enough: a job deleted and created again under the same name would
    adopt the old one's Jobs, pods and Deployment while the garbage collector deletes them.
    Jobs and the Deployment must name this job as their controller; pods, one of those Jobs.
    """
    mine = tuple(j for j in jobs if j.owner_uid == uid)
    job_uids = {j.uid for j in mine}
    return Children(
        jobs=mine,
        pods=tuple(p for p in pods if p.owner_uid in job_uids),
        deployment=next((d for d in deployments if d.owner_uid == uid), None),
        inference_service=uid in inference_services,
        output_taken_by=output_taken_by,
    )


def reconcile_once(document: dict[str, Any], children: Children, *, fresh: bool = False) -> bool:
    """Observe, decide, act. Returns True when the job is finished.

    kopf's copy of the job lags our own writes by a watch event. Acting on a stale status could
    undo what the last pass did (create the previous attempt's pods again right after a gang
    restart), so a pass that writes decides on a fresh read; a pass with nothing to do makes no
    API call at all.
    """
    meta = document["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    if not fresh and names.ANNOTATION_APPLIED_SPEC not in (meta.get("annotations") or {}):
        return _on_fresh_read(namespace, name, children)  # recording the applied spec writes
    try:
        job, decision = _decide(document, children)
    except JobInvalid as invalid:
        if not fresh:
            return _on_fresh_read(namespace, name, children)  # failing the job writes
        _reject(document, invalid, children)
        return True
    if not fresh and _would_write(document, decision):
        latest = kube.read_job(namespace, name)
        if latest is None:
            return True
        if latest["metadata"]["resourceVersion"] != meta.get("resourceVersion"):
            return reconcile_once(latest, children, fresh=True)
    _act(document, decision)
    _record_metrics(job, decision)
    return decision.status.phase in TERMINAL_PHASES


def _on_fresh_read(namespace: str, name: str, children: Children) -> bool:
    latest = kube.read_job(namespace, name)
    return latest is None or reconcile_once(latest, children, fresh=True)


def _decide(document: dict[str, Any], children: Children) -> tuple[DreamBoothJob, Decision]:
    """The job parsed from this document and what reconcile decides for it (recording the
    applied spec first if it is not yet); raises JobInvalid for a spec the models refuse."""
    meta = document["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    current_spec = document.get("spec", {})
    applied_raw = meta.get("annotations", {}).get(names.ANNOTATION_APPLIED_SPEC)
    if applied_raw is None:
        kube.patch_job_annotations(
            namespace,
            name,
            {names.ANNOTATION_APPLIED_SPEC: json.dumps(current_spec, sort_keys=True)},
        )
        applied = current_spec
    else:
        applied = json.loads(applied_raw)
    document["spec"] = effective_spec(applied, current_spec)
    job = parse_job(document)
    config_json, cache = trainer_inputs(job)
    observed = Observed(
        now=datetime.now(timezone.utc),
        jobs=children.jobs,
        pods=children.pods,
        prior_cache=cache,
        inference=children.deployment,
        inference_service=children.inference_service,
        trainer_config_json=config_json,
        rejected_changes=tuple(immutable_changes(applied, current_spec)),
        output_taken_by=children.output_taken_by,
    )
    return job, reconcile(job, observed)


def _changes_status(document: dict[str, Any], decision: Decision) -> bool:
    # The API server stores no nulls: a null in the patch matches an absent field.
    current = document.get("status") or {}
    return any(current.get(k) != _without_nulls(v) for k, v in decision.status_patch().items())


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _would_write(document: dict[str, Any], decision: Decision) -> bool:
    acts = any(not isinstance(action, Event) for action in decision.actions)
    return acts or _changes_status(document, decision)


def _act(document: dict[str, Any], decision: Decision) -> None:
    meta = document["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    if decision.status.restarts > (document.get("status") or {}).get("restarts", 0):
        # A gang restart is recorded before its Jobs are deleted: an operator that dies in
        # between must not lose the count (and with it the backoff limit). The next pass
        # deletes the previous attempt's Jobs as stale.
        kube.patch_job_status(namespace, name, decision.status_patch())
    try:
        for action in decision.actions:
            if isinstance(action, Create):
                kube.create(action.manifest)
            elif isinstance(action, Update):
                kube.replace(action.manifest)
            elif isinstance(action, Delete):
                kube.delete(action.kind, namespace, action.name)
            elif isinstance(action, DeleteSelf):
                kube.delete_job(namespace, name)
                return
    except kube.Rejected as rejected:
        # Something validation let through (requests above limits, say): fail with the API
        # server's words instead of retrying for ever in Pending.
        _fail(document, "ChildRejected", str(rejected))
        return
    except kube.OwnedByAnother as taken:
        # A deleted namesake's child, on its way out: act once it is gone (a later pass).
        log.info("%s/%s waits: %s", namespace, name, taken)
        return
    if _changes_status(document, decision):
        kube.patch_job_status(namespace, name, decision.status_patch())
    for action in decision.actions:
        if isinstance(action, Event):
            kopf.event(document, type=action.type, reason=action.reason, message=action.message)


def _reject(document: dict[str, Any], invalid: JobInvalid, children: Children) -> None:
    """Specs the CRD schema cannot catch (cross-field rules) fail with the validator's words.

    A running job can meet a rule only a newer operator has: what it runs stops too, rather
    than training on under a Failed job.
    """
    meta = document["metadata"]
    for job in children.jobs:
        if not job.deleting and not job.succeeded:
            kube.delete("Job", meta["namespace"], job.name)
    if children.deployment is not None:
        kube.delete("Deployment", meta["namespace"], names.inference(meta["name"]))
    _fail(document, "InvalidSpec", "; ".join(invalid.problems))


def _fail(document: dict[str, Any], reason: str, message: str) -> None:
    """Phase Failed with a Failed condition, a Warning event and the failure counted (once)."""
    meta = document["metadata"]
    status = document.get("status") or {}
    if status.get("phase") == "Failed":
        return
    now = datetime.now(timezone.utc).isoformat()
    kube.patch_job_status(
        meta["namespace"],
        meta["name"],
        {
            "phase": "Failed",
            "completionTime": now,
            "conditions": [
                *(c for c in status.get("conditions") or [] if c.get("type") != COND_FAILED),
                {
                    "type": COND_FAILED,
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": now,
                    "observedGeneration": meta.get("generation"),
                },
            ],
        },
    )
    kopf.event(document, type="Warning", reason=reason, message=message)
    metrics.JOBS_FAILED.labels(reason).inc()


def _record_metrics(job: DreamBoothJob, decision: Decision) -> None:
    before = job.status
    after = decision.status
    if after.phase != (before.phase if before else None):
        if after.phase == "Succeeded":
            metrics.JOBS_SUCCEEDED.inc()
        elif after.phase == "Failed":
            reason = next((c.reason for c in after.conditions if c.type == COND_FAILED), "Unknown")
            metrics.JOBS_FAILED.labels(reason).inc()
    restarts_before = before.restarts if before else 0
    if after.restarts > restarts_before:
        metrics.GANG_RESTARTS.inc(after.restarts - restarts_before)
    started_before = before and any(c.type == COND_TRAINING_STARTED for c in before.conditions)
    if not started_before and any(c.type == COND_TRAINING_STARTED for c in after.conditions):
        created = getattr(job.metadata, "creationTimestamp", None)
        if created:
            born = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
            metrics.TIME_TO_FIRST_STEP.observe((datetime.now(timezone.utc) - born).total_seconds())


# ------------------------------------------------------------------------------ entry point

_phase_index: kopf.Index | None = None


@kopf.on.startup()
def _keep_phase_index(job_phases: kopf.Index, **_: Any) -> None:
    global _phase_index
    _phase_index = job_phases


def _phases() -> Iterable[str]:
    for values in (_phase_index or {}).values():
        yield from values


@click.command("operator")
@click.option("-n", "--namespace", "namespaces", multiple=True, help="Watch only these namespaces.")
@click.option("--metrics-port", default=8000, show_default=True, help="Prometheus /metrics port.")
@click.option("--health-port", default=8080, show_default=True, help="Liveness /healthz port.")
@click.option(
    "--stuck-pass-seconds",
    default=STUCK_PASS_SECONDS,
    show_default=True,
    help="Fail /healthz while a reconcile pass has run longer than this.",
)
@click.option(
    "--server-side-filtering/--no-server-side-filtering",
    default=True,
    show_default=True,
    help="Watch only the Jobs, pods, Deployments and Services the operator made (off: every "
    "one, filtered here; for comparison in benchmarks).",
)
@click.option("--kubeconfig", envvar="KUBECONFIG", help="Outside a cluster: the kubeconfig to use.")
@click.option("--verbose", is_flag=True, help="Debug logging.")
def operator_command(
    namespaces: tuple[str, ...],
    metrics_port: int,
    health_port: int,
    stuck_pass_seconds: int,
    server_side_filtering: bool,
    kubeconfig: str | None,
    verbose: bool,
) -> None:
    """Run the operator: reconcile DreamBoothJobs until stopped."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO)
    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # for kopf's login and for kube.load_config
    metrics.serve(metrics_port, _phases)
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
        memo=kopf.Memo(
            passes=liveness.PassTracker(stuck_pass_seconds),
            filter_children=server_side_filtering,
        ),
    )
