"""Thin kopf handlers: observe (from kopf's in-memory indexes), decide (reconcile.py, pure),
act (actions.py).

One daemon per DreamBoothJob loops decide -> act -> wait, woken early by events of the job's
children. Observing reads kopf indexes fed by watches, so a reconcile costs no list calls. What
the handlers share (the daemons' wake-up calls, the phase index for the metrics) lives in kopf's
memo, made once by the operator's startup.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import Any, NamedTuple

import click
import kopf

from dreambooth_contract import names, publication
from dreambooth_contract.api import (
    GROUP,
    PLURAL,
    TERMINAL_PHASES,
    VERSION,
    DreamBoothJob,
    DreamBoothJobStatus,
    Phase,
)
from dreambooth_contract.server_api import SERVER_PLURAL
from dreambooth_contract.validation import JobInvalid, parse_job, parse_server

from . import actions, builders, kube, liveness, metrics, server_reconcile
from .publishing import PublicationRequest, ServerView
from .reconcile import (
    COND_FAILED,
    COND_TRAINING_STARTED,
    POD_PENDING,
    REASON_CHILD_REJECTED,
    ChildDeployment,
    ChildJob,
    ChildPod,
    Decision,
    Observed,
    RecordAppliedSpec,
    condition,
    effective_spec,
    failure,
    immutable_changes,
    reconcile,
    rejection,
)
from .server_reconcile import ServerDecision, ServerObserved
from .trainer_inputs import trainer_inputs

log = logging.getLogger(__name__)

RESYNC_SECONDS = 10.0  # level-triggered safety net on top of child events
FINISHED_RESYNC_SECONDS = 60.0
# A pass makes a handful of API calls, each bounded by kube.TIMEOUT (and urllib3's retries of a
# GET): one still running after this long is stuck, and the liveness probe says so.
STUCK_PASS_SECONDS = 600
OWNED = {names.LABEL_MANAGED_BY: names.MANAGER}


# What the operator watches besides DreamBoothJobs: only objects it made (the API server
# filters by label, so the operator neither receives nor remembers anything else).
CHILD_RESOURCES = (("batch", "v1", "jobs"), ("", "v1", "pods"), ("apps", "v1", "deployments"),
                   ("", "v1", "services"), ("", "v1", "configmaps"))  # fmt: skip
SERVER_CHILDREN = {**OWNED, names.LABEL_COMPONENT: names.SERVER}


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
    memo.wakeups = Wakeups()
    memo.server_wakeups = Wakeups()
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


JOB_CHILDREN = {**OWNED, names.LABEL_JOB: kopf.PRESENT}


@kopf.index("batch", "v1", "jobs", labels=JOB_CHILDREN)
def owned_jobs(namespace: str, name: str, labels: dict, status: dict, meta: dict, **_: Any):
    succeeded = (status.get("succeeded") or 0) > 0
    failed = (status.get("failed") or 0) > 0
    return {
        (namespace, labels[names.LABEL_JOB]): ChildJob(
            name=name,
            **_placement(labels),
            succeeded=succeeded,
            failed=failed,
            deleting=bool(meta.get("deletionTimestamp")),
            uid=meta.get("uid", ""),
            owner_uid=_controller_uid(meta),
        )
    }


def _placement(labels: dict) -> dict[str, Any]:
    """Component, rank and attempt of a batch Job or of its pod: builders label both alike."""
    return {
        "component": labels.get(names.LABEL_COMPONENT, ""),
        "rank": int(labels.get(names.LABEL_RANK, 0)),
        "attempt": int(labels.get(names.LABEL_ATTEMPT, 0)),
    }


def _controller_uid(meta: dict) -> str:
    """The UID of the object's controller (its ownerReference with controller: true)."""
    refs = meta.get("ownerReferences") or []
    return next((r.get("uid", "") for r in refs if r.get("controller")), "")


@kopf.index("", "v1", "pods", labels=JOB_CHILDREN)
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
            **_placement(labels),
            phase=status.get("phase", POD_PENDING),
            exit_code=terminated.get("exitCode"),
            message=terminated.get("message") or "",
            owner_uid=_controller_uid(meta),
        )
    }


def _owner_name(labels: dict) -> str:
    """The name of the job or the server that made a child (its label says which)."""
    return labels.get(names.LABEL_JOB) or labels.get(names.LABEL_SERVER, "")


