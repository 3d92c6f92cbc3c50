"""100 DreamBoothJobs applied at once all reach their first phase (pods are not run)."""

from __future__ import annotations

import pytest

from bench.operator import RANKS, apply_and_measure

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.slow]


def test_hundred_jobs_reach_their_first_phase(operator_factory, jobs, namespace, kube_api):
    operator = operator_factory(namespace)
    result = apply_and_measure(kube_api, namespace, 100, timeout=300)
    assert result["completed"] == 100, (result, operator.log()[-3000:])
    assert len(jobs.pods()) == 100 * RANKS
    phases = {jobs.status(f"bench-{i:03d}").get("phase") for i in range(100)}
    assert phases <= {"Pending", "GeneratingPriors"} and None not in phases
    print(result, f"operator peak RSS {operator.peak_rss_bytes() / 2**20:.0f} MiB")
