"""The operator's kopf settings: what it watches, and how."""

from __future__ import annotations

import copy

import kopf
import pytest
from kopf._cogs.structs.references import Resource

from dreambooth_contract import names
from dreambooth_operator import handlers, kube, metrics


@pytest.fixture
def configured(monkeypatch):
    monkeypatch.setattr(kube, "load_config", lambda: None)

    def configure(**memo) -> kopf.OperatorSettings:
        settings = kopf.OperatorSettings()
        handlers.configure(settings=settings, memo=kopf.Memo(**memo))
        return settings

    return configure


def selectors(settings: kopf.OperatorSettings, group: str, version: str, plural: str):
    return list(settings.watching.label_selectors.collect(Resource(group, version, plural)))


def test_children_are_filtered_by_the_api_server_not_here(configured):
    """Without a selector the operator receives (and kopf keeps a record of) every pod, Job,
    Service and Deployment in the cluster."""
    settings = configured()
    for group, version, plural in handlers.CHILD_RESOURCES:
        assert selectors(settings, group, version, plural) == [
            "app.kubernetes.io/managed-by=dreambooth-operator"
        ], plural
    assert selectors(settings, "dreambooth.dev", "v1alpha1", "dreamboothjobs") == []
    assert selectors(settings, "", "v1", "secrets") == []  # not watched at all


def test_filtering_can_be_turned_off_for_comparison(configured):
    settings = configured(filter_children=False)
    assert selectors(settings, "", "v1", "pods") == []


def test_a_childs_event_wakes_its_jobs_daemon_through_the_memo(monkeypatch):
    """No module-level state: the wake-up calls live in the memo the startup handler fills
    (kopf hands each object a shallow copy of it)."""
    memo = kopf.Memo()
    monkeypatch.setattr(kube, "load_config", lambda: None)
    handlers.configure(settings=kopf.OperatorSettings(), memo=memo)
    pod_memo = copy.copy(memo)
    labels = {names.LABEL_JOB: "dog"}
    with memo.wakeups.registered(("team", "dog")) as wakeup:
        handlers.pod_changed(namespace="other", labels=labels, memo=pod_memo)
        assert not wakeup.is_set()
        handlers.pod_changed(namespace="team", labels=labels, memo=pod_memo)
        assert wakeup.is_set()
    handlers.pod_changed(namespace="team", labels=labels, memo=pod_memo)  # daemon gone: no-op


def test_the_phase_gauge_reads_the_index_the_startup_hands_over():
    phases = handlers.JobPhases()
    assert list(phases()) == []
    index = {("team", "dog"): ["Training"], ("team", "cat"): ["Failed"]}
    handlers.hand_phase_index_to_metrics(
        job_phases=index, job_evaluations={}, memo=kopf.Memo(phases=phases)
    )
    assert sorted(phases()) == ["Failed", "Training"]


def test_the_evaluation_gauge_has_each_evaluated_jobs_scores_with_bounded_labels():
    from prometheus_client import CollectorRegistry, generate_latest

    evaluations = handlers.JobEvaluations()
    scores = {"dino": 0.61, "clipI": 0.7, "clipT": 0.3, "div": 0.2}
    index = {("team", "dog"): [{"trained": {**scores, "pres": 0.5}, "base": scores}]}
    handlers.hand_phase_index_to_metrics(
        job_phases={}, job_evaluations=index, memo=kopf.Memo(evaluations=evaluations)
    )
    registry = CollectorRegistry()
    registry.register(metrics.EvaluationCollector(evaluations))
    text = generate_latest(registry).decode()
    assert (
        'dreambooth_operator_evaluation_score{dreambooth_job="dog",dreambooth_namespace="team",'
        'metric="clip_i",model="trained"} 0.7' in text
    )
    samples = [s for f in registry.collect() for s in f.samples]
    assert len(samples) == 9  # 5 trained, 4 base (no PRES)
    assert {s.labels["metric"] for s in samples} == {"dino", "clip_i", "clip_t", "pres", "div"}
