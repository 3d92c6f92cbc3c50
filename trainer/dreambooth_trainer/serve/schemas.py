"""Wire format: the OpenAI Images API (`POST /v1/images/generations`) plus our extras.

Types are strict (a string is not an int, 1.5 is not an n) so that wrong types are 400s, not
silent coercions. Limits that depend on how the server was started (max n, max size, step range)
are checked by `resolve` against `Limits`, so that the schema stays static and documentable.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from .config import MAX_ID_CHARS, MAX_TEXT_CHARS, Limits, ServeSettings
from .errors import ApiError
from .schedulers import SchedulerName

if TYPE_CHECKING:  # the wire format does not import the model code
    from .adapters import VerifiedAdapter

SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")
MAX_SIZE_CHARS = len("99999x99999")
MAX_SEED = 2**63 - 1
# Seeds the server draws stay 32-bit: easy to copy from a response into a UI.
RANDOM_SEEDS = 2**32


class ImageGenerationRequest(BaseModel):
    # Unknown fields are refused (OpenAI does the same): a typo such as "negative prompt" must
    # not silently produce an image without the negative prompt.
    model_config = ConfigDict(strict=True, extra="forbid")

    # Every string is bounded here, before any work: 400 naming the field.
    prompt: str = Field(max_length=MAX_TEXT_CHARS, description="What to draw.")
    model: str | None = Field(
        None, max_length=MAX_ID_CHARS, description="The served model's id (GET /v1/models)."
    )
    # null means "default" for every optional field, as in the OpenAI API.
    n: int | None = Field(None, description="Images to generate (default 1).")
    size: str | None = Field(
        None,
        max_length=MAX_SIZE_CHARS,
        description="'WIDTHxHEIGHT' in pixels, multiples of 8 (default: the model's).",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="Only b64_json (the default): this server hosts no files."
    )
    user: str | None = Field(
        None, max_length=MAX_ID_CHARS, description="End-user id (accepted for compatibility)."
    )
    # Extras (the openai client sends them with extra_body=...).
    negative_prompt: str | None = Field(
        None, max_length=MAX_TEXT_CHARS, description="What to steer away from."
    )
    num_inference_steps: int | None = Field(None, description="Denoising steps.")
    guidance_scale: float | None = Field(
        None, description="Classifier-free guidance; <= 1 turns it off."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Image i uses seed + i; random when omitted."
    )
    scheduler: SchedulerName | None = Field(None, description="Sampler (default: the model's).")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("empty", "must not be empty")
        return value

    @field_validator("size")
    @classmethod
    def _size_format(cls, value: str | None) -> str | None:
        if value is not None and not SIZE_PATTERN.match(value):
            raise PydanticCustomError("size_format", "must be 'WIDTHxHEIGHT', e.g. '512x512'")
        return value


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int = Field(description="Seed of this image: send it back to get the same image.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dreambooth"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@dataclass(frozen=True)
class Generation:
    """A validated request with every default filled in: what the batcher and engine see."""

    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str | None
    seed: int
    # The published model's adapter to run with; None: the pipeline as served.
    adapter: VerifiedAdapter | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]

    @property
    def batch_key(self) -> tuple[object, ...]:
        """Requests with equal keys can share one pipeline call (one UNet batch): the same
        size, steps, guidance and scheduler. Not the adapter: a call runs one per row."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.scheduler,
        )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404, f"The model '{model}' does not exist.", param="model", code="model_not_found"
    )


def resolve(
    request: ImageGenerationRequest,
    settings: ServeSettings,
    default_side: int,
    adapter: VerifiedAdapter | None = None,
) -> Generation:
    """Apply the server's limits and defaults; ApiError(400) names the offending field.

    `adapter`: the published model the request names (the caller looked `model` up); without
    one, `model` must be the served model's id or absent (404 otherwise)."""
    limits = settings.limits
    if adapter is None and request.model not in (None, settings.model_id):
        raise model_not_found(request.model)
    if request.response_format == "url":
        raise invalid(
            "response_format",
            "'url' is not supported: this server does not host files; use 'b64_json'.",
        )
    for param in ("prompt", "negative_prompt"):
        text = getattr(request, param)
        if text is not None and len(text) > limits.max_prompt_chars:
            raise invalid(param, f"must be at most {limits.max_prompt_chars} characters")
    n = 1 if request.n is None else request.n
    if not 1 <= n <= limits.max_n:
        raise invalid("n", f"must be between 1 and {limits.max_n}")
    width, height = _size(request.size, limits, default_side)
    steps = request.num_inference_steps
    if steps is None:
        steps = settings.default_steps
    elif not limits.min_steps <= steps <= limits.max_steps:
        raise invalid(
            "num_inference_steps", f"must be between {limits.min_steps} and {limits.max_steps}"
        )
    guidance = request.guidance_scale
    if guidance is None:
        guidance = settings.default_guidance_scale
    elif not 0 <= guidance <= limits.max_guidance_scale:
        raise invalid("guidance_scale", f"must be between 0 and {limits.max_guidance_scale}")
    if request.seed is not None and request.seed + n - 1 > MAX_SEED:
        raise invalid("seed", f"seed + n - 1 must not exceed {MAX_SEED}")
    return Generation(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or "",
        n=n,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=float(guidance),
        scheduler=request.scheduler or settings.default_scheduler,
        # A drawn seed is returned with the image, so any image can be reproduced.
        seed=request.seed if request.seed is not None else secrets.randbelow(RANDOM_SEEDS),
        adapter=adapter,
    )


def _size(size: str | None, limits: Limits, default_side: int) -> tuple[int, int]:
    if size is None:
        return default_side, default_side
    match = SIZE_PATTERN.match(size)
    assert match is not None  # the schema checked the format
    width, height = int(match[1]), int(match[2])
    for side in (width, height):
        if side % limits.size_multiple:
            raise invalid("size", f"width and height must be multiples of {limits.size_multiple}")
        if not limits.min_side <= side <= limits.max_side:
            raise invalid(
                "size", f"width and height must be between {limits.min_side} and {limits.max_side}"
            )
    return width, height


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, f"Invalid '{param}': {message}", param=param, code="invalid_value")
