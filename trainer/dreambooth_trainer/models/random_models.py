"""Stable Diffusion pipelines with random weights, built in code (no hub needed).

`random://tiny-sd` is a few MB and runs on a laptop CPU in milliseconds per step: tests and demos.
`random://sd15` is the full SD1.5 architecture (860M-parameter UNet): real GPU throughput and memory
figures without downloading anything.

Weights are a pure function of (architecture, seed, library versions), and each model is saved once
under the cache directory so that every process and rank loads the very same files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..cache_dirs import build_once

RANDOM_SCHEME = "random://"

# SD1.x's noise schedule; PNDM for sampling like the original release (training uses DDPM).
SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}

# Words that get whole-word BPE merges, so that prompts tokenize into a few tokens like a real CLIP
# tokenizer; anything else falls back to one token per byte, which is still valid.
TOKENIZER_WORDS = (  # noqa: SIM905 - a sentence reads better than 32 quoted words
    "a an the of in on at with and photo picture painting rendering style sks cube dog cat "
    "person man woman toy red blue green yellow background table grass beach snow city"
).split()
MODEL_MAX_LENGTH = 77


@dataclass(frozen=True)
class RandomArchitecture:
    """Configs of the three networks; the tokenizer is the same small one for every size."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    seed: int = 0
    # Bump to rebuild cached weights when the construction code changes.
    format_version: int = 1
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULER))

    def fingerprint(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


TINY_SD = RandomArchitecture(
    # Two resolution levels; sample_size 8 latents = 64 px images by default.
    unet={
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 32,
    },
    # Four levels like SD's VAE so that it downsamples by 8, the factor the API assumes.
    vae={
        "sample_size": 64,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (32, 32, 32, 32),
        "layers_per_block": 1,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "norm_num_groups": 32,
    },
    text_encoder={
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "hidden_act": "quick_gelu",
    },
)

SD15 = RandomArchitecture(
    unet={
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    vae={
        "sample_size": 512,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "norm_num_groups": 32,
    },
    # CLIP ViT-L/14's text tower; the vocabulary is CLIP's size even though our tokenizer uses
    # only the first ids, so that the embedding table costs what it costs in the real model.
    text_encoder={
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "hidden_act": "quick_gelu",
    },
)

ARCHITECTURES: dict[str, RandomArchitecture] = {"tiny-sd": TINY_SD, "sd15": SD15}


def is_random_uri(uri: str) -> bool:
    return uri.startswith(RANDOM_SCHEME)


def architecture_for(uri: str) -> RandomArchitecture:
    name = uri.removeprefix(RANDOM_SCHEME)
    if name not in ARCHITECTURES:
        known = ", ".join(RANDOM_SCHEME + n for n in ARCHITECTURES)
        raise ValueError(f"unknown random model {uri!r}; known: {known}")
    return ARCHITECTURES[name]


def build_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE tokenizer in CLIP's format, deterministic, with whole-word merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab_tokens = ["<|startoftext|>", "<|endoftext|>"]
    vocab_tokens += alphabet + [symbol + "</w>" for symbol in alphabet]
    merges: list[tuple[str, str]] = []
    for word in TOKENIZER_WORDS:
        # Merge left to right: (p, h), (ph, o), ... then the last character with its word end.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merge = (merged, piece)
            merged += piece
            if merge not in merges:
                merges.append(merge)
                vocab_tokens.append(merged)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MODEL_MAX_LENGTH)


def build_pipeline(architecture: RandomArchitecture) -> StableDiffusionPipeline:
    """The pipeline, with weights drawn after seeding torch: same seed, same weights."""
    tokenizer = build_tokenizer()
    text_config = {"vocab_size": len(tokenizer), **architecture.text_encoder}
    text_config.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(architecture.seed)
        unet = UNet2DConditionModel(**architecture.unet)
        vae = AutoencoderKL(**architecture.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(architecture.scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def materialize(uri: str, cache_dir: Path) -> Path:
    """The directory of the random model `uri`, building and saving it on first use.

    Several processes may race to build it (`build_once`); their copies are identical anyway.
    """
    architecture = architecture_for(uri)
    name = uri.removeprefix(RANDOM_SCHEME)
    target = cache_dir / "random" / f"{name}-{architecture.fingerprint()}"

    def build(directory: Path) -> None:
        build_pipeline(architecture).save_pretrained(directory, safe_serialization=True)

    return build_once(target, build, marker="model_index.json")
