"""Deciding, purely: a DreamBoothJob + what exists (+ the time) -> a Decision.

A Decision is the job's new status and the actions that move it forward; nothing here talks
to the API server (actions.py carries decisions out). Predicates only answer; the steps that
build a decision are named for what they decide, and `reconcile` calls them in the one order
that is right (see `_decide_phase`).

Level-triggered: nothing here remembers events. The phase is recomputed every time from the
milestone conditions (PriorsReady, Trained, Exported, Evaluated) and the children that exist, so an
operator restart, a lost event or a deleted child all heal by the next call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dreambooth_contract import env, names, publication
from dreambooth_contract.api import (
    TERMINAL_PHASES,
    ArtifactStatus,
    Condition,
    DreamBoothJob,
    DreamBoothJobStatus,
    EvaluationStatus,
    InferenceStatus,
    Phase,
    PriorsStatus,
    Progress,
)

from . import builders
from .publishing import ServerView, refusal

# Phases after the batch work, which activeDeadlineSeconds does not bound.
UNBOUNDED_PHASES = (*TERMINAL_PHASES, Phase.serving.value)
# Spec sections that may change while a job runs; everything else is fixed at start.
MUTABLE_SPEC_SECTIONS = ("runPolicy", "inference")

COND_PRIORS_READY = "PriorsReady"
COND_TRAINED = "Trained"
COND_EXPORTED = "Exported"
# True with the scores in its message, False when the evaluation failed (the artifact stands);
# absent while it runs, and for jobs that do not evaluate.
COND_EVALUATED = "Evaluated"
COND_SUSPENDED = "Suspended"
COND_FAILED = "Failed"
COND_COMPLETE = "Complete"
COND_SPEC_ACCEPTED = "SpecAccepted"
COND_TRAINING_STARTED = "TrainingStarted"
COND_INFERENCE_READY = "InferenceReady"
TRUE, FALSE = "True", "False"  # a condition's status
EVENT_NORMAL, EVENT_WARNING = "Normal", "Warning"

# Why a job failed (the Failed condition's reason), where more than one place fails it.
REASON_INVALID_SPEC = "InvalidSpec"
REASON_CHILD_REJECTED = "ChildRejected"
REASON_SERVER_REFUSED = "ServerRefused"
# Why an evaluation failed (the Evaluated condition's reason, and its Warning event's).
REASON_EVALUATION_FAILED = "EvaluationFailed"
REASON_EVALUATION_DEADLINE = "DeadlineExceeded"
REASON_NO_REPORT = "NoReport"

# Pod phases (Kubernetes'), as the pod index reports them.
POD_PENDING, POD_RUNNING = "Pending", "Running"
POD_SUCCEEDED, POD_FAILED = "Succeeded", "Failed"

PHASE_OF_COMPONENT = {
    names.PRIORS: Phase.generating_priors.value,
    names.TRAIN: Phase.training.value,
    names.EXPORT: Phase.exporting.value,
}
MILESTONE_OF_COMPONENT = {
    names.PRIORS: COND_PRIORS_READY,
    names.TRAIN: COND_TRAINED,
    names.EXPORT: COND_EXPORTED,
}


# ------------------------------------------------------------------------------ observed state


@dataclass(frozen=True)
class ChildJob:
    """A batch Job of the DreamBoothJob, reduced to what decisions need."""

    name: str
    component: str
    rank: int
    attempt: int
    succeeded: bool = False
    failed: bool = False
    deleting: bool = False
    uid: str = ""
    owner_uid: str = ""  # its controller's: the DreamBoothJob that created it


@dataclass(frozen=True)
class ChildPod:
    name: str
    component: str
    rank: int
    attempt: int
    phase: str = POD_PENDING
    exit_code: int | None = None
    message: str = ""
    owner_uid: str = ""  # its controller's: the batch Job that created it


@dataclass(frozen=True)
class ChildDeployment:
    """The inference Deployment, if it exists."""

    template_hash: str
    ready_replicas: int = 0
    owner_uid: str = ""


def keep_serving(
    wanted: dict[str, Any],
    current: ChildDeployment | None,
    *,
    service: dict[str, Any] | None,
    service_account: dict[str, Any],
) -> tuple[list[Create | Update], int]:
    """The actions that keep a Deployment running `wanted`'s template, behind its Service
    (`service`: the one to create, None when it exists) and as its own ServiceAccount; and its
    ready replicas, 0 until it runs that template (a rolling Deployment's old pods serve the
    old artifact)."""
    wanted_hash = wanted["metadata"]["annotations"][builders.ANNOTATION_TEMPLATE_HASH]
    actions: list[Create | Update] = []
    if service is not None:
        actions.append(Create(service))
    if current is None or current.template_hash != wanted_hash:
        # Its pods' identity first (a 409 when it exists is fine).
        actions.append(Create(service_account))
    if current is None:
        actions.append(Create(wanted))
    elif current.template_hash != wanted_hash:
        actions.append(Update(wanted))
    up_to_date = current is not None and current.template_hash == wanted_hash
    return actions, current.ready_replicas if current is not None and up_to_date else 0


@dataclass(frozen=True)
class PriorCache:
    """Where the job's class images go: content-addressed, so jobs with the same class and
    base model share them (the priors pods generate only what the storage lacks)."""

    key: str
    uri: str


@dataclass(frozen=True)
class Observed:
    now: datetime
    jobs: tuple[ChildJob, ...] = ()
    pods: tuple[ChildPod, ...] = ()
    prior_cache: PriorCache | None = None
    inference: ChildDeployment | None = None
    inference_service: bool = False  # the inference Service exists
    trainer_config_json: str = "{}"
    # Paths of spec changes made after the job started that cannot apply (see immutable_changes).
    rejected_changes: tuple[str, ...] = ()
    # Another live job, created earlier, writing to the same outputUri ("namespace/name").
    output_taken_by: str | None = None
    # The DreamBoothServer that spec.inference.server names; None also when it does not exist.
    server: ServerView | None = None


# ------------------------------------------------------------------------------ decisions


@dataclass(frozen=True)
class Create:
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Delete:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class Update:
    """Replace an existing object with the given manifest (the inference Deployment)."""

    manifest: dict[str, Any]


@dataclass(frozen=True)
class DeleteSelf:
    """The TTL after finishing has passed."""


@dataclass(frozen=True)
class RecordAppliedSpec:
    """Remember the spec the job started with (an annotation): later changes to fields that
    cannot change are told apart from it. Carried out before anything else."""

    spec_json: str


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


Action = Create | Update | Delete | DeleteSelf | Event | RecordAppliedSpec


@dataclass
class Decision:
    """What one pass decided: the status to write and the actions to take, in order."""

    status: DreamBoothJobStatus
    actions: list[Action] = field(default_factory=list)
    # The trainers own status.progress; the operator writes it only to start it at step 0
    # (sending its possibly older copy later could overwrite a newer report).
    progress_started: bool = False

    def status_patch(self) -> dict[str, Any]:
        """The operator's part of the status (the trainers own progress and checkpoint)."""
        owned = self.status.model_dump(
            mode="json",
            by_alias=True,
            include={
                "phase",
                "conditions",
                "restarts",
                "observed_generation",
                "start_time",
                "completion_time",
                "priors",
                "inference",
            },
        )
        # A merge patch replaces a list whole, nulls included, and the schema has no nullable
        # fields: a condition without observedGeneration goes back without it.
        owned["conditions"] = [
            c.model_dump(mode="json", by_alias=True, exclude_none=True)
            for c in self.status.conditions
        ]
        if self.progress_started and self.status.progress is not None:
            owned["progress"] = self.status.progress.model_dump(
                mode="json", by_alias=True, exclude_none=True
            )
        return owned


