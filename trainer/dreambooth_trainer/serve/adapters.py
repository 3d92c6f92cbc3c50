"""Many LoRA adapters on one shared base pipeline: verified on demand, the most recently used
kept loaded, the rest evicted.

Two steps, on two kinds of threads:
- `AdapterVerifier.verify` (a request's thread): download the published export, check its files
  against its manifest and the published digest, and its base_model.json against the served
  base (artifact.py); remembered per (uri, digest), so a cached adapter costs nothing here.
- `AdapterCache.activate` (the inference worker, the only thread that touches the pipeline):
  load the verified adapter as a named peft adapter if it is not loaded (evicting the least
  recently used beyond `max_loaded`), then make it the only active one; None runs the bare base.
  `AdapterCache.per_row` does the same for a batch of several adapters: each row of the next
  pipeline call runs under its own adapter (mixed_lora.py).

Adapters are named in the pipeline by their digest: the same export published under two names
is loaded once, and a model republished with new files is a new adapter, never the old one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer

from dreambooth_contract.publication import PublishedModel

from ..methods.lora_files import LORA_WEIGHTS
from . import artifact
from .mixed_lora import BASE_ROW, RowAdapters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifiedAdapter:
    """A published model whose files checked out: what a request and its batch carry."""

    model: str
    digest: str
    path: Path

    @property
    def adapter_name(self) -> str:
        # peft adapter names become module keys: no "." and no ":" from "sha256:...".
        return "dreambooth_" + self.digest.removeprefix("sha256:")[:32]


class AdapterObserver(Protocol):
    def on_adapter_load(self, seconds: float) -> None: ...

    def on_adapter_eviction(self) -> None: ...

    def on_adapter_cache(self, hit: bool) -> None: ...

    def on_adapters_loaded(self, count: int) -> None: ...


class AdapterVerifier:
    """Fetches and verifies published adapters against the served base, once per version."""

    def __init__(
        self,
        cache_dir: Path,
        s3: artifact.S3Location | None = None,
        base: artifact.ServedBase | None = None,
    ):
        # Set once the base is resolved (it may be downloaded first: not in the constructor).
        self.base = base
        self._cache_dir = cache_dir
        self.s3 = s3
        # One at a time: two requests for a new model must not download into one folder at once.
        self._lock = threading.Lock()
        self._verified: dict[tuple[str, str], Path] = {}

    def verify(self, published: PublishedModel) -> VerifiedAdapter:
        """The model's verified export; artifact.ArtifactError when it is refused."""
        if self.base is None:
            raise RuntimeError("no base model to check adapters against yet")
        key = (published.uri, published.digest)
        with self._lock:
            path = self._verified.get(key)
            if path is None:
                adapter, record = artifact.fetch_adapter(
                    published.uri,
                    cache_dir=self._cache_dir,
                    expected_digest=published.digest,
                    s3=self.s3,
                )
                self.base.check(record, published.uri)
                path = self._verified[key] = adapter.path
        return VerifiedAdapter(published.name, published.digest, path)

    def forget_unpublished(self, published: dict[str, PublishedModel]) -> None:
        """Drop what no published model names any more (republished or unpublished)."""
        current = {(model.uri, model.digest) for model in published.values()}
        with self._lock:
            for key in set(self._verified) - current:
                del self._verified[key]


