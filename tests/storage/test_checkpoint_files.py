"""The commit protocol: only checkpoints with a valid manifest and matching files exist."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from dreambooth_contract.layout import join_uri
from dreambooth_trainer import checkpoint_files as ckpt
from dreambooth_trainer.storage import Store

ROOT = "checkpoints"


def staging(tmp_path: Path, step: int, name: str = "stage") -> Path:
    """A staging directory like the trainer's: shards in subdirectories, content per step."""
    d = tmp_path / f"{name}-{step}"
    (d / "model").mkdir(parents=True)
    (d / "model" / "unet.bin").write_bytes(os.urandom(3000) + step.to_bytes(4, "big"))
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    return d


def save_steps(store: Store, tmp_path: Path, steps, **kwargs) -> list[ckpt.CheckpointInfo]:
    return [ckpt.save(staging(tmp_path, s), store, ROOT, s, {"epoch": s}, **kwargs) for s in steps]


def file_key(step: int, rel: str) -> str:
    return join_uri(ckpt.checkpoint_key(ROOT, step), rel)


def test_save_then_restore_round_trip(store, tmp_path):
    info = ckpt.save(staging(tmp_path, 7), store, ROOT, 7, {"world_size": 2})
    assert info.step == 7
    assert info.uri == store.uri_for("checkpoints/checkpoint-00000007")
    assert [f.path for f in info.files] == ["model/unet.bin", "trainer_state.json"]

    manifest = json.loads(store.read_bytes(file_key(7, "manifest.json")))
    assert manifest["step"] == 7 and manifest["metadata"] == {"world_size": 2}
    assert manifest["format"] == "dreambooth-checkpoint/v1"

    dest = tmp_path / "restored"
    restored = ckpt.restore(store, ROOT, dest)
    assert restored is not None and restored.step == 7 and restored.metadata == {"world_size": 2}
    for rel in ("model/unet.bin", "trainer_state.json"):
        assert (dest / rel).read_bytes() == (tmp_path / "stage-7" / rel).read_bytes()


def test_nothing_to_restore(store, tmp_path):
    assert ckpt.restore(store, ROOT, tmp_path / "dest") is None
    assert ckpt.latest_valid(store, ROOT) is None


def corrupt_flip_byte(store: Store, step: int) -> None:
    """Same size, different content: only the sha256 check can tell."""
    key = file_key(step, "model/unet.bin")
    data = bytearray(store.read_bytes(key))
    data[10] ^= 0xFF
    store.write_bytes(key, bytes(data))


CUT_OFF = {
    "manifest missing": lambda s, step: s.delete(file_key(step, "manifest.json")),
    "file missing": lambda s, step: s.delete(file_key(step, "model/unet.bin")),
    "file truncated": lambda s, step: s.write_bytes(file_key(step, "model/unet.bin"), b"half"),
    "hash wrong": corrupt_flip_byte,
    "manifest garbage": lambda s, step: s.write_bytes(file_key(step, "manifest.json"), b"{tru"),
    "manifest of another step": lambda s, step: s.write_bytes(
        file_key(step, "manifest.json"),
        s.read_bytes(file_key(step - 10, "manifest.json")),
    ),
}
REASONS = {
    "manifest missing": "no manifest",
    "file missing": "is missing",
    "file truncated": "bytes, manifest says",
    "hash wrong": "sha256",
    "manifest garbage": "invalid manifest",
    "manifest of another step": "manifest says step 10",
}


@pytest.mark.parametrize("damage", sorted(CUT_OFF))
def test_cut_off_checkpoint_is_never_restored(store, tmp_path, caplog, damage):
    save_steps(store, tmp_path, [10, 20])
    CUT_OFF[damage](store, 20)
    caplog.set_level(logging.WARNING, logger="dreambooth_trainer.checkpoint_files")

    latest = ckpt.latest_valid(store, ROOT)
    assert latest is not None and latest.step == 10

    dest = tmp_path / "dest"
    restored = ckpt.restore(store, ROOT, dest)
    assert restored is not None and restored.step == 10
    assert json.loads((dest / "trainer_state.json").read_text()) == {"step": 10}
    assert REASONS[damage] in caplog.text
    assert "checkpoint-00000020" in caplog.text
    assert not list(tmp_path.glob(".dest.*")), "no restore staging left behind"


