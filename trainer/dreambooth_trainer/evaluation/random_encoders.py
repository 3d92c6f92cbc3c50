"""CLIP and DINO with random weights, built in code, for tests and the offline demo.

`random://tiny-clip` stands in for CLIP ViT-B/32 and `random://tiny-dino` for DINO ViT-S/16:
the same transformers classes and processors, a few hundred KB. Their scores mean nothing; they
exercise every step the real encoders go through. Each is saved once under the cache directory
(like the random Stable Diffusion models) and loaded back with `from_pretrained`, so the path a
real model takes is the path they take.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from ..cache_dirs import build_once
from ..models.random_models import MODEL_MAX_LENGTH, RANDOM_SCHEME, build_tokenizer

COMPLETE_MARKER = ".complete"
IMAGE_SIZE = 32  # pixels the tiny encoders see: 4x4 patches of 8
SEED = 0
FORMAT_VERSION = 1  # bump when the construction below changes
TINY_VIT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
}
TINY_CLIP_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MODEL_MAX_LENGTH,
}
TINY_PROJECTION = 32
# ImageNet statistics, as DINO's processor normalizes.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def save_tiny_clip(directory: Path) -> None:
    tokenizer = build_tokenizer()
    text_config = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **TINY_CLIP_TEXT,
    }
    config = CLIPConfig(
        text_config=text_config, vision_config=TINY_VIT, projection_dim=TINY_PROJECTION
    )
    images = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    _seeded(lambda: CLIPModel(config)).save_pretrained(directory, safe_serialization=True)


def save_tiny_dino(directory: Path) -> None:
    images = ViTImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    images.save_pretrained(directory)
    model = _seeded(lambda: ViTModel(ViTConfig(**TINY_VIT), add_pooling_layer=False))
    model.save_pretrained(directory, safe_serialization=True)


def _seeded(build: Callable[[], Any]) -> Any:
    """Same seed, same weights, without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-clip": save_tiny_clip,
    "tiny-dino": save_tiny_dino,
}


def fingerprint() -> str:
    recipe = {"vit": TINY_VIT, "text": TINY_CLIP_TEXT, "version": FORMAT_VERSION, "seed": SEED}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def materialize(uri: str, cache_dir: Path) -> Path:
    """The directory of the random encoder `uri`, built and saved on first use."""
    name = uri.removeprefix(RANDOM_SCHEME)
    if name not in BUILDERS:
        known = ", ".join(RANDOM_SCHEME + n for n in BUILDERS)
        raise ValueError(f"unknown random encoder {uri!r}; known: {known}")

    def build(directory: Path) -> None:
        BUILDERS[name](directory)
        (directory / COMPLETE_MARKER).touch()

    return build_once(cache_dir / "random" / f"{name}-{fingerprint()}", build, COMPLETE_MARKER)
