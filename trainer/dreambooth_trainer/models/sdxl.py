"""SDXL components: two text encoders, the pooled embedding and the size micro-conditioning.

What SDXL's UNet takes besides latents and a prompt, computed as diffusers'
StableDiffusionXLPipeline does at inference (`encode_prompt`, `_get_add_time_ids`), so that a
model trained here is conditioned the way it is later sampled:

- the prompt: the penultimate hidden states of both CLIP encoders, concatenated feature-wise;
- `text_embeds`: text_encoder_2's projected pooled output;
- `time_ids`: (original height, original width, crop top, crop left, target height, target
  width) per photo: its size before the resize, where the crop was taken in the resized photo,
  and the training resolution.

The two encoders (and the two tokenizers) act as one (`TextEncoders`, `Tokenizers`), so the
training methods, the text cache and the backends handle them as they do SD's one encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from diffusers import StableDiffusionXLPipeline
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .parts import DreamBoothModel, FrozenParts, enable_activation_checkpointing


def add_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """One photo's micro-conditioning, in the order diffusers' pipeline concatenates it: [6]."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


class Tokenizers:
    """Both tokenizers as one: `tokenizer(prompts, ...)` gives ids [K, 2, L] (CLIPTokenizer's
    call, as data.tokenize makes it)."""

    def __init__(self, tokenizer: CLIPTokenizer, tokenizer_2: CLIPTokenizer):
        if tokenizer.model_max_length != tokenizer_2.model_max_length:
            raise ValueError("the SDXL tokenizers disagree on the prompt length")
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.model_max_length = tokenizer.model_max_length

    def __call__(self, prompts: list[str], **options) -> SimpleNamespace:
        ids = [t(prompts, **options).input_ids for t in (self.tokenizer, self.tokenizer_2)]
        return SimpleNamespace(input_ids=torch.stack(ids, dim=1))


class TextEncoders(nn.Module):
    """Both text encoders as one module: ids [K, 2, L] -> (hidden states [K, L, D1 + D2],
    pooled [K, P]). It trains (full or LoRA) as SD's one encoder does."""

    pooled_output = True  # data.encode_prompts: the second output is the pooled embedding

    def __init__(self, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.text_encoder(ids[:, 0], output_hidden_states=True)
        second = self.text_encoder_2(ids[:, 1], output_hidden_states=True)
        # clip_skip None: the penultimate layer of each, as the pipeline's encode_prompt.
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return hidden, second.text_embeds

    def gradient_checkpointing_enable(self) -> None:
        for encoder in (self.text_encoder, self.text_encoder_2):
            enable_activation_checkpointing(encoder)

    def add_adapter(self, config) -> None:
        """The same LoRA config on both encoders (peft; see methods/lora.py)."""
        for encoder in (self.text_encoder, self.text_encoder_2):
            encoder.add_adapter(config)

    def freeze_unused(self) -> None:
        """The first encoder's last layer and final norm never reach the output (its penultimate
        hidden states do): their parameters (and adapters) would get no gradient, which DDP
        refuses (it waits for every trainable parameter's). They stay as loaded."""
        # transformers 5 flattened CLIPTextModel (no `text_model` between it and its layers).
        model = getattr(self.text_encoder, "text_model", self.text_encoder)
        for module in (model.encoder.layers[-1], model.final_layer_norm):
            module.requires_grad_(False)


class SdxlDreamBoothModel(DreamBoothModel):
    """SDXL's UNet (and both text encoders when they train) as one module; the UNet also takes
    the pooled embedding and the micro-conditioning (added_cond_kwargs)."""

    def __init__(self, unet: nn.Module, text_encoder: TextEncoders | None = None):
        super().__init__(unet, text_encoder)
        if text_encoder is not None:
            text_encoder.freeze_unused()

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor,
        condition_is_embedding: bool,
        time_ids: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if condition_is_embedding:
            hidden_states = condition
        else:
            hidden_states, pooled = self.text_encoder(condition)
        if time_ids is None or pooled is None:
            raise ValueError("SDXL's UNet needs time_ids and the pooled prompt embedding")
        dtype = self.unet.conv_in.weight.dtype  # as DreamBoothModel.forward
        added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        return self.unet(
            noisy_latents.to(dtype),
            timesteps,
            encoder_hidden_states=hidden_states.to(dtype),
            added_cond_kwargs=added,
        ).sample


def text_encoders(pipeline: StableDiffusionXLPipeline) -> TextEncoders:
    return TextEncoders(pipeline.text_encoder, pipeline.text_encoder_2)


def tokenizers(pipeline: StableDiffusionXLPipeline) -> Tokenizers:
    return Tokenizers(pipeline.tokenizer, pipeline.tokenizer_2)


def sampling_pipeline(model: DreamBoothModel, frozen: FrozenParts) -> StableDiffusionXLPipeline:
    """A pipeline over the current weights (shares the modules, copies nothing)."""
    encoders = model.text_encoder or frozen.text_encoder
    pipeline = StableDiffusionXLPipeline(
        vae=frozen.vae,
        text_encoder=encoders.text_encoder,
        text_encoder_2=encoders.text_encoder_2,
        tokenizer=frozen.tokenizer.tokenizer,
        tokenizer_2=frozen.tokenizer.tokenizer_2,
        unet=model.unet,
        scheduler=frozen.sampling_scheduler,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def time_ids_of(
    sizes: Sequence[tuple[tuple[int, int], tuple[int, int]]], resolution: int
) -> torch.Tensor:
    """[N, 6] for photos of (original size, crop top-left), all trained at `resolution`."""
    target = (resolution, resolution)
    return torch.stack([add_time_ids(size, crop, target) for size, crop in sizes])
