"""Checkpoint commit protocol: files first, manifest last; no valid manifest, no checkpoint.

This module moves and verifies *files*; what the files contain (model shards, optimizer, RNG
states, data order) is the trainer's business, so there is no torch here.

Layout in any Store::

    <root>/checkpoint-<step:08d>/<files...>
    <root>/checkpoint-<step:08d>/manifest.json   {format, step, created, files: [{path, size,
                                                   sha256}], metadata}

A checkpoint exists only if its manifest parses, names the step of its directory, and every file
it lists is there with the listed size and sha256. A writer killed mid-upload therefore leaves
debris that readers skip (with a warning) and retention later removes.

Single writer, or all ranks sharing one staging directory (shared filesystem)::

    # every rank writes its files into `staging`; barrier (caller's job); then rank 0:
    info = save(staging, store, root, step, metadata, keep=K)

Each rank uploading its own files (no shared filesystem)::

    if rank == 0: begin(store, root, step)                # drops a stale attempt at this step
    barrier()
    entries = upload(store, root, step, my_dir)           # every rank: hash + upload its files
    all_entries = gather_object(entries)                  # caller's job (torch.distributed)
    if rank == 0:
        info = commit(store, root, step, flatten(all_entries), metadata)   # manifest LAST
        apply_retention(store, root, keep=K)
    barrier()

Resume (single process): ``restore(store, root, dest)`` falls back past broken checkpoints.
Resume (many ranks): rank 0 picks ``latest_valid(store, root, level="size")`` and broadcasts the
step; every rank calls ``restore(store, root, dest, step=step, select=...)``, which hash-checks
what it downloads, so all ranks load the same checkpoint. If any rank gets CheckpointInvalid,
agree on it (all-reduce) and try again with ``latest_valid(..., below=step)``.

Trust: the manifest lies beside the files it vouches for, so it proves a checkpoint complete,
not genuine: whoever may write the store can commit a checkpoint of their own. Where that
matters, keep ``CheckpointInfo.manifest_digest`` (the sha256 of the manifest's bytes, returned
by ``commit``) somewhere those writers cannot change, and pass it back as ``expect_digest`` to
``verify``/``restore``: the manifest is then checked against it before anything else, and since
it lists every file's sha256, which ``restore`` checks, the digest vouches for every file.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dreambooth_contract.layout import join_uri

from .storage import Store, local_files, normalize_key, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "dreambooth-checkpoint/v1"
DIR_PREFIX = "checkpoint-"
_DIR_RE = re.compile(rf"^{DIR_PREFIX}(\d+)$")

# manifest: it parses and names its step; size: + every file listed with its size (one LIST
# request); sha256: + every file's content hashed (reads everything: the full check).
VerifyLevel = Literal["manifest", "size", "sha256"]


class CheckpointInvalid(Exception):
    """A checkpoint failed verification; ``reason`` says why (it is logged when skipped)."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"checkpoint {uri}: {reason}")
        self.uri = uri
        self.reason = reason


class CheckpointMissing(CheckpointInvalid):
    """No manifest: never committed, or deleted (deletion removes the manifest first)."""


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="Key relative to the checkpoint directory.")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        # Manifests are read back from storage: never let one point outside its directory.
        value = normalize_key(value)
        if not value or value == MANIFEST:
            raise ValueError(f"invalid checkpoint file path {value!r}")
        return value


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["dreambooth-checkpoint/v1"] = FORMAT
    step: int = Field(ge=0)
    created: datetime
    files: list[FileEntry]
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _unique_paths(cls, files: list[FileEntry]) -> list[FileEntry]:
        paths = [f.path for f in files]
        if len(set(paths)) != len(paths):
            raise ValueError("duplicate file paths")
        return sorted(files, key=lambda f: f.path)


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: where it is and what its manifest says."""

    step: int
    key: str  # directory key inside the store
    uri: str  # full URI of the directory, for logs and status.checkpoint.uri
    created: datetime
    files: tuple[FileEntry, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    # "sha256:<hex>" of the manifest's bytes as written (commit) or read (everything else).
    manifest_digest: str | None = None


def manifest_digest(data: bytes) -> str:
    """The digest of a manifest's bytes, in the form status.checkpoint.manifestDigest holds."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def checkpoint_key(root: str, step: int) -> str:
    """Directory key of ``step``: zero-padded so names sort like steps."""
    return join_uri(root, f"{DIR_PREFIX}{step:08d}")


