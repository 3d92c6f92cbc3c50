"""What one job (or its pods, which may write its status) must not decide for another."""

from __future__ import annotations

import pytest

from dreambooth_contract.api import GROUP, PLURAL, VERSION
from dreambooth_contract.trainer_config import TrainerConfig
from dreambooth_contract.validation import parse_job
from tests.e2e.conftest import job_document, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]


def test_a_second_live_job_on_the_same_output_uri_is_refused_naming_the_first(
    operator_factory, jobs, namespace
):
    operator = operator_factory(namespace)
    jobs.create(job_document("first"))
    wait_until(
        "first's priors Job",
        lambda: [j.metadata.name for j in jobs.batch_jobs()] == ["first-priors-0"],
        60,
        operator.log,
    )
    second = job_document("second")
    second["spec"]["storage"]["outputUri"] = jobs.get("first")["spec"]["storage"]["outputUri"]
    jobs.create(second)
    status = jobs.wait("second", lambda s: s.get("phase") == "Failed", "Failed", 60, operator.log)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("spec.storage.outputUri: s3://runs/first is in use")
    assert f"by job {namespace}/first" in failed["message"]
    assert jobs.status("first").get("phase") != "Failed"
    assert [j.metadata.name for j in jobs.batch_jobs()] == ["first-priors-0"]


def test_another_jobs_status_cannot_make_a_job_skip_its_priors(operator_factory, jobs, namespace):
    """Any job's pods may patch their own job's status: one claiming a complete class-image
    set must not make another job skip generating (or checking) it."""
    operator = operator_factory(namespace)
    victim = job_document("victim")
    victim["metadata"]["namespace"] = namespace
    config = TrainerConfig.from_job(parse_job(victim))
    jobs.create(job_document("forger", runPolicy={"suspend": True}))
    jobs.wait("forger", lambda s: s.get("phase") == "Suspended", "Suspended", 60, operator.log)
    forged = {
        "priors": {"cacheKey": config.priors_key, "uri": config.priors_uri, "images": 4},
        "conditions": [
            {"type": "PriorsReady", "status": "True", "reason": "Generated", "message": "forged",
             "lastTransitionTime": "2026-12-01T00:00:00Z"}
        ],
    }  # fmt: skip
    jobs.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "forger", {"status": forged}
    )
    jobs.create(victim)
    wait_until(
        "victim's priors Job",
        lambda: "victim-priors-0" in [j.metadata.name for j in jobs.batch_jobs()],
        60,
        operator.log,
    )
    assert not [j for j in jobs.batch_jobs() if j.metadata.name.startswith("victim-train")]