# ------------------------------------------------------------------------------ predicates
# Each answers a question about the job and what exists; none changes anything.


def _elapsed(since: datetime | None, now: datetime) -> float:
    return (now - since).total_seconds() if since else 0.0


def condition(status: DreamBoothJobStatus, kind: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == kind), None)


def condition_is_true(status: DreamBoothJobStatus, kind: str) -> bool:
    found = condition(status, kind)
    return found is not None and found.status == TRUE


def is_finished(job: DreamBoothJob, status: DreamBoothJobStatus) -> bool:
    """A terminal phase: only the TTL is left to act on. Not a succeeded job whose serving was
    switched on after it finished."""
    if status.phase not in TERMINAL_PHASES:
        return False
    return not (status.phase == Phase.succeeded.value and job.spec.inference.serves)


def ttl_expired(job: DreamBoothJob, status: DreamBoothJobStatus, now: datetime) -> bool:
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    return ttl is not None and _elapsed(status.completion_time, now) >= ttl


def deadline_passed(job: DreamBoothJob, status: DreamBoothJobStatus, now: datetime) -> bool:
    """activeDeadlineSeconds have passed since the job's pods first ran (or were resumed)."""
    deadline = job.spec.run_policy.active_deadline_seconds
    started = status.start_time
    return deadline is not None and started is not None and _elapsed(started, now) >= deadline


