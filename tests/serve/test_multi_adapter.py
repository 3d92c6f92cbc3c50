"""One server, many subjects: `dreambooth serve --model BASE --publications DIR`.

Three LoRA exports (different seeds) on one tiny base, published through the index the operator
writes (contract publication.py). Each published model's image is that of a plain diffusers
pipeline with that adapter loaded; an unpublished or refused model is not served; the cache
keeps the N most recently used adapters; a batch runs several adapters, one per image.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from dreambooth_contract import publication
from dreambooth_contract.publication import Publications, PublishedModel
from dreambooth_trainer.serve.adapters import AdapterCache, AdapterVerifier, VerifiedAdapter
from dreambooth_trainer.serve.app import create_app
from dreambooth_trainer.serve.catalog import AdapterCatalog
from dreambooth_trainer.serve.engine import Text2ImageEngine
from dreambooth_trainer.serve.publications import PublicationSource
from dreambooth_trainer.storage import S3Store
from tests.support.lora import digest_of, export_for, publish
from tests.support.procs import wait_for

from .conftest import MODEL_ID, settings
from .harness import (
    DEPTH,
    GENERATE,
    HTTP_TIMEOUT,
    SERVE,
    HeldWorker,
    metric,
    running,
    serve_process,
)

PROMPT = "a photo of sks dog"
OPTIONS = {"height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 7.5}
REQUEST = {"size": "32x32", "num_inference_steps": 2, "guidance_scale": 7.5}
NAMES = ("team-a/rex", "team-a/fido", "team-b/bella")
LOADS = "dreambooth_inference_adapter_loads_total"
EVICTIONS = "dreambooth_inference_adapter_evictions_total"
HITS = 'dreambooth_inference_adapter_cache_lookups_total{result="hit"}'
MISSES = 'dreambooth_inference_adapter_cache_lookups_total{result="miss"}'


@pytest.fixture(scope="module")
def exports(base_dir, tmp_path_factory) -> dict[str, Path]:
    """Three adapters for the base, each from another seed, by model name; moderate ones, so
    that a batch's rounding stays rounding (support/lora.py)."""
    return {
        name: export_for(base_dir, tmp_path_factory.mktemp("adapter"), seed=seed, strength=0.2)
        for seed, name in enumerate(NAMES, start=1)
    }


@pytest.fixture
def multi(base_dir, model_cache, tmp_path) -> Iterator[Callable[..., str]]:
    """Factory: `url = multi(publications_dir, max_loaded=...)` starts a multi-adapter server."""
    with contextlib.ExitStack() as stack:

        def start(directory: Path, max_loaded: int = 3) -> str:
            catalog = AdapterCatalog(
                PublicationSource(directory),
                AdapterVerifier(model_cache),
                max_loaded=max_loaded,
                poll_interval_s=0.05,
            )
            loader = partial(catalog.load_base, str(base_dir), model_cache, device="cpu")
            app = create_app(settings(), loader, warm_up=False, catalog=catalog)
            return stack.enter_context(running(app))

        yield start


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=HTTP_TIMEOUT
    )


def generate(url: str, model: str | None, seed: int = 7) -> httpx.Response:
    body = {"prompt": PROMPT, "seed": seed, **REQUEST}
    if model is not None:
        body["model"] = model
    return httpx.post(url + GENERATE, json=body, timeout=HTTP_TIMEOUT)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def plain_image(base_dir: Path, adapter: Path | None, seed: int = 7) -> np.ndarray:
    """The image of a plain diffusers pipeline (with `adapter` loaded the usual way)."""
    import torch

    pipeline = StableDiffusionPipeline.from_pretrained(base_dir)
    pipeline.set_progress_bar_config(disable=True)
    if adapter is not None:
        pipeline.load_lora_weights(adapter)
    generator = torch.Generator("cpu").manual_seed(seed)
    return np.asarray(pipeline(PROMPT, generator=generator, **OPTIONS).images[0])


def test_each_model_gives_the_image_of_a_plain_pipeline_with_its_adapter(
    multi, exports, base_dir, tmp_path
):
    publish(tmp_path, exports)
    url = multi(tmp_path, max_loaded=2)  # three adapters through two slots: swaps on the way
    openai_client = client(url)
    assert [model.id for model in openai_client.models.list()] == [MODEL_ID, *sorted(NAMES)]
    served = {}
    for name in (*NAMES, None):
        kwargs = {"model": name} if name is not None else {}
        result = openai_client.images.generate(
            prompt=PROMPT,
            size="32x32",
            response_format="b64_json",
            extra_body={"num_inference_steps": 2, "guidance_scale": 7.5, "seed": 7},
            **kwargs,
        )
        served[name] = pixels(result.data[0].b64_json)

    for name, export in exports.items():
        assert np.array_equal(served[name], plain_image(base_dir, export)), name
    # Requests without a model get the base, no adapter active (after three were loaded).
    assert np.array_equal(served[None], plain_image(base_dir, None))
    images = list(served.values())
    for i, first in enumerate(images):
        for second in images[i + 1 :]:
            assert not np.array_equal(first, second)


