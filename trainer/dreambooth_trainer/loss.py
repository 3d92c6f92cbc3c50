"""The DreamBooth objective: denoising loss on instance rows + weight * on class rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import nn

from .data import Batch
from .models.loading import check_prediction_type


@dataclass
class Losses:
    total: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor
    per_subject: torch.Tensor  # [S]: each subject's instance loss

    def detached(self) -> torch.Tensor:
        """[3 + S]: total, instance, prior, then each subject's instance loss."""
        losses = torch.stack([self.total, self.instance, self.prior]).detach().float()
        return torch.cat([losses, self.per_subject.detach().float()])


def min_snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma), relative to the target's own scale.

    An epsilon target is weighted by min(SNR, gamma) / SNR; a v target already carries a factor
    SNR + 1, hence min(SNR, gamma) / (SNR + 1).
    """
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


@dataclass
class DreamBoothObjective:
    scheduler: DDPMScheduler
    prior_loss_weight: float = 1.0
    offset_noise: float = 0.0
    snr_gamma: float | None = None
    prediction_type: str = field(init=False)

    def __post_init__(self) -> None:
        # Refuse an unsupported target when the objective is set up, before any step runs.
        self.prediction_type = check_prediction_type(self.scheduler)

    def __call__(
        self, model: nn.Module, batch: Batch, generator: torch.Generator, device: torch.device
    ) -> Losses:
        """loss = instance + prior_loss_weight * prior, each a (min-SNR weighted) MSE.

        Random draws come from `generator` on the CPU: the same numbers on any device.
        """

        def randn(shape: Sequence[int]) -> torch.Tensor:
            return torch.randn(tuple(shape), generator=generator).to(device)

        latents = batch.latents.to(device)
        noise = randn(latents.shape)
        if self.offset_noise:
            # Offset noise (Guttenberg 2023): a per-channel constant lets the model learn to move
            # overall brightness, which zero-mean noise never asks of it.
            noise = noise + self.offset_noise * randn((*latents.shape[:2], 1, 1))
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (len(latents),), generator=generator).to(device)
        noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
        added = {name: value.to(device) for name, value in batch.added.items()}
        prediction = model(
            noisy_latents,
            timesteps,
            batch.condition.to(device),
            batch.condition_is_embedding,
            **added,
        )
        per_image = F.mse_loss(
            prediction.float(), self.target(latents, noise, timesteps).float(), reduction="none"
        ).mean(dim=(1, 2, 3))
        if self.snr_gamma:
            per_image = per_image * min_snr_weights(self.scheduler, timesteps, self.snr_gamma)
        return self.combine(per_image, batch)

    def target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def combine(self, per_image: torch.Tensor, batch: Batch) -> Losses:
        rows = batch.instance_rows
        instance = per_image[:rows].mean()
        has_class_rows = len(per_image) > rows
        prior = per_image[rows:].mean() if has_class_rows else torch.zeros_like(instance)
        return Losses(
            instance + self.prior_loss_weight * prior,
            instance,
            prior,
            per_subject_means(per_image[:rows], batch.subject_of_row, batch.subjects)
            if batch.subjects > 1
            else instance.unsqueeze(0),  # one subject: the instance loss itself
        )


def per_subject_means(
    losses: torch.Tensor, subject_of_row: Sequence[int], subjects: int
) -> torch.Tensor:
    """[S]: the mean of each subject's rows (every micro-batch holds every subject: the API
    asks batchSize >= S)."""
    labels = torch.tensor(list(subject_of_row), device=losses.device)
    sums = torch.zeros(subjects, device=losses.device, dtype=losses.dtype)
    counts = torch.zeros(subjects, device=losses.device, dtype=losses.dtype)
    sums = sums.index_add(0, labels, losses)
    counts = counts.index_add(0, labels, torch.ones_like(losses))
    return sums / counts.clamp(min=1)