@kopf.index("apps", "v1", "deployments", labels=OWNED)
def owned_deployments(namespace: str, labels: dict, meta: dict, status: dict, **_: Any):
    """Inference Deployments of jobs and of servers, under their owner's name (a job and a
    server of the same name are told apart by the owner's UID)."""
    annotations = meta.get("annotations") or {}
    return {
        (namespace, _owner_name(labels)): ChildDeployment(
            template_hash=annotations.get(builders.ANNOTATION_TEMPLATE_HASH, ""),
            ready_replicas=status.get("readyReplicas") or 0,
            owner_uid=_controller_uid(meta),
        )
    }


@kopf.index("", "v1", "services", labels={**OWNED, names.LABEL_COMPONENT: names.INFERENCE})
def owned_inference_services(namespace: str, labels: dict, meta: dict, **_: Any):
    """The UID of the DreamBoothJob that owns the job's inference Service."""
    return {(namespace, labels[names.LABEL_JOB]): _controller_uid(meta)}


@kopf.index("", "v1", "services", labels=SERVER_CHILDREN)
def owned_server_services(namespace: str, labels: dict, meta: dict, **_: Any):
    """The UID of the DreamBoothServer that owns the server's Service."""
    return {(namespace, labels[names.LABEL_SERVER]): _controller_uid(meta)}


class PublicationIndex(NamedTuple):
    owner_uid: str
    text: str


@kopf.index("", "v1", "configmaps", labels=SERVER_CHILDREN)
def owned_publications(namespace: str, labels: dict, meta: dict, body: kopf.Body, **_: Any):
    """A server's publication index as its ConfigMap holds it now."""
    text = (body.get("data") or {}).get(publication.PUBLICATIONS_FILE, "")
    return {(namespace, labels[names.LABEL_SERVER]): PublicationIndex(_controller_uid(meta), text)}


@kopf.index(GROUP, VERSION, SERVER_PLURAL)
def servers(namespace: str, name: str, body: kopf.Body, **_: Any):
    """Every DreamBoothServer as jobs see it (base model, who may publish, what it serves)."""
    try:
        server = parse_server(_plain(body))
    except JobInvalid:
        return None
    return {(namespace, name): server_reconcile.view_of(server)}


@kopf.index(GROUP, VERSION, PLURAL)
def publication_requests(namespace: str, name: str, spec: dict, status: dict, meta: dict, **_):
    """(server namespace, server name) -> the jobs that name it in spec.inference.server."""
    server = (spec.get("inference") or {}).get("server")
    if not server:
        return None
    artifact = status.get("artifact") or {}
    base = spec.get("baseModel") or {}
    request = PublicationRequest(
        namespace=namespace,
        job=name,
        uid=meta.get("uid", ""),
        base_model=base.get("uri", ""),
        base_revision=base.get("revision"),
        phase=status.get("phase"),
        suspended=bool((spec.get("runPolicy") or {}).get("suspend")),
        deleting=bool(meta.get("deletionTimestamp")),
        artifact_kind=artifact.get("kind", "pipeline") if artifact else None,
        artifact_uri=artifact.get("uri"),
        artifact_digest=artifact.get("digest"),
    )
    return {_server_key(namespace, server): request}


def _server_key(namespace: str, ref: str) -> tuple[str, str]:
    """(namespace, name) of spec.inference.server: NAME or NAMESPACE/NAME."""
    server_namespace, _, server_name = ref.rpartition("/")
    return server_namespace or namespace, server_name


def _plain(body: kopf.Body) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


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
    return {(namespace, name): status.get("phase") or Phase.pending.value}


@kopf.index(GROUP, VERSION, PLURAL)
def job_evaluations(namespace: str, name: str, status: dict, **_: Any):
    """The scores of each job evaluated (status.evaluation, as its evaluation pod wrote it)."""
    evaluation = status.get("evaluation")
    return {(namespace, name): dict(evaluation)} if evaluation else None