def test_pinned_step_that_is_broken_raises(store, tmp_path):
    """Ranks told to load step N must not silently load something else."""
    save_steps(store, tmp_path, [10, 20])
    corrupt_flip_byte(store, 20)
    with pytest.raises(ckpt.CheckpointInvalid, match="sha256"):
        ckpt.restore(store, ROOT, tmp_path / "dest", step=20)
    assert ckpt.restore(store, ROOT, tmp_path / "dest", step=10).step == 10


def test_verify_levels(store, tmp_path):
    save_steps(store, tmp_path, [1])
    corrupt_flip_byte(store, 1)
    assert ckpt.verify(store, ROOT, 1, level="size").step == 1  # sizes still match
    with pytest.raises(ckpt.CheckpointInvalid):
        ckpt.verify(store, ROOT, 1, level="sha256")
    assert ckpt.latest_valid(store, ROOT, below=1) is None


def test_manifest_cannot_point_outside_its_directory(store, tmp_path):
    save_steps(store, tmp_path, [5])
    manifest = json.loads(store.read_bytes(file_key(5, "manifest.json")))
    manifest["files"][0]["path"] = "../../escape"
    store.write_bytes(file_key(5, "manifest.json"), json.dumps(manifest).encode())
    with pytest.raises(ckpt.CheckpointInvalid, match="invalid manifest"):
        ckpt.read_manifest(store, ROOT, 5)


def test_retention_keeps_newest_k(store, tmp_path):
    save_steps(store, tmp_path, [100, 200, 300, 400, 500], keep=2)
    assert ckpt.list_steps(store, ROOT) == [500, 400]
    assert ckpt.restore(store, ROOT, tmp_path / "dest").step == 500


def test_retention_removes_old_debris_keeps_newer(store, tmp_path):
    save_steps(store, tmp_path, [100, 200, 300])
    store.delete(file_key(200, "manifest.json"))  # old debris: an interrupted save
    store.upload_dir(staging(tmp_path, 400), ckpt.checkpoint_key(ROOT, 400))  # in progress
    deleted = ckpt.apply_retention(store, ROOT, keep=1)
    assert deleted == [100, 200]
    assert ckpt.list_steps(store, ROOT) == [400, 300]
    assert ckpt.latest_valid(store, ROOT).step == 300


def test_retention_does_not_count_broken_checkpoints(store, tmp_path):
    """A newest checkpoint with a missing file must not push out the last good one."""
    save_steps(store, tmp_path, [100, 200])
    store.delete(file_key(200, "model/unet.bin"))
    ckpt.apply_retention(store, ROOT, keep=1)
    assert ckpt.latest_valid(store, ROOT).step == 100


def test_resave_same_step_drops_stale_files(store, tmp_path):
    store.write_bytes(file_key(30, "model/stale-shard.bin"), b"from a killed attempt")
    info = ckpt.save(staging(tmp_path, 30), store, ROOT, 30)
    assert "model/stale-shard.bin" not in {f.path for f in info.files}
    assert not store.exists(file_key(30, "model/stale-shard.bin"))
    assert ckpt.verify(store, ROOT, 30).step == 30


def test_multi_rank_upload_then_commit(store, tmp_path):
    """Each rank uploads its own shards; rank 0 commits the union after the (caller's) barrier."""
    step = 40
    ckpt.begin(store, ROOT, step)
    per_rank = []
    for rank in range(2):
        d = tmp_path / f"rank{rank}"
        (d / "shards").mkdir(parents=True)
        (d / "shards" / f"rank{rank}.pt").write_bytes(os.urandom(500))
        per_rank.append(ckpt.upload(store, ROOT, step, d))
    assert ckpt.latest_valid(store, ROOT) is None, "uploaded but uncommitted: does not exist"

    info = ckpt.commit(store, ROOT, step, [e for entries in per_rank for e in entries])
    assert [f.path for f in info.files] == ["shards/rank0.pt", "shards/rank1.pt"]

    mine = ckpt.restore(store, ROOT, tmp_path / "r1", step=step, select=lambda p: "rank1" in p)
    assert mine.step == step
    assert [p.name for p in (tmp_path / "r1").rglob("*.pt")] == ["rank1.pt"]


def test_restore_replaces_previous_destination(store, tmp_path):
    save_steps(store, tmp_path, [1])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "leftover.bin").write_bytes(b"old")
    ckpt.restore(store, ROOT, dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "model/unet.bin",
        "trainer_state.json",
    ]
