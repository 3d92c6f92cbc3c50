"""The models a multi-adapter server answers to: its base, and the adapters published to it.

    catalog = AdapterCatalog(PublicationSource(directory), verifier, max_loaded=4)

The catalog ties the publication index (publications.py) to the verifier and, once the base is
loaded, to the adapter cache (adapters.py, `cache_for`): a request's `model` is looked up here,
a published one verified; an unpublished one stops being found at once and is unloaded before
the next batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth_contract.publication import PublishedModel

from . import artifact
from .adapters import AdapterCache, AdapterObserver, AdapterVerifier, VerifiedAdapter
from .artifact import LoadedModel
from .publications import DEFAULT_POLL_INTERVAL_S, PublicationSource, PublicationWatcher


class ModelNotPublished(LookupError):
    """No published model has this name."""


@dataclass
class AdapterCatalog:
    source: PublicationSource
    verifier: AdapterVerifier
    max_loaded: int
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    # When this server first saw each model: the `created` of its model card.
    first_seen: dict[str, int] = field(default_factory=dict)
    # Hears how many models are published after every change (a metrics gauge).
    on_published: Callable[[int], None] | None = None
    _watcher: PublicationWatcher | None = None

    def start(self) -> None:
        self._watcher = PublicationWatcher(self.source, self.poll_interval_s, self._published)
        self._watcher.start()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()

    def load_base(
        self, uri: str, cache_dir: Path, *, device: str = "auto", dtype: str = "auto"
    ) -> LoadedModel:
        """The shared base pipeline (a ModelLoader); adapters are checked against it from now."""
        base = artifact.resolve_base(uri, cache_dir, self.verifier.s3)
        pipeline = artifact.load_base(base, device, dtype)
        self.verifier.base = base
        return LoadedModel(pipeline)

    def published_digests(self) -> set[str]:
        return {model.digest for model in self.models.values()}

    def cache_for(self, pipeline, observer: AdapterObserver | None = None) -> AdapterCache:
        """The adapter cache on the loaded base `pipeline`, unloading what gets unpublished."""
        return AdapterCache(pipeline, self.max_loaded, observer, self.published_digests)

    @property
    def models(self) -> dict[str, PublishedModel]:
        return self.source.models

    def lookup(self, name: str) -> VerifiedAdapter:
        """The published model `name`, verified (blocks: may download and hash its files).

        ModelNotPublished when it is not published; artifact.ArtifactError when its files are
        refused."""
        published = self.source.get(name)
        if published is None:
            raise ModelNotPublished(name)
        return self.verifier.verify(published)

    def _published(self, models: dict[str, PublishedModel]) -> None:
        now = int(time.time())
        for name in models:
            self.first_seen.setdefault(name, now)
        for name in set(self.first_seen) - set(models):
            del self.first_seen[name]
        self.verifier.forget_unpublished(models)
        if self.on_published is not None:
            self.on_published(len(models))
