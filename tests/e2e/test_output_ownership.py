"""One outputUri, one live job: both would resume from and prune the same checkpoints."""

from __future__ import annotations

import pytest

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
