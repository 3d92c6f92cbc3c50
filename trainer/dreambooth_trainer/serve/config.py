"""Server settings: what `dreambooth serve` was started with (limits, batching, device)."""

from __future__ import annotations

from dataclasses import dataclass


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
    max_guidance_scale: float = 30.0
    max_prompt_chars: int = 4000


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