def list_steps(store: Store, root: str) -> list[int]:
    """Steps of every checkpoint directory under ``root``, committed or not, newest first."""
    matches = (_DIR_RE.match(name) for name in store.list_dirs(root))
    return sorted({int(m.group(1)) for m in matches if m}, reverse=True)


def describe_files(local_dir: Path | str, paths: Iterable[str] | None = None) -> list[FileEntry]:
    """Size and sha256 of files in ``local_dir`` (all of them, or the relative ``paths``)."""
    root = Path(local_dir)
    rels = [rel for _, rel in local_files(root)] if paths is None else list(paths)
    return [_describe(root / rel, rel) for rel in rels]


def _describe(path: Path, rel: str) -> FileEntry:
    return FileEntry(path=rel, size=path.stat().st_size, sha256=sha256_file(path))


# ---------------------------------------------------------------------------------------------
# writing


def begin(store: Store, root: str, step: int) -> None:
    """Clear any earlier attempt at ``step`` so that no stale file or manifest survives."""
    _delete_checkpoint(store, checkpoint_key(root, step))


def upload(
    store: Store, root: str, step: int, local_dir: Path | str, paths: Iterable[str] | None = None
) -> list[FileEntry]:
    """Hash and upload files of ``local_dir`` (all, or ``paths``) into the checkpoint of ``step``.

    Returns the entries for the manifest; it does NOT commit.
    """
    entries = describe_files(local_dir, paths)
    directory = checkpoint_key(root, step)
    store.upload_files([(Path(local_dir, e.path), join_uri(directory, e.path)) for e in entries])
    return entries