class Wakeups:
    """Cuts a job's daemon's wait short when the job or one of its children changes: one
    asyncio.Event per running daemon, keyed by (namespace, job name)."""

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], asyncio.Event] = {}

    @contextlib.contextmanager
    def registered(self, key: tuple[str, str]) -> Iterator[asyncio.Event]:
        event = self._events.setdefault(key, asyncio.Event())
        try:
            yield event
        finally:
            self._events.pop(key, None)

    def wake(self, namespace: str, job: str) -> None:
        event = self._events.get((namespace, job))
        if event:
            event.set()


def _wake_owner(namespace: str, labels: dict, memo: kopf.Memo) -> None:
    if names.LABEL_SERVER in labels:
        memo.server_wakeups.wake(namespace, labels[names.LABEL_SERVER])
    else:
        memo.wakeups.wake(namespace, labels.get(names.LABEL_JOB, ""))


@kopf.on.event("batch", "v1", "jobs", labels=OWNED)
def job_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner(namespace, labels, memo)


@kopf.on.event("apps", "v1", "deployments", labels=OWNED)
def deployment_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner(namespace, labels, memo)


@kopf.on.event("", "v1", "services", labels={**OWNED, names.LABEL_COMPONENT: names.INFERENCE})
def service_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner(namespace, labels, memo)


@kopf.on.event("", "v1", "services", labels=SERVER_CHILDREN)
def server_service_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner(namespace, labels, memo)


@kopf.on.event("", "v1", "configmaps", labels=SERVER_CHILDREN)
def publications_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner(namespace, labels, memo)


@kopf.on.event(GROUP, VERSION, PLURAL)
def job_event(namespace: str, spec: dict, memo: kopf.Memo, **_: Any) -> None:
    """A job that names a server changed (its phase, its artifact, its deletion): the server
    decides again what it publishes."""
    server = (spec.get("inference") or {}).get("server")
    if server:
        memo.server_wakeups.wake(*_server_key(namespace, server))


@kopf.on.event(GROUP, VERSION, SERVER_PLURAL)
def server_event(
    namespace: str, name: str, memo: kopf.Memo, publication_requests: kopf.Index, **_: Any
) -> None:
    """A server changed (what it publishes, its readiness, its spec): its jobs report it."""
    memo.server_wakeups.wake(namespace, name)
    for request in publication_requests.get((namespace, name), ()):
        memo.wakeups.wake(request.namespace, request.job)


@kopf.on.event("", "v1", "pods", labels=OWNED)
def pod_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    _wake_owner(namespace, labels, memo)


@kopf.on.create(GROUP, VERSION, PLURAL)
def job_created(**_: Any) -> None:
    metrics.JOBS_CREATED.inc()


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def spec_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    memo.wakeups.wake(namespace, name)


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
    servers: kopf.Index,
    **_: Any,
) -> None:
    key = (namespace, name)
    with memo.wakeups.registered(key) as wakeup:
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
                _server_of(namespace, body["spec"], servers),
            )
            with memo.passes.running(f"{namespace}/{name}"):
                finished = await asyncio.to_thread(
                    reconcile_once, copy.deepcopy(dict(body)), children
                )
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
            timeout = FINISHED_RESYNC_SECONDS if finished else RESYNC_SECONDS
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=timeout)


def _server_of(namespace: str, spec: dict, servers: kopf.Index) -> ServerView | None:
    """The DreamBoothServer the job's spec.inference.server names, if it exists."""
    ref = (spec.get("inference") or {}).get("server")
    if not ref:
        return None
    return next(iter(servers.get(_server_key(namespace, ref), ())), None)


class Children(NamedTuple):
    """What the indexes hold for one job."""

    jobs: tuple[ChildJob, ...]
    pods: tuple[ChildPod, ...]
    deployment: ChildDeployment | None
    inference_service: bool
    output_taken_by: str | None = None  # see Observed
    server: ServerView | None = None  # see Observed


def children_of(
    uid: str,
    jobs: Iterable[ChildJob],
    pods: Iterable[ChildPod],
    deployments: Iterable[ChildDeployment],
    inference_services: Iterable[str],
    output_taken_by: str | None = None,
    server: ServerView | None = None,
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
        server=server,
    )


