"""Server settings: what `dreambooth serve` was started with (limits, batching, device)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dreambooth_contract.sampling import MAX_GUIDANCE_SCALE

# Hard caps of the request schema (schemas.py): every string a client sends is bounded.
MAX_TEXT_CHARS = 4000  # prompt, negative_prompt
MAX_ID_CHARS = 256  # model, user
# A valid request is a few KB (two 4000-character prompts, escaped, stay under 100 KB).
MAX_BODY_BYTES = 1 << 20
REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond gets a 400 naming the field."""

    max_n: int = 8
    max_side: int = 1024
    min_side: int = 8
    # Latents are 1/8 of the image: other sizes would be silently cropped by the VAE.
    size_multiple: int = 8
    min_steps: int = 1
    max_steps: int = 150
    max_guidance_scale: float = MAX_GUIDANCE_SCALE
    max_prompt_chars: int = MAX_TEXT_CHARS


@dataclass(frozen=True)
class BatchingSettings:
    # Images (not requests) per pipeline call; 1 turns batching off (one request at a time).
    max_batch_size: int = 8
    # Requests waiting for the worker; one more is answered 429 instead of growing without bound.
    max_queue: int = 64
    # How long the worker holds a batch open for compatible arrivals once it has one request.
    batch_timeout_ms: float = 10.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if self.batch_timeout_ms < 0:
            raise ValueError("batch_timeout_ms must not be negative")


@dataclass(frozen=True)
class ServeSettings:
    model_id: str
    limits: Limits = Limits()
    batching: BatchingSettings = BatchingSettings()
    default_steps: int = 25
    default_guidance_scale: float = 7.5
    # The sampler of a request that names none; None: the model's own scheduler.
    default_scheduler: str | None = None
    # A request still queued or running after this long is answered 504; queued work is dropped.
    request_timeout_s: float = REQUEST_TIMEOUT_S
    # Larger request bodies are refused with 413 before they are read into memory.
    max_body_bytes: int = MAX_BODY_BYTES
    # When set, /v1/ routes need `Authorization: Bearer <key>`. Never in a repr, hence a log.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be at least 1")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
