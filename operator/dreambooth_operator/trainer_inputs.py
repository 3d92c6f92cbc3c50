"""What the operator hands the trainers: their config and where their class images go.

Both come from the contract's trainer config, so the operator and the trainer can never
disagree about a cache key or a field.
"""

from __future__ import annotations

from dreambooth_contract.api import DreamBoothJob
from dreambooth_contract.trainer_config import TrainerConfig

from .reconcile import PriorCache


def trainer_inputs(job: DreamBoothJob) -> tuple[str, PriorCache | None]:
    """(trainer config JSON for the ConfigMap, the job's prior cache or None without priors).

    Whether the cache already holds a complete set is for the priors pods to find out, from
    the storage itself: no job's word (a status any job's pods can write) is trusted for it.
    """
    config = TrainerConfig.from_job(job)
    if not config.uses_priors:
        return config.to_json(), None
    return config.to_json(), PriorCache(key=config.priors_key, uri=config.priors_uri)