def reconcile_once(document: dict[str, Any], children: Children) -> bool:
    """Decide, then act: one pass. Returns True when the job is finished.

    kopf's copy of the job lags our own writes by a watch event. Acting on a stale status could
    undo what the last pass did (create the previous attempt's pods again right after a gang
    restart), so a decision that writes is made again on a fresh read when the job changed
    since kopf's copy; a pass with nothing to do makes no API call at all.
    """
    decision = _decide(document, children)
    if actions.writes(document, decision):
        meta = document["metadata"]
        latest = kube.read_job(meta["namespace"], meta["name"])
        if latest is None:
            return True
        if latest["metadata"]["resourceVersion"] != meta.get("resourceVersion"):
            document, decision = latest, _decide(latest, children)
    _carry_out(document, decision)
    return decision.status.phase in TERMINAL_PHASES


def _decide(document: dict[str, Any], children: Children) -> Decision:
    """What to do about the job as this document has it (no API call).

    The spec it obeys is the one it started with (recorded in an annotation by its first pass)
    plus today's mutable sections; one the models refuse is a rejection.
    """
    meta = document["metadata"]
    current_spec = document.get("spec", {})
    recorded = (meta.get("annotations") or {}).get(names.ANNOTATION_APPLIED_SPEC)
    applied = current_spec if recorded is None else json.loads(recorded)
    now = datetime.now(timezone.utc)
    try:
        job = parse_job({**document, "spec": effective_spec(applied, current_spec)})
    except JobInvalid as invalid:
        observed = Observed(now=now, jobs=children.jobs, inference=children.deployment)
        status, generation = _status_of(document), meta.get("generation")
        decision = rejection(meta["name"], status, generation, observed, invalid.problems)
    else:
        decision = reconcile(job, _observe(job, children, applied, current_spec, now))
    if recorded is None:
        decision.actions.insert(0, RecordAppliedSpec(json.dumps(current_spec, sort_keys=True)))
    return decision


def _observe(
    job: DreamBoothJob,
    children: Children,
    applied: dict[str, Any],
    current_spec: dict[str, Any],
    now: datetime,
) -> Observed:
    config_json, cache = trainer_inputs(job)
    return Observed(
        now=now,
        jobs=children.jobs,
        pods=children.pods,
        prior_cache=cache,
        inference=children.deployment,
        inference_service=children.inference_service,
        trainer_config_json=config_json,
        rejected_changes=tuple(immutable_changes(applied, current_spec)),
        output_taken_by=children.output_taken_by,
        server=children.server,
    )


def _status_of(document: dict[str, Any]) -> DreamBoothJobStatus:
    return DreamBoothJobStatus.model_validate(document.get("status") or {})


def _carry_out(document: dict[str, Any], decision: Decision) -> None:
    meta = document["metadata"]
    before = _status_of(document)
    try:
        actions.apply(document, decision)
    except kube.Rejected as rejected:
        # Something validation let through (requests above limits, say): fail with the API
        # server's words instead of retrying for ever in Pending.
        now = datetime.now(timezone.utc)
        failed = failure(before, meta.get("generation"), now, REASON_CHILD_REJECTED, str(rejected))
        actions.apply(document, failed)
        _record_metrics(before, failed, meta)
    except kube.OwnedByAnother as taken:
        # A deleted namesake's child, on its way out: act once it is gone (a later pass).
        log.info("%s/%s waits: %s", meta["namespace"], meta["name"], taken)
    _record_metrics(before, decision, meta)


def _record_metrics(before: DreamBoothJobStatus, decision: Decision, meta: dict[str, Any]) -> None:
    after = decision.status
    if after.phase != before.phase:
        if after.phase == Phase.succeeded.value:
            metrics.JOBS_SUCCEEDED.inc()
        elif after.phase == Phase.failed.value:
            failed = condition(after, COND_FAILED)
            metrics.JOBS_FAILED.labels(failed.reason if failed else "Unknown").inc()
    if after.restarts > before.restarts:
        metrics.GANG_RESTARTS.inc(after.restarts - before.restarts)
    started = condition(after, COND_TRAINING_STARTED) is not None
    if started and condition(before, COND_TRAINING_STARTED) is None:
        created = meta.get("creationTimestamp")
        if created:
            born = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
            metrics.TIME_TO_FIRST_STEP.observe((datetime.now(timezone.utc) - born).total_seconds())


# ------------------------------------------------------------------------------ servers


