"""One small interface over a local directory and s3:// (MinIO and friends included).

The trainer's phases and the inference server use it; it depends only on the standard library,
boto3 and the contract's URI joiner (layout.join_uri).

A ``Store`` is rooted at a URI; everything inside it is addressed by a *key*: a relative,
'/'-separated path (``checkpoints/checkpoint-00000100/manifest.json``). Keys behave like paths
in a directory tree on both backends: ``delete("a")`` removes the object ``a`` and everything
under ``a/``, never ``ab``.

S3 settings:
- credentials come only from the environment / default chain (``AWS_ACCESS_KEY_ID`` and
  ``AWS_SECRET_ACCESS_KEY`` from a Secret, IRSA, instance profile); nothing here takes keys;
- ``endpoint`` (MinIO, moto) and ``region`` come from the job spec; without them botocore's
  own ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` apply;
- retries use botocore's retry modes; transfers go through boto3's TransferManager (s3transfer),
  which does multipart and parallel transfers: nothing here hand-rolls multipart.

Errors are ``StorageError`` naming the operation and the URI, never a credential; a URI no store
can be opened at is ``InvalidUri`` (a ValueError).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.futures import TransferFuture
from s3transfer.manager import TransferManager

from dreambooth_contract.layout import join_uri

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
# Local partial files look like ".<name>.<random>.partial"; listings hide them.
PARTIAL_SUFFIX = ".partial"
# S3 DeleteObjects takes at most 1000 keys per request.
DELETE_BATCH = 1000
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})

RetryMode = Literal["standard", "adaptive", "legacy"]


class StorageError(RuntimeError):
    """A storage operation failed; the message names the operation and the URI."""

    def __init__(self, op: str, uri: str, reason: str):
        super().__init__(f"{op} {uri}: {reason}")
        self.op = op
        self.uri = uri
        self.reason = reason


class ObjectNotFound(StorageError, FileNotFoundError):
    """The key does not exist (also a FileNotFoundError, so callers may catch either)."""


class InvalidUri(ValueError):
    """A URI no store can be opened at (unsupported scheme, no bucket, '.' or '..' segments).

    The trainer reports it as bad input (exit 2: no restart can help), not as a failed run.
    """

    def __init__(self, uri: str, reason: str):
        super().__init__(f"invalid storage URI {uri!r}: {reason}")
        self.uri = uri
        self.reason = reason


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def normalize_key(key: str) -> str:
    """Return ``key`` in canonical form; reject keys that could escape the store's root.

    Keys come from manifests that may have been written by someone else, so '..' and absolute
    paths are refused rather than resolved.
    """
    segments = key.split("/")
    if key.startswith("/") or "\\" in key or any(s in (".", "..") for s in segments):
        raise ValueError(f"invalid storage key {key!r}: must be a relative path without '..'")
    return join_uri(*segments)


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a local file, read in chunks (checkpoint shards can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def local_files(directory: Path | str) -> list[tuple[Path, str]]:
    """Regular files under ``directory`` as (path, key relative to it), sorted by key."""
    root = Path(directory)
    found = [
        (p, p.relative_to(root).as_posix())
        for p in root.rglob("*")
        if p.is_file() and not _is_partial(p.name)
    ]
    return sorted(found, key=lambda item: item[1])


def _is_partial(name: str) -> bool:
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def _under(key: str, prefix: str) -> bool:
    """True if ``key`` is ``prefix`` itself or lies below it (directory semantics)."""
    return not prefix or key == prefix or key.startswith(prefix + "/")


class Store(ABC):
    """A tree of objects addressed by keys; see the module docstring."""

    uri: str

    def uri_for(self, key: str = "") -> str:
        """Full URI (s3://bucket/prefix/key or a local path) of ``key``, for logs and status."""
        key = normalize_key(key) if key else ""
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """All objects at or below ``prefix`` (recursive), sorted by key."""

    @abstractmethod
    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate 'subdirectories' of ``prefix`` (not recursive), sorted."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True if an object ``key`` exists."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Content of ``key``; ObjectNotFound if it is missing."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``key`` atomically: readers see the old object or the whole new one."""

    @abstractmethod
    def upload_file(self, local_path: Path | str, key: str) -> None:
        """Copy a local file to ``key`` (atomically)."""

    @abstractmethod
    def download_file(self, key: str, local_path: Path | str) -> None:
        """Copy ``key`` to a local file (atomically); parent directories are created."""

    @abstractmethod
    def upload_files(self, files: list[tuple[Path, str]]) -> None:
        """Upload (local path, key) pairs; the S3 backend transfers them in parallel."""

    @abstractmethod
    def download_files(self, files: list[tuple[str, Path]]) -> None:
        """Download (key, local path) pairs; the S3 backend transfers them in parallel."""

    @abstractmethod
    def sha256(self, key: str) -> str:
        """Hex sha256 of ``key``'s content, streamed (no local copy)."""

    @abstractmethod
    def delete(self, key: str) -> int:
        """Delete ``key`` and everything under ``key/``; return how many objects went."""

    def upload_dir(self, local_dir: Path | str, prefix: str = "") -> list[str]:
        """Upload every file under ``local_dir`` below ``prefix``; return the keys written."""
        pairs = [(path, join_uri(prefix, rel)) for path, rel in local_files(local_dir)]
        self.upload_files(pairs)
        return [key for _, key in pairs]

    def download_dir(
        self,
        prefix: str,
        local_dir: Path | str,
        select: Callable[[str], bool] | None = None,
    ) -> list[Path]:
        """Download every object under ``prefix/`` into ``local_dir`` (keys relative to prefix).

        ``select`` filters on the relative key, so a rank can fetch only its own shards.
        """
        prefix = normalize_key(prefix) if prefix else ""
        pairs = []
        for obj in self.list(prefix):
            rel = obj.key[len(prefix) :].lstrip("/") if prefix else obj.key
            if rel and (select is None or select(rel)):
                pairs.append((obj.key, Path(local_dir, rel)))
        self.download_files(pairs)
        return [path for _, path in pairs]


# ---------------------------------------------------------------------------------------------
# local directory


@contextlib.contextmanager
def _atomic_output(target: Path) -> Iterator[IO[bytes]]:
    """Yield a temp file beside ``target``; fsync it and os.replace it into place on success.

    The temp file lives in the target's directory so the rename is atomic (same filesystem);
    fsync before the rename makes "manifest written last" hold across a crash, not just a kill.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class LocalStore(Store):
    """A directory on a local or shared (NFS, hostPath, PVC) filesystem."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def path(self, key: str) -> Path:
        """Local path of ``key`` (lets callers hash or read big files in place)."""
        key = normalize_key(key) if key else ""
        return self.root / key if key else self.root

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.path(prefix)
        if base.is_file():
            return [ObjectInfo(normalize_key(prefix), base.stat().st_size)]
        if not base.is_dir():
            return []
        return [
            ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size)
            for p, _ in local_files(base)
        ]

    def list_dirs(self, prefix: str = "") -> list[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound("read", self.uri_for(key), "no such object") from None
        except OSError as exc:
            raise StorageError("read", self.uri_for(key), str(exc)) from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        self._guard("write", key, lambda: self._write(self.path(key), data))

    def upload_file(self, local_path: Path | str, key: str) -> None:
        self._guard("upload", key, lambda: self._copy(Path(local_path), self.path(key)))

    def download_file(self, key: str, local_path: Path | str) -> None:
        source = self.path(key)
        if not source.is_file():
            raise ObjectNotFound("download", self.uri_for(key), "no such object")
        self._guard("download", key, lambda: self._copy(source, Path(local_path)))

    def upload_files(self, files: list[tuple[Path, str]]) -> None:
        for path, key in files:
            self.upload_file(path, key)

    def download_files(self, files: list[tuple[str, Path]]) -> None:
        for key, path in files:
            self.download_file(key, path)

    def sha256(self, key: str) -> str:
        try:
            return sha256_file(self.path(key))
        except FileNotFoundError:
            raise ObjectNotFound("hash", self.uri_for(key), "no such object") from None

    def delete(self, key: str) -> int:
        target = self.path(key)
        if target == self.root:
            raise ValueError("refusing to delete the whole store; name a key")
        if target.is_dir():
            count = len(local_files(target))
            self._guard("delete", key, lambda: shutil.rmtree(target))
            return count
        if target.is_file():
            self._guard("delete", key, target.unlink)
            return 1
        return 0

    def _guard(self, op: str, key: str, action: Callable[[], object]) -> None:
        try:
            action()
        except OSError as exc:
            raise StorageError(op, self.uri_for(key), str(exc)) from exc

    @staticmethod
    def _write(target: Path, data: bytes) -> None:
        with _atomic_output(target) as f:
            f.write(data)

    @staticmethod
    def _copy(source: Path, target: Path) -> None:
        with open(source, "rb") as src, _atomic_output(target) as dst:
            shutil.copyfileobj(src, dst, HASH_CHUNK)


# ---------------------------------------------------------------------------------------------
# S3


def default_transfer_config() -> TransferConfig:
    """Multipart above 64 MiB in 64 MiB parts, 10 parallel transfers: good for GB-sized shards."""
    return TransferConfig(
        multipart_threshold=64 << 20,
        multipart_chunksize=64 << 20,
        max_concurrency=10,
        use_threads=True,
    )


def make_s3_client(
    endpoint: str | None = None,
    region: str | None = None,
    *,
    retry_mode: RetryMode = "adaptive",
    max_attempts: int = 10,
    max_pool_connections: int = 20,
):
    """A boto3 S3 client with botocore retries; credentials from the default chain only.

    Path-style addressing with a custom endpoint: MinIO and moto serve buckets under the path,
    and an IP endpoint has no DNS for bucket sub-domains.
    """
    config = Config(
        retries={"mode": retry_mode, "max_attempts": max_attempts},
        s3={"addressing_style": "path" if endpoint else "auto"},
        max_pool_connections=max_pool_connections,
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _reason(exc: Exception) -> str:
    """Error code and message of a boto error, never the request (which carries signatures)."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip().rstrip(":")
    return f"{type(exc).__name__}: {exc}"


def _is_not_found(exc: Exception) -> bool:
    return isinstance(exc, ClientError) and (
        str(exc.response.get("Error", {}).get("Code")) in NOT_FOUND_CODES
    )


class S3Store(Store):
    """s3://bucket/prefix on AWS or any S3-compatible endpoint."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client=None,
        endpoint: str | None = None,
        region: str | None = None,
        transfer_config: TransferConfig | None = None,
    ):
        self.bucket = bucket
        try:
            self.prefix = normalize_key(prefix.strip("/"))
        except ValueError:
            raise InvalidUri(
                f"s3://{bucket}/{prefix.lstrip('/')}",
                "'.' and '..' path segments and backslashes are not allowed (object keys have "
                "no parent directories)",
            ) from None
        self.uri = join_uri(f"s3://{bucket}", self.prefix)
        self.transfer_config = transfer_config or default_transfer_config()
        pool = max(20, 2 * (self.transfer_config.max_concurrency or 10))
        self.client = client or make_s3_client(endpoint, region, max_pool_connections=pool)

    def _key(self, key: str) -> str:
        return join_uri(self.prefix, normalize_key(key)) if key else self.prefix

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.prefix) :].lstrip("/") if self.prefix else full_key

    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        """Turn boto errors into StorageError / ObjectNotFound that name the op and the URI."""
        try:
            yield
        except (ClientError, BotoCoreError) as exc:
            cls = ObjectNotFound if _is_not_found(exc) else StorageError
            raise cls(op, self.uri_for(key), _reason(exc)) from None

    def _pages(self, key: str, full_prefix: str, **kwargs) -> Iterator[dict]:
        """ListObjectsV2 pages under ``full_prefix`` (bucket key); errors name ``key``."""
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors("list", key):
            yield from paginator.paginate(Bucket=self.bucket, Prefix=full_prefix, **kwargs)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._key(prefix)
        found = [
            ObjectInfo(self._rel(obj["Key"]), obj["Size"])
            for page in self._pages(prefix, full)
            for obj in page.get("Contents", [])
            if _under(obj["Key"], full)
        ]
        return sorted(found, key=lambda o: o.key)

    def list_dirs(self, prefix: str = "") -> list[str]:
        full = self._key(prefix)
        start = full + "/" if full else ""
        names = [
            cp["Prefix"][len(start) :].rstrip("/")
            for page in self._pages(prefix, start, Delimiter="/")
            for cp in page.get("CommonPrefixes", [])
        ]
        return sorted(names)

    def exists(self, key: str) -> bool:
        try:
            with self._errors("head", key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ObjectNotFound:
            return False
        return True

    def read_bytes(self, key: str) -> bytes:
        with self._errors("read", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            return body.read()

    def write_bytes(self, key: str, data: bytes) -> None:
        # A PUT is atomic in S3: readers see the old object or the whole new one.
        with self._errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_file(self, local_path: Path | str, key: str) -> None:
        self.upload_files([(Path(local_path), key)])

    def download_file(self, key: str, local_path: Path | str) -> None:
        self.download_files([(key, Path(local_path))])

    def upload_files(self, files: list[tuple[Path, str]]) -> None:
        self._transfer("upload", [(key, self._uploader(path, key)) for path, key in files])

    def download_files(self, files: list[tuple[str, Path]]) -> None:
        for _, path in files:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._transfer("download", [(key, self._downloader(key, path)) for key, path in files])

    def _uploader(self, path: Path, key: str) -> Callable[[TransferManager], TransferFuture]:
        return lambda manager: manager.upload(str(path), self.bucket, self._key(key))

    def _downloader(self, key: str, path: Path) -> Callable[[TransferManager], TransferFuture]:
        # s3transfer downloads to a temp name and renames it: the local file appears whole.
        return lambda manager: manager.download(self.bucket, self._key(key), str(path))

    def _transfer(
        self, op: str, submissions: list[tuple[str, Callable[[TransferManager], TransferFuture]]]
    ) -> None:
        """Submit all transfers to one TransferManager and wait; the first failure is raised.

        Leaving the manager's context on an error cancels the transfers still queued.
        """
        if not submissions:
            return
        with create_transfer_manager(self.client, self.transfer_config) as manager:
            futures = [(key, submit(manager)) for key, submit in submissions]
            for key, future in futures:
                with self._errors(op, key):
                    future.result()

    def sha256(self, key: str) -> str:
        h = hashlib.sha256()
        with self._errors("hash", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            for chunk in body.iter_chunks(HASH_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def delete(self, key: str) -> int:
        if not normalize_key(key):
            raise ValueError("refusing to delete the whole store; name a key")
        keys = [self._key(obj.key) for obj in self.list(key)]
        for start in range(0, len(keys), DELETE_BATCH):
            self._delete_batch(key, keys[start : start + DELETE_BATCH])
        return len(keys)

    def _delete_batch(self, key: str, keys: list[str]) -> None:
        with self._errors("delete", key):
            response = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
            )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise StorageError(
                "delete",
                f"s3://{self.bucket}/{first.get('Key')}",
                f"{first.get('Code')}: {first.get('Message')} ({len(errors)} objects failed)",
            )


# ---------------------------------------------------------------------------------------------


def open_store(
    uri: str,
    endpoint: str | None = None,
    region: str | None = None,
    *,
    transfer_config: TransferConfig | None = None,
) -> Store:
    """Open ``s3://bucket/prefix``, ``file:///path`` or a plain local path as a Store."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidUri(uri, "no bucket")
        return S3Store(
            parsed.netloc,
            parsed.path,
            endpoint=endpoint,
            region=region,
            transfer_config=transfer_config,
        )
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # "C:" is a drive, not a scheme
        raise InvalidUri(uri, "unsupported scheme: use s3://, file:// or a path")
    return LocalStore(uri)
