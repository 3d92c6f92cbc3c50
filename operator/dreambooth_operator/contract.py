"""What the operator hands the trainers: their config and the class-image cache they share.

Both come from the trainer package's torch-free config module, so the operator and the
trainer can never disagree about a cache key or a field.
"""

from __future__ import annotations

from collections.abc import Mapping

from dreambooth_trainer.config import TrainerConfig

from .api import DreamBoothJob
from .reconcile import PriorCache


def trainer_contract(
    job: DreamBoothJob, complete_caches: Mapping[str, str]
) -> tuple[str, PriorCache | None]:
    """(trainer config JSON for the ConfigMap, the job's prior cache or None without priors).

    `complete_caches` maps cache keys that some job finished generating to their URIs.
    """
    config = TrainerConfig.from_job(job)
    if not config.uses_priors:
        return config.to_json(), None
    key, uri = config.priors_key, config.priors_uri
    return config.to_json(), PriorCache(key=key, uri=uri, complete=complete_caches.get(key) == uri)