def deadline_exceeded(job: DreamBoothJob, status: DreamBoothJobStatus, now: datetime) -> bool:
    """activeDeadlineSeconds bounds the batch work, as a Job's does: not a suspended job (whose
    clock restarts on resume) and not serving, which may last as long as it is wanted. Once
    exported, the job has its artifact: past the deadline only a running evaluation stops
    (and fails alone, see _advance_evaluation)."""
    if not deadline_passed(job, status, now) or condition_is_true(status, COND_EXPORTED):
        return False
    # Still marked Suspended: this pass resumes it, and the clock restarts from the resume.
    paused = job.spec.run_policy.suspend or condition_is_true(status, COND_SUSPENDED)
    return not paused and status.phase not in UNBOUNDED_PHASES


def resuming(job: DreamBoothJob, status: DreamBoothJobStatus) -> bool:
    """Marked Suspended, and no longer asked to be."""
    return not job.spec.run_policy.suspend and condition_is_true(status, COND_SUSPENDED)


def _pods_in(observed: Observed, *phases: str) -> bool:
    return any(p.phase in phases for p in observed.pods)


def phase_in_progress(status: DreamBoothJobStatus, observed: Observed, component: str) -> str:
    """The phase of a job whose `component` runs: Pending until one of its pods has run."""
    if status.start_time is None and not _pods_in(observed, POD_RUNNING, POD_SUCCEEDED):
        return Phase.pending.value
    return PHASE_OF_COMPONENT[component]


def _by_attempt(
    jobs: tuple[ChildJob, ...], component: str, attempt: int
) -> tuple[list[ChildJob], list[ChildJob]]:
    """(live, stale): the phase's Jobs of this attempt not being deleted, and all the others."""
    mine = [j for j in jobs if j.component == component]
    live = [j for j in mine if j.attempt == attempt and not j.deleting]
    return live, [j for j in mine if j not in live]


def _all_succeeded(live: list[ChildJob], wanted: list[dict[str, Any]]) -> bool:
    return len(live) == len(wanted) and all(j.succeeded for j in live)


def _failure_detail(
    component: str, jobs: list[ChildJob], pods: tuple[ChildPod, ...]
) -> tuple[bool, str]:
    """(bad input?, message) of the first failed pod of the failed Jobs.

    Bad input shows as the trainer's exit code, or, under torchrun (which exits 1 whatever its
    workers did), as the trainer's termination message.
    """
    # A pod of an earlier attempt may linger (deletion runs in the background): only the failed
    # Jobs' own attempt explains this failure.
    failed_ranks = {(j.rank, j.attempt) for j in jobs}
    for pod in pods:
        if (
            pod.component == component
            and (pod.rank, pod.attempt) in failed_ranks
            and pod.phase == POD_FAILED
        ):
            bad_input = pod.exit_code == env.EXIT_BAD_INPUT or pod.message.startswith(
                env.BAD_INPUT_PREFIX
            )
            return bad_input, f"rank {pod.rank} (pod {pod.name}) exited with code " + (
                f"{pod.exit_code}: {pod.message.strip()[-500:]}"
                if pod.message
                else f"{pod.exit_code}"
            )
    return False, f"{component} Job {jobs[0].name} failed"


# ------------------------------------------------------------------------------ the draft


def with_condition(
    conditions: list[Condition],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
    warn: bool = False,
) -> tuple[list[Condition], Event | None]:
    """metav1.Condition bookkeeping: the conditions with `kind` set, and the event telling of
    it. A transition keeps its time until the status changes, and each change of status is an
    event (a condition born False is not)."""
    value = TRUE if status else FALSE
    current = next((c for c in conditions if c.type == kind), None)
    if current and (current.status, current.reason, current.message) == (value, reason, message):
        return conditions, None
    changed = current is None or current.status != value
    updated = Condition(
        type=kind,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=now if changed else current.last_transition_time,
        observed_generation=generation,
    )
    others = [c for c in conditions if c.type != kind]
    event = None
    if changed and (status or current is not None):
        event = Event(EVENT_WARNING if warn else EVENT_NORMAL, reason, message)
    return [*others, updated], event


