"""Which base model a LoRA adapter belongs to: recorded by the export, checked by the server.

An adapter holds deltas on one base model's weights; applied to another base it gives wrong
images without any error. So the export records the base it was trained on (BASE_MODEL_FILE,
one of the export's files, so the artifact's digest covers it) and the server refuses to apply
the adapter to any other:

- uri, revision, variant: as the job's spec.baseModel gave them;
- source "files" with filesDigest: the base is files we read (a local directory, an s3://
  download): the digest of all of them, as digest.py computes an artifact's;
- source "builtInCode": random://, random weights built in code from a fixed seed (no files);
- source "hub": a Hugging Face repo id; the revision is what pins it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dreambooth_contract.api import BaseModelSpec

from .. import digest
from . import random_models
from .loading import COMPLETE_MARKER

BASE_MODEL_FILE = "base_model.json"
# Our own bookkeeping inside a downloaded base (loading.download_s3_model), not model files.
NOT_MODEL_FILES = (COMPLETE_MARKER,)


class BaseModelMismatch(ValueError):
    """The base model at hand is not the one the adapter was trained on."""


def files_digest(directory: Path) -> str:
    files = [f for f in digest.describe(directory) if f["path"] not in NOT_MODEL_FILES]
    return digest.digest_of(files)


def base_model_record(spec: BaseModelSpec, source: str) -> dict[str, Any]:
    """What identifies the base `spec` names, loaded from `source` (resolve_model_source)."""
    record: dict[str, Any] = {"uri": spec.uri, "revision": spec.revision, "variant": spec.variant}
    if random_models.is_random_uri(spec.uri):
        record["source"] = "builtInCode"
    elif Path(source).is_dir():
        record["source"] = "files"
        record["filesDigest"] = files_digest(Path(source))
    else:
        record["source"] = "hub"
    return record


def write_record(record: dict[str, Any], directory: Path) -> Path:
    path = directory / BASE_MODEL_FILE
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def read_record(directory: Path) -> dict[str, Any]:
    return json.loads((directory / BASE_MODEL_FILE).read_text())


def check_uri(record: dict[str, Any], uri: str) -> None:
    if record["uri"] != uri:
        raise BaseModelMismatch(
            f"the adapter was trained on base model {record['uri']!r}, not on {uri!r}"
        )


def check_files(
    record: dict[str, Any], source: str, digest_of: Callable[[Path], str] = files_digest
) -> None:
    """Refuse a base whose files differ from those the adapter was trained on.

    `digest_of` computes the files' digest: a server checking many adapters against one base
    passes a memoized one (hashing a multi-GB base once, not once per adapter)."""
    expected = record.get("filesDigest")
    if expected is None:
        return
    found = digest_of(Path(source))
    if found != expected:
        raise BaseModelMismatch(
            f"the files of base model {record['uri']!r} changed since the adapter was trained "
            f"on them: their digest is {found}, the adapter's record says {expected}"
        )


def spec_of(record: dict[str, Any]) -> BaseModelSpec:
    """The spec that loads the recorded base (its revision and variant included)."""
    return BaseModelSpec(uri=record["uri"], revision=record["revision"], variant=record["variant"])
