"""actions.apply: the one place a decision is carried out, in the one safe order."""

from __future__ import annotations

import pytest

from dreambooth_contract import names
from dreambooth_contract.api import DreamBoothJobStatus
from dreambooth_operator import actions, kube, reconcile

DOCUMENT = {
    "metadata": {"name": "dog", "namespace": "team"},
    "status": {"phase": "Training", "restarts": 0, "conditions": []},
}
CONFIG_MAP = {"kind": "ConfigMap", "metadata": {"name": "dog-config", "namespace": "team"}}


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """What reached kube.py, in order."""
    made: list[tuple] = []
    for name in (
        "create",
        "replace",
        "delete",
        "delete_job",
        "patch_job_status",
        "patch_job_annotations",
        "post_event",
    ):
        monkeypatch.setattr(kube, name, lambda *args, name=name: made.append((name, *args)))
    return made


def decision(restarts=0, phase="Training", *acts) -> reconcile.Decision:
    return reconcile.Decision(DreamBoothJobStatus(phase=phase, restarts=restarts), list(acts))


def test_the_applied_spec_first_the_events_last(calls):
    applied = decision(
        0,
        "Training",
        reconcile.Event("Normal", "PhaseTraining", "x"),
        reconcile.Create(CONFIG_MAP),
        reconcile.RecordAppliedSpec('{"a": 1}'),
    )
    actions.apply(DOCUMENT, applied)
    assert [c[0] for c in calls] == ["patch_job_annotations", "create", "post_event"]
    assert calls[0][3] == {names.ANNOTATION_APPLIED_SPEC: '{"a": 1}'}


def test_a_gang_restart_is_written_ahead_and_only_once(calls):
    restart = decision(
        1,
        "Training",
        reconcile.Delete("batch/v1", "Job", "dog-train-0"),
        reconcile.Event("Warning", "GangRestart", ""),
    )
    actions.apply(DOCUMENT, restart)
    assert [c[0] for c in calls] == ["patch_job_status", "delete", "post_event"]
    assert calls[0][3]["restarts"] == 1


def test_a_changed_status_is_written_after_the_children(calls):
    actions.apply(DOCUMENT, decision(0, "Exporting", reconcile.Create(CONFIG_MAP)))
    assert [c[0] for c in calls] == ["create", "patch_job_status"]


def test_deleting_the_job_itself_ends_the_decision(calls):
    actions.apply(
        DOCUMENT,
        decision(0, "Succeeded", reconcile.DeleteSelf(), reconcile.Event("Normal", "x", "")),
    )
    assert [c[0] for c in calls] == ["delete_job"]


def test_a_refused_child_leaves_the_status_and_events_unwritten(calls, monkeypatch):
    def refuse(manifest):
        raise kube.OwnedByAnother("taken")

    monkeypatch.setattr(kube, "create", refuse)
    with pytest.raises(kube.OwnedByAnother):
        actions.apply(
            DOCUMENT,
            decision(0, "Exporting", reconcile.Create(CONFIG_MAP), reconcile.Event("N", "x", "")),
        )
    assert calls == []


def test_writes_tells_events_and_an_unchanged_status_from_a_write():
    same = decision(0, "Training", reconcile.Event("Normal", "x", ""))
    assert not actions.writes(DOCUMENT, same)
    assert actions.writes(DOCUMENT, decision(0, "Exporting"))
    assert actions.writes(DOCUMENT, decision(0, "Training", reconcile.RecordAppliedSpec("{}")))
