"""sha256 manifest of an artifact directory and its top-level digest.

Torch-free: the operator reads the digest into `status.artifact.digest`, and the inference server
checks that the files it loads are the ones the manifest names.

manifest.json: {"format", "files": [{"path", "size", "sha256"}], "digest": "sha256:<hex>", ...}
The digest covers the file list only (paths, sizes, hashes), so it identifies the content no
matter where the directory is copied or what metadata is added.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .storage import local_files, sha256_file

MANIFEST = "manifest.json"
FORMAT = "dreambooth-artifact/v1"


class DigestMismatch(ValueError):
    """A file is missing, extra or changed relative to the manifest."""


def describe(directory: Path) -> list[dict[str, Any]]:
    return [
        {"path": key, "size": path.stat().st_size, "sha256": sha256_file(path)}
        for path, key in local_files(directory)
        if key != MANIFEST
    ]


def digest_of(files: list[dict[str, Any]]) -> str:
    canonical = json.dumps(sorted(files, key=lambda f: f["path"]), sort_keys=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def write_manifest(directory: Path, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    files = describe(directory)
    manifest = {"format": FORMAT, **(metadata or {}), "files": files, "digest": digest_of(files)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def verify(directory: Path) -> str:
    """The digest of `directory` after checking every file against its manifest."""
    manifest = json.loads((directory / MANIFEST).read_text())
    actual = describe(directory)
    if actual != sorted(manifest["files"], key=lambda f: f["path"]):
        expected = {f["path"]: f["sha256"] for f in manifest["files"]}
        found = {f["path"]: f["sha256"] for f in actual}
        changed = sorted(
            p for p in expected.keys() | found.keys() if expected.get(p) != found.get(p)
        )
        raise DigestMismatch(f"{directory}: files differ from the manifest: {changed[:5]}")
    if digest_of(actual) != manifest["digest"]:
        raise DigestMismatch(f"{directory}: manifest digest does not match its files")
    return manifest["digest"]
