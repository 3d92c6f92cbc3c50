"""The published models, read from the index the operator writes (contract publication.py).

In the cluster the directory is a mounted ConfigMap: kubelet writes each new version into a
fresh timestamped directory and swaps the `..data` symlink, so the index path resolves to a new
file (a new inode). Locally, an edit in place changes its mtime. Polling `os.stat` of the index
sees both, costs one syscall a second, and needs no inotify (which misses symlink swaps inside
a mounted volume anyway).

An index that does not parse leaves the last good set in place (and is logged and counted): a
bad write must not unpublish every model at once. A missing index means nothing is published.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from dreambooth_contract import publication
from dreambooth_contract.publication import PublishedModel

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 1.0

# (inode, size, mtime) of the index; None when there is none.
Signature = tuple[int, int, int] | None


class PublicationSource:
    """The index in `directory`, re-read when its file changes (`refresh`)."""

    def __init__(self, directory: Path, on_error: Callable[[str], None] | None = None):
        self.path = directory / publication.PUBLICATIONS_FILE
        self._on_error = on_error
        self._lock = threading.Lock()
        self._signature: Signature | bool = False  # False: never read
        self._models: dict[str, PublishedModel] = {}

    @property
    def models(self) -> dict[str, PublishedModel]:
        """The published models by name (a snapshot: callers may keep it)."""
        with self._lock:
            return self._models

    def get(self, name: str) -> PublishedModel | None:
        return self.models.get(name)

    def refresh(self) -> bool:
        """Re-read the index if its file changed; True when the published set changed."""
        signature = self._stat()
        with self._lock:
            if signature == self._signature:
                return False
        models = self._read(signature)
        with self._lock:
            self._signature = signature
            if models is None or models == self._models:
                return False
            self._models = models
        log.info("published models: %s", sorted(models) or "none")
        return True

    def _stat(self) -> Signature:
        try:
            found = os.stat(self.path)  # follows ..data: a swap is a new inode
        except FileNotFoundError:
            return None
        return (found.st_ino, found.st_size, found.st_mtime_ns)

    def _read(self, signature: Signature) -> dict[str, PublishedModel] | None:
        """The models in the index; None (keep the last good set) when it is unreadable."""
        if signature is None:
            return {}
        try:
            return publication.parse(self.path.read_text()).by_name()
        except FileNotFoundError:  # removed between stat and read: the next poll sees it
            return None
        except (OSError, UnicodeDecodeError, ValidationError) as exc:
            log.error("%s: not a valid publication index, keeping the last one: %s", self.path, exc)
            if self._on_error is not None:
                self._on_error(str(exc))
            return None


class PublicationWatcher:
    """Calls `source.refresh()` every `interval_s` on a thread of its own; `on_change` hears
    about every change of the published set."""

    def __init__(
        self,
        source: PublicationSource,
        interval_s: float = DEFAULT_POLL_INTERVAL_S,
        on_change: Callable[[dict[str, PublishedModel]], None] | None = None,
    ):
        self.source = source
        self.interval_s = interval_s
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="publications", daemon=True)

    def start(self) -> None:
        self.poll()
        self._thread.start()

    def poll(self) -> None:
        if self.source.refresh() and self._on_change is not None:
            self._on_change(self.source.models)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # the watcher must outlive one bad poll
                log.exception("reading the publication index failed")
