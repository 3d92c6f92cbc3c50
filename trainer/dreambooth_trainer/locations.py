"""Local directories for URIs: read inputs from and publish outputs to s3:// or a path.

Torch code wants files on disk. A local URI is used in place; an s3:// URI is mirrored through
a directory under the cache (downloaded before reading, uploaded after writing).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dreambooth_contract.api import S3Spec

from .storage import LocalStore, Store, local_files, open_store


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def store_for(uri: str, s3: S3Spec) -> Store:
    return open_store(uri, s3.endpoint, s3.region)


def staging_dir(uri: str, cache_dir: Path) -> Path:
    """Where an s3:// URI is mirrored locally (stable, so a restarted pod finds its files)."""
    return cache_dir / "staging" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def working_dir(uri: str, cache_dir: Path) -> Path:
    """The local directory to read and write `uri`'s files in."""
    return staging_dir(uri, cache_dir) if is_s3(uri) else Path(uri).expanduser()


def fetch_dir(uri: str, s3: S3Spec, cache_dir: Path) -> Path:
    """A local directory holding `uri`'s files (downloaded when it is in S3)."""
    store = store_for(uri, s3)
    if isinstance(store, LocalStore):
        return store.path("")
    local = working_dir(uri, cache_dir)
    store.download_dir("", local)
    return local


def publish_dir(
    local: Path, uri: str, s3: S3Spec, last: str | None = None, replace: bool = False
) -> None:
    """Upload `local` to `uri` when that is remote (a local URI was written in place).

    `last` (a manifest) goes up after everything else: readers that see it see all files.
    With `replace`, `uri` ends up holding exactly `local`'s files: the old manifest goes first
    (what was there stops being an artifact), objects `local` lacks before the new manifest.
    """
    if not is_s3(uri):
        return
    store = store_for(uri, s3)
    files = [(path, key) for path, key in local_files(local) if key != last]
    if replace and last:
        store.delete(last)
    store.upload_files(files)
    if replace:
        keep = {key for _, key in files} | {last}
        for stale in [info.key for info in store.list() if info.key not in keep]:
            store.delete(stale)
    if last and (local / last).is_file():
        store.upload_file(local / last, last)