@kopf.daemon(GROUP, VERSION, SERVER_PLURAL, cancellation_timeout=5.0)
async def drive_server(
    stopped: kopf.DaemonStopped,
    namespace: str,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    owned_deployments: kopf.Index,
    owned_server_services: kopf.Index,
    owned_publications: kopf.Index,
    publication_requests: kopf.Index,
    **_: Any,
) -> None:
    """One DreamBoothServer: decide -> act -> wait, woken by its children and by the jobs that
    name it."""
    key = (namespace, name)
    with memo.server_wakeups.registered(key) as wakeup:
        while not stopped:
            wakeup.clear()
            uid = body["metadata"].get("uid", "")
            index = next((c for c in owned_publications.get(key, ()) if c.owner_uid == uid), None)
            children = ServerChildren(
                deployment=next(
                    (d for d in owned_deployments.get(key, ()) if d.owner_uid == uid), None
                ),
                service=uid in owned_server_services.get(key, ()),
                index=index.text if index else None,
                requests=tuple(publication_requests.get(key, ())),
            )
            with memo.passes.running(f"server {namespace}/{name}"):
                await asyncio.to_thread(reconcile_server_once, _plain(body), children)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout=RESYNC_SECONDS)


class ServerChildren(NamedTuple):
    """What the indexes hold for one server."""

    deployment: ChildDeployment | None
    service: bool
    index: str | None
    requests: tuple[PublicationRequest, ...]


def reconcile_server_once(document: dict[str, Any], children: ServerChildren) -> None:
    """Decide, then act, for one server; like `reconcile_once`, a decision that writes is made
    again on a fresh read when kopf's copy is behind."""
    decision = _decide_server(document, children)
    if decision.actions or actions.changes_server_status(document, decision):
        meta = document["metadata"]
        latest = kube.read_job(meta["namespace"], meta["name"], SERVER_PLURAL)
        if latest is None:
            return
        if latest["metadata"]["resourceVersion"] != meta.get("resourceVersion"):
            document, decision = latest, _decide_server(latest, children)
    try:
        actions.apply_server(document, decision)
    except kube.Rejected as rejected:
        # Something validation let through: say so in the status rather than retry unseen.
        now = datetime.now(timezone.utc)
        refused = server_reconcile.invalid(document, now, [str(rejected)], REASON_CHILD_REJECTED)
        actions.apply_server(document, refused)
    except kube.OwnedByAnother as taken:
        log.info("server %s waits: %s", document["metadata"]["name"], taken)


def _decide_server(document: dict[str, Any], children: ServerChildren) -> ServerDecision:
    now = datetime.now(timezone.utc)
    try:
        server = parse_server(document)
    except JobInvalid as invalid:
        return server_reconcile.invalid(document, now, invalid.problems)
    observed = ServerObserved(
        now=now,
        deployment=children.deployment,
        service=children.service,
        index=children.index,
        requests=children.requests,
    )
    return server_reconcile.reconcile_server(server, observed)


# ------------------------------------------------------------------------------ entry point


class JobPhases:
    """Every job's phase, for the jobs-by-phase gauge, read at scrape time from the job_phases
    index (which kopf hands only to handlers: the startup handler below passes it on)."""

    def __init__(self) -> None:
        self.index: kopf.Index | None = None

    def __call__(self) -> Iterator[str]:
        for values in (self.index or {}).values():
            yield from values


class JobEvaluations(JobPhases):
    """Every evaluated job's scores, for the evaluation gauge: (namespace, job, evaluation)."""

    def __call__(self) -> Iterator[tuple[str, str, dict[str, Any]]]:  # type: ignore[override]
        for (namespace, name), values in (self.index or {}).items():
            for evaluation in values:
                yield namespace, name, evaluation


@kopf.on.startup()
def hand_phase_index_to_metrics(
    job_phases: kopf.Index, job_evaluations: kopf.Index, memo: kopf.Memo, **_: Any
) -> None:
    # Absent when kopf runs this module without operator_command.
    if "phases" in memo:
        memo.phases.index = job_phases
    if "evaluations" in memo:
        memo.evaluations.index = job_evaluations


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
    phases, evaluations = JobPhases(), JobEvaluations()
    metrics.serve(metrics_port, phases, evaluations)
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz",
        memo=kopf.Memo(
            passes=liveness.PassTracker(stuck_pass_seconds),
            filter_children=server_side_filtering,
            phases=phases,
            evaluations=evaluations,
        ),
    )
