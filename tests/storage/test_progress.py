"""Progress reporting: payload shape, rate limiting (fake clock), delivery, choice by env."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

import pytest

from dreambooth_contract.api import GROUP, PLURAL, VERSION, ArtifactStatus, DreamBoothJobStatus
from dreambooth_contract.env import JOB_NAME_ENV, JOB_NAMESPACE_ENV
from dreambooth_trainer import progress
from dreambooth_trainer.checkpoint_files import CheckpointInfo

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
CKPT = CheckpointInfo(
    step=100, key="ckpt/checkpoint-00000100", uri="s3://b/ckpt/checkpoint-00000100", created=T0
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recording(progress.ProgressReporter):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[dict] = []

    def _send(self, patch):
        self.sent.append(patch)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reporter(clock) -> Recording:
    return Recording(800, min_interval=10, clock=clock, wallclock=lambda: T0)


def test_payload_uses_the_crd_field_names(reporter, clock):
    reporter.report(10, loss=0.25, images_per_second=3.5)
    clock.now += 20
    reporter.report(50, loss=0.2, images_per_second=4.0)
    reporter.report_checkpoint(CKPT)
    patch = reporter.sent[-1]
    assert patch == {
        "status": {
            "progress": {
                "step": 50,
                "totalSteps": 800,
                "loss": 0.2,
                "imagesPerSecond": 4.0,
                "etaSeconds": 375,  # 2 steps/s measured, 750 steps left
                "activity": "training",
                "summary": "50/800",
                "updatedAt": "2024-05-01T12:00:00Z",
            },
            "checkpoint": {"step": 100, "uri": CKPT.uri, "time": "2024-05-01T12:00:00Z"},
        }
    }
    # what the operator reads back parses with the API models
    status = DreamBoothJobStatus.model_validate(patch["status"])
    assert status.progress.step == 50 and status.checkpoint.step == 100


def test_the_loss_is_reported_to_four_significant_digits(reporter):
    reporter.report(1, loss=1.6682686805725098)
    assert reporter.sent[-1]["status"]["progress"]["loss"] == 1.668
    reporter.report(2, loss=0.000123456, force=True)
    assert reporter.sent[-1]["status"]["progress"]["loss"] == 0.0001235


def test_rate_limited_but_checkpoint_and_close_always_sent(reporter, clock):
    assert reporter.report(1) is True  # first report goes out at once
    for step in range(2, 10):
        clock.now += 1
        assert reporter.report(step) is False
    clock.now += 2  # 10 s since the last send
    assert reporter.report(10) is True
    assert len(reporter.sent) == 2

    clock.now += 1
    reporter.report_checkpoint(CKPT)  # not rate limited
    assert "checkpoint" in reporter.sent[-1]["status"]
    clock.now += 1
    assert reporter.report(12) is False  # the checkpoint send counts as a send
    assert reporter.report(13, force=True) is True
    reporter.close()
    assert reporter.sent[-1]["status"]["progress"]["step"] == 13
    assert len(reporter.sent) == 5


def test_the_first_report_after_an_activity_goes_out_at_once(reporter, clock):
    reporter.announce(progress.PREPARING_DATA)
    clock.now += 1
    assert reporter.report(0) is True  # the activity turns to training as the steps start
    assert reporter.sent[-1]["status"]["progress"]["activity"] == progress.TRAINING
    clock.now += 1
    assert reporter.report(1) is False  # then rate limited again


def test_interval_never_exceeds_the_contract():
    assert progress.NullReporter(1, min_interval=120).min_interval == progress.MAX_INTERVAL


def test_send_failures_never_reach_the_training_loop(clock, caplog):
    class Broken(progress.ProgressReporter):
        def _send(self, patch):
            raise RuntimeError("apiserver on fire")

    r = Broken(10, clock=clock)
    r.report(1)
    r.report_checkpoint(CKPT)
    r.close()
    assert "apiserver on fire" in caplog.text


def test_local_reporter_writes_status_file(tmp_path, clock):
    path = tmp_path / "run" / "status.json"
    r = progress.LocalReporter(100, path, clock=clock, wallclock=lambda: T0)
    r.report(5, loss=1.0)
    r.report_checkpoint(CKPT)
    clock.now += 60
    r.report(6, loss=0.5)
    status = json.loads(path.read_text())
    assert status["progress"]["step"] == 6 and status["checkpoint"]["step"] == 100


def test_an_activity_is_announced_at_once_and_steps_say_training(reporter, clock):
    reporter.report(8, loss=0.5)
    reporter.announce(progress.PREPARING_DATA)  # within the rate limit: sent all the same
    assert reporter.sent[-1] == {"status": {"progress": {"activity": "preparing the data"}}}
    clock.now += 60
    reporter.report(9, loss=0.4)
    assert reporter.sent[-1]["status"]["progress"]["activity"] == progress.TRAINING


def test_the_local_status_file_merges_an_activity_into_the_progress(tmp_path, clock):
    """As the API server applies a merge patch: the step stays, the activity joins it."""
    path = tmp_path / "status.json"
    r = progress.LocalReporter(100, path, clock=clock, wallclock=lambda: T0)
    r.report(5, loss=1.0)
    r.announce(progress.LOADING_MODEL)
    status = json.loads(path.read_text())["progress"]
    assert status["step"] == 5 and status["activity"] == progress.LOADING_MODEL


class ApiError(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.reason = f"status {status}"


class StubCustomObjects:
    """Stands in for kubernetes.client.CustomObjectsApi; the real PATCH is a cluster test."""

    def __init__(self, failures: list[int] | None = None):
        self.failures = list(failures or [])
        self.calls: list[tuple] = []

    def patch_namespaced_custom_object_status(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.failures:
            raise ApiError(self.failures.pop(0))


def k8s_reporter(api, **kwargs) -> progress.KubernetesReporter:
    return progress.KubernetesReporter(100, "job", "ns", api=api, backoff=0.01, **kwargs)


def test_kubernetes_reporter_merge_patches_status_subresource():
    api = StubCustomObjects()
    r = k8s_reporter(api)
    r.report(3, loss=0.1)
    r.report_checkpoint(CKPT)
    r.close()
    assert api.calls, "nothing was sent"
    args, kwargs = api.calls[-1]
    assert args[:5] == (GROUP, VERSION, "ns", PLURAL, "job")
    assert kwargs["_content_type"] == "application/merge-patch+json"
    sent = {k for call in api.calls for k in call[0][5]["status"]}
    assert sent == {"progress", "checkpoint"}


@pytest.mark.parametrize(("failures", "attempts"), [([409, 503], 3), ([403], 1), ([500] * 5, 3)])
def test_kubernetes_reporter_retries_only_transient_errors(failures, attempts, caplog):
    caplog.set_level(logging.WARNING)
    api = StubCustomObjects(failures)
    r = k8s_reporter(api, retries=3)
    r.report(1)
    assert r.flush(10)
    assert len(api.calls) == attempts
    r.close()


def test_reporter_from_env(monkeypatch, tmp_path):
    for name in (JOB_NAME_ENV, JOB_NAMESPACE_ENV, progress.ENV_FILE):
        monkeypatch.delenv(name, raising=False)
    assert type(progress.reporter_from_env(10)) is progress.NullReporter

    monkeypatch.setenv(progress.ENV_FILE, str(tmp_path / "s.json"))
    monkeypatch.setenv(progress.ENV_INTERVAL, "5")
    local = progress.reporter_from_env(10)
    assert isinstance(local, progress.LocalReporter) and local.min_interval == 5
    assert type(progress.reporter_from_env(10, rank=1)) is progress.NullReporter

    # asked for Kubernetes but no cluster credentials: training goes on without status
    monkeypatch.setenv(JOB_NAME_ENV, "job")
    monkeypatch.setenv(JOB_NAMESPACE_ENV, "ns")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert type(progress.reporter_from_env(10)) is progress.NullReporter


ARTIFACT = ArtifactStatus(uri="s3://runs/dog/export", digest="sha256:abc")


def test_artifact_report_is_sent_at_once_in_the_wire_format():
    sent: list[dict] = []

    class Recording(progress.ProgressReporter):
        def _send(self, patch):
            sent.append(patch)

    reporter = Recording(total_steps=10)
    reporter.report_artifact(ArtifactStatus(uri="s3://runs/dog/export", digest="sha256:abc"))
    reporter.report_artifact(
        ArtifactStatus(
            uri="s3://runs/dog/export", digest="sha256:def", kind="lora", base_model="s3://m/sd15"
        )
    )
    pipeline = {"uri": "s3://runs/dog/export", "digest": "sha256:abc", "kind": "pipeline"}
    lora = {
        "uri": "s3://runs/dog/export",
        "digest": "sha256:def",
        "kind": "lora",
        "baseModel": "s3://m/sd15",
    }
    assert sent == [{"status": {"artifact": pipeline}}, {"status": {"artifact": lora}}]


@pytest.mark.parametrize(
    ("failures", "delivered"), [([503, 503], True), ([503] * 3, False), ([403], False)]
)
def test_an_artifact_that_cannot_be_recorded_fails_the_export(failures, delivered):
    """The operator learns what to serve only from this patch: a lost one must not leave the
    export looking successful (the job would wait in Exporting for good)."""
    api = StubCustomObjects(failures)
    r = k8s_reporter(api, retries=3)
    if delivered:
        r.report_artifact(ARTIFACT)
        assert api.calls[-1][0][5] == {
            "status": {"artifact": ARTIFACT.model_dump(by_alias=True, exclude_none=True)}
        }
    else:
        with pytest.raises(progress.ReportNotDelivered, match="job"):
            r.report_artifact(ARTIFACT)
    r.close()


def test_the_export_insists_on_a_kubernetes_reporter(monkeypatch, tmp_path):
    monkeypatch.setenv(JOB_NAME_ENV, "job")
    monkeypatch.setenv(JOB_NAMESPACE_ENV, "ns")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(Exception, match="missing-kubeconfig|Invalid kube-config|kube-config"):
        progress.reporter_from_env(10, must_deliver=True)
