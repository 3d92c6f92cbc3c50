"""Directories in the model cache that several processes may want to fill at once."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path


def build_once(target: Path, build: Callable[[Path], object], marker: str) -> Path:
    """`target`, filled by `build(directory)` unless it is already complete (holds `marker`).

    The processes of a pod share the cache and may race: each builds into a private directory
    and renames it into place, so `target` only ever appears complete; a loser discards its
    copy. `build` must write `marker` last, or write it at all: it is how completeness is seen.
    """
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    build(staging)
    if target.exists() and not (target / marker).exists():
        shutil.rmtree(target, ignore_errors=True)  # left by an interrupted older writer
    try:
        staging.rename(target)
    except OSError:
        if not (target / marker).exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return target
