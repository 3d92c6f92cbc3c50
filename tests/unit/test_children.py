"""What a job observes as its children: only what it controls, not a deleted namesake's."""

from __future__ import annotations

from dreambooth_operator.handlers import children_of
from dreambooth_operator.reconcile import ChildDeployment, ChildJob, ChildPod

OURS, OLD = "uid-new", "uid-old"


def test_only_children_this_job_controls_are_observed():
    jobs = [
        ChildJob("dog-priors-0", "priors", 0, 0, uid="j-new", owner_uid=OURS),
        # The deleted job of the same name: finished, not yet collected.
        ChildJob("dog-train-0", "train", 0, 0, succeeded=True, uid="j-old", owner_uid=OLD),
    ]
    pods = [
        ChildPod("dog-priors-0-a", "priors", 0, 0, owner_uid="j-new"),
        ChildPod("dog-train-0-b", "train", 0, 0, phase="Succeeded", owner_uid="j-old"),
    ]
    deployments = [ChildDeployment("hash-old", ready_replicas=1, owner_uid=OLD)]
    children = children_of(OURS, jobs, pods, deployments, [OLD])
    assert [j.name for j in children.jobs] == ["dog-priors-0"]
    assert [p.name for p in children.pods] == ["dog-priors-0-a"]
    assert children.deployment is None
    assert children.inference_service is False


def test_a_job_sees_its_own_deployment_and_service():
    deployments = [ChildDeployment("h", owner_uid=OLD), ChildDeployment("h2", owner_uid=OURS)]
    children = children_of(OURS, [], [], deployments, [OURS])
    assert children.deployment == deployments[1]
    assert children.inference_service is True


def test_the_earliest_live_job_keeps_an_output_uri():
    from dreambooth_operator.handlers import OutputClaim, output_taken_by

    first = OutputClaim("2026-12-01T10:00:00Z", "team", "dog", "u-first")
    second = OutputClaim("2026-12-01T10:05:00Z", "other", "cat", "u-second")
    assert output_taken_by("u-first", [second, first]) is None
    assert output_taken_by("u-second", [second, first]) == "team/dog"
    assert output_taken_by("u-second", [second]) is None  # alone once the first finished
    # Created in the same second: both passes agree on one order.
    twin = OutputClaim("2026-12-01T10:00:00Z", "team", "cow", "u-twin")
    assert output_taken_by("u-first", [first, twin]) == "team/cow"
    assert output_taken_by("u-twin", [first, twin]) is None
