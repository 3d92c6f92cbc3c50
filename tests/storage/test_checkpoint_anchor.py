"""A checkpoint is code (DeepSpeed and DCP unpickle theirs), and its manifest lies beside it, so
whoever may write the output location could commit one of their own. Under the operator a resume
trusts only the checkpoint recorded in the job's status, whose manifest digest bucket writers
cannot change. Here the status is a stub and the trainer a stub that loads its state the way
DeepSpeed does (``torch.load(weights_only=False)``); the real API server is a cluster test, the
real DeepSpeed engine a distributed one."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from dreambooth_contract.api import CheckpointStatus
from dreambooth_contract.env import JOB_NAME_ENV, JOB_NAMESPACE_ENV
from dreambooth_contract.trainer_config import ConfigError
from dreambooth_trainer import checkpoint_files, progress
from dreambooth_trainer.checkpoint_files import CheckpointInvalid
from dreambooth_trainer.checkpoint_manager import CheckpointManager
from dreambooth_trainer.parallel import World
from dreambooth_trainer.progress import AnchorUnavailable
from dreambooth_trainer.storage import LocalStore

ROOT = "checkpoints"
STATE = "backend/state.pt"


class Payload:
    """What an attacker puts in a checkpoint: unpickling it runs code (here: creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class StubStatus:
    """The job's status.checkpoint (a CheckpointAnchor)."""

    def __init__(self) -> None:
        self.checkpoint: CheckpointStatus | None = None
        self.unreadable: str | None = None

    def recorded_checkpoint(self, attempts: int | None = None) -> CheckpointStatus | None:
        if self.unreadable:
            raise AnchorUnavailable(self.unreadable)
        return self.checkpoint

    def describe(self) -> str:
        return "the stub status"


class Report:
    """StatusReport's part: the checkpoint's status, through the wire format. `lost`: a patch
    that never arrived."""

    def __init__(self, status: StubStatus):
        self.status = status
        self.lost = False

    def announce(self, info, seconds) -> None:
        """What the manager calls on each commit (the loop's `announce_checkpoint`)."""
        if not self.lost:
            wire = progress.status_patch(checkpoint=progress.checkpoint_model(info))
            self.status.checkpoint = CheckpointStatus.model_validate(wire["status"]["checkpoint"])


class StubTrainer:
    """What CheckpointManager uses of a Trainer (checkpoint_manager.Checkpointable); loads its
    state as DeepSpeed does (pickle)."""

    def __init__(self) -> None:
        self.world = World()
        self.backend_name = "stub"
        self.step = 0
        self.micro_step = 0
        self.loaded: list[int] = []

    def save_state(self, directory: Path) -> None:
        (directory / STATE).parent.mkdir(parents=True)
        torch.save({"step": self.step, "weights": torch.full((4,), float(self.step))},
                   directory / STATE)  # fmt: skip

    def load_state(self, directory: Path) -> None:
        state = torch.load(directory / STATE, weights_only=False)  # as DeepSpeed's engine does
        self.step = state["step"]
        self.loaded.append(self.step)

    def needs_file(self, path: str) -> bool:
        return True


@pytest.fixture
def unpickled(monkeypatch) -> list[Path]:
    """Every torch.load call (the spy passes through)."""
    calls: list[Path] = []
    real = torch.load

    def spy(f, *args, **kwargs):
        calls.append(Path(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.fixture
def status() -> StubStatus:
    return StubStatus()


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "output")


@pytest.fixture
def make(tmp_path, store, status):
    def make(anchor=status, keep: int = 3, identity=None) -> CheckpointManager:
        staging = tmp_path / "staging"
        identity = identity or {"instance": "a photo of sks dog"}
        return CheckpointManager(
            store, staging, interval=2, keep=keep, anchor=anchor, identity=identity
        )

    return make


def train_to(ckpt: CheckpointManager, status: StubStatus, *steps: int, lost=()) -> None:
    report = Report(status)
    trainer = StubTrainer()
    for step in steps:
        trainer.step = step
        report.lost = step in lost
        ckpt.save(trainer, report.announce)


def plant(store: LocalStore, tmp_path: Path, step: int, marker: Path) -> None:
    """Replace checkpoint `step` consistently: new files, a new manifest with their sha256s and
    the genuine metadata (identity and all), committed by the real protocol."""
    genuine = checkpoint_files.read_manifest(
        store, ROOT, checkpoint_files.list_steps(store, ROOT)[0]
    )
    staging = tmp_path / f"planted-{step}"
    (staging / STATE).parent.mkdir(parents=True)
    torch.save(Payload(marker), staging / STATE)
    checkpoint_files.save(staging, store, ROOT, step, genuine.metadata)
    assert checkpoint_files.verify(store, ROOT, step, level="sha256").step == step  # it checks out


def resume(ckpt: CheckpointManager) -> StubTrainer:
    trainer = StubTrainer()
    ckpt.resume(trainer)
    return trainer


def test_the_recorded_checkpoint_resumes(make, status, unpickled):
    train_to(make(), status, 2, 4)
    assert status.checkpoint.step == 4
    assert status.checkpoint.manifest_digest.startswith("sha256:")
    trainer = resume(make())
    assert (trainer.step, trainer.loaded) == (4, [4])
    assert len(unpickled) == 1


def test_a_consistently_replaced_checkpoint_is_refused_before_anything_is_unpickled(
    make, status, store, tmp_path, unpickled
):
    train_to(make(), status, 2, 4)
    marker = tmp_path / "attacker-code-ran"
    plant(store, tmp_path, 4, marker)

    trainer = StubTrainer()
    with pytest.raises(ConfigError) as refused:
        make().resume(trainer)
    assert refused.value.field == "storage.outputUri"
    assert store.uri_for(f"{ROOT}/checkpoint-00000004") in refused.value.message
    assert "recorded in the stub status" in refused.value.message
    assert "changed after its commit" in refused.value.message
    assert unpickled == [] and trainer.loaded == [] and trainer.step == 0
    assert not marker.exists()

    # Without the anchor (storage trusted, as before) the same checkpoint runs its code: what
    # the refusal above prevents.
    with pytest.raises(Exception):  # noqa: B017 - the payload is no state dict
        make(anchor=None).resume(StubTrainer())
    assert marker.exists()


def test_a_checkpoint_replaced_after_rank_0_checked_it_is_refused_by_the_download(
    make, status, store, tmp_path, unpickled, monkeypatch
):
    """Every rank checks the manifest bytes it reads itself against the recorded digest."""
    train_to(make(), status, 2, 4)
    marker = tmp_path / "attacker-code-ran"
    checked = checkpoint_files.verify

    def verify_then_replace(*args, **kwargs):
        info = checked(*args, **kwargs)
        monkeypatch.setattr(checkpoint_files, "verify", checked)
        plant(store, tmp_path, 4, marker)  # between rank 0's look and the download
        return info

    monkeypatch.setattr(checkpoint_files, "verify", verify_then_replace)
    with pytest.raises(ConfigError, match="a file does not match it"):
        make().resume(StubTrainer())
    assert unpickled == [] and not marker.exists()


def test_newer_checkpoints_than_the_recorded_one_are_skipped(
    make, status, store, tmp_path, unpickled, caplog
):
    ckpt = make()
    train_to(ckpt, status, 2, 4, 6, lost={6})  # step 6's report never arrived
    marker = tmp_path / "attacker-code-ran"
    plant(store, tmp_path, 8, marker)
    caplog.set_level(logging.WARNING)
    trainer = resume(make())
    assert (trainer.step, trainer.loaded) == (4, [4])
    assert "skipping checkpoints at steps [6, 8]" in caplog.text
    assert [p.parent.parent.name for p in unpickled] == ["restore-rank-00000"]
    assert not marker.exists()


def test_a_lost_report_never_gets_the_recorded_checkpoint_retired(make, status, store):
    """keep=1: retention must not delete the recorded checkpoint for a newer unrecorded one,
    or a job whose last report was lost would have nothing left to resume."""
    ckpt = make(keep=1)
    train_to(ckpt, status, 2)
    train_to(ckpt, status, 4, lost={4})
    assert checkpoint_files.list_steps(store, ROOT) == [4, 2]
    assert resume(make()).step == 2
    train_to(ckpt, status, 6)
    assert checkpoint_files.list_steps(store, ROOT) == [6]
    assert resume(make()).step == 6


def test_retention_waits_while_the_status_cannot_be_read(make, status, store):
    ckpt = make(keep=1)
    train_to(ckpt, status, 2, 4)
    status.unreadable = "apiserver down"
    train_to(ckpt, status, 6)
    assert checkpoint_files.list_steps(store, ROOT) == [6, 4]  # nothing deleted blind
    status.unreadable = None
    train_to(ckpt, status, 8)
    assert checkpoint_files.list_steps(store, ROOT) == [8]


@pytest.mark.parametrize("record", ["none", "no digest", "another location"])
def test_checkpoints_nobody_recorded_are_not_trusted_and_training_starts_over(
    make, status, store, unpickled, record
):
    """A job deleted and re-created starts with an empty status: what its storage holds is
    vouched for by nothing, so it trains from step 0 (the old checkpoints stay)."""
    train_to(make(), status, 2, 4)
    genuine = status.checkpoint
    status.checkpoint = {
        "none": None,
        "no digest": genuine.model_copy(update={"manifest_digest": None}),  # an older trainer
        "another location": genuine.model_copy(update={"uri": "s3://elsewhere/checkpoint-4"}),
    }[record]
    trainer = resume(make())
    assert (trainer.step, trainer.loaded, unpickled) == (0, [], [])
    assert checkpoint_files.list_steps(store, ROOT) == [4, 2]


def test_unrecorded_checkpoints_of_another_spec_are_refused_not_overwritten(
    make, status, store, unpickled
):
    """Nothing vouches for them, so they are not resumed; but their manifests (parsed, never
    loaded) say another spec trained them: training over them would replace another job's
    checkpoints and export, so the identity check still refuses (it did before the anchor)."""
    train_to(make(), status, 2, 4)
    status.checkpoint = None  # the job was deleted and re-created with another prompt
    with pytest.raises(ConfigError, match="another instance than this run's: training here"):
        make(identity={"instance": "a photo of zwx cat"}).resume(StubTrainer())
    assert unpickled == []
    assert checkpoint_files.list_steps(store, ROOT) == [4, 2]


def test_the_recorded_checkpoint_deleted_means_training_starts_over(make, status, store, unpickled):
    train_to(make(), status, 2, 4)
    store.delete(f"{ROOT}/checkpoint-00000004")
    trainer = resume(make())
    assert (trainer.step, unpickled) == (0, [])


def test_a_changed_file_under_the_recorded_manifest_is_refused(make, status, store, unpickled):
    """The manifest untouched, one file rewritten (same size): only the download's hash check
    can tell, and there is no falling back to an older checkpoint nothing vouches for."""
    train_to(make(), status, 2, 4)
    path = store.path(f"{ROOT}/checkpoint-00000004/{STATE}")
    data = bytearray(path.read_bytes())
    data[-30] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="a file does not match it"):
        make().resume(StubTrainer())
    assert unpickled == []


def test_a_status_that_cannot_be_read_fails_the_run_without_loading(make, status, unpickled):
    train_to(make(), status, 2)
    status.unreadable = "connection refused"
    with pytest.raises(RuntimeError, match="connection refused"):
        make().resume(StubTrainer())
    assert unpickled == []


def test_a_new_job_with_empty_storage_does_not_need_its_status(make, status):
    status.unreadable = "never asked"
    assert resume(make()).step == 0


def test_local_runs_trust_their_storage(make, status, store, monkeypatch):
    monkeypatch.delenv(JOB_NAME_ENV, raising=False)
    train_to(make(anchor=None), status, 2)
    status.checkpoint = None
    assert CheckpointManager(store, Path("/unused"), 2, 1).anchor is None  # the default, locally
    assert resume(make(anchor=None)).step == 2


def test_under_the_operator_the_default_anchor_is_the_jobs_status(monkeypatch, store):
    monkeypatch.setenv(JOB_NAME_ENV, "dog")
    monkeypatch.setenv(JOB_NAMESPACE_ENV, "team")
    anchor = CheckpointManager(store, Path("/unused"), 2, 1).anchor
    assert isinstance(anchor, progress.JobStatusAnchor)
    assert (anchor.name, anchor.namespace) == ("dog", "team")


# -- the protocol's part: every reader checks the bytes it parses -------------------------------


def test_restore_checks_the_manifest_bytes_against_the_expected_digest(store, tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "a.bin").write_bytes(b"genuine")
    info = checkpoint_files.save(staging, store, ROOT, 3)
    written = store.read_bytes(f"{ROOT}/checkpoint-00000003/manifest.json")
    assert info.manifest_digest == checkpoint_files.manifest_digest(written)
    assert checkpoint_files.verify(store, ROOT, 3, expect_digest=info.manifest_digest).step == 3

    (staging / "a.bin").write_bytes(b"planted")
    checkpoint_files.save(staging, store, ROOT, 3)  # consistent, but another manifest
    dest = tmp_path / "dest"
    with pytest.raises(CheckpointInvalid, match="not the expected"):
        checkpoint_files.restore(store, ROOT, dest, step=3, expect_digest=info.manifest_digest)
    assert not dest.exists()
    with pytest.raises(ValueError, match="give its step"):
        checkpoint_files.restore(store, ROOT, dest, expect_digest=info.manifest_digest)


def test_retention_upto_keeps_the_trusted_one_and_leaves_newer_ones(store, tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "a.bin").write_bytes(b"x")
    for step in (1, 2, 3, 4, 5):
        checkpoint_files.save(staging, store, ROOT, step)
    assert checkpoint_files.apply_retention(store, ROOT, keep=2, upto=3) == [1]
    assert checkpoint_files.list_steps(store, ROOT) == [5, 4, 3, 2]


# -- the status: written confirmed, read back --------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.reason = f"status {status}"


class StubCustomObjects:
    def __init__(self, status: dict | None = None, failures=()):
        self.status = status or {}
        self.failures = list(failures)
        self.patches: list[dict] = []
        self.reads = 0

    def patch_namespaced_custom_object_status(self, *args, **kwargs):
        if self.failures:
            raise ApiError(self.failures.pop(0))
        self.patches.append(args[5])

    def get_namespaced_custom_object_status(self, *args, **kwargs):
        self.reads += 1
        if self.failures:
            raise ApiError(self.failures.pop(0))
        return {"metadata": {"name": args[4]}, "status": self.status}


DIGEST = "sha256:" + "ab" * 32
INFO = checkpoint_files.CheckpointInfo(
    step=8,
    key="c/checkpoint-00000008",
    uri="s3://b/c/checkpoint-00000008",
    created=datetime(2024, 5, 1, tzinfo=timezone.utc),
    manifest_digest=DIGEST,
)


@pytest.mark.parametrize(("failures", "delivered"), [([503], True), ([503] * 3, False)])
def test_a_checkpoint_report_is_confirmed(failures, delivered, caplog):
    api = StubCustomObjects(failures=failures)
    reporter = progress.KubernetesReporter(10, "dog", "team", api=api, backoff=0.01, retries=3)
    caplog.set_level(logging.WARNING)
    assert reporter.report_checkpoint(INFO) is delivered  # returns once it arrived (or not)
    if delivered:
        assert api.patches[-1]["status"]["checkpoint"]["manifestDigest"] == DIGEST
    else:
        assert "is not recorded in the status of dreamboothjobs team/dog" in caplog.text
    reporter.close()


def test_the_job_status_anchor_reads_status_checkpoint():
    wire = progress.checkpoint_model(INFO).model_dump(mode="json", by_alias=True)
    api = StubCustomObjects({"phase": "Training", "checkpoint": wire}, failures=[503])
    anchor = progress.JobStatusAnchor("dog", "team", api=api, backoff=0.01)
    recorded = anchor.recorded_checkpoint()
    assert (recorded.step, recorded.uri, recorded.manifest_digest) == (8, INFO.uri, DIGEST)
    assert api.reads == 2  # the 503 was retried
    assert (
        progress.JobStatusAnchor("dog", "team", api=StubCustomObjects()).recorded_checkpoint()
        is None
    )


@pytest.mark.parametrize("failures", [[403], [503] * 5])
def test_the_job_status_anchor_says_when_it_cannot_read(failures):
    api = StubCustomObjects(failures=failures)
    anchor = progress.JobStatusAnchor("dog", "team", api=api, backoff=0.01, retries=5)
    with pytest.raises(AnchorUnavailable, match="team/dog"):
        anchor.recorded_checkpoint()
    assert api.reads == len(failures)
    with pytest.raises(AnchorUnavailable, match="namespace"):
        progress.JobStatusAnchor("dog", None, api=api).recorded_checkpoint()
