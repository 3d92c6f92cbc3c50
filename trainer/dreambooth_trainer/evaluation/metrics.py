"""The DreamBooth paper's metrics (Ruiz et al., CVPR 2023, sections 4.1 and 4.3) over embeddings.

Pure functions of tensors: `encoders` turns images and prompts into embeddings, these reduce them
to numbers. Similarities are cosines, so the scale of an embedding does not matter.

    DINO, CLIP-I  subject_fidelity(generated, real): DINO ViT-S/16 or CLIP image embeddings
    CLIP-T        prompt_fidelity(prompt texts, images): CLIP text and image embeddings
    PRES          prior_drift(class-prompt images, real): DINO embeddings
    DIV           diversity(images per prompt, distance): LPIPS, or cosine_distance of DINO
                  embeddings where LPIPS is not installed
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[n, m]: the cosine similarity of every row of `a` [n, d] with every row of `b` [m, d]."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def subject_fidelity(generated: torch.Tensor, real: torch.Tensor) -> float:
    """DINO and CLIP-I: the mean cosine similarity over every (generated, real) pair."""
    return float(cosine_matrix(generated, real).mean())


def prompt_fidelity(texts: torch.Tensor, images: torch.Tensor) -> float:
    """CLIP-T: the mean cosine similarity of image i [n, d] with the text of its prompt [n, d]."""
    if texts.shape != images.shape:
        raise ValueError(f"one text per image: texts {tuple(texts.shape)}, images {images.shape}")
    return float(F.cosine_similarity(texts.double(), images.double(), dim=-1).mean())


def prior_drift(class_generated: torch.Tensor, real: torch.Tensor) -> float:
    """PRES: how much images of the class prompt look like the subject (lower is better: the
    model still knows other members of the class). Computed like subject fidelity."""
    return subject_fidelity(class_generated, real)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of row i of `a` with row i of `b`."""
    return 1.0 - F.cosine_similarity(a.double(), b.double(), dim=-1)


def diversity(groups: Sequence[torch.Tensor], distance: Distance) -> float:
    """DIV: per prompt, the mean `distance` over distinct pairs of its images; then the mean over
    prompts. Each group stacks one prompt's images (embeddings or pixels) on its first axis."""
    per_prompt = []
    for group in groups:
        if len(group) < 2:
            raise ValueError("diversity needs at least two images per prompt")
        first, second = torch.triu_indices(len(group), len(group), offset=1)
        per_prompt.append(distance(group[first], group[second]).double().mean())
    return float(torch.stack(per_prompt).mean())
