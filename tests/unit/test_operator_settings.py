"""The operator's kopf settings: what it watches, and how."""

from __future__ import annotations

import kopf
import pytest
from kopf._cogs.structs.references import Resource

from dreambooth_operator import handlers, kube


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
    assert selectors(settings, "", "v1", "configmaps") == []  # not watched at all


def test_filtering_can_be_turned_off_for_comparison(configured):
    settings = configured(filter_children=False)
    assert selectors(settings, "", "v1", "pods") == []
