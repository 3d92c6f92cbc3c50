"""The pure reconcile function: a DreamBoothJob + what exists -> new status and next actions.

Level-triggered: nothing here remembers events. The phase is recomputed every time from the
milestone conditions (PriorsReady, Trained, Exported) and the children that exist, so an
operator restart, a lost event or a deleted child all heal by the next call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dreambooth_contract import env, names
from dreambooth_contract.api import (
    TERMINAL_PHASES,
    Condition,
    DreamBoothJob,
    DreamBoothJobStatus,
    InferenceStatus,
    Phase,
    PriorsStatus,
    Progress,
)

from . import builders

# Phases after the batch work, which activeDeadlineSeconds does not bound.
UNBOUNDED_PHASES = (*TERMINAL_PHASES, Phase.serving.value)
# Spec sections that may change while a job runs; everything else is fixed at start.
MUTABLE_SPEC_SECTIONS = ("runPolicy", "inference")

COND_PRIORS_READY = "PriorsReady"
COND_TRAINED = "Trained"
COND_EXPORTED = "Exported"
COND_SUSPENDED = "Suspended"
COND_FAILED = "Failed"
COND_COMPLETE = "Complete"
COND_SPEC_ACCEPTED = "SpecAccepted"
COND_TRAINING_STARTED = "TrainingStarted"
COND_INFERENCE_READY = "InferenceReady"

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
    phase: str = "Pending"
    exit_code: int | None = None
    message: str = ""
    owner_uid: str = ""  # its controller's: the batch Job that created it


@dataclass(frozen=True)
class ChildDeployment:
    """The inference Deployment, if it exists."""

    template_hash: str
    ready_replicas: int = 0
    owner_uid: str = ""


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
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


Action = Create | Update | Delete | DeleteSelf | Event


@dataclass
class Decision:
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


# ------------------------------------------------------------------------------ helpers


class _Conditions:
    """metav1.Condition bookkeeping: a transition keeps its time until the status changes."""

    def __init__(self, decision: Decision, now: datetime, generation: int | None):
        self.decision, self.now, self.generation = decision, now, generation

    def get(self, kind: str) -> Condition | None:
        return next((c for c in self.decision.status.conditions if c.type == kind), None)

    def is_true(self, kind: str) -> bool:
        condition = self.get(kind)
        return condition is not None and condition.status == "True"

    def set(self, kind: str, status: bool, reason: str, message: str, warn: bool = False) -> None:
        value = "True" if status else "False"
        current = self.get(kind)
        if current and (current.status, current.reason, current.message) == (
            value,
            reason,
            message,
        ):
            return
        changed = current is None or current.status != value
        updated = Condition(
            type=kind,
            status=value,
            reason=reason,
            message=message,
            last_transition_time=self.now if changed else current.last_transition_time,
            observed_generation=self.generation,
        )
        others = [c for c in self.decision.status.conditions if c.type != kind]
        self.decision.status.conditions = [*others, updated]
        if changed and (status or current is not None):
            self.decision.actions.append(Event("Warning" if warn else "Normal", reason, message))


def _elapsed(since: datetime | None, now: datetime) -> float:
    return (now - since).total_seconds() if since else 0.0


def _delete(job: ChildJob) -> Delete:
    return Delete("batch/v1", "Job", job.name)


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
            and pod.phase == "Failed"
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


# ------------------------------------------------------------------------------ reconcile


class _Reconciler:
    def __init__(self, job: DreamBoothJob, observed: Observed):
        self.job, self.observed, self.spec = job, observed, job.spec
        status = (job.status or DreamBoothJobStatus()).model_copy(deep=True)
        self.decision = Decision(status=status)
        generation = getattr(job.metadata, "generation", None)
        self.conditions = _Conditions(self.decision, observed.now, generation)
        self.status = status
        self.shared_created = False

    # ---- outcome helpers

    def fail(self, reason: str, message: str) -> None:
        self.conditions.set(COND_FAILED, True, reason, message, warn=True)
        self.stop_all_pods()

    def stop_all_pods(self) -> None:
        for child in self.observed.jobs:
            if not child.deleting and not child.succeeded:
                self.decision.actions.append(_delete(child))

    def create(self, manifest: dict[str, Any]) -> None:
        if not self.shared_created:
            # Whatever the pods mount or use must exist first; creates are idempotent (409).
            for shared in builders.shared_objects(self.job, self.observed.trainer_config_json):
                self.decision.actions.append(Create(shared))
            self.shared_created = True
        self.decision.actions.append(Create(manifest))

    # ---- phases

    def run_phase(self, component: str) -> bool:
        """Drive one phase's Jobs; True once every rank succeeded in the current attempt."""
        attempt = self.status.restarts
        mine = [j for j in self.observed.jobs if j.component == component]
        live = [j for j in mine if j.attempt == attempt and not j.deleting]
        stale = [j for j in mine if j not in live]
        failed = [j for j in live if j.failed]
        if failed:
            self.restart_gang(component, live, failed)
            return False
        if stale:
            # Names are deterministic: the next attempt waits until the old pods are gone.
            self.decision.actions += [_delete(j) for j in stale if not j.deleting]
            return False
        wanted = builders.phase_jobs(self.job, component, attempt)
        if len(live) == len(wanted) and all(j.succeeded for j in live):
            return True
        present = {j.name for j in live}
        for manifest in wanted:
            if manifest["metadata"]["name"] not in present:
                self.create(manifest)
        return False

    def restart_gang(self, component: str, live: list[ChildJob], failed: list[ChildJob]) -> None:
        bad_input, detail = _failure_detail(component, failed, self.observed.pods)
        if bad_input:
            self.fail("InvalidConfig", detail)
            return
        limit = self.spec.run_policy.backoff_limit
        if self.status.restarts >= limit:
            self.fail(
                "BackoffLimitExceeded", f"{detail}; {self.status.restarts} restarts, limit {limit}"
            )
            return
        self.status.restarts += 1
        self.decision.actions += [_delete(j) for j in live]
        self.decision.actions.append(
            Event(
                "Warning",
                "GangRestart",
                f"{detail}; restarting all {len(live)} {component} pods "
                f"(restart {self.status.restarts} of {limit}); training resumes from the newest "
                "committed checkpoint",
            )
        )

    def priors_ready(self) -> bool:
        if self.conditions.is_true(COND_PRIORS_READY):
            return True
        priors, cache = self.spec.prior_preservation, self.observed.prior_cache
        if not priors.enabled:
            self.conditions.set(COND_PRIORS_READY, True, "Disabled", "prior preservation is off")
            return True
        if cache:
            self.status.priors = self.status.priors or PriorsStatus(
                cache_key=cache.key, uri=cache.uri
            )
        if self.run_phase(names.PRIORS):
            if self.status.priors:
                self.status.priors.images = priors.num_class_images
            self.conditions.set(
                COND_PRIORS_READY,
                True,
                "Generated",
                f"{priors.num_class_images} class images at {self.status.priors.uri}"
                if self.status.priors
                else f"{priors.num_class_images} class images",
            )
            return True
        return False

    def milestone(self, component: str, message: str) -> bool:
        kind = MILESTONE_OF_COMPONENT[component]
        if self.conditions.is_true(kind):
            return True
        if self.run_phase(component):
            self.conditions.set(kind, True, "Succeeded", message)
            return True
        return False

    # ---- the whole job

    def phase_in_progress(self, component: str) -> str:
        running = any(p.phase in ("Running", "Succeeded") for p in self.observed.pods)
        if self.status.start_time is None and not running:
            return Phase.pending.value
        return PHASE_OF_COMPONENT[component]

    def track_start(self) -> None:
        if self.status.start_time is None and any(p.phase == "Running" for p in self.observed.pods):
            self.status.start_time = self.observed.now

    def finished(self) -> bool:
        """Terminal phases: only the TTL is left to act on."""
        if self.status.phase not in TERMINAL_PHASES:
            return False
        if self.status.phase == Phase.succeeded.value and self.spec.inference.enabled:
            return False  # serving was switched on after the job finished
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        if ttl is not None and _elapsed(self.status.completion_time, self.observed.now) >= ttl:
            self.decision.actions.append(DeleteSelf())
        return True

    def past_deadline(self) -> bool:
        """activeDeadlineSeconds bounds the batch work, as a Job's does: not a suspended job
        (whose clock restarts on resume) and not serving, which may last as long as it is
        wanted."""
        deadline = self.spec.run_policy.active_deadline_seconds
        started = self.status.start_time
        if deadline is None or started is None or _elapsed(started, self.observed.now) < deadline:
            return False
        # Still marked Suspended: this pass resumes it (suspended() restarts the clock).
        paused = self.spec.run_policy.suspend or self.conditions.is_true(COND_SUSPENDED)
        if paused or self.status.phase in UNBOUNDED_PHASES:
            return False
        self.fail("DeadlineExceeded", f"the job ran longer than activeDeadlineSeconds={deadline}")
        return True

    def suspended(self) -> bool:
        if self.spec.run_policy.suspend:
            self.stop_all_pods()
            self.stop_serving()
            self.conditions.set(
                COND_SUSPENDED, True, "Suspended", "pods stopped; checkpoints kept for resuming"
            )
            return True
        if self.conditions.is_true(COND_SUSPENDED):
            self.conditions.set(
                COND_SUSPENDED, False, "Resumed", "resuming from the newest checkpoint"
            )
            self.status.start_time = None  # the deadline counts from the resumed pods' start
        return False

    def check_spec_changes(self) -> None:
        rejected = self.observed.rejected_changes
        if rejected:
            self.conditions.set(
                COND_SPEC_ACCEPTED,
                False,
                "ImmutableFieldChanged",
                f"{', '.join(rejected)} cannot change after the job started; the job goes on with "
                "the values it started with (only runPolicy and inference may change: delete and "
                "re-create the job to change the rest)",
                warn=True,
            )
        elif self.conditions.get(COND_SPEC_ACCEPTED) is not None:
            self.conditions.set(COND_SPEC_ACCEPTED, True, "Accepted", "the spec is in force")

    def track_first_step(self) -> None:
        progress = self.status.progress
        if progress and progress.step > 0 and not self.conditions.is_true(COND_TRAINING_STARTED):
            self.conditions.set(
                COND_TRAINING_STARTED, True, "FirstStep", f"step {progress.step} reported"
            )

    def run(self) -> Decision:
        if self.finished():
            return self.decision
        self.check_spec_changes()
        self.track_start()
        self.track_first_step()
        phase = self.next_phase()
        if phase in TERMINAL_PHASES and self.status.completion_time is None:
            self.status.completion_time = self.observed.now
        if phase != self.status.phase:
            self.decision.actions.append(
                Event("Normal", f"Phase{phase}", f"phase {self.status.phase or 'none'} -> {phase}")
            )
        self.status.phase = phase
        self.status.observed_generation = getattr(self.job.metadata, "generation", None)
        return self.decision

    def next_phase(self) -> str:
        if self.past_deadline() or self.conditions.is_true(COND_FAILED):
            return Phase.failed.value
        if self.observed.output_taken_by:
            # Both would resume from, and prune, the same checkpoints.
            self.fail(
                "InvalidSpec",
                f"spec.storage.outputUri: {self.spec.storage.output_uri} is in use by job "
                f"{self.observed.output_taken_by}; each job needs an outputUri of its own",
            )
            return Phase.failed.value
        if self.suspended():
            return Phase.suspended.value
        if not self.priors_ready():
            return self.failed_or(self.phase_in_progress(names.PRIORS))
        if self.status.progress is None:
            total = self.spec.training.max_steps
            self.status.progress = Progress(step=0, total_steps=total)
            self.decision.progress_started = True
        if not self.milestone(names.TRAIN, f"trained {self.spec.training.max_steps} steps"):
            return self.failed_or(self.phase_in_progress(names.TRAIN))
        if not self.milestone(names.EXPORT, "pipeline exported"):
            return self.failed_or(Phase.exporting.value)
        if self.spec.inference.enabled:
            return self.serve()
        self.stop_serving()
        self.conditions.set(COND_COMPLETE, True, "Succeeded", "trained and exported")
        return Phase.succeeded.value

    def serve(self) -> str:
        """Keep a Deployment serving exactly the exported artifact (rolls on a new digest)."""
        artifact = self.status.artifact
        if artifact is None:
            self.conditions.set(
                COND_INFERENCE_READY,
                False,
                "NoArtifact",
                "the export reported no artifact",
                warn=True,
            )
            return Phase.exporting.value
        wanted = builders.inference_deployment(self.job, artifact.uri, artifact.digest)
        wanted_hash = wanted["metadata"]["annotations"][builders.ANNOTATION_TEMPLATE_HASH]
        current = self.observed.inference
        if not self.observed.inference_service:  # also when someone deleted it
            self.decision.actions.append(Create(builders.inference_service(self.job)))
        if current is None or current.template_hash != wanted_hash:
            # Its pods' identity first (a 409 when it exists is fine).
            self.decision.actions.append(Create(builders.inference_service_account(self.job)))
        if current is None:
            self.decision.actions.append(Create(wanted))
        elif current.template_hash != wanted_hash:
            self.decision.actions.append(Update(wanted))
        ready = current.ready_replicas if current and current.template_hash == wanted_hash else 0
        self.status.inference = InferenceStatus(
            endpoint=builders.inference_endpoint(self.job),
            ready_replicas=ready,
            digest=artifact.digest,
        )
        replicas = self.spec.inference.replicas
        if ready >= min(replicas, 1):
            self.conditions.set(
                COND_INFERENCE_READY, True, "Ready", f"{ready}/{replicas} replicas ready"
            )
        else:
            self.conditions.set(
                COND_INFERENCE_READY, False, "Starting", f"{ready}/{replicas} replicas ready"
            )
        return Phase.serving.value

    def stop_serving(self) -> None:
        name = names.inference(self.job.metadata.name)
        if self.observed.inference is not None:
            self.decision.actions.append(Delete("apps/v1", "Deployment", name))
        if self.observed.inference_service:
            self.decision.actions.append(Delete("v1", "Service", name))
        self.status.inference = None

    def failed_or(self, phase: str) -> str:
        return Phase.failed.value if self.conditions.is_true(COND_FAILED) else phase


def reconcile(job: DreamBoothJob, observed: Observed) -> Decision:
    """Compute the job's new status and the actions that move it forward."""
    return _Reconciler(job, observed).run()


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
