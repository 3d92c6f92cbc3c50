"""The FastAPI app: OpenAI Images API, model list, health, readiness and metrics.

    app = create_app(ServeSettings(model_id="my-dog"), loader)
    uvicorn.run(app)

With a catalog (`create_app(settings, load_base, catalog=...)`) the server also answers to every
model published to it: `model` picks the adapter, GET /v1/models lists them.

The event loop only validates, queues and encodes; inference runs on the batcher's worker
thread (host.py, batching.py), so health checks and 429s stay fast while a batch runs.

A request waits for its images only while its client is connected and its deadline
(`request_timeout_s`) has not passed; otherwise its queued work is dropped (guard.py has the
body limit and the API key, errors.py the error bodies).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import errors
from .adapters import VerifiedAdapter
from .artifact import ArtifactError
from .batching import BatcherClosed, DynamicBatcher, Job, QueueFull
from .catalog import AdapterCatalog, ModelNotPublished
from .config import ServeSettings
from .engine import Text2ImageEngine, png_base64
from .errors import ApiError, internal_error, request_id_of
from .guard import RequestGuard
from .host import ModelHost, ModelLoader, State
from .metrics import ServeMetrics
from .schemas import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    model_not_found,
    resolve,
)

log = logging.getLogger(__name__)

# Rejection reasons for the metric, by HTTP status.
REJECT_REASONS = {
    400: "invalid",
    401: "unauthorized",
    404: "invalid",
    413: "too_large",
    429: "queue_full",
    499: "client_closed",  # nginx's code: nobody reads the answer
    503: "not_ready",
    504: "timeout",
}

router = APIRouter()


def host_of(request: Request) -> ModelHost:
    return request.app.state.host


def _ready(host: ModelHost) -> tuple[Text2ImageEngine, DynamicBatcher]:
    engine, batcher = host.engine, host.batcher
    if host.state is not State.ready or engine is None or batcher is None:
        raise ApiError(503, f"The model is not ready ({host.state.value}).", code="model_not_ready")
    return engine, batcher


@router.post("/v1/images/generations", response_model=ImagesResponse)
async def create_image(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
    started = time.perf_counter()
    host = host_of(request)
    engine, batcher = _ready(host)
    adapter = await _adapter(host, body.model, request)
    generation = resolve(body, host.settings, engine.native_side, adapter)
    job = Job(generation.batch_key, generation.n, generation, group=generation.adapter)
    try:
        future = batcher.submit(job)
    except QueueFull as exc:
        raise ApiError(
            429,
            f"The server is at capacity ({exc}); retry shortly.",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from exc
    except BatcherClosed as exc:
        raise ApiError(503, "The server is shutting down.", code="shutting_down") from exc
    deadline = started + host.settings.request_timeout_s
    images = await _images(request, future, deadline, host)
    # PNG encoding is CPU work: off the loop, and overlapping the next batch on the worker.
    encoded = await asyncio.to_thread(lambda: [png_base64(image) for image in images])
    model = adapter.model if adapter is not None else host.settings.model_id
    host.metrics.served(model, len(encoded), time.perf_counter() - started)
    pairs = zip(encoded, generation.seeds, strict=True)
    data = [ImageData(b64_json=b64, seed=seed) for b64, seed in pairs]
    return ImagesResponse(created=int(time.time()), data=data)


async def _adapter(host: ModelHost, model: str | None, request: Request) -> VerifiedAdapter | None:
    """The verified adapter of the published model `model`; None for the served model itself."""
    catalog = host.catalog
    if catalog is None or model is None or model == host.settings.model_id:
        return None
    try:
        # Off the loop: a model not verified yet is downloaded and hashed first.
        return await asyncio.to_thread(catalog.lookup, model)
    except ModelNotPublished:
        raise model_not_found(model) from None
    except ArtifactError as exc:
        request_id = request_id_of(request)
        log.error("model %s refused (request %s): %s", model, request_id, exc)
        raise ApiError(
            500,
            f"The model '{model}' cannot be served: its files do not match its published digest "
            f"or this server's base model (request id {request_id}).",
            param="model",
            code="model_refused",
        ) from None


async def _images(request: Request, future: Future, deadline: float, host: ModelHost) -> list:
    """The job's images, unless the client goes away or the deadline passes first.

    Whatever ends the wait (those two, or this handler's task being cancelled), a job still
    queued is cancelled, which takes it out of the batcher's queue: it costs no compute.
    """
    result = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        timeout = max(deadline - time.perf_counter(), 0.0)
        done, _ = await asyncio.wait(
            {result, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone.cancel()
        dropped = future.cancel()  # False once the job runs or ran
        result.cancel()  # a late outcome of a running job is not awaited by anyone
    if result in done:
        try:
            return result.result()
        except BatcherClosed as exc:
            raise ApiError(503, "The server is shutting down.", code="shutting_down") from exc
        except Exception:
            request_id = request_id_of(request)
            log.exception("generation failed (request %s)", request_id)
            raise internal_error(request_id) from None
    reason = "client_disconnected" if gone in done else "deadline"
    stage = "queued" if dropped else "running"
    host.metrics.abandoned.labels(reason=reason, stage=stage).inc()
    log.info("request %s abandoned (%s) while %s", request_id_of(request), reason, stage)
    if reason == "deadline":
        seconds = host.settings.request_timeout_s
        raise ApiError(
            504, f"The request did not complete within {seconds:g} seconds.", code="timeout"
        )
    raise ApiError(499, "The client closed the request.", code="client_closed_request")


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body is read: only http.disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_cards(host_of(request)))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    for card in _cards(host_of(request)):
        if card.id == model_id:
            return card
    raise model_not_found(model_id)


def _cards(host: ModelHost) -> list[ModelCard]:
    """The served model, then the published ones by name."""
    cards = [ModelCard(id=host.settings.model_id, created=host.loaded_at)]
    if host.catalog is not None:
        cards += _published_cards(host.catalog)
    return cards


def _published_cards(catalog: AdapterCatalog) -> list[ModelCard]:
    first_seen = catalog.first_seen
    return [ModelCard(id=name, created=first_seen.get(name, 0)) for name in sorted(catalog.models)]


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """Alive: the process serves HTTP. A failed load is not alive (restart, or look at logs)."""
    host = host_of(request)
    ok = host.state is not State.failed
    return JSONResponse({"status": "ok" if ok else "failed"}, status_code=200 if ok else 500)


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready: the model is loaded, so the Service may route generation requests here."""
    host = host_of(request)
    body: dict[str, object] = {"status": host.state.value, "model": host.settings.model_id}
    if host.digest:
        body["digest"] = host.digest
    if host.error:
        body["error"] = host.error
    return JSONResponse(body, status_code=200 if host.state is State.ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(host_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


def create_app(
    settings: ServeSettings,
    loader: ModelLoader,
    *,
    on_load_failure: Callable[[BaseException], None] | None = None,
    warm_up: bool = True,
    catalog: AdapterCatalog | None = None,
) -> FastAPI:
    """The app; the model starts loading (in a thread) when the server starts the app.

    With `catalog`, `loader` loads the shared base and published models are served on it."""
    metrics_ = ServeMetrics()
    metrics_.expose(settings.model_id)
    host = ModelHost(
        settings,
        loader,
        metrics_,
        on_load_failure=on_load_failure,
        warm_up=warm_up,
        catalog=catalog,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        host.start()
        try:
            yield
        finally:
            host.close()

    app = FastAPI(title="DreamBooth inference", version="1", lifespan=lifespan)
    app.state.host = host
    errors.install(app, on_error=lambda status: _count_rejection(metrics_, status))
    app.add_middleware(
        RequestGuard,
        max_body_bytes=settings.max_body_bytes,
        api_key=settings.api_key,
        on_reject=lambda status: _count_rejection(metrics_, status),
    )
    app.include_router(router)
    return app


def _count_rejection(metrics_: ServeMetrics, status: int) -> None:
    metrics_.rejected.labels(reason=REJECT_REASONS.get(status, "error")).inc()
