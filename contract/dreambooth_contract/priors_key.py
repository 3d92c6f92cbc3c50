"""Content-addressed key of a class-image set.

Jobs whose class images would come out the same share them: the key names their directory in
the prior cache (TrainerConfig.priors_uri), and the operator reports it in status.priors.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .api import BaseModelSpec, PriorPreservationSpec

# Bump when the generation code changes what the same parameters produce.
PRIORS_FORMAT = "dreambooth-priors/v1"
KEY_HEX_CHARS = 32


def generation_params(
    base_model: BaseModelSpec, priors: PriorPreservationSpec, resolution: int
) -> dict[str, Any]:
    """Everything that decides the pixels of the class images, and nothing else.

    The batch size is left out: it changes how images are grouped into forward passes, not
    which image index i is (its seed is always seed + i). The model family (SD or SDXL, from
    its model_index.json) is fixed by the model and its revision. A VAE override (vaeUri)
    decodes the images, so it counts when set (an unset one leaves the keys as they were).
    """
    generation = priors.generation
    vae = {"vae": base_model.vae_uri} if base_model.vae_uri else {}
    return {
        **vae,
        "format": PRIORS_FORMAT,
        "model": base_model.uri,
        "revision": base_model.revision,
        "variant": base_model.variant,
        "prompt": priors.class_prompt,
        "negative_prompt": generation.negative_prompt,
        "count": priors.num_class_images,
        "resolution": resolution,
        "steps": generation.steps,
        "guidance_scale": generation.guidance_scale,
        "seed": generation.seed,
    }


def cache_key(base_model: BaseModelSpec, priors: PriorPreservationSpec, resolution: int) -> str:
    """sha256 of the canonical JSON of `generation_params` (shortened: it names a directory)."""
    canonical = json.dumps(generation_params(base_model, priors, resolution), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_HEX_CHARS]