def test_an_unpublished_model_is_a_404_and_leaves_the_list(multi, exports, tmp_path):
    rex, fido = NAMES[:2]
    publish(tmp_path, {rex: exports[rex], fido: exports[fido]})
    url = multi(tmp_path)
    assert generate(url, rex).status_code == 200
    assert metric(url, LOADS) == 1

    publish(tmp_path, {fido: exports[fido]})
    wait_for(
        "the index change",
        lambda: rex not in [m.id for m in client(url).models.list()],
        timeout=HTTP_TIMEOUT,
    )
    response = generate(url, rex)
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": f"The model '{rex}' does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    with pytest.raises(openai.NotFoundError):
        client(url).images.generate(model=rex, prompt=PROMPT, extra_body=REQUEST)
    assert httpx.get(f"{url}/v1/models/{rex}").status_code == 404
    assert httpx.get(f"{url}/v1/models/{fido}").json()["id"] == fido
    # Its adapter is unloaded before the next batch, without waiting for the LRU to need it.
    assert generate(url, fido).status_code == 200
    assert metric(url, EVICTIONS) == 1
    assert metric(url, "dreambooth_inference_adapters_loaded") == 1
    assert metric(url, "dreambooth_inference_models_published") == 1


def test_a_model_whose_files_differ_from_the_published_digest_is_refused(multi, exports, tmp_path):
    rex, fido = NAMES[:2]
    # rex's index entry carries fido's digest: rex's files do not match it.
    publish(tmp_path, {rex: exports[rex]}, digests={rex: digest_of(exports[fido])})
    url = multi(tmp_path)
    response = generate(url, rex)
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("model_refused", "model")
    assert str(exports[rex]) not in error["message"]  # no server paths to clients
    assert metric(url, LOADS) == 0


def test_an_adapter_of_another_base_is_refused(multi, base_dir, tmp_path_factory, tmp_path):
    import shutil

    other_base = Path(shutil.copytree(base_dir, tmp_path_factory.mktemp("other") / "base"))
    foreign = export_for(other_base, tmp_path_factory.mktemp("foreign"))
    publish(tmp_path, {"team-c/stray": foreign})
    url = multi(tmp_path)
    response = generate(url, "team-c/stray")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "model_refused"
    assert metric(url, LOADS) == 0


def test_the_cache_keeps_the_most_recently_used_adapters(multi, exports, tmp_path):
    rex, fido, bella = NAMES
    publish(tmp_path, exports)
    url = multi(tmp_path, max_loaded=2)
    for name in (rex, fido, bella):  # bella evicts rex, the least recently used
        assert generate(url, name).status_code == 200
    assert (metric(url, LOADS), metric(url, EVICTIONS)) == (3, 1)
    assert generate(url, fido).status_code == 200  # still loaded: a hit
    assert (metric(url, HITS), metric(url, MISSES)) == (1, 3)
    assert generate(url, rex).status_code == 200  # evicted: loaded again, bella goes
    assert (metric(url, LOADS), metric(url, EVICTIONS)) == (4, 2)
    assert generate(url, fido).status_code == 200  # fido was used after bella: kept
    assert (metric(url, HITS), metric(url, MISSES)) == (2, 4)
    assert metric(url, "dreambooth_inference_adapters_loaded") == 2
    assert metric(url, "dreambooth_inference_adapter_load_duration_seconds_count") == 4
    images = f'dreambooth_inference_images_generated_total{{model="{fido}"}}'
    assert metric(url, images) == 3


def test_a_batch_mixes_adapters_up_to_the_cache_size_and_each_image_is_its_adapters(
    multi, exports, base_dir, tmp_path, monkeypatch
):
    """One pipeline call runs several adapters, one per row (peft's mixed-batch LoRA forward in
    the text encoder and the UNet): each image is its adapter's image alone, up to a batched
    GEMM's rounding; a batch holds no more adapters than the cache keeps loaded."""
    rex, fido, bella = NAMES
    publish(tmp_path, exports)
    url = multi(tmp_path, max_loaded=2)
    held = HeldWorker(monkeypatch)
    batches: list[list[str | None]] = []
    held_call = Text2ImageEngine.__call__

    def recording_call(engine, jobs):
        batches.append([job.payload.adapter and job.payload.adapter.model for job in jobs])
        return held_call(engine, jobs)

    monkeypatch.setattr(Text2ImageEngine, "__call__", recording_call)
    # Same size, steps and guidance: only the model tells these requests apart.
    order = [rex, fido, None, bella, rex]
    with ThreadPoolExecutor(len(order) + 1) as pool:
        blocker = held.occupy(pool, url)
        futures = []
        for seed, name in enumerate(order, start=1):  # queued one by one: a known order
            futures.append(pool.submit(generate, url, name, seed))
            wait_for(f"{seed} queued", lambda n=seed: metric(url, DEPTH) == n, HTTP_TIMEOUT)
        held.release()
        assert blocker.result().status_code == 200
        responses = [future.result() for future in futures]

    assert batches[1:] == [[rex, fido, None, rex], [bella]]
    for seed, (name, response) in enumerate(zip(order, responses, strict=True), start=1):
        assert response.status_code == 200, response.text
        served = pixels(response.json()["data"][0]["b64_json"])
        alone = plain_image(base_dir, exports.get(name), seed)
        assert level_difference(served, alone) <= 1, (name, seed)
        # ... and the criterion tells adapters apart: another model's image is far away.
        other = plain_image(base_dir, exports[fido if name == rex else rex], seed)
        assert level_difference(served, other) > 32, (name, seed)


