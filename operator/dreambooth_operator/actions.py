"""Carrying out a Decision: the one place that acts on what reconcile decided, through kube.py.

The order is fixed here, not by whoever built the decision: the applied spec is recorded first;
a gang restart's count is written before its Jobs are deleted; then the children are created,
replaced and deleted in the decision's order; then the status is written, if it changed; the
events come last, once what they tell has happened.
"""

from __future__ import annotations

from typing import Any

from dreambooth_contract import names
from dreambooth_contract.server_api import SERVER_PLURAL

from . import kube
from .reconcile import (
    Create,
    Decision,
    Delete,
    DeleteSelf,
    Event,
    RecordAppliedSpec,
    Update,
)
from .server_reconcile import AnnotatePods, ServerDecision


def writes(document: dict[str, Any], decision: Decision) -> bool:
    """Whether carrying the decision out would write anything (events aside)."""
    acts = any(not isinstance(action, Event) for action in decision.actions)
    return acts or changes_status(document, decision)


def changes_status(document: dict[str, Any], decision: Decision) -> bool:
    # The API server stores no nulls: a null in the patch matches an absent field.
    current = document.get("status") or {}
    return any(current.get(k) != _without_nulls(v) for k, v in decision.status_patch().items())


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def apply(document: dict[str, Any], decision: Decision) -> None:
    """Carry the decision out on the job `document` is a read of.

    Raises kube.Rejected (a manifest the API server refuses) and kube.OwnedByAnother (a name a
    deleted namesake's child still holds) from the children's changes: what came after them in
    the decision, the status and the events included, is then not done.
    """
    meta = document["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    for record in decision.actions:
        if isinstance(record, RecordAppliedSpec):
            kube.patch_job_annotations(
                namespace, name, {names.ANNOTATION_APPLIED_SPEC: record.spec_json}
            )
    status_written = decision.status.restarts > (document.get("status") or {}).get("restarts", 0)
    if status_written:
        # A gang restart is recorded before its Jobs are deleted: an operator that dies in
        # between must not lose the count (and with it the backoff limit). The next pass
        # deletes the previous attempt's Jobs as stale.
        kube.patch_job_status(namespace, name, decision.status_patch())
    for action in decision.actions:
        if isinstance(action, DeleteSelf):
            kube.delete_job(namespace, name)
            return
        _change_child(action, namespace)
    if not status_written and changes_status(document, decision):
        kube.patch_job_status(namespace, name, decision.status_patch())
    _post_events(document, decision.actions)


def _change_child(action: object, namespace: str) -> None:
    """Create, replace, delete or annotate a child; anything else is not a child's change."""
    if isinstance(action, Create):
        kube.create(action.manifest)
    elif isinstance(action, Update):
        kube.replace(action.manifest)
    elif isinstance(action, Delete):
        kube.delete(action.kind, namespace, action.name)
    elif isinstance(action, AnnotatePods):
        kube.annotate_pods(namespace, action.selector, action.annotations)


def _post_events(document: dict[str, Any], actions: list) -> None:
    for event in actions:
        if isinstance(event, Event):
            kube.post_event(document, event.type, event.reason, event.message)


def changes_server_status(document: dict[str, Any], decision: ServerDecision) -> bool:
    current = document.get("status") or {}
    return any(current.get(k) != v for k, v in decision.status_patch().items())


def apply_server(document: dict[str, Any], decision: ServerDecision) -> None:
    """Carry out a DreamBoothServer's decision: its children in order (the index ConfigMap
    before the pods are nudged to re-read it), then its status if it changed, then events."""
    meta = document["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    for action in decision.actions:
        _change_child(action, namespace)
    if changes_server_status(document, decision):
        kube.patch_job_status(namespace, name, decision.status_patch(), SERVER_PLURAL)
    _post_events(document, decision.actions)
