"""The pure decide functions, scenario by scenario (no API server needed)."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import datetime, timedelta, timezone

from dreambooth_contract import env, names
from dreambooth_contract.validation import parse_job
from dreambooth_operator.reconcile import (
    COND_EVALUATED,
    COND_EXPORTED,
    COND_FAILED,
    COND_INFERENCE_READY,
    COND_PRIORS_READY,
    COND_SUSPENDED,
    COND_TRAINED,
    ChildJob,
    ChildPod,
    Create,
    Delete,
    DeleteSelf,
    Event,
    Observed,
    PriorCache,
    deadline_exceeded,
    effective_spec,
    failure,
    immutable_changes,
    is_finished,
    reconcile,
    rejection,
    resuming,
)

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
CACHE = PriorCache(key="abc123", uri="s3://runs/priors/abc123")

DOCUMENT = {
    "apiVersion": "dreambooth.dev/v1alpha1",
    "kind": "DreamBoothJob",
    "metadata": {"name": "dog", "namespace": "team", "uid": "u-1", "generation": 1},
    "spec": {
        "baseModel": {"uri": "random://tiny-sd"},
        "instance": {"imagesUri": "s3://data/dog", "prompt": "a photo of sks dog"},
        "priorPreservation": {"classPrompt": "a photo of dog", "numClassImages": 8},
        "training": {"maxSteps": 10, "mixedPrecision": "bf16"},
        "resources": {"nodes": 2, "gpusPerNode": 0, "processesPerNode": 1},
        "storage": {"outputUri": "s3://runs/dog"},
        "runPolicy": {"backoffLimit": 1},
    },
}


def job_with(status=None, **spec_changes):
    document = copy.deepcopy(DOCUMENT)
    for section, values in spec_changes.items():
        document["spec"].setdefault(section, {}).update(values)
    if status is not None:
        document["status"] = status
    return parse_job(document)


def step(job, **observed):
    """Reconcile, then return (decision, the job with the decision's status applied)."""
    decision = reconcile(job, Observed(now=observed.pop("now", NOW), prior_cache=CACHE, **observed))
    document = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    document["status"] = decision.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return decision, parse_job(document)


def created(decision, kind="Job"):
    return [
        a.manifest["metadata"]["name"]
        for a in decision.actions
        if isinstance(a, Create) and a.manifest["kind"] == kind
    ]


def deleted(decision):
    return [a.name for a in decision.actions if isinstance(a, Delete)]


def events(decision):
    return [a.reason for a in decision.actions if isinstance(a, Event)]


def jobs(component, attempt=0, ranks=2, **state):
    return tuple(
        ChildJob(names.rank_job("dog", component, r), component, r, attempt, **state)
        for r in range(ranks)
    )


def test_new_job_starts_prior_generation_with_shared_objects_first():
    decision, _ = step(job_with())
    assert decision.status.phase == "Pending"
    assert created(decision) == ["dog-priors-0", "dog-priors-1"]
    assert created(decision, "ConfigMap") == ["dog-config"]
    kinds = [a.manifest["kind"] for a in decision.actions if isinstance(a, Create)]
    assert kinds.index("ConfigMap") < kinds.index("Job") and "Role" in kinds
    assert decision.status.priors.cache_key == "abc123"


def test_running_pod_moves_pending_to_generating_priors_and_records_start():
    _, job = step(job_with())
    running = (ChildPod("dog-priors-0-x", names.PRIORS, 0, 0, "Running"),)
    decision, job = step(job, jobs=jobs(names.PRIORS), pods=running)
    assert decision.status.phase == "GeneratingPriors"
    assert decision.status.start_time == NOW
    assert created(decision) == []


def test_the_priors_phase_runs_even_for_a_cached_class():
    """Only the priors pods, reading the storage, can tell that a cached set is complete."""
    decision = reconcile(job_with(), Observed(now=NOW, prior_cache=CACHE))
    assert created(decision) == ["dog-priors-0", "dog-priors-1"]
    assert decision.status.priors.uri == CACHE.uri


def test_priors_done_then_training_then_export_then_succeeded():
    _, job = step(job_with())
    decision, job = step(job, jobs=jobs(names.PRIORS, succeeded=True))
    assert created(decision) == ["dog-train-0", "dog-train-1"]
    assert decision.status.phase == "Pending"  # no pod has run yet
    done = jobs(names.PRIORS, succeeded=True) + jobs(names.TRAIN, succeeded=True)
    decision, job = step(job, jobs=done)
    assert created(decision) == ["dog-export"]
    assert decision.status.phase == "Exporting"
    export = (ChildJob("dog-export", names.EXPORT, 0, 0, succeeded=True),)
    decision, job = step(job, jobs=done + export)
    assert created(decision) == ["dog-evaluate"]
    assert decision.status.phase == "Evaluating"
    evaluate = (ChildJob("dog-evaluate", names.EVALUATE, 0, 0, succeeded=True),)
    decision, job = step(scored(job), jobs=done + export + evaluate)
    assert decision.status.phase == "Succeeded"
    assert decision.status.completion_time == NOW
    assert {"PhaseSucceeded", "Succeeded"} <= set(events(decision))
    evaluated = condition(decision, COND_EVALUATED)
    assert (evaluated.status, evaluated.reason) == ("True", "Succeeded")
    assert "DINO 0.612 (base 0.401)" in evaluated.message and "PRES 0.550" in evaluated.message


def test_priors_ready_of_several_classes_says_each_has_its_set():
    document = copy.deepcopy(DOCUMENT)
    spec = document["spec"]
    first = spec.pop("instance")
    del spec["priorPreservation"]["classPrompt"]
    spec["subjects"] = [
        {**first, "classPrompt": "a photo of dog"},
        {"imagesUri": "s3://data/cat", "prompt": "a photo of zwx cat", "classPrompt": "a cat"},
    ]
    spec["training"]["batchSize"] = 2
    _, job = step(parse_job(document))
    decision, _ = step(job, jobs=jobs(names.PRIORS, succeeded=True))
    ready = condition(decision, COND_PRIORS_READY)
    assert ready.status == "True"
    assert ready.message == (
        f"8 class images for each of 2 classes, the first class's at {CACHE.uri}"
    )


def test_failed_rank_restarts_the_whole_gang_then_recreates_it():
    status = {
        "conditions": [
            {
                "type": COND_PRIORS_READY,
                "status": "True",
                "reason": "Generated",
                "lastTransitionTime": NOW.isoformat(),
            }
        ]
    }
    job = job_with(status=status)
    train = (
        ChildJob("dog-train-0", names.TRAIN, 0, 0),
        ChildJob("dog-train-1", names.TRAIN, 1, 0, failed=True),
    )
    pods = (
        ChildPod("dog-train-1-p", names.TRAIN, 1, 0, "Failed", exit_code=137, message="killed"),
    )
    decision, job = step(job, jobs=train, pods=pods)
    assert decision.status.restarts == 1
    assert sorted(deleted(decision)) == ["dog-train-0", "dog-train-1"]
    assert "GangRestart" in events(decision)
    # Old pods still terminating: wait, create nothing.
    terminating = tuple(ChildJob(j.name, j.component, j.rank, 0, deleting=True) for j in train)
    decision, job = step(job, jobs=terminating)
    assert created(decision) == [] and deleted(decision) == []
    # Gone: the next attempt is created with the new attempt label.
    decision, job = step(job)
    assert created(decision) == ["dog-train-0", "dog-train-1"]
    manifest = next(
        a.manifest
        for a in decision.actions
        if isinstance(a, Create) and a.manifest["kind"] == "Job"
    )
    assert manifest["metadata"]["labels"][names.LABEL_ATTEMPT] == "1"


def test_backoff_limit_fails_the_job():
    status = {
        "restarts": 1,
        "conditions": [
            {
                "type": COND_PRIORS_READY,
                "status": "True",
                "reason": "Generated",
                "lastTransitionTime": NOW.isoformat(),
            }
        ],
    }
    failed = jobs(names.TRAIN, attempt=1, failed=True)
    decision, _ = step(job_with(status=status), jobs=failed)
    assert decision.status.phase == "Failed"
    failure = next(c for c in decision.status.conditions if c.type == COND_FAILED)
    assert failure.reason == "BackoffLimitExceeded"


def test_bad_input_exit_code_fails_at_once_with_the_trainers_message():
    failed = jobs(names.PRIORS, failed=True, ranks=1) + jobs(names.PRIORS, ranks=2)[1:]
    pods = (
        ChildPod(
            "dog-priors-0-p",
            names.PRIORS,
            0,
            0,
            "Failed",
            2,
            "config: instance images not found at s3://data/dog",
        ),
    )
    decision, _ = step(job_with(), jobs=failed, pods=pods)
    assert decision.status.phase == "Failed"
    failure = next(c for c in decision.status.conditions if c.type == COND_FAILED)
    assert failure.reason == "InvalidConfig"
    assert "instance images not found" in failure.message
    assert decision.status.restarts == 0


def test_a_lingering_pod_of_an_earlier_attempt_does_not_explain_a_failure():
    status = {"restarts": 1}
    failed = jobs(names.PRIORS, attempt=1, failed=True, ranks=1)
    old_message = f"{env.BAD_INPUT_PREFIX}instance.imagesUri: no images"
    pods = (
        ChildPod("dog-priors-0-old", names.PRIORS, 0, 0, "Failed", 1, old_message),
        ChildPod("dog-priors-0-new", names.PRIORS, 0, 1, "Failed", 137, "OOMKilled"),
    )
    job = job_with(status=status, runPolicy={"backoffLimit": 3})
    decision, _ = step(job, jobs=failed, pods=pods)
    assert decision.status.restarts == 2
    restart = next(
        a for a in decision.actions if isinstance(a, Event) and a.reason == "GangRestart"
    )
    assert "dog-priors-0-new" in restart.message and "code 137" in restart.message


def test_suspend_deletes_pods_and_resume_recreates_them():
    status = {
        "conditions": [
            {
                "type": COND_PRIORS_READY,
                "status": "True",
                "reason": "Generated",
                "lastTransitionTime": NOW.isoformat(),
            }
        ]
    }
    decision, job = step(
        job_with(status=status, runPolicy={"suspend": True}), jobs=jobs(names.TRAIN)
    )
    assert decision.status.phase == "Suspended"
    assert sorted(deleted(decision)) == ["dog-train-0", "dog-train-1"]
    document = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    document["spec"]["runPolicy"]["suspend"] = False
    decision, _ = step(parse_job(document))
    assert created(decision) == ["dog-train-0", "dog-train-1"]
    resumed = next(c for c in decision.status.conditions if c.type == COND_SUSPENDED)
    assert (resumed.status, resumed.reason) == ("False", "Resumed")


def test_bad_input_under_torchrun_is_told_by_the_termination_message():
    """torchrun exits 1 whatever its workers did; the trainer's message says bad input."""
    failed = jobs(names.PRIORS, failed=True, ranks=1) + jobs(names.PRIORS, ranks=2)[1:]
    message = f"{env.BAD_INPUT_PREFIX}instance.imagesUri: no images (png, jpg, webp) in /x"
    pods = (ChildPod("dog-priors-0-p", names.PRIORS, 0, 0, "Failed", 1, message),)
    decision, _ = step(job_with(), jobs=failed, pods=pods)
    failure = next(c for c in decision.status.conditions if c.type == COND_FAILED)
    assert (decision.status.phase, failure.reason) == ("Failed", "InvalidConfig")
    assert "instance.imagesUri: no images" in failure.message
    assert decision.status.restarts == 0


def test_deadline_fails_a_running_job():
    status = {"startTime": (NOW - timedelta(seconds=100)).isoformat()}
    decision, _ = step(
        job_with(status=status, runPolicy={"activeDeadlineSeconds": 60}), jobs=jobs(names.PRIORS)
    )
    assert decision.status.phase == "Failed"
    failure = next(c for c in decision.status.conditions if c.type == COND_FAILED)
    assert failure.reason == "DeadlineExceeded"
    assert sorted(deleted(decision)) == ["dog-priors-0", "dog-priors-1"]


def test_deadline_spares_serving_suspended_and_resumed_jobs():
    long_ago = {"startTime": (NOW - timedelta(hours=5)).isoformat()}
    deadline = {"activeDeadlineSeconds": 3600}
    serving = {**long_ago, "phase": "Serving"}
    decision, _ = step(job_with(status=serving, runPolicy=deadline))
    assert decision.status.phase != "Failed"
    suspended = job_with(status=long_ago, runPolicy={**deadline, "suspend": True})
    decision, _ = step(suspended, jobs=jobs(names.TRAIN))
    assert decision.status.phase == "Suspended"
    document = suspended.model_dump(mode="json", by_alias=True, exclude_none=True)
    document["status"] = decision.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    document["spec"]["runPolicy"]["suspend"] = False
    decision, _ = step(parse_job(document))
    assert decision.status.phase != "Failed" and decision.status.start_time is None


def test_ttl_deletes_a_finished_job_only_when_due():
    status = {"phase": "Succeeded", "completionTime": (NOW - timedelta(seconds=30)).isoformat()}
    decision, _ = step(job_with(status=status, runPolicy={"ttlSecondsAfterFinished": 60}))
    assert not any(isinstance(a, DeleteSelf) for a in decision.actions)
    decision, _ = step(job_with(status=status, runPolicy={"ttlSecondsAfterFinished": 10}))
    assert any(isinstance(a, DeleteSelf) for a in decision.actions)


def test_reconcile_is_idempotent_once_children_exist():
    _, job = step(job_with())
    first, _ = step(job, jobs=jobs(names.PRIORS))
    second, _ = step(job, jobs=jobs(names.PRIORS))
    assert created(first) == created(second) == []
    assert first.status == second.status


def test_priors_disabled_go_straight_to_training():
    decision, _ = step(job_with(priorPreservation={"enabled": False}))
    assert created(decision) == ["dog-train-0", "dog-train-1"]


def test_immutable_changes_name_their_paths_and_mutable_sections_pass():
    applied = {"training": {"maxSteps": 10}, "runPolicy": {"suspend": False}}
    current = {"training": {"maxSteps": 20}, "runPolicy": {"suspend": True}}
    assert immutable_changes(applied, current) == ["spec.training.maxSteps"]
    assert effective_spec(applied, current) == {
        "training": {"maxSteps": 10},
        "runPolicy": {"suspend": True},
    }


DONE = [
    {"type": t, "status": "True", "reason": "Succeeded", "lastTransitionTime": NOW.isoformat()}
    for t in (COND_PRIORS_READY, COND_TRAINED, COND_EXPORTED, COND_EVALUATED)
]
ARTIFACT = {"uri": "s3://runs/dog/export", "digest": "sha256:aaa"}


def test_serving_creates_a_deployment_for_exactly_the_artifact():
    job = job_with(status={"conditions": DONE, "artifact": ARTIFACT}, inference={"enabled": True})
    decision, _ = step(job)
    assert decision.status.phase == "Serving"
    assert created(decision, "Deployment") == ["dog-inference"]
    assert created(decision, "Service") == ["dog-inference"]
    kinds = [a.manifest["kind"] for a in decision.actions if isinstance(a, Create)]
    assert kinds.index("ServiceAccount") < kinds.index("Deployment")  # its pods' identity first
    account = next(
        a.manifest
        for a in decision.actions
        if isinstance(a, Create) and a.manifest["kind"] == "ServiceAccount"
    )
    deployment = next(
        a.manifest
        for a in decision.actions
        if isinstance(a, Create) and a.manifest["kind"] == "Deployment"
    )
    pod = deployment["spec"]["template"]["spec"]
    # The unauthenticated server holds no Kubernetes credentials: not the trainer's identity
    # (which may patch the job's status), and no token at all.
    assert pod["serviceAccountName"] == account["metadata"]["name"] == "dog-inference"
    assert pod["automountServiceAccountToken"] is False
    assert account["automountServiceAccountToken"] is False
    args = pod["containers"][0]["args"]
    assert args[args.index("--model") + 1] == ARTIFACT["uri"]
    assert args[args.index("--digest") + 1] == ARTIFACT["digest"]
    assert decision.status.inference.endpoint == "http://dog-inference.team.svc"


def test_a_lora_artifact_is_served_on_the_base_the_export_recorded():
    lora = {**ARTIFACT, "kind": "lora", "baseModel": "s3://models/sd15"}
    job = job_with(status={"conditions": DONE, "artifact": lora}, inference={"enabled": True})
    decision, _ = step(job)
    deployment = next(
        a.manifest
        for a in decision.actions
        if isinstance(a, Create) and a.manifest["kind"] == "Deployment"
    )
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == "s3://models/sd15"
    assert args[args.index("--adapter") + 1] == ARTIFACT["uri"]
    assert args[args.index("--digest") + 1] == ARTIFACT["digest"]


def test_a_lora_artifact_without_its_base_is_not_served():
    lora = {**ARTIFACT, "kind": "lora"}
    job = job_with(status={"conditions": DONE, "artifact": lora}, inference={"enabled": True})
    decision, _ = step(job)
    assert created(decision, "Deployment") == []
    ready = next(c for c in decision.status.conditions if c.type == COND_INFERENCE_READY)
    assert (ready.status, ready.reason) == ("False", "NoBaseModel")


def test_serving_rolls_to_a_new_digest_and_reports_ready_replicas():
    from dreambooth_operator import builders
    from dreambooth_operator.reconcile import ChildDeployment, Update

    job = job_with(status={"conditions": DONE, "artifact": ARTIFACT}, inference={"enabled": True})
    current = builders.inference_deployment(job, ARTIFACT["uri"], ARTIFACT["digest"])
    same = ChildDeployment(current["metadata"]["annotations"][builders.ANNOTATION_TEMPLATE_HASH], 1)
    decision, _ = step(job, inference=same, inference_service=True)
    assert not [a for a in decision.actions if isinstance(a, (Create, Update))]
    ready = next(c for c in decision.status.conditions if c.type == COND_INFERENCE_READY)
    assert (ready.status, decision.status.inference.ready_replicas) == ("True", 1)
    newer = job_with(
        status={"conditions": DONE, "artifact": {**ARTIFACT, "digest": "sha256:bbb"}},
        inference={"enabled": True},
    )
    decision, _ = step(newer, inference=same, inference_service=True)
    assert [a for a in decision.actions if isinstance(a, Update)]
    assert decision.status.inference.ready_replicas == 0


def test_disabling_inference_removes_the_deployment_and_succeeds():
    from dreambooth_operator.reconcile import ChildDeployment

    job = job_with(status={"conditions": DONE, "artifact": ARTIFACT})
    decision, _ = step(job, inference=ChildDeployment("x", 1), inference_service=True)
    assert sorted(deleted(decision)) == ["dog-inference", "dog-inference"]
    assert decision.status.phase == "Succeeded"


def test_a_lost_inference_service_is_created_again():
    from dreambooth_operator import builders
    from dreambooth_operator.reconcile import ChildDeployment

    job = job_with(status={"conditions": DONE, "artifact": ARTIFACT}, inference={"enabled": True})
    current = builders.inference_deployment(job, ARTIFACT["uri"], ARTIFACT["digest"])
    same = ChildDeployment(current["metadata"]["annotations"][builders.ANNOTATION_TEMPLATE_HASH], 1)
    decision, _ = step(job, inference=same, inference_service=False)
    assert created(decision, "Service") == ["dog-inference"]
    assert created(decision, "Deployment") == []


def test_suspending_a_serving_job_stops_inference_and_resuming_brings_it_back():
    from dreambooth_operator.reconcile import ChildDeployment

    status = {"phase": "Serving", "conditions": DONE, "artifact": ARTIFACT}
    job = job_with(status=status, inference={"enabled": True}, runPolicy={"suspend": True})
    decision, _ = step(job, inference=ChildDeployment("x", 1), inference_service=True)
    assert decision.status.phase == "Suspended"
    assert sorted(deleted(decision)) == ["dog-inference", "dog-inference"]
    assert decision.status.inference is None
    resumed = job_with(status=status, inference={"enabled": True})
    decision, _ = step(resumed)
    assert decision.status.phase == "Serving"
    assert created(decision, "Deployment") == created(decision, "Service") == ["dog-inference"]


def test_enabling_inference_on_a_succeeded_job_starts_serving():
    status = {
        "phase": "Succeeded",
        "conditions": DONE,
        "artifact": ARTIFACT,
        "completionTime": NOW.isoformat(),
    }
    decision, _ = step(job_with(status=status, inference={"enabled": True}))
    assert decision.status.phase == "Serving"
    assert created(decision, "Deployment") == ["dog-inference"]


def test_operator_writes_progress_only_to_start_it():
    decision = reconcile(job_with(priorPreservation={"enabled": False}), Observed(now=NOW))
    assert decision.status_patch()["progress"]["summary"] == "0/10"
    reported = {"progress": {"step": 7, "totalSteps": 10}, "conditions": DONE[:1]}
    decision = reconcile(
        job_with(status=reported, priorPreservation={"enabled": False}), Observed(now=NOW)
    )
    assert "progress" not in decision.status_patch()


def test_a_job_whose_output_uri_an_earlier_live_job_uses_is_refused():
    decision, _ = step(job_with(), output_taken_by="team/first")
    assert decision.status.phase == "Failed"
    failure = next(c for c in decision.status.conditions if c.type == COND_FAILED)
    assert failure.reason == "InvalidSpec"
    assert failure.message.startswith("spec.storage.outputUri: ")
    assert "in use by job team/first" in failure.message
    assert created(decision) == []


# ------------------------------------------------------------------------------ made explicit
# What the order of the decide steps implies, and that predicates only answer.


def failure_of(decision):
    return next(c for c in decision.status.conditions if c.type == COND_FAILED)


def test_predicates_only_answer():
    status = {
        "phase": "Training",
        "startTime": (NOW - timedelta(seconds=100)).isoformat(),
        "conditions": [
            {
                "type": COND_SUSPENDED,
                "status": "True",
                "reason": "Suspended",
                "lastTransitionTime": NOW.isoformat(),
            }
        ],
    }
    job = job_with(status=status, runPolicy={"activeDeadlineSeconds": 60})
    before = job.model_dump()
    assert not deadline_exceeded(job, job.status, NOW)  # still marked Suspended: resuming
    assert resuming(job, job.status)
    assert not is_finished(job, job.status)
    assert job.model_dump() == before
    running = job_with(status={**status, "conditions": []}, runPolicy={"activeDeadlineSeconds": 60})
    assert deadline_exceeded(running, running.status, NOW)
    assert not deadline_exceeded(running, running.status, NOW - timedelta(seconds=50))


def test_reconcile_leaves_the_job_it_decides_on_untouched():
    job = job_with(status={"restarts": 0, "conditions": DONE[:1]})
    before = job.model_dump()
    failed = jobs(names.TRAIN, failed=True)
    decision, _ = step(job, jobs=failed)
    assert decision.status.restarts == 1
    assert job.model_dump() == before


def test_a_finished_job_only_waits_for_its_ttl():
    """Nothing else is looked at: not its children, not its deadline."""
    status = {
        "phase": "Failed",
        "completionTime": (NOW - timedelta(seconds=30)).isoformat(),
        "startTime": (NOW - timedelta(hours=5)).isoformat(),
    }
    job = job_with(status=status, runPolicy={"activeDeadlineSeconds": 60})
    decision, _ = step(job, jobs=jobs(names.TRAIN))
    assert decision.actions == [] and decision.status == job.status
    ttl = job_with(status=status, runPolicy={"ttlSecondsAfterFinished": 10})
    decision, _ = step(ttl, jobs=jobs(names.TRAIN))
    assert decision.actions == [DeleteSelf()]


def test_the_deadline_is_decided_before_anything_else():
    status = {"startTime": (NOW - timedelta(seconds=100)).isoformat()}
    job = job_with(status=status, runPolicy={"activeDeadlineSeconds": 60})
    decision, _ = step(job, jobs=jobs(names.PRIORS), output_taken_by="team/first")
    assert failure_of(decision).reason == "DeadlineExceeded"


def test_a_failed_job_stays_failed_and_starts_nothing():
    status = {
        "phase": "Training",
        "conditions": [
            *DONE[:1],
            {
                "type": COND_FAILED,
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "lastTransitionTime": NOW.isoformat(),
            },
        ],
    }
    decision, _ = step(job_with(status=status))
    assert decision.status.phase == "Failed"
    assert created(decision) == [] and deleted(decision) == []
    assert decision.status.completion_time == NOW
    assert events(decision) == ["PhaseFailed"]


def test_a_taken_output_uri_fails_even_a_suspended_job():
    """The outputUri is decided before suspension: a job that cannot own its output fails."""
    job = job_with(runPolicy={"suspend": True})
    decision, _ = step(job, output_taken_by="team/first")
    assert decision.status.phase == "Failed"
    assert failure_of(decision).reason == "InvalidSpec"


def test_training_starts_only_once_the_priors_are_ready():
    running = jobs(names.PRIORS, succeeded=False)
    decision, _ = step(job_with(), jobs=running)
    assert created(decision) == []
    assert decision.status.progress is None and not decision.progress_started
    one_done = (replace(running[0], succeeded=True), running[1])
    decision, _ = step(job_with(), jobs=one_done)
    assert created(decision) == []


def test_a_failure_from_outside_is_the_failed_condition_reconcile_builds():
    job = job_with(status={"phase": "Training", "restarts": 1, "conditions": DONE[:1]})
    decision = failure(job.status, 1, NOW, "ChildRejected", "the API server refused Job x")
    assert (decision.status.phase, decision.status.completion_time) == ("Failed", NOW)
    assert decision.status.restarts == 1
    failed = failure_of(decision)
    assert (failed.status, failed.reason, failed.last_transition_time) == (
        "True",
        "ChildRejected",
        NOW,
    )
    assert failed.observed_generation == 1
    assert [(a.type, a.reason) for a in decision.actions] == [("Warning", "ChildRejected")]
    # Once failed, a job stays as it failed first.
    again = failure(decision.status, 1, NOW + timedelta(seconds=5), "ChildRejected", "other")
    assert again.status == decision.status and again.actions == []


def test_a_rejected_spec_stops_what_runs_even_once_failed():
    from dreambooth_operator.reconcile import ChildDeployment

    running = jobs(names.TRAIN) + (ChildJob("dog-priors-0", names.PRIORS, 0, 0, succeeded=True),)
    observed = Observed(now=NOW, jobs=running, inference=ChildDeployment("h", 1))
    decision = rejection("dog", job_with().status, 1, observed, ["a: no", "b: no"])
    assert sorted(deleted(decision)) == ["dog-inference", "dog-train-0", "dog-train-1"]
    assert (decision.status.phase, failure_of(decision).message) == ("Failed", "a: no; b: no")
    assert failure_of(decision).reason == "InvalidSpec"
    again = rejection("dog", decision.status, 1, observed, ["a: no"])
    assert sorted(deleted(again)) == sorted(deleted(decision))
    assert not events(again) and again.status == decision.status


# ------------------------------------------------------------------------------ evaluation

SCORES = {"dino": 0.401, "clipI": 0.6, "clipT": 0.25, "pres": 0.5, "div": 0.3}
EVALUATION = {
    "trained": {**SCORES, "dino": 0.612, "pres": 0.55},
    "base": SCORES,
    "diversityMethod": "dino",
    "images": 12,
    "reportUri": "s3://runs/dog/evaluation/report.json",
}
EXPORTED = [c for c in DONE if c["type"] != COND_EVALUATED]
EVALUATE_FAILED = (ChildJob("dog-evaluate", names.EVALUATE, 0, 0, failed=True),)
ENCODER_MISSING = (
    ChildPod(
        "dog-evaluate-p",
        names.EVALUATE,
        0,
        0,
        "Failed",
        1,
        "OSError: /models/no-such-dino is not a local folder",
    ),
)


def scored(job):
    """The job as its evaluation pod leaves it: status.evaluation written."""
    document = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    document["status"]["evaluation"] = EVALUATION
    return parse_job(document)


def condition(decision, kind):
    return next((c for c in decision.status.conditions if c.type == kind), None)


def test_a_failed_evaluation_fails_only_itself_and_the_job_succeeds():
    job = job_with(status={"conditions": EXPORTED, "artifact": ARTIFACT})
    decision, job = step(job, jobs=EVALUATE_FAILED, pods=ENCODER_MISSING)
    assert decision.status.phase == "Succeeded"
    evaluated = condition(decision, COND_EVALUATED)
    assert (evaluated.status, evaluated.reason) == ("False", "EvaluationFailed")
    assert "no-such-dino" in evaluated.message and "artifact is unaffected" in evaluated.message
    warning = next(a for a in decision.actions if isinstance(a, Event) and a.type == "Warning")
    assert warning.reason == "EvaluationFailed" and "no-such-dino" in warning.message
    # No restart, nothing deleted, the job not failed.
    assert decision.status.restarts == 0 and deleted(decision) == []
    assert condition(decision, COND_FAILED) is None
    # Level-triggered: the next pass neither evaluates again nor tells it again.
    decision, _ = step(job, jobs=EVALUATE_FAILED, pods=ENCODER_MISSING)
    assert created(decision) == [] and "EvaluationFailed" not in events(decision)


def test_serving_starts_beside_the_evaluation_and_outlives_its_failure():
    job = job_with(
        status={"conditions": EXPORTED, "artifact": ARTIFACT}, inference={"enabled": True}
    )
    decision, job = step(job)
    assert decision.status.phase == "Serving"
    assert created(decision) == ["dog-evaluate"]
    assert created(decision, "Deployment") == ["dog-inference"]
    assert condition(decision, COND_EVALUATED) is None  # running
    decision, _ = step(job, jobs=EVALUATE_FAILED, pods=ENCODER_MISSING)
    assert decision.status.phase == "Serving"
    assert condition(decision, COND_EVALUATED).reason == "EvaluationFailed"
    assert "EvaluationFailed" in events(decision)
    assert deleted(decision) == []  # the inference Deployment stays


def test_an_evaluation_pod_that_reported_no_scores_fails_the_evaluation():
    job = job_with(status={"conditions": EXPORTED, "artifact": ARTIFACT})
    evaluate = (ChildJob("dog-evaluate", names.EVALUATE, 0, 0, succeeded=True),)
    decision, _ = step(job, jobs=evaluate)
    assert decision.status.phase == "Succeeded"
    assert condition(decision, COND_EVALUATED).reason == "NoReport"


def test_the_deadline_stops_the_evaluation_only():
    started = (NOW - timedelta(seconds=100)).isoformat()
    status = {"conditions": EXPORTED, "artifact": ARTIFACT, "startTime": started}
    job = job_with(status=status, runPolicy={"activeDeadlineSeconds": 60})
    running = (ChildJob("dog-evaluate", names.EVALUATE, 0, 0),)
    decision, _ = step(job, jobs=running)
    assert decision.status.phase == "Succeeded"
    assert deleted(decision) == ["dog-evaluate"]
    assert condition(decision, COND_EVALUATED).reason == "DeadlineExceeded"
    # One that finished before the pass that saw the deadline counts.
    done = (ChildJob("dog-evaluate", names.EVALUATE, 0, 0, succeeded=True),)
    decision, _ = step(scored(job), jobs=done)
    assert condition(decision, COND_EVALUATED).reason == "Succeeded" and deleted(decision) == []


def test_a_job_that_does_not_evaluate_succeeds_after_export():
    job = job_with(
        status={"conditions": EXPORTED, "artifact": ARTIFACT}, evaluation={"enabled": False}
    )
    decision, _ = step(job)
    assert decision.status.phase == "Succeeded" and created(decision) == []
    assert condition(decision, COND_EVALUATED) is None