def _delete(job: ChildJob) -> Delete:
    return Delete("batch/v1", "Job", job.name)


class _Draft:
    """The decision one call is building: a copy of the status, and the actions so far.

    Made fresh by each call and handed out only as a Decision, so decisions never share state.
    """

    def __init__(
        self, status: DreamBoothJobStatus | None, generation: int | None, observed: Observed
    ):
        self.status = (status or DreamBoothJobStatus()).model_copy(deep=True)
        self.generation, self.observed, self.now = generation, observed, observed.now
        self.actions: list[Action] = []
        self.progress_started = False

    def decision(self) -> Decision:
        return Decision(self.status, self.actions, self.progress_started)

    def act(self, *actions: Action) -> None:
        self.actions.extend(actions)

    def is_true(self, kind: str) -> bool:
        return condition_is_true(self.status, kind)

    def set_condition(
        self, kind: str, status: bool, reason: str, message: str, warn: bool = False
    ) -> None:
        self.status.conditions, event = with_condition(
            self.status.conditions, kind, status, reason, message, self.now, self.generation, warn
        )
        if event is not None:
            self.act(event)

    def fail(self, reason: str, message: str) -> None:
        """The Failed condition, with its Warning event: the one place either is made."""
        self.set_condition(COND_FAILED, True, reason, message, warn=True)

    def stop_batch(self) -> None:
        """Delete the Jobs that have not succeeded (their pods go with them)."""
        self.act(*(_delete(j) for j in self.observed.jobs if not j.deleting and not j.succeeded))

    def fail_and_stop(self, reason: str, message: str) -> None:
        self.fail(reason, message)
        self.stop_batch()


# ------------------------------------------------------------------------------ reconcile


def _generation(job: DreamBoothJob) -> int | None:
    return getattr(job.metadata, "generation", None)


def reconcile(job: DreamBoothJob, observed: Observed) -> Decision:
    """Compute the job's new status and the actions that move it forward."""
    draft = _Draft(job.status, _generation(job), observed)
    if is_finished(job, draft.status):
        if ttl_expired(job, draft.status, observed.now):
            draft.act(DeleteSelf())
        return draft.decision()
    _note_spec_changes(draft)
    _note_start(draft)
    _note_first_step(draft)
    _enter(draft, _decide_phase(draft, job))
    return draft.decision()


def _enter(draft: _Draft, phase: str) -> None:
    status = draft.status
    if phase in TERMINAL_PHASES and status.completion_time is None:
        status.completion_time = draft.now
    if phase != status.phase:
        draft.act(
            Event(EVENT_NORMAL, f"Phase{phase}", f"phase {status.phase or 'none'} -> {phase}")
        )
    status.phase = phase
    status.observed_generation = draft.generation


