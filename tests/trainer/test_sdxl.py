"""SDXL training: what the trainer feeds SDXL's UNet is what diffusers' SDXL pipeline feeds it
(prompt embeddings of both encoders, the pooled embedding, the size and crop micro-conditioning),
the VAE's dtype under fp16, baseModel.vaeUri, and what SDXL refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_contract.trainer_config import ConfigError
from dreambooth_trainer import data, priors
from dreambooth_trainer.methods import method_for
from dreambooth_trainer.models.components import vae_dtype
from dreambooth_trainer.models.loading import load_pipeline
from dreambooth_trainer.models.sdxl import SdxlDreamBoothModel, text_encoders, tokenizers
from dreambooth_trainer.parallel import World
from dreambooth_trainer.train import build_trainer

pytestmark = pytest.mark.trainer

TINY_SDXL = {"baseModel": {"uri": "random://tiny-sdxl"}}
PROMPTS = ["a photo of sks cube", "a photo of cube on the beach"]


class UNetInputs:
    """The keyword arguments of every call of `unet` (a forward pre-hook)."""

    def __init__(self, unet: torch.nn.Module):
        self.calls: list[dict] = []
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.calls.append(kwargs)

    def close(self) -> None:
        self.handle.remove()


def landscape_subject(directory: Path) -> Path:
    """One 80x48 photo (wider than tall, so that height and width cannot be swapped unseen)."""
    directory.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(directory / "photo.png")
    return directory


def crop_taken(resized: torch.Tensor, crop: torch.Tensor) -> tuple[int, int]:
    """(top, left) of the square `crop` in `resized`, found from the pixels alone."""
    side = crop.shape[-1]
    for top in range(resized.shape[1] - side + 1):
        for left in range(resized.shape[2] - side + 1):
            if torch.equal(resized[:, top : top + side, left : left + side], crop):
                return top, left
    raise AssertionError("the training crop is no square of the resized photo")


def test_micro_conditioning_is_what_the_sdxl_pipeline_computes(make_config, tmp_path: Path):
    """The time_ids a training step gives the UNet == those StableDiffusionXLPipeline gives it
    for the photo's original size, the crop actually taken (read from the pixels) and the
    training resolution."""
    subject = landscape_subject(tmp_path / "subject")
    training = {"centerCrop": False, "cacheLatents": False, "batchSize": 1, "seed": 3}
    config = make_config(
        {
            **TINY_SDXL,
            "instance": {"imagesUri": str(subject)},
            "priorPreservation": {"enabled": False},
            "training": training,
        }
    )
    trainer = build_trainer(config, subject, None, World())
    photo = data.load_rgb(subject / "photo.png", "instance.imagesUri")
    top, left = crop_taken(data.resized_tensor(photo, 64), trainer.data.latents.pixels[0])
    assert left > 0  # a crop off the corner: offsets that are not zero by default

    inputs = UNetInputs(trainer.trained_model.unet)
    trainer.train_step()
    inputs.close()
    ours = inputs.calls[0]["added_cond_kwargs"]["time_ids"]

    pipeline = load_pipeline(config.base_model, config.model_cache_dir())
    inputs = UNetInputs(pipeline.unet)
    pipeline(
        prompt=PROMPTS[0],
        num_inference_steps=1,
        guidance_scale=1.0,  # no unconditional half: one row
        height=64,
        width=64,
        original_size=(48, 80),
        crops_coords_top_left=(top, left),
        target_size=(64, 64),
        output_type="latent",
    )
    inputs.close()
    theirs = inputs.calls[0]["added_cond_kwargs"]["time_ids"]
    assert theirs.shape == ours.shape == (1, 6)
    assert torch.equal(ours, theirs.to(ours.dtype))


@torch.no_grad()
def test_prompt_embeddings_are_the_pipelines(make_config):
    """Both encoders' penultimate hidden states and text_encoder_2's pooled embedding, as the
    text cache holds them and as the trained encoders compute them inside the model, equal
    StableDiffusionXLPipeline.encode_prompt's."""
    config = make_config(TINY_SDXL)
    pipeline = load_pipeline(config.base_model, config.model_cache_dir())
    embeds, _, pooled, _ = pipeline.encode_prompt(
        PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=False
    )
    encoders = text_encoders(pipeline)
    cached = data.Prompts.of(PROMPTS, tokenizers(pipeline), encoders)
    assert cached.cached.shape == embeds.shape and cached.cached_pooled.shape == pooled.shape
    torch.testing.assert_close(cached.cached, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cached.cached_pooled, pooled, rtol=0, atol=0)

    # The encoders training inside the model feed the UNet the same.
    model = SdxlDreamBoothModel(pipeline.unet, encoders)
    inputs = UNetInputs(pipeline.unet)
    latents = torch.zeros(len(PROMPTS), 4, 8, 8)
    time_ids = torch.zeros(len(PROMPTS), 6)
    model(latents, torch.tensor([1, 1]), cached.ids, False, time_ids=time_ids)
    inputs.close()
    fed = inputs.calls[0]
    torch.testing.assert_close(fed["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(fed["added_cond_kwargs"]["text_embeds"], pooled, rtol=0, atol=0)


def test_a_step_feeds_the_cached_pooled_embedding(make_config):
    """With a frozen encoder the batch carries each row's pooled embedding and time_ids."""
    config = make_config({**TINY_SDXL, "training": {"batchSize": 2}})
    from .test_train import trainer_for

    trainer = trainer_for(config)
    batch = trainer.data.batch(0, 2, 0, 1, torch.Generator().manual_seed(0))
    prompts = trainer.data.prompts
    rows = [trainer.data.prompt_of[i] for i in range(len(trainer.data.prompt_of))]
    assert batch.added["pooled"].shape == (4, prompts.cached_pooled.shape[1])
    assert {tuple(row.tolist()) for row in batch.added["pooled"]} <= {
        tuple(prompts.cached_pooled[k].tolist()) for k in set(rows)
    }
    assert batch.added["time_ids"].shape == (4, 6)


def test_sdxls_vae_stays_in_fp32_under_fp16_unless_fixed_for_it(tiny_pipeline, make_config):
    config = make_config(TINY_SDXL)
    sdxl = load_pipeline(config.base_model, config.model_cache_dir())
    assert sdxl.vae.config.force_upcast
    assert vae_dtype(sdxl, torch.float16) == torch.float32
    assert vae_dtype(sdxl, torch.bfloat16) == torch.bfloat16
    sdxl.vae.register_to_config(force_upcast=False)  # what madebyollin/sdxl-vae-fp16-fix says
    assert vae_dtype(sdxl, torch.float16) == torch.float16
    assert vae_dtype(tiny_pipeline, torch.float16) == torch.float16  # SD as before


@pytest.mark.parametrize("method", ["full", "lora"])
def test_both_methods_keep_sdxls_vae_in_fp32_under_fp16(make_config, method):
    fp16 = {"mixedPrecision": "fp16", "method": method}
    config = make_config({**TINY_SDXL, "training": fp16, "resources": {"gpusPerNode": 1}})
    pipeline = load_pipeline(config.base_model, config.model_cache_dir())
    split = method_for(config.training).split_pipeline
    _, frozen = split(pipeline, config.training, torch.device("cpu"))
    assert frozen.vae.dtype == torch.float32
    assert frozen.text_encoder.text_encoder_2.dtype == torch.float16  # the rest as before


def test_vae_uri_replaces_the_base_models_vae(make_config, tiny_pipeline):
    config = make_config({"baseModel": {"uri": "random://tiny-sdxl", "vaeUri": "random://tiny-sd"}})
    pipeline = load_pipeline(config.base_model, config.model_cache_dir())
    theirs = tiny_pipeline.vae.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in pipeline.vae.state_dict().items())
    assert pipeline.components["vae"] is pipeline.vae

    missing = make_config({"baseModel": {"uri": "random://tiny-sdxl", "vaeUri": "/no/such/vae"}})
    with pytest.raises(ConfigError, match="baseModel.vaeUri"):
        load_pipeline(missing.base_model, missing.model_cache_dir())


def test_sdxl_refuses_a_new_crop_every_step_naming_the_field(make_config):
    training = {"cropEachStep": True, "cacheLatents": False, "centerCrop": False}
    config = make_config({**TINY_SDXL, "training": training})
    from .test_train import trainer_for

    with pytest.raises(ConfigError, match="training.cropEachStep"):
        trainer_for(config)


def test_class_images_come_from_the_sdxl_pipeline_at_the_training_resolution(make_config):
    """72 px, not the tiny model's own 64: the SDXL pipeline is told the size."""
    config = make_config({**TINY_SDXL, "training": {"resolution": 72}})
    class_dir = priors.run_priors(config)
    images = data.list_images(class_dir)
    assert len(images) == config.prior_preservation.num_class_images
    for path in images:
        with Image.open(path) as image:
            assert image.size == (72, 72)


def test_both_trained_text_encoders_reach_the_exported_pipeline(make_config, tmp_path: Path):
    """Full fine-tune with trainTextEncoder: trained/ holds both encoders, and the export's
    pipeline (full.with_trained_weights) takes both, not the base's."""
    from dreambooth_trainer.methods import full

    from .test_train import trainer_for

    config = make_config({**TINY_SDXL, "training": {"trainTextEncoder": True, "maxSteps": 1}})
    trainer = trainer_for(config)
    trainer.fit()
    trainer.save_trained(tmp_path / "trained")
    base = load_pipeline(config.base_model, config.model_cache_dir())
    exported = full.with_trained_weights(base, tmp_path / "trained")
    trained = trainer.trained_model.text_encoder
    for name in ("text_encoder", "text_encoder_2"):
        ours, theirs = getattr(trained, name).state_dict(), getattr(exported, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
        before = getattr(base, name).state_dict()
        assert not all(torch.equal(ours[k], before[k]) for k in ours), f"{name} did not train"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_trainable_parameter_gets_a_gradient(make_config, method):
    """What DDP needs (it waits for every trainable parameter's gradient): the first encoder's
    last layer and final norm, which its penultimate hidden states never reach, do not train."""
    training = {"method": method, "trainTextEncoder": True, "batchSize": 1}
    config = make_config({**TINY_SDXL, "training": training})
    from .test_train import trainer_for

    trainer = trainer_for(config)
    model = trainer.trained_model
    batch = trainer.data.batch(0, 1, 0, 1, torch.Generator().manual_seed(0))
    timesteps = torch.tensor([10] * len(batch.latents))
    prediction = model(batch.latents, timesteps, batch.condition, False, **batch.added)
    prediction.float().pow(2).mean().backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any(".text_encoder_2." in name for name in trainable)
    assert [name for name, p in trainable.items() if p.grad is None] == []
