"""Dynamic batching end to end: concurrent requests share pipeline calls, a seed gives the same
image batched or alone, and a full queue answers 429."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from PIL import Image

from tests.support.procs import wait_for

from .harness import (
    BATCHED_IMAGES,
    BATCHES,
    DEPTH,
    HeldWorker,
    generate,
    images,
    metric,
)


def queue_behind(held: HeldWorker, url: str, bodies: list[dict]) -> list[httpx.Response]:
    """Send `bodies` concurrently while the worker is held; release it once all are queued."""
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        blocker = held.occupy(pool, url)
        futures = [pool.submit(generate, url, **body) for body in bodies]
        wait_for("the requests to queue", lambda: metric(url, DEPTH) == len(bodies), 30)
        held.release()
        images(blocker.result())
        return [future.result() for future in futures]


def test_concurrent_requests_share_a_call_and_seeds_give_the_same_image_either_way(serve, held):
    url = serve(max_batch_size=8, batch_timeout_ms=0)
    bodies = [
        {"prompt": "a photo of sks dog", "seed": 1},
        {"prompt": "a red cube", "seed": 2, "negative_prompt": "blurry"},
        {"prompt": "a cat on the grass", "seed": 3, "n": 2},
        {"prompt": "a photo of sks dog on the beach", "seed": 5},
    ]
    batched = [images(response) for response in queue_behind(held, url, bodies)]
    # The blocker's call, then ONE call (one UNet batch) for the four requests' five images.
    assert metric(url, BATCHES) == 2
    assert metric(url, BATCHED_IMAGES) == 1 + 5

    # The same seeds, one request at a time, give the same images: each image has its own
    # generator, so its neighbours in the batch do not change it.
    for body, expected in zip(bodies, batched, strict=True):
        for alone, together in zip(images(generate(url, **body)), expected, strict=True):
            assert_same_image(alone, together)
    # Image i of a request uses seed + i: the second cat is the cat of seed 4 on its own.
    (cat,) = images(generate(url, prompt="a cat on the grass", seed=4))
    assert_same_image(cat, batched[2][1])
    assert metric(url, BATCHES) == 2 + len(bodies) + 1
    # ... and the comparison can tell images apart: another seed is another image.
    assert np.abs(pixels(batched[2][0]) - pixels(cat)).mean() > 10


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def assert_same_image(a: str, b: str) -> None:
    """Equal up to float rounding: a batched GEMM sums in another order (~1e-6 in latents),
    which may flip a pixel by one 8-bit level, never more."""
    difference = np.abs(pixels(a) - pixels(b))
    assert difference.max() <= 1, f"max pixel difference {difference.max()}"


def test_requests_with_different_parameters_are_not_merged(serve, held):
    url = serve(max_batch_size=8, batch_timeout_ms=0)
    bodies = [{"seed": 1}, {"seed": 2, "num_inference_steps": 3}, {"seed": 3}]
    for response in queue_behind(held, url, bodies):
        images(response)
    # The blocker, the two 2-step requests together, the 3-step one alone.
    assert metric(url, BATCHES) == 3
    assert metric(url, BATCHED_IMAGES) == 1 + 3


def test_a_full_queue_answers_429_instead_of_growing(serve, held):
    url = serve(max_batch_size=1, max_queue=1, batch_timeout_ms=0)
    with ThreadPoolExecutor(2) as pool:
        blocker = held.occupy(pool, url)
        waiting = pool.submit(generate, url, seed=2)
        wait_for("the second request to queue", lambda: metric(url, DEPTH) == 1, 30)
        refused = generate(url, seed=3)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert metric(url, 'dreambooth_inference_requests_rejected_total{reason="queue_full"}') == 1
        held.release()
        assert images(blocker.result()) and images(waiting.result())
    assert metric(url, DEPTH) == 0


def test_the_batch_window_merges_a_burst_of_requests(serve):
    # No held worker: the first request opens a batch and the burst joins it within the window.
    url = serve(max_batch_size=8, batch_timeout_ms=500)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda seed: generate(url, seed=seed), range(8)))
    assert all(images(response) for response in responses)
    assert metric(url, BATCHED_IMAGES) == 8
    assert metric(url, BATCHES) < 8  # lenient: a loaded machine may split the burst in two