def _decide_phase(draft: _Draft, job: DreamBoothJob) -> str:
    """The phase this pass moves the job to, deciding on the way what moves it there.

    The order is the rule: a job past its deadline fails (and stops) before anything else is
    looked at; a failed job stays failed; a job whose outputUri an earlier live job holds fails
    before it runs anything; a suspended job runs nothing; then the batch phases, each started
    only once the one before it is done; then serving, or success.
    """
    if deadline_exceeded(job, draft.status, draft.now):
        deadline = job.spec.run_policy.active_deadline_seconds
        draft.fail_and_stop(
            "DeadlineExceeded", f"the job ran longer than activeDeadlineSeconds={deadline}"
        )
        return Phase.failed.value
    if draft.is_true(COND_FAILED):
        return Phase.failed.value
    if draft.observed.output_taken_by:
        # Both would resume from, and prune, the same checkpoints.
        draft.fail_and_stop(
            REASON_INVALID_SPEC,
            f"spec.storage.outputUri: {job.spec.storage.output_uri} is in use by job "
            f"{draft.observed.output_taken_by}; each job needs an outputUri of its own",
        )
        return Phase.failed.value
    refused = _server_refusal(draft, job)
    if refused and not draft.is_true(COND_EXPORTED):
        # Before the training is paid for: the server would never serve what it produces.
        draft.fail_and_stop(REASON_SERVER_REFUSED, f"spec.inference.server: {refused[1]}")
        return Phase.failed.value
    if job.spec.run_policy.suspend:
        _suspend(draft, job)
        return Phase.suspended.value
    if resuming(job, draft.status):
        _resume(draft)
    if not _advance_priors(draft, job):
        return _failed_or(draft, phase_in_progress(draft.status, draft.observed, names.PRIORS))
    _start_progress(draft, job)
    if not _advance_milestone(
        draft, job, names.TRAIN, f"trained {job.spec.training.max_steps} steps"
    ):
        return _failed_or(draft, phase_in_progress(draft.status, draft.observed, names.TRAIN))
    if not _advance_milestone(draft, job, names.EXPORT, "pipeline exported"):
        return _failed_or(draft, Phase.exporting.value)
    # Serving starts beside the evaluation, not after it: the scores are a report, not a gate.
    evaluated = _advance_evaluation(draft, job)
    if job.spec.inference.server is not None:
        return _publish(draft, job, refused)
    if job.spec.inference.enabled:
        return _serve(draft, job)
    _stop_serving(draft, job)
    if not evaluated:
        return Phase.evaluating.value
    draft.set_condition(COND_COMPLETE, True, "Succeeded", "trained and exported")
    return Phase.succeeded.value


def _failed_or(draft: _Draft, phase: str) -> str:
    """A phase's step may have failed the job (bad input, the backoff limit)."""
    return Phase.failed.value if draft.is_true(COND_FAILED) else phase


# ---- bookkeeping of every pass


def _note_spec_changes(draft: _Draft) -> None:
    rejected = draft.observed.rejected_changes
    if rejected:
        draft.set_condition(
            COND_SPEC_ACCEPTED,
            False,
            "ImmutableFieldChanged",
            f"{', '.join(rejected)} cannot change after the job started; the job goes on with "
            "the values it started with (only runPolicy and inference may change: delete and "
            "re-create the job to change the rest)",
            warn=True,
        )
    elif condition(draft.status, COND_SPEC_ACCEPTED) is not None:
        draft.set_condition(COND_SPEC_ACCEPTED, True, "Accepted", "the spec is in force")


def _note_start(draft: _Draft) -> None:
    if draft.status.start_time is None and _pods_in(draft.observed, POD_RUNNING):
        draft.status.start_time = draft.now


def _note_first_step(draft: _Draft) -> None:
    progress = draft.status.progress
    if progress and progress.step > 0 and not draft.is_true(COND_TRAINING_STARTED):
        draft.set_condition(
            COND_TRAINING_STARTED, True, "FirstStep", f"step {progress.step} reported"
        )


# ---- suspend


def _suspend(draft: _Draft, job: DreamBoothJob) -> None:
    draft.stop_batch()
    _stop_serving(draft, job)
    draft.set_condition(
        COND_SUSPENDED, True, "Suspended", "pods stopped; checkpoints kept for resuming"
    )


def _resume(draft: _Draft) -> None:
    draft.set_condition(COND_SUSPENDED, False, "Resumed", "resuming from the newest checkpoint")
    draft.status.start_time = None  # the deadline counts from the resumed pods' start


# ---- the batch phases


# What to do about a phase's failed ranks: (draft, job, component, live Jobs, failed Jobs).
FailureHandler = Callable[["_Draft", DreamBoothJob, str, list[ChildJob], list[ChildJob]], None]


def _run_phase(
    draft: _Draft, job: DreamBoothJob, component: str, on_failure: FailureHandler | None = None
) -> bool:
    """Drive one phase's Jobs; True once every rank succeeded in the current attempt. A failed
    rank is handed to `on_failure` (default: restart the gang)."""
    attempt = draft.status.restarts
    live, stale = _by_attempt(draft.observed.jobs, component, attempt)
    failed = [j for j in live if j.failed]
    if failed:
        (on_failure or _restart_gang)(draft, job, component, live, failed)
        return False
    if stale:
        # Names are deterministic: the next attempt waits until the old pods are gone.
        draft.act(*(_delete(j) for j in stale if not j.deleting))
        return False
    wanted = builders.phase_jobs(job, component, attempt)
    if _all_succeeded(live, wanted):
        return True
    present = {j.name for j in live}
    missing = [Create(m) for m in wanted if m["metadata"]["name"] not in present]
    if missing:
        # Whatever the pods mount or use must exist first; creates are idempotent (409).
        shared = builders.shared_objects(job, draft.observed.trainer_config_json)
        draft.act(*(Create(s) for s in shared), *missing)
    return False