def commit(
    store: Store,
    root: str,
    step: int,
    files: Iterable[FileEntry],
    metadata: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Write the manifest: the single atomic write that makes the checkpoint exist.

    Call only after every file listed in ``files`` has been uploaded (by every rank).
    """
    manifest = Manifest(
        step=step,
        created=datetime.now(timezone.utc),
        files=list(files),
        metadata=dict(metadata or {}),
    )
    directory = checkpoint_key(root, step)
    data = manifest.model_dump_json(indent=1).encode()
    store.write_bytes(join_uri(directory, MANIFEST), data)
    info = _info(store, directory, manifest, manifest_digest(data))
    log.info("committed checkpoint %s (%d files)", info.uri, len(info.files))
    return info


def save(
    local_dir: Path | str,
    store: Store,
    root: str,
    step: int,
    metadata: dict[str, Any] | None = None,
    keep: int | None = None,
) -> CheckpointInfo:
    """Upload every file of the staging directory ``local_dir`` as checkpoint ``step``, commit.

    With ``keep``, retention runs after the commit (never before: a crash must not leave fewer
    than ``keep`` committed checkpoints).
    """
    begin(store, root, step)
    entries = upload(store, root, step, local_dir)
    info = commit(store, root, step, entries, metadata)
    if keep is not None:
        apply_retention(store, root, keep)
    return info


# ---------------------------------------------------------------------------------------------
# reading and verifying


def read_manifest(store: Store, root: str, step: int, expect_digest: str | None = None) -> Manifest:
    """The parsed manifest of ``step``; CheckpointInvalid if missing, unreadable or inconsistent
    (CheckpointMissing if there is none), or if its bytes do not have ``expect_digest``."""
    return _read_manifest(store, root, step, expect_digest)[0]


def _read_manifest(
    store: Store, root: str, step: int, expect_digest: str | None
) -> tuple[Manifest, str]:
    """The manifest and the digest of the very bytes it was parsed from."""
    directory = checkpoint_key(root, step)
    uri = store.uri_for(directory)
    try:
        data = store.read_bytes(join_uri(directory, MANIFEST))
    except FileNotFoundError:
        raise CheckpointMissing(uri, "no manifest (uncommitted)") from None
    digest = manifest_digest(data)
    if expect_digest is not None and digest != expect_digest:
        # Checked before parsing: an untrusted manifest is not even read.
        raise CheckpointInvalid(uri, f"manifest is {digest}, not the expected {expect_digest}")
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as exc:
        raise CheckpointInvalid(uri, f"invalid manifest: {_first_error(exc)}") from None
    if manifest.step != step:
        raise CheckpointInvalid(uri, f"manifest says step {manifest.step}")
    return manifest, digest


def verify(
    store: Store,
    root: str,
    step: int,
    level: VerifyLevel = "sha256",
    expect_digest: str | None = None,
) -> CheckpointInfo:
    """CheckpointInfo of ``step`` if it verifies at ``level`` (and its manifest has
    ``expect_digest``, if given); CheckpointInvalid otherwise."""
    manifest, digest = _read_manifest(store, root, step, expect_digest)
    directory = checkpoint_key(root, step)
    if level in ("size", "sha256"):
        _check_sizes(store, directory, manifest)
    if level == "sha256":
        for entry in manifest.files:
            actual = store.sha256(join_uri(directory, entry.path))
            _check_hash(store.uri_for(directory), entry, actual)
    return _info(store, directory, manifest, digest)


def latest_valid(
    store: Store, root: str, level: VerifyLevel = "sha256", below: int | None = None
) -> CheckpointInfo | None:
    """The newest checkpoint that verifies, skipping broken ones with a warning; or None.

    ``below`` only considers steps lower than it. On S3 the sha256 level reads every object;
    ``restore`` hashes what it downloads instead, so it needs no separate full check.
    """
    for step in list_steps(store, root):
        if below is not None and step >= below:
            continue
        try:
            return verify(store, root, step, level)
        except CheckpointInvalid as exc:
            log.warning("skipping %s", exc)
    return None


def restore(
    store: Store,
    root: str,
    dest_dir: Path | str,
    *,
    step: int | None = None,
    select: Callable[[str], bool] | None = None,
    expect_digest: str | None = None,
) -> CheckpointInfo | None:
    """Download the newest valid checkpoint (or exactly ``step``) into ``dest_dir``.

    Files are downloaded to a temporary sibling, hash-checked, then swapped in for ``dest_dir``,
    which afterwards holds exactly the checkpoint's (selected) files. A broken candidate is
    skipped with a warning and the previous one tried; with ``step`` given (ranks that must agree)
    a broken checkpoint raises CheckpointInvalid instead. None if nothing valid exists.
    ``select`` filters the relative file paths (a rank's own shards); only those are hashed.
    Processes restoring at once need distinct ``dest_dir``s (or one restores per node).
    ``expect_digest`` (with ``step``): the manifest's bytes must have this digest, or nothing
    is downloaded (CheckpointInvalid).
    """
    if expect_digest is not None and step is None:
        raise ValueError("expect_digest names one checkpoint: give its step")
    candidates = [step] if step is not None else list_steps(store, root)
    for candidate in candidates:
        try:
            return _restore_one(store, root, candidate, Path(dest_dir), select, expect_digest)
        except CheckpointInvalid as exc:
            if step is not None:
                raise
            log.warning("skipping %s", exc)
    return None


def _restore_one(
    store: Store,
    root: str,
    step: int,
    dest: Path,
    select: Callable[[str], bool] | None,
    expect_digest: str | None,
) -> CheckpointInfo:
    manifest, digest = _read_manifest(store, root, step, expect_digest)
    directory = checkpoint_key(root, step)
    _check_sizes(store, directory, manifest)  # cheap: no download of an obviously broken one
    wanted = [e for e in manifest.files if select is None or select(e.path)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".restoring", dir=dest.parent))
    try:
        store.download_files([(join_uri(directory, e.path), staging / e.path) for e in wanted])
        for entry in wanted:
            _check_hash(store.uri_for(directory), entry, sha256_file(staging / entry.path))
        _replace_dir(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    info = _info(store, directory, manifest, digest)
    log.info("restored checkpoint %s into %s", info.uri, dest)
    return info


def _check_sizes(store: Store, directory: str, manifest: Manifest) -> None:
    uri = store.uri_for(directory)
    sizes = {obj.key[len(directory) :].lstrip("/"): obj.size for obj in store.list(directory)}
    for entry in manifest.files:
        if entry.path not in sizes:
            raise CheckpointInvalid(uri, f"file {entry.path} is missing")
        if sizes[entry.path] != entry.size:
            raise CheckpointInvalid(
                uri, f"file {entry.path} has {sizes[entry.path]} bytes, manifest says {entry.size}"
            )


def _check_hash(uri: str, entry: FileEntry, actual: str) -> None:
    if actual != entry.sha256:
        raise CheckpointInvalid(uri, f"file {entry.path} sha256 {actual} != manifest's")


def _replace_dir(source: Path, dest: Path) -> None:
    """Put ``source`` at ``dest``, dropping whatever ``dest`` held (a stale restore)."""
    if dest.is_dir():
        shutil.rmtree(dest)
    elif dest.exists():
        dest.unlink()
    source.rename(dest)


# ---------------------------------------------------------------------------------------------
# retention


def apply_retention(store: Store, root: str, keep: int, upto: int | None = None) -> list[int]:
    """Keep the newest ``keep`` committed checkpoints; delete older ones and older debris.

    "Committed" here means the manifest is valid and every file has its size (one LIST per
    checkpoint; hashing every checkpoint on each save would read gigabytes). Uncommitted
    directories newer than the newest committed one are left alone: they may be in progress.
    With ``upto`` (the step of the newest checkpoint one trusts), only steps up to it count and
    may go: the trusted one is never deleted to keep newer ones nobody vouches for.
    Returns the steps deleted.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    committed, debris = _classify(store, root)
    if upto is not None:
        committed = [s for s in committed if s <= upto]
        debris = [s for s in debris if s <= upto]
    newest = committed[0] if committed else None
    doomed = committed[keep:] + [s for s in debris if newest is not None and s < newest]
    for step in sorted(doomed):
        _delete_checkpoint(store, checkpoint_key(root, step))
    if doomed:
        log.info("retention removed checkpoints at steps %s", sorted(doomed))
    return sorted(doomed)


def _classify(store: Store, root: str) -> tuple[list[int], list[int]]:
    """(committed steps newest first, uncommitted/broken steps)."""
    committed, debris = [], []
    for step in list_steps(store, root):
        try:
            verify(store, root, step, level="size")
            committed.append(step)
        except CheckpointInvalid as exc:
            log.debug("not committed: %s", exc)
            debris.append(step)
    return committed, debris


def _delete_checkpoint(store: Store, directory: str) -> None:
    """Manifest first, so a half-deleted checkpoint is never mistaken for a committed one."""
    store.delete(join_uri(directory, MANIFEST))
    store.delete(directory)


# ---------------------------------------------------------------------------------------------


def _info(store: Store, directory: str, manifest: Manifest, digest: str) -> CheckpointInfo:
    return CheckpointInfo(
        step=manifest.step,
        key=directory,
        uri=store.uri_for(directory),
        created=manifest.created,
        files=tuple(manifest.files),
        metadata=manifest.metadata,
        manifest_digest=digest,
    )


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "document"
    return f"{where}: {err.get('msg')}"
