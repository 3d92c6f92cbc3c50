"""The served model's lifecycle: loading -> ready (or failed) -> closed.

With a catalog (multi-adapter serving: catalog.py) the loaded pipeline is the shared base, and
the engine gets an adapter cache on it; the publication index is read from start, before the
base is ready.

Loading runs in a background thread so that the HTTP server answers /healthz (alive) and
/readyz (503) while a multi-GB artifact downloads, verifies and moves to the GPU; Kubernetes
then routes traffic only once /readyz says 200.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from .artifact import LoadedModel
from .batching import DynamicBatcher
from .catalog import AdapterCatalog
from .config import ServeSettings
from .engine import Text2ImageEngine
from .metrics import ServeMetrics

log = logging.getLogger(__name__)


# Downloads, verifies and loads the pipeline; raises to refuse it (e.g. digest mismatch).
ModelLoader = Callable[[], LoadedModel]


class State(str, enum.Enum):
    loading = "loading"
    ready = "ready"
    failed = "failed"
    closed = "closed"


class ModelHost:
    def __init__(
        self,
        settings: ServeSettings,
        loader: ModelLoader,
        metrics: ServeMetrics,
        on_load_failure: Callable[[BaseException], None] | None = None,
        warm_up: bool = True,
        catalog: AdapterCatalog | None = None,
    ):
        self.settings = settings
        self.catalog = catalog
        self.metrics = metrics
        self._loader = loader
        self._on_load_failure = on_load_failure
        self._warm_up = warm_up
        self._lock = threading.Lock()
        self.state = State.loading
        self.error: str | None = None
        self.engine: Text2ImageEngine | None = None
        self.batcher: DynamicBatcher | None = None
        self.digest: str | None = None
        self.loaded_at: int = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.catalog is not None:
            self.catalog.on_published = self.metrics.models_published.set
            self.catalog.start()
        self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> State:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state

    def close(self) -> None:
        with self._lock:
            batcher, self.batcher = self.batcher, None
            self.state = State.closed
        self.metrics.model_ready.set(0)
        if batcher is not None:
            batcher.close()
        if self.catalog is not None:
            self.catalog.close()

    def _load(self) -> None:
        started = time.monotonic()
        try:
            loaded = self._loader()
            adapters = None
            if self.catalog is not None:
                adapters = self.catalog.cache_for(loaded.pipeline, self.metrics)
            engine = Text2ImageEngine(loaded.pipeline, adapters)
            if self._warm_up:
                engine.warm_up()
        except Exception as exc:  # reported on /readyz and to the CLI, not raised in a thread
            log.error("the model was not loaded: %s", exc)
            self.error = str(exc)
            self.state = State.failed
            if self._on_load_failure is not None:
                self._on_load_failure(exc)
            return
        batching = self.settings.batching
        batcher = DynamicBatcher(
            engine,
            max_batch_size=batching.max_batch_size,
            max_queue=batching.max_queue,
            batch_timeout_s=batching.batch_timeout_ms / 1000,
            # A batch runs at most as many adapters as the cache holds loaded.
            max_groups=None if engine.adapters is None else engine.adapters.max_loaded,
            observer=self.metrics,
        )
        with self._lock:
            if self.state is State.closed:  # shut down while loading
                batcher.close()
                return
            self.engine, self.batcher, self.digest = engine, batcher, loaded.digest
            self.loaded_at = int(time.time())
            self.state = State.ready
        self.metrics.model_ready.set(1)
        log.info(
            "model %s ready in %.1fs (digest %s)",
            self.settings.model_id,
            time.monotonic() - started,
            loaded.digest,
        )