def level_difference(a: np.ndarray, b: np.ndarray) -> int:
    """The largest difference in 8-bit levels. A batch sums its GEMMs in another order than a
    single image (~1e-6 in the latents), which may flip a pixel by one level, never more."""
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_the_cache_switches_the_pipeline_only_when_the_adapter_changes(
    exports, base_dir, monkeypatch
):
    """Every batch activates its adapter; switching visits every LoRA layer of every loaded
    adapter, so the same adapter twice in a row must not pay for it again."""
    pipeline = StableDiffusionPipeline.from_pretrained(base_dir)
    switches: list[str] = []
    for method in ("set_adapters", "enable_lora", "disable_lora"):
        original = getattr(pipeline, method)

        def counted(*args, _method=method, _original=original, **kwargs):
            switches.append(_method)
            return _original(*args, **kwargs)

        monkeypatch.setattr(pipeline, method, counted)
    cache = AdapterCache(pipeline, max_loaded=2)
    rex, fido, bella = (VerifiedAdapter(n, digest_of(exports[n]), exports[n]) for n in NAMES)

    def active() -> list[str] | None:
        """The active adapters, None while LoRA is switched off (the bare base runs)."""
        layers = [m for m in pipeline.unet.modules() if hasattr(m, "disable_adapters")]
        return None if all(m.disable_adapters for m in layers) else pipeline.get_active_adapters()

    steps = [
        (rex, ["set_adapters"]),
        (rex, []),
        (fido, ["set_adapters"]),
        (fido, []),
        (None, ["disable_lora"]),
        (None, []),
        (fido, ["enable_lora"]),  # fido is still the one set
        (rex, ["set_adapters"]),
        (bella, ["set_adapters"]),  # evicts fido
        (fido, ["set_adapters"]),  # loaded again, evicting rex
        (None, ["disable_lora"]),
        (rex, ["enable_lora", "set_adapters"]),  # loaded while LoRA is off, evicting bella
    ]
    for adapter, calls in steps:
        switches.clear()
        cache.activate(adapter)
        assert switches == calls, adapter and adapter.model
        assert active() == (None if adapter is None else [adapter.adapter_name])


def test_the_cli_serves_adapters_published_on_s3(exports, base_dir, s3_server, s3_bucket, tmp_path):
    rex = NAMES[0]
    prefix = "team-a/rex/export"
    S3Store(s3_bucket, prefix, client=s3_server.client()).upload_dir(exports[rex])
    publications = tmp_path / "publications"
    publications.mkdir()
    index = Publications(
        models=(
            PublishedModel(
                name=rex, uri=f"s3://{s3_bucket}/{prefix}", digest=digest_of(exports[rex])
            ),
        )
    )
    (publications / publication.PUBLICATIONS_FILE).write_text(publication.render(index))
    args = ["--model", str(base_dir), "--publications", str(publications)]
    args += ["--max-loaded-adapters", "1"]
    env = {**os.environ, **s3_server.env(), "DREAMBOOTH_CACHE": str(tmp_path / "cache")}
    with serve_process(args, tmp_path / "serve.log", env) as (url, _server):
        result = client(url).images.generate(
            model=rex,
            prompt=PROMPT,
            size="32x32",
            response_format="b64_json",
            extra_body={"num_inference_steps": 2, "guidance_scale": 7.5, "seed": 7},
        )
        served = pixels(result.data[0].b64_json)
    assert np.array_equal(served, plain_image(base_dir, exports[rex]))


def test_the_cli_refuses_publications_with_an_adapter(base_dir, exports, tmp_path):
    argv = [*SERVE, "--model", str(base_dir), "--publications", str(tmp_path)]
    result = subprocess.run(
        [*argv, "--adapter", str(exports[NAMES[0]])], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "drop --adapter and --digest" in result.stderr