def _restart_gang(
    draft: _Draft, job: DreamBoothJob, component: str, live: list[ChildJob], failed: list[ChildJob]
) -> None:
    """Restart every rank (torchrun cannot re-admit a single restarted one), unless the
    failure is bad input, which no restart cures, or the backoff limit is spent."""
    bad_input, detail = _failure_detail(component, failed, draft.observed.pods)
    if bad_input:
        draft.fail_and_stop("InvalidConfig", detail)
        return
    limit = job.spec.run_policy.backoff_limit
    restarts = draft.status.restarts
    if restarts >= limit:
        draft.fail_and_stop("BackoffLimitExceeded", f"{detail}; {restarts} restarts, limit {limit}")
        return
    draft.status.restarts = restarts + 1
    draft.act(*(_delete(j) for j in live))
    draft.act(
        Event(
            EVENT_WARNING,
            "GangRestart",
            f"{detail}; restarting all {len(live)} {component} pods "
            f"(restart {draft.status.restarts} of {limit}); training resumes from the newest "
            "committed checkpoint",
        )
    )


def _advance_priors(draft: _Draft, job: DreamBoothJob) -> bool:
    """Drive the class-image generation; True once PriorsReady (which is never undone)."""
    if draft.is_true(COND_PRIORS_READY):
        return True
    priors, cache = job.spec.prior_preservation, draft.observed.prior_cache
    if not priors.enabled:
        draft.set_condition(COND_PRIORS_READY, True, "Disabled", "prior preservation is off")
        return True
    status = draft.status
    if cache:
        status.priors = status.priors or PriorsStatus(cache_key=cache.key, uri=cache.uri)
    if not _run_phase(draft, job, names.PRIORS):
        return False
    if status.priors:
        status.priors.images = priors.num_class_images
    draft.set_condition(COND_PRIORS_READY, True, "Generated", _priors_message(job, status.priors))
    return True


def _priors_message(job: DreamBoothJob, cache: PriorsStatus | None) -> str:
    """What PriorsReady says: the class images, and where (status.priors names the first
    class's set; a job of several classes has one set per class)."""
    count = job.spec.prior_preservation.num_class_images
    classes = len({subject.class_prompt for subject in job.spec.subjects})
    if classes > 1:
        where = f", the first class's at {cache.uri}" if cache else ""
        return f"{count} class images for each of {classes} classes{where}"
    return f"{count} class images at {cache.uri}" if cache else f"{count} class images"


def _start_progress(draft: _Draft, job: DreamBoothJob) -> None:
    if draft.status.progress is None:
        draft.status.progress = Progress(step=0, total_steps=job.spec.training.max_steps)
        draft.progress_started = True


def _advance_milestone(draft: _Draft, job: DreamBoothJob, component: str, message: str) -> bool:
    """Drive training or export; True once its milestone condition holds (never undone)."""
    kind = MILESTONE_OF_COMPONENT[component]
    if draft.is_true(kind):
        return True
    if not _run_phase(draft, job, component):
        return False
    draft.set_condition(kind, True, "Succeeded", message)
    return True


# ---- the evaluation


def _advance_evaluation(draft: _Draft, job: DreamBoothJob) -> bool:
    """Drive the evaluation of the export; True once it is over (Evaluated True or False) or
    when the job does not evaluate. A failed evaluation fails only itself: the Evaluated
    condition says why, a Warning event tells it, and the job goes on to serve or succeed."""
    if not job.spec.evaluation.enabled or condition(draft.status, COND_EVALUATED) is not None:
        return True
    live, _ = _by_attempt(draft.observed.jobs, names.EVALUATE, draft.status.restarts)
    finished = bool(live) and all(j.succeeded for j in live)
    if deadline_passed(job, draft.status, draft.now) and not finished:
        draft.stop_batch()
        deadline = job.spec.run_policy.active_deadline_seconds
        _evaluation_failed(
            draft,
            REASON_EVALUATION_DEADLINE,
            f"the evaluation was stopped: the job ran longer than activeDeadlineSeconds={deadline}",
        )
        return True
    if not _run_phase(draft, job, names.EVALUATE, on_failure=_evaluation_pod_failed):
        return condition(draft.status, COND_EVALUATED) is not None
    evaluation = draft.status.evaluation
    if evaluation is None:
        _evaluation_failed(
            draft, REASON_NO_REPORT, "the evaluation pod succeeded but reported no scores"
        )
        return True
    draft.set_condition(COND_EVALUATED, True, "Succeeded", evaluation_message(evaluation))
    return True


