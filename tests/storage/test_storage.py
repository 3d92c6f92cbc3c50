"""Store round-trips on both backends, S3 multipart, key safety and error hygiene."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from dreambooth_contract.layout import join_uri
from dreambooth_trainer.storage import (
    LocalStore,
    ObjectNotFound,
    S3Store,
    StorageError,
    normalize_key,
    open_store,
    sha256_file,
)

from .conftest import MULTIPART, SECRET


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"alpha",
        "sub/b.bin": os.urandom(1000),
        "sub/deeper/c.json": b"{}",
        "empty": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_bytes_round_trip(store):
    assert not store.exists("x/y.txt")
    store.write_bytes("x/y.txt", b"one")
    assert store.exists("x/y.txt")
    assert store.read_bytes("x/y.txt") == b"one"
    store.write_bytes("x/y.txt", b"two")  # overwrite
    assert store.read_bytes("x/y.txt") == b"two"
    assert not store.exists("x")  # a "directory" is not an object


def test_missing_object_is_object_not_found(store):
    with pytest.raises(ObjectNotFound) as info:
        store.read_bytes("nope/missing.bin")
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.uri == store.uri_for("nope/missing.bin")
    assert "read" in str(info.value)


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4096))
    store.upload_file(src, "files/src.bin")
    dest = tmp_path / "out" / "nested" / "copy.bin"
    store.download_file("files/src.bin", dest)
    assert dest.read_bytes() == src.read_bytes()
    assert store.sha256("files/src.bin") == sha256_file(src)


def test_dir_round_trip_list_and_select(store, tmp_path):
    files = make_tree(tmp_path / "tree")
    keys = store.upload_dir(tmp_path / "tree", "run/ckpt")
    assert sorted(keys) == sorted(join_uri("run/ckpt", rel) for rel in files)

    listed = {o.key: o.size for o in store.list("run")}
    assert listed == {join_uri("run/ckpt", rel): len(data) for rel, data in files.items()}
    assert store.list_dirs("run/ckpt") == ["sub"]
    assert store.list_dirs("") == ["run"]
    assert store.list("does/not/exist") == []

    out = store.download_dir("run/ckpt", tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in out) == sorted(files)
    for rel, data in files.items():
        assert (tmp_path / "out" / rel).read_bytes() == data

    only_sub = store.download_dir(
        "run/ckpt", tmp_path / "sel", select=lambda r: r.startswith("sub/")
    )
    assert sorted(p.name for p in only_sub) == ["b.bin", "c.json"]


def test_delete_has_directory_semantics(store):
    for key in ("d/a", "d/sub/b", "d-sibling/c", "dd", "d2"):
        store.write_bytes(key, b"x")
    assert store.delete("d") == 2
    assert sorted(o.key for o in store.list()) == ["d-sibling/c", "d2", "dd"]
    assert store.delete("dd") == 1
    assert store.delete("never-there") == 0
    with pytest.raises(ValueError):
        store.delete("")


def test_multipart_sized_object(store, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(2 * MULTIPART + 12345))  # 3 parts above the lowered threshold
    store.upload_file(big, "big/big.bin")
    if isinstance(store, S3Store):
        head = store.client.head_object(Bucket=store.bucket, Key=store._key("big/big.bin"))
        assert head["ETag"].strip('"').endswith("-3"), "expected a 3-part multipart upload"
    assert store.list("big")[0].size == big.stat().st_size
    store.download_file("big/big.bin", tmp_path / "back.bin")
    assert sha256_file(tmp_path / "back.bin") == sha256_file(big)
    assert store.sha256("big/big.bin") == sha256_file(big)


@pytest.mark.parametrize("key", ["../escape", "/absolute", "a/../../b", "a\\b", "./x"])
def test_keys_cannot_escape_the_root(store, key):
    with pytest.raises(ValueError):
        store.write_bytes(key, b"x")


def test_normalize_and_join():
    assert join_uri("a/", "/b", "", "c/") == "a/b/c"
    assert normalize_key("a//b/") == "a/b"


def test_prefix_scopes_the_store(aws_env, s3_server, s3_bucket):
    outer = open_store(f"s3://{s3_bucket}", endpoint=s3_server.endpoint_url)
    outer.write_bytes("jobs/one/x", b"1")
    outer.write_bytes("jobs/one-more/y", b"2")
    inner = open_store(f"s3://{s3_bucket}/jobs/one", endpoint=s3_server.endpoint_url)
    assert [o.key for o in inner.list()] == ["x"]
    assert inner.uri_for("x") == f"s3://{s3_bucket}/jobs/one/x"


def test_endpoint_from_environment(aws_env, monkeypatch, s3_server, s3_bucket):
    """Without an explicit endpoint botocore's AWS_ENDPOINT_URL_S3 applies (pods, MinIO)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    store = open_store(f"s3://{s3_bucket}/p")
    store.write_bytes("k", b"v")
    assert store.read_bytes("k") == b"v"


def test_errors_name_uri_and_operation_never_credentials(aws_env, s3_server, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    store = open_store("s3://no-such-bucket-here/p", endpoint=s3_server.endpoint_url)
    (tmp_path / "f").write_bytes(b"x")
    actions = {
        "read": lambda: store.read_bytes("k"),
        "upload": lambda: store.upload_file(tmp_path / "f", "k"),
        "list": lambda: store.list("k"),
    }
    for op, action in actions.items():
        with pytest.raises(StorageError) as info:
            action()
        assert str(info.value).startswith(f"{op} s3://no-such-bucket-here/p/k: NoSuchBucket")
        assert SECRET not in str(info.value)
    assert SECRET not in caplog.text


def test_open_store_schemes(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(f"file://{tmp_path}").uri == str(tmp_path.resolve())
    assert LocalStore(tmp_path).uri_for("a/b") == f"{tmp_path.resolve()}/a/b"
    with pytest.raises(ValueError):
        open_store("gs://bucket/x")
    with pytest.raises(ValueError):
        open_store("s3:///nobucket")


def test_local_partial_files_are_invisible(local_store):
    local_store.write_bytes("dir/real", b"x")
    (local_store.path("dir") / ".real.abc123.partial").write_bytes(b"half")
    assert [o.key for o in local_store.list("dir")] == ["dir/real"]
