"""What every model family's trainable module and frozen parts are (families build on these:
components.py for SD1.x/2.x and the choice of family, sdxl.py for SDXL)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from .family import SD


class DreamBoothModel(nn.Module):
    """The UNet and, when it trains, the text encoder, as ONE module.

    Backends wrap one module (DDP, DeepSpeed's engine, FSDP2); training the text encoder as a
    second wrapped model is what breaks diffusers' script under DeepSpeed.
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel | None = None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor,
        condition_is_embedding: bool,
    ) -> torch.Tensor:
        hidden_states = condition if condition_is_embedding else self.text_encoder(condition)[0]
        # Inputs in the UNet's own dtype: DeepSpeed's engine holds 16-bit weights and turns the
        # caller's CUDA autocast off inside its forward, so float32 latents would not match.
        # That of its first layer, which `unet.dtype` reports after a walk over every submodule
        # (1.6 ms per forward for SD1.5's UNet on one Xeon core; a GPU idles through host work at
        # the start of a step).
        dtype = self.unet.conv_in.weight.dtype
        return self.unet(
            noisy_latents.to(dtype), timesteps, encoder_hidden_states=hidden_states.to(dtype)
        ).sample


@dataclass
class FrozenParts:
    """What the loop uses but never trains, and what sampling needs besides the trained parts."""

    vae: AutoencoderKL
    tokenizer: CLIPTokenizer  # SDXL: both as one (sdxl.Tokenizers)
    text_encoder: CLIPTextModel  # the frozen one when it does not train (SDXL: sdxl.TextEncoders)
    sampling_scheduler: SchedulerMixin
    noise_scheduler: DDPMScheduler
    family: str = SD


def enable_activation_checkpointing(text_encoder: CLIPTextModel) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (the old name warns).
    enable = getattr(text_encoder, "activation_checkpointing_enable", None)
    (enable or text_encoder.gradient_checkpointing_enable)()