def evaluation_message(evaluation: EvaluationStatus) -> str:
    """The Evaluated condition's message: each score, trained (base)."""
    trained, base = evaluation.trained, evaluation.base
    scores = [
        f"{label} {getattr(trained, key):.3f} (base {getattr(base, key):.3f})"
        for label, key in EVALUATION_LABELS
        if getattr(trained, key) is not None and getattr(base, key) is not None
    ]
    report = [f"report {evaluation.report_uri}"] if evaluation.report_uri else []
    return "; ".join(scores + report)


EVALUATION_LABELS = (
    ("DINO", "dino"),
    ("CLIP-I", "clip_i"),
    ("CLIP-T", "clip_t"),
    ("PRES", "pres"),
    ("DIV", "div"),
)


def _evaluation_pod_failed(
    draft: _Draft, job: DreamBoothJob, component: str, live: list[ChildJob], failed: list[ChildJob]
) -> None:
    """No restart: what fails an evaluation (an encoder that cannot load) fails it again."""
    _, detail = _failure_detail(component, failed, draft.observed.pods)
    _evaluation_failed(draft, REASON_EVALUATION_FAILED, f"{detail}; the artifact is unaffected")


def _evaluation_failed(draft: _Draft, reason: str, message: str) -> None:
    """Evaluated False and a Warning event (a condition born False makes none by itself)."""
    draft.set_condition(COND_EVALUATED, False, reason, message, warn=True)
    draft.act(Event(EVENT_WARNING, reason, message))


# ---- serving


def _served_artifact(draft: _Draft) -> ArtifactStatus | None:
    """The export to serve; None (and InferenceReady False) when the export reported none."""
    artifact = draft.status.artifact
    if artifact is None:
        draft.set_condition(
            COND_INFERENCE_READY, False, "NoArtifact", "the export reported no artifact", warn=True
        )
        return None
    if artifact.kind == "lora" and not artifact.base_model:
        draft.set_condition(
            COND_INFERENCE_READY,
            False,
            "NoBaseModel",
            "the export reported a LoRA adapter without its base model",
            warn=True,
        )
        return None
    return artifact


def _serve(draft: _Draft, job: DreamBoothJob) -> str:
    """Keep a Deployment serving exactly the exported artifact (rolls on a new digest)."""
    artifact = _served_artifact(draft)
    if artifact is None:
        return Phase.exporting.value
    base_model = artifact.base_model if artifact.kind == "lora" else None
    actions, ready = keep_serving(
        builders.inference_deployment(job, artifact.uri, artifact.digest, base_model),
        draft.observed.inference,
        # also when someone deleted it
        service=None if draft.observed.inference_service else builders.inference_service(job),
        service_account=builders.inference_service_account(job),
    )
    for action in actions:
        draft.act(action)
    draft.status.inference = InferenceStatus(
        endpoint=builders.inference_endpoint(job), ready_replicas=ready, digest=artifact.digest
    )
    replicas = job.spec.inference.replicas
    reason = "Ready" if ready >= min(replicas, 1) else "Starting"
    draft.set_condition(
        COND_INFERENCE_READY, reason == "Ready", reason, f"{ready}/{replicas} replicas ready"
    )
    return Phase.serving.value


def _server_refusal(draft: _Draft, job: DreamBoothJob) -> tuple[str, str] | None:
    """(reason, message) when the server the job names exists and would not take it."""
    server = draft.observed.server
    if server is None:
        return None
    base = job.spec.base_model
    return refusal(server, job.metadata.namespace or "", base.uri, base.revision)


