"""The HTTP API on the tiny model: the official openai client, errors, models, health, metrics."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from dreambooth_trainer.serve.app import create_app
from tests.support.tools import promtool_check_metrics

from .conftest import FAST, MODEL_ID, settings
from .harness import HTTP_TIMEOUT, metric, running


@pytest.fixture(scope="module")
def url(loaded) -> Iterator[str]:
    with running(create_app(settings(), lambda: loaded, warm_up=False)) as base:
        yield base


@pytest.fixture(scope="module")
def http(url) -> Iterator[httpx.Client]:
    # A generous timeout: two cores shared with other test suites can be slow.
    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT) as client:
        yield client


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_the_official_openai_client_generates_images(url):
    client = openai.OpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=HTTP_TIMEOUT
    )
    result = client.images.generate(
        model=MODEL_ID,
        prompt="a photo of sks dog",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={
            "num_inference_steps": 2,
            "guidance_scale": 5.0,
            "seed": 42,
            "scheduler": "ddim",
        },
    )
    assert result.created > 0
    assert len(result.data) == 2
    images = [decode(item.b64_json) for item in result.data]
    assert [(image.format, image.size) for image in images] == [("PNG", (64, 64))] * 2
    assert [item.model_extra["seed"] for item in result.data] == [42, 43]
    assert [model.id for model in client.models.list()] == [MODEL_ID]


def test_defaults_give_the_model_native_size_and_a_reproducible_seed(http):
    # null is "default" for optional fields, as in the OpenAI API.
    nulls = {"n": None, "size": None, "response_format": None, "seed": None}
    body = http.post(
        "/v1/images/generations", json={"prompt": "a photo of sks dog", **nulls}
    ).json()
    (item,) = body["data"]
    assert decode(item["b64_json"]).size == (64, 64)  # tiny-sd: 8 latent px x 8
    again = http.post(
        "/v1/images/generations", json={"prompt": "a photo of sks dog", "seed": item["seed"]}
    ).json()
    assert again["data"][0]["b64_json"] == item["b64_json"]


BAD_REQUESTS = [
    # (what is wrong, body, the field the error must name)
    ("size not a multiple of 8", {"size": "60x64"}, "size"),
    ("size above the maximum", {"size": "512x512"}, "size"),
    ("size not WxH", {"size": "big"}, "size"),
    ("size of the wrong type", {"size": 64}, "size"),
    ("n too large", {"n": 5}, "n"),
    ("n zero", {"n": 0}, "n"),
    ("n a string", {"n": "two"}, "n"),
    ("n a float", {"n": 1.5}, "n"),
    ("steps above the range", {"num_inference_steps": 51}, "num_inference_steps"),
    ("steps zero", {"num_inference_steps": 0}, "num_inference_steps"),
    ("steps a string", {"num_inference_steps": "10"}, "num_inference_steps"),
    ("empty prompt", {"prompt": ""}, "prompt"),
    ("blank prompt", {"prompt": "   "}, "prompt"),
    ("prompt not a string", {"prompt": 7}, "prompt"),
    ("no prompt", {"prompt": None}, "prompt"),
    ("guidance a string", {"guidance_scale": "high"}, "guidance_scale"),
    ("guidance negative", {"guidance_scale": -1}, "guidance_scale"),
    ("negative seed", {"seed": -1}, "seed"),
    ("unknown scheduler", {"scheduler": "magic"}, "scheduler"),
    ("url response format", {"response_format": "url"}, "response_format"),
    ("a typo in an extra", {"negative prompt": "blurry"}, "negative prompt"),
    # Every string is bounded (a 20 MiB negative_prompt once got a 200).
    ("prompt too long", {"prompt": "a" * 4001}, "prompt"),
    ("negative_prompt too long", {"negative_prompt": "a" * 4001}, "negative_prompt"),
    ("user too long", {"user": "u" * 257}, "user"),
    ("model too long", {"model": "m" * 257}, "model"),
    ("size too long", {"size": "1" * 1000}, "size"),
]


def test_a_default_scheduler_serves_requests_that_name_none(loaded):
    """`--default-scheduler ddim`: a request without `scheduler` gets exactly the image of one
    naming ddim, not the model's own scheduler's."""

    def image(client: httpx.Client, **extra) -> bytes:
        body = {"prompt": "a photo of sks dog", "size": "64x64", "seed": 3, **extra}
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        return base64.b64decode(response.json()["data"][0]["b64_json"])

    app = create_app(settings(default_scheduler="ddim"), lambda: loaded, warm_up=False)
    with running(app) as ddim_url, httpx.Client(base_url=ddim_url, timeout=HTTP_TIMEOUT) as ddim:
        default = image(ddim)
        assert default == image(ddim, scheduler="ddim")
        assert default != image(ddim, scheduler="pndm")  # the tiny model's own scheduler


@pytest.mark.parametrize(
    ("body", "field"), [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS]
)
def test_bad_requests_get_400_naming_the_field(http, body, field):
    request = {"prompt": "a photo of sks dog", **FAST, **body}
    if body.get("prompt", "") is None:
        del request["prompt"]
    response = http.post("/v1/images/generations", json=request)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == field
    assert field in error["message"]


def test_strings_at_their_limits_are_accepted(http):
    body = {"prompt": "a" * 4000, "negative_prompt": "b" * 4000, "user": "u" * 256, **FAST}
    assert http.post("/v1/images/generations", json=body).status_code == 200


def test_bad_requests_through_the_openai_client_raise_its_bad_request_error(url):
    client = openai.OpenAI(
        base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=HTTP_TIMEOUT
    )
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(prompt="a dog", size="100x100")  # type: ignore[arg-type]
    assert raised.value.param == "size"
    assert "multiples of 8" in raised.value.message


def test_a_body_that_is_not_json_or_not_an_object_is_a_400(http):
    for content in (b"not json", b"[1, 2]"):
        response = http.post(
            "/v1/images/generations",
            content=content,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["error"]["message"].startswith("Invalid request body")


def test_another_model_is_a_404_naming_the_model(http):
    response = http.post(
        "/v1/images/generations", json={"prompt": "a dog", "model": "dall-e-3", **FAST}
    )
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"
    assert http.get(f"/v1/models/{MODEL_ID}").json()["id"] == MODEL_ID
    assert http.get("/v1/models/other").status_code == 404


def test_metrics_count_images_latency_and_rejections(url, http):
    images = f'dreambooth_inference_images_generated_total{{model="{MODEL_ID}"}}'
    before = metric(url, images)
    rejected = 'dreambooth_inference_requests_rejected_total{reason="invalid"}'
    invalid_before = metric(url, rejected)
    http.post("/v1/images/generations", json={"prompt": "a dog", "n": 3, **FAST})
    http.post("/v1/images/generations", json={"prompt": "", **FAST})
    assert metric(url, images) == before + 3
    assert metric(url, rejected) == invalid_before + 1
    requests = f'dreambooth_inference_request_duration_seconds_count{{model="{MODEL_ID}"}}'
    assert metric(url, requests) >= 1
    assert metric(url, "dreambooth_inference_queue_depth") == 0
    assert metric(url, "dreambooth_inference_model_ready") == 1


def test_metrics_exposition_passes_promtool(url, http, promtool_bin):
    http.post("/v1/images/generations", json={"prompt": "a dog", **FAST})
    exposition = http.get("/metrics").text
    for family in (
        "request_duration_seconds",
        "images_generated_total",
        "queue_depth",
        "batch_size",
    ):
        assert f"\ndreambooth_inference_{family}" in exposition, family
    promtool_check_metrics(promtool_bin, exposition)
