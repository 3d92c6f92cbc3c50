"""The networks that judge a model: CLIP (images and prompts) and DINO (images), and LPIPS
where it is installed.

Loaded with transformers from a hub id, a local directory, s3:// (downloaded into the model
cache once, like base models) or random:// (`random_encoders`). Embeddings come back as float32
on the CPU, one row per input, for `metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

from dreambooth_contract.api import EvaluationSpec, S3Spec

from ..models.loading import resolve_source
from . import metrics, random_encoders

log = logging.getLogger(__name__)

EMBED_BATCH = 32  # images per encoder call: bounded memory however many images are scored


class ImageEncoder(Protocol):
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


def pooled(output: object) -> torch.Tensor:
    """CLIP's projected features: a tensor from transformers 4, `pooler_output` from 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class ClipEncoder:
    """CLIP: image embeddings for CLIP-I, text and image embeddings for CLIP-T."""

    model: CLIPModel
    processor: CLIPProcessor

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        def embed(chunk: Sequence[Image.Image]) -> torch.Tensor:
            pixels = self.processor(images=list(chunk), return_tensors="pt")["pixel_values"]
            return pooled(self.model.get_image_features(pixel_values=pixels.to(self.device)))

        return in_batches(images, embed)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        def embed(chunk: Sequence[str]) -> torch.Tensor:
            tokens = self.processor(
                text=list(chunk), padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            return pooled(self.model.get_text_features(**tokens))

        return in_batches(texts, embed)

    @property
    def device(self) -> torch.device:
        return self.model.device


@dataclass
class DinoEncoder:
    """A DINO ViT: the CLS token of the last layer, as the paper (and DINO's k-NN eval) use."""

    model: ViTModel
    processor: object  # a ViT image processor

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        def embed(chunk: Sequence[Image.Image]) -> torch.Tensor:
            pixels = self.processor(images=list(chunk), return_tensors="pt")["pixel_values"]
            return self.model(pixel_values=pixels.to(self.model.device)).last_hidden_state[:, 0]

        return in_batches(images, embed)


def in_batches(items: Sequence, embed) -> torch.Tensor:
    chunks = [embed(items[i : i + EMBED_BATCH]) for i in range(0, len(items), EMBED_BATCH)]
    return torch.cat(chunks).float().cpu()


def resolve_encoder_source(uri: str, cache_dir: Path, s3: S3Spec | None = None) -> str:
    return resolve_source(
        uri,
        cache_dir,
        s3,
        build_random=random_encoders.materialize,
        index_file="config.json",
        kind="transformers model",
    )


def load_clip(
    uri: str, cache_dir: Path, s3: S3Spec | None = None, device: str = "cpu"
) -> ClipEncoder:
    source = resolve_encoder_source(uri, cache_dir, s3)
    model = CLIPModel.from_pretrained(source).to(device).eval()
    return ClipEncoder(model, CLIPProcessor.from_pretrained(source))


def load_dino(
    uri: str, cache_dir: Path, s3: S3Spec | None = None, device: str = "cpu"
) -> DinoEncoder:
    source = resolve_encoder_source(uri, cache_dir, s3)
    # The CLS token is the embedding: no pooler (DINO's checkpoints have none to load).
    model = ViTModel.from_pretrained(source, add_pooling_layer=False).to(device).eval()
    return DinoEncoder(model, AutoImageProcessor.from_pretrained(source))


@dataclass
class Diversity:
    """How DIV measures the distance between two images of the same prompt."""

    method: str  # "lpips" or "dino" (EvaluationStatus.diversityMethod)
    lpips: torch.nn.Module | None = None

    def score(self, groups: Sequence[Sequence[Image.Image]], dino: ImageEncoder) -> float:
        if self.lpips is None:
            embeddings = [dino.embed_images(group) for group in groups]
            return metrics.diversity(embeddings, metrics.cosine_distance)
        device = next(self.lpips.parameters()).device
        pixels = [to_lpips_input(group).to(device) for group in groups]
        with torch.inference_mode():
            return metrics.diversity(pixels, lambda a, b: self.lpips(a, b).flatten())


def to_lpips_input(images: Sequence[Image.Image]) -> torch.Tensor:
    """[n, 3, H, W] in [-1, 1], what LPIPS expects."""
    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def load_diversity(device: str = "cpu") -> Diversity:
    """The paper's LPIPS when the `lpips` package imports (it needs torchvision, which this
    project does not install); otherwise 1 - cosine similarity of DINO embeddings."""
    try:
        import lpips
    except ImportError:
        log.info("lpips is not installed: DIV is the DINO-embedding distance")
        return Diversity("dino")
    return Diversity("lpips", lpips.LPIPS(net="alex", verbose=False).to(device).eval())


@dataclass
class Encoders:
    clip: ClipEncoder
    dino: DinoEncoder
    diversity: Diversity


def load_encoders(
    spec: EvaluationSpec, cache_dir: Path, s3: S3Spec | None = None, device: str = "cpu"
) -> Encoders:
    return Encoders(
        clip=load_clip(spec.clip_uri, cache_dir, s3, device),
        dino=load_dino(spec.dino_uri, cache_dir, s3, device),
        diversity=load_diversity(device),
    )