def _publish(draft: _Draft, job: DreamBoothJob, refused: tuple[str, str] | None) -> str:
    """Serve on a shared DreamBoothServer: the server publishes the adapter once this job is
    Serving (its index of jobs sees the phase); this job reports where, and whether the server
    lists its digest yet."""
    artifact = _served_artifact(draft)
    if artifact is None:
        return Phase.exporting.value
    _stop_serving(draft, job)  # a Deployment of its own, from before inference.server was set
    namespace = job.metadata.namespace or ""
    server_namespace, server_name = job.spec.inference.server_key(namespace) or ("", "")
    model = publication.model_name(namespace, job.metadata.name)
    server = draft.observed.server
    draft.status.inference = InferenceStatus(
        endpoint=builders.server_endpoint(server_namespace, server_name),
        ready_replicas=server.ready_replicas if server else 0,
        digest=artifact.digest,
        server=f"{server_namespace}/{server_name}",
        model=model,
    )
    if server is None:
        reason, message = (
            "ServerNotFound",
            (
                f"DreamBoothServer {server_namespace}/{server_name} does not exist; the adapter is "
                "published once it does"
            ),
        )
    elif refused:
        reason, message = refused
    elif not server.serves(model, artifact.digest):
        reason, message = "Publishing", f"publishing {model} to {server.ref}"
    elif server.ready_replicas < 1:
        reason, message = "ServerStarting", f"{model} published; {server.ref} has no ready replica"
    else:
        reason, message = "Published", f"served as model {model} by {server.ref}"
    draft.set_condition(
        COND_INFERENCE_READY, reason == "Published", reason, message, warn=bool(refused)
    )
    return Phase.serving.value


def _stop_serving(draft: _Draft, job: DreamBoothJob) -> None:
    name = names.inference(job.metadata.name)
    if draft.observed.inference is not None:
        draft.act(Delete("apps/v1", "Deployment", name))
    if draft.observed.inference_service:
        draft.act(Delete("v1", "Service", name))
    draft.status.inference = None


# --------------------------------------------------------------------- failing from outside
# What fails a job outside its phases: a spec the models refuse, a child the API server refuses.


def failure(
    status: DreamBoothJobStatus | None,
    generation: int | None,
    now: datetime,
    reason: str,
    message: str,
) -> Decision:
    """Phase Failed, the Failed condition and its Warning event (a child the API server
    refused, say); a job that failed already stays as it is."""
    draft = _Draft(status, generation, Observed(now=now))
    _fail_from_outside(draft, reason, message)
    return draft.decision()


def rejection(
    name: str,
    status: DreamBoothJobStatus | None,
    generation: int | None,
    observed: Observed,
    problems: list[str],
) -> Decision:
    """A spec the models refuse (rules the CRD schema cannot express) fails with the
    validator's words. A running job can meet a rule only a newer operator has: what it runs
    stops too, rather than training on under a Failed job."""
    draft = _Draft(status, generation, observed)
    draft.stop_batch()
    if observed.inference is not None:
        draft.act(Delete("apps/v1", "Deployment", names.inference(name)))
    _fail_from_outside(draft, REASON_INVALID_SPEC, "; ".join(problems))
    return draft.decision()


def _fail_from_outside(draft: _Draft, reason: str, message: str) -> None:
    if draft.status.phase == Phase.failed.value:
        return
    draft.fail(reason, message)
    draft.status.phase = Phase.failed.value
    draft.status.completion_time = draft.now


# ------------------------------------------------------------------------------ spec changes


def immutable_changes(applied: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Paths (spec.x.y) that changed outside the sections allowed to change while running."""
    changes: list[str] = []

    def walk(before: Any, after: Any, path: str) -> None:
        if isinstance(before, dict) and isinstance(after, dict):
            for key in sorted(set(before) | set(after)):
                walk(before.get(key), after.get(key), f"{path}.{key}")
        elif before != after:
            changes.append(path)

    for section in sorted(set(applied) | set(current)):
        if section not in MUTABLE_SPEC_SECTIONS:
            walk(applied.get(section), current.get(section), f"spec.{section}")
    return changes


def effective_spec(applied: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The spec a running job obeys: the one it started with, plus today's mutable sections."""
    merged = dict(applied)
    for section in MUTABLE_SPEC_SECTIONS:
        if section in current:
            merged[section] = current[section]
    return merged
