"""Stable Diffusion pipelines with random weights, built in code (no hub needed).

`random://tiny-sd` is a few MB and runs on a laptop CPU in milliseconds per step: tests and demos.
`random://sd15` is the full SD1.5 architecture (860M-parameter UNet): real GPU throughput and memory
figures without downloading anything. `random://tiny-sdxl` and `random://sdxl` are the same two
for SDXL (two text encoders, the pooled embedding and size conditioning; a 2.6B-parameter UNet).

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
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

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

# SDXL's release samples with Euler on the same beta schedule, "leading" timestep spacing.
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "prediction_type": "epsilon",
}
# SDXL's VAE latents are scaled by this instead of SD's 0.18215.
SDXL_VAE_SCALING_FACTOR = 0.13025
# The added time embedding takes six numbers: original (h, w), crop (top, left), target (h, w).
SDXL_TIME_IDS = 6

# Words that get whole-word BPE merges, so that prompts tokenize into a few tokens like a real CLIP
# tokenizer; anything else falls back to one token per byte, which is still valid.
TOKENIZER_WORDS = (  # noqa: SIM905 - a sentence reads better than 32 quoted words
    "a an the of in on at with and photo picture painting rendering style sks cube dog cat "
    "person man woman toy red blue green yellow background table grass beach snow city"
).split()
MODEL_MAX_LENGTH = 77


@dataclass(frozen=True)
class RandomArchitecture:
    """Configs of the networks; the tokenizer is the same small one for every size (and both of
    SDXL's encoders). An SDXL architecture is one with a second text encoder."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    seed: int = 0
    # Bump to rebuild cached weights when the construction code changes.
    format_version: int = 1
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULER))
    # SDXL's second encoder (OpenCLIP bigG's text tower, with projection: the pooled embedding).
    text_encoder_2: dict[str, Any] | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def fingerprint(self) -> str:
        # Unset fields stay out, so that adding one does not rebuild every cached SD model.
        fields = {key: value for key, value in asdict(self).items() if value is not None}
        canonical = json.dumps(fields, sort_keys=True)
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


def sdxl_unet(
    *,
    sample_size: int,
    block_out_channels: tuple[int, ...],
    transformer_layers_per_block: tuple[int, ...],
    attention_head_dim: tuple[int, ...],
    cross_attention_dim: int,
    pooled_dim: int,
    time_embed_dim: int,
    layers_per_block: int,
) -> dict[str, Any]:
    """SDXL's UNet layout: no attention at the top level, the "text_time" added embedding of the
    pooled text embedding and the six size/crop numbers."""
    levels = len(block_out_channels)
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        "up_block_types": ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        "transformer_layers_per_block": transformer_layers_per_block,
        "attention_head_dim": attention_head_dim,
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_dim,
        "projection_class_embeddings_input_dim": SDXL_TIME_IDS * time_embed_dim + pooled_dim,
        "norm_num_groups": 32,
    }


TINY_SDXL = RandomArchitecture(
    # 8x8 latents = 64 px by default, like tiny-sd; the two encoders' 32 + 64 features are the
    # UNet's cross-attention width, as 768 + 1280 = 2048 are in SDXL. The encoders differ in
    # width as SDXL's do: diffusers' single-file loader tells them apart by it.
    unet=sdxl_unet(
        sample_size=8,
        block_out_channels=(32, 64),
        transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4),
        cross_attention_dim=96,
        pooled_dim=64,
        time_embed_dim=8,
        layers_per_block=1,
    ),
    vae={**TINY_SD.vae, "scaling_factor": SDXL_VAE_SCALING_FACTOR},
    text_encoder={**TINY_SD.text_encoder, "hidden_act": "quick_gelu"},
    text_encoder_2={
        **TINY_SD.text_encoder,
        "hidden_size": 64,
        "intermediate_size": 128,
        "projection_dim": 64,
        "hidden_act": "gelu",
    },
    scheduler=dict(SDXL_SCHEDULER),
)

SDXL = RandomArchitecture(
    unet=sdxl_unet(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        pooled_dim=1280,
        time_embed_dim=256,
        layers_per_block=2,
    ),
    vae={**SD15.vae, "sample_size": 1024, "scaling_factor": SDXL_VAE_SCALING_FACTOR},
    # CLIP ViT-L/14's text tower, as in SD1.5, and OpenCLIP ViT-bigG/14's.
    text_encoder=SD15.text_encoder,
    text_encoder_2={
        "vocab_size": 49408,
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "projection_dim": 1280,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "hidden_act": "gelu",
    },
    scheduler=dict(SDXL_SCHEDULER),
)

ARCHITECTURES: dict[str, RandomArchitecture] = {
    "tiny-sd": TINY_SD,
    "sd15": SD15,
    "tiny-sdxl": TINY_SDXL,
    "sdxl": SDXL,
}


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


def text_config(encoder: dict[str, Any], tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    config = {"vocab_size": len(tokenizer), **encoder}
    config.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextConfig(**config)


def build_pipeline(architecture: RandomArchitecture) -> DiffusionPipeline:
    """The pipeline, with weights drawn after seeding torch: same seed, same weights."""
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(architecture.seed)
        unet = UNet2DConditionModel(**architecture.unet)
        vae = AutoencoderKL(**architecture.vae)
        text_encoder = CLIPTextModel(text_config(architecture.text_encoder, tokenizer))
        if architecture.text_encoder_2 is not None:
            text_encoder_2 = CLIPTextModelWithProjection(
                text_config(architecture.text_encoder_2, tokenizer)
            )
    if architecture.text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=build_tokenizer(),
            unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(architecture.scheduler),
            add_watermarker=False,
        )
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