class AdapterCache:
    """The adapters loaded on `pipeline`, at most `max_loaded`, least recently used evicted.

    Not thread-safe on purpose: only the inference worker calls it, between pipeline calls.
    """

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        max_loaded: int,
        observer: AdapterObserver | None = None,
        published: Callable[[], Collection[str]] | None = None,
    ):
        """`published()` says which digests are published now (None: all that load are)."""
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.pipeline = pipeline
        self.max_loaded = max_loaded
        self._observer = observer
        # adapter name -> digest, least recently used first
        self._loaded: OrderedDict[str, str] = OrderedDict()
        self._published = published
        # What the pipeline runs now: the active adapter's name (None: no adapter set since the
        # last change) and whether LoRA is switched off (a request for the base). Kept so that
        # a batch for the adapter already active costs nothing: enable_lora and set_adapters
        # visit every LoRA layer for every loaded adapter: 11 ms with 10 adapters on the tiny
        # model (40 LoRA layers; SD1.5 has 176), at every batch (bench multi_adapter).
        self._active: str | None = None
        self._disabled = False

    @property
    def loaded(self) -> list[str]:
        """Digests of the loaded adapters, least recently used first."""
        return list(self._loaded.values())

    def activate(self, adapter: VerifiedAdapter | None) -> None:
        """Make `adapter` the pipeline's only active adapter (None: the base, none active)."""
        self._evict_unpublished()
        if adapter is None:
            if self._loaded and not self._disabled:
                self.pipeline.disable_lora()
                self._disabled = True
            return
        self._ensure_loaded([adapter])
        name = adapter.adapter_name
        if name != self._active:
            self.pipeline.set_adapters(name)
            self._active = name

    @contextmanager
    def per_row(self, adapters: Sequence[VerifiedAdapter | None]) -> Iterator[None]:
        """Within the block, row i of a pipeline call over len(adapters) prompts runs under
        adapters[i] (None: the bare base). At most `max_loaded` distinct adapters: the batcher's
        max_groups keeps batches within that."""
        distinct = list(dict.fromkeys(adapters))
        if len(distinct) == 1:  # one adapter: peft's plain forward, no per-row indexing
            self.activate(distinct[0])
            yield
            return
        wanted = [adapter for adapter in distinct if adapter is not None]
        if len(wanted) > self.max_loaded:
            raise ValueError(f"{len(wanted)} adapters in one batch; {self.max_loaded} fit loaded")
        self._evict_unpublished()
        self._ensure_loaded(wanted)
        names = [BASE_ROW if adapter is None else adapter.adapter_name for adapter in adapters]
        with RowAdapters(names).applied(self._layers()):
            yield

    def _ensure_loaded(self, adapters: Sequence[VerifiedAdapter]) -> None:
        """Load what is missing and switch LoRA on. Hits are touched before any load so that
        loading a miss never evicts another adapter of the same batch."""
        misses = []
        for adapter in adapters:
            hit = adapter.adapter_name in self._loaded
            if self._observer is not None:
                self._observer.on_adapter_cache(hit)
            if hit:
                self._loaded.move_to_end(adapter.adapter_name)
            else:
                misses.append(adapter)
        for adapter in misses:
            self._load(adapter)
        if self._disabled:
            self.pipeline.enable_lora()
            self._disabled = False

    def _layers(self) -> list[LoraLayer]:
        """Every LoRA layer of the pipeline's models (UNet and text encoders)."""
        models = [c for c in self.pipeline.components.values() if isinstance(c, torch.nn.Module)]
        return [m for model in models for m in model.modules() if isinstance(m, LoraLayer)]

    def _load(self, adapter: VerifiedAdapter) -> None:
        while len(self._loaded) >= self.max_loaded:
            self._evict(next(iter(self._loaded)))
        started = time.perf_counter()
        self.pipeline.load_lora_weights(
            adapter.path, weight_name=LORA_WEIGHTS, adapter_name=adapter.adapter_name
        )
        seconds = time.perf_counter() - started
        self._loaded[adapter.adapter_name] = adapter.digest
        log.info("loaded adapter of %s (%s) in %.2fs", adapter.model, adapter.digest, seconds)
        if self._observer is not None:
            self._observer.on_adapter_load(seconds)
            self._observer.on_adapters_loaded(len(self._loaded))

    def _evict(self, name: str) -> None:
        digest = self._loaded.pop(name)
        self.pipeline.delete_adapters(name)
        if name == self._active:
            self._active = None
        log.info("evicted adapter %s", digest)
        if self._observer is not None:
            self._observer.on_adapter_eviction()
            self._observer.on_adapters_loaded(len(self._loaded))

    def _evict_unpublished(self) -> None:
        """Unload adapters unpublished since the last batch (here, not when the index changes:
        the pipeline may be running then)."""
        if self._published is None:
            return
        published = set(self._published())
        for name, digest in list(self._loaded.items()):
            if digest not in published:
                self._evict(name)
