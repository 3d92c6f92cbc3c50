"""The training loop: it learns, it resumes exactly, every option runs, backends agree."""

from __future__ import annotations

import copy
import json
import math
import threading
import types
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from dreambooth_trainer import data, priors, progress
from dreambooth_trainer.callbacks import (
    PAUSE_ENV,
    Callback,
    StatusReport,
    StepMetrics,
    pause_from_env,
)
from dreambooth_trainer.loss import min_snr_weights
from dreambooth_trainer.models.loading import load_pipeline
from dreambooth_trainer.parallel import World
from dreambooth_trainer.samples import ValidationSamples
from dreambooth_trainer.train import Trainer, announcer, build_trainer

from .conftest import CLASS_PROMPT, INSTANCE_PROMPT, SUBJECT_DIR

pytestmark = pytest.mark.trainer


def trainer_for(config) -> Trainer:
    class_dir = priors.run_priors(config)
    return build_trainer(config, SUBJECT_DIR, class_dir, World())


def unet_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.trained_model.unet.state_dict().items()}


@torch.no_grad()
def instance_loss(trainer: Trainer, draws: int = 32) -> float:
    """Denoising loss on the subject images at fixed noise and timesteps (comparable over time)."""
    generator = torch.Generator().manual_seed(1234)
    instance = trainer.data.instance
    indices = [i % len(instance.latents) for i in range(draws)]
    latents = instance.latents.sample(indices, generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (draws,), generator=generator)
    scheduler = trainer.frozen.noise_scheduler
    prediction = trainer.trained_model(
        scheduler.add_noise(latents, noise, timesteps),
        timesteps,
        trainer.data.condition(instance.latents.indices(indices)),
        trainer.data.prompts.is_embedding,
    )
    return torch.nn.functional.mse_loss(prediction, noise).item()


def test_building_a_trainer_says_what_it_is_doing(make_config):
    config = make_config()
    heard: list[str] = []
    build_trainer(config, SUBJECT_DIR, priors.run_priors(config), World(), announce=heard.append)
    assert heard == [progress.LOADING_MODEL, progress.PREPARING_DATA]


def test_what_the_trainer_does_reaches_the_status_through_rank_0s_report(tmp_path, monkeypatch):
    status_file = tmp_path / "status.json"
    monkeypatch.setenv(progress.ENV_FILE, str(status_file))
    announce = announcer([Callback(), StatusReport()], total_steps=10, rank=0)
    announce(progress.PREPARING_DATA)
    status = json.loads(status_file.read_text())
    assert status["progress"]["activity"] == progress.PREPARING_DATA


def test_loss_on_the_instance_images_falls(make_config):
    config = make_config({"priorPreservation": {"enabled": False}, "training": {"maxSteps": 60}})
    trainer = trainer_for(config)
    before = instance_loss(trainer)
    trainer.fit()
    after = instance_loss(trainer)
    assert after < 0.6 * before, (before, after)


RESUMED_RUNS = {
    "adamw": ("random://tiny-sd", {}),
    "adamw-8bit": ("random://tiny-sd", {"use8bitAdam": True}),
    "lora": ("random://tiny-sd", {"method": "lora", "trainTextEncoder": True}),
    # SDXL: both text encoders, the pooled embedding and the time_ids in the state and the data.
    "sdxl": ("random://tiny-sdxl", {"trainTextEncoder": True}),
    "sdxl-lora": ("random://tiny-sdxl", {"method": "lora", "trainTextEncoder": True}),
}


@pytest.mark.parametrize(("model", "changes"), RESUMED_RUNS.values(), ids=RESUMED_RUNS.keys())
def test_resume_continues_exactly(make_config, model, changes):
    """N steps, state_dict, a fresh trainer, load, N more == 2N straight (bitwise on CPU)."""
    training = {"maxSteps": 4, "gradientAccumulationSteps": 2, **changes}
    config = make_config({"baseModel": {"uri": model}, "training": training})
    straight = trainer_for(config)
    straight.fit()

    first = trainer_for(config)
    first.train_step()
    first.train_step()
    state = copy.deepcopy(first.state_dict())
    resumed = trainer_for(config)
    resumed.load_state_dict(state)
    resumed.fit()

    assert resumed.step == straight.step == 4
    assert resumed.micro_step == straight.micro_step == 8
    expected, actual = (t.trained_model.state_dict() for t in (straight, resumed))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())


def test_8bit_adam_keeps_its_moments_in_8_bits(make_config, tmp_path: Path):
    trainer = trainer_for(make_config({"training": {"maxSteps": 2, "use8bitAdam": True}}))
    before = unet_weights(trainer)
    trainer.fit()
    after = unet_weights(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    state = trainer.backend.optimizer.state.values()
    assert {s["state1"].dtype for s in state} == {torch.uint8, torch.float32}  # small: 32-bit
    # A checkpoint loads back without unpickling code (torch.load's weights_only).
    trainer.backend.save_to_dir(tmp_path)
    fresh = trainer_for(make_config({"training": {"maxSteps": 2, "use8bitAdam": True}}))
    fresh.backend.load_from_dir(tmp_path)
    saved, loaded = (moments(t.backend.optimizer) for t in (trainer, fresh))
    assert len(loaded) == len(saved) > 0
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(loaded, saved, strict=True))


def moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """First moments, in parameter order."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    return [optimizer.state[p]["state1"] for p in parameters if p in optimizer.state]


def losses_with(make_config, training: dict) -> tuple[Trainer, list[float]]:
    trainer = trainer_for(make_config({"training": {**training, "maxSteps": 3}}))
    return trainer, [trainer.train_step().loss for _ in range(3)]


def test_latent_cache_is_only_a_speed_up(make_config, monkeypatch):
    """Cached and per-step VAE encodings give the same latents, hence the same losses.

    The cache encodes its images in batches, a step only the images it draws, and a conv
    kernel sums in another order for another batch size: the same image encoded alone or
    among others differs in the last bits (up to 2.4e-6 in the posterior parameters on this
    CPU, AVX-512 or AVX2 alike; another CPU's kernels, another amount). With one image per
    VAE call on both paths (and one image per step) the arithmetic is the same, so anything
    but bit-for-bit equality is a real difference: other pixels, noise draws or scaling.
    """
    monkeypatch.setattr(data, "VAE_ENCODE_BATCH", 1)
    (cached_run, cached_losses), (encoded_run, encoded_losses) = (
        losses_with(make_config, {"cacheLatents": cache, "batchSize": 1}) for cache in (True, False)
    )
    assert cached_losses == encoded_losses
    assert isinstance(cached_run.data.latents, data.CachedLatents)
    assert isinstance(encoded_run.data.latents, data.EncodedEachStep)
    cached, encoded = (t.data.classes.latents for t in (cached_run, encoded_run))
    indices = list(range(len(cached)))
    draw = [s.sample(indices, torch.Generator().manual_seed(0)) for s in (cached, encoded)]
    assert torch.equal(*draw)


def test_text_embedding_cache_is_only_a_speed_up(make_config):
    """Prompts encoded once or on every step condition the UNet identically."""
    (cached_run, cached), (encoded_run, encoded) = (
        losses_with(make_config, {"cacheTextEmbeddings": cache}) for cache in (True, False)
    )
    assert cached == pytest.approx(encoded, rel=1e-6)
    assert cached_run.data.prompts.cached is not None
    assert encoded_run.data.prompts.cached is None


def test_a_step_encodes_its_instance_and_class_rows_together(make_config):
    """With the caches off, a micro-batch's images go through the VAE in one call and its
    prompts through the text encoder in one, and the batch is the one its subsets give alone:
    instance rows first, each subset's latent noise drawn in turn from the same generator.
    (A batch of 4 images through the VAE sums in another order than 2 and 2: float tolerance.)
    """
    config = make_config(
        {"training": {"cacheLatents": False, "cacheTextEmbeddings": False, "batchSize": 2}}
    )
    trainer = trainer_for(config)
    frozen, dataset = trainer.frozen, trainer.data
    calls: list[str] = []
    hooks = [
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
        for name, module in (("vae", frozen.vae.encoder), ("text", frozen.text_encoder))
    ]
    try:
        batch = dataset.batch(3, 2, 0, 1, torch.Generator().manual_seed(5))
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(calls) == ["text", "vae"]

    generator = torch.Generator().manual_seed(5)
    subsets = (dataset.instance, dataset.classes)
    alone = [s.latents.sample(s.order.take(3 * 2, 2), generator) for s in subsets]
    torch.testing.assert_close(batch.latents, torch.cat(alone))
    prompts = [
        data.encode_prompt(frozen.text_encoder, data.tokenize(frozen.tokenizer, [prompt]))
        for prompt in (INSTANCE_PROMPT, CLASS_PROMPT)
    ]
    rows = torch.cat([prompt.expand(2, *prompt.shape[1:]) for prompt in prompts])
    torch.testing.assert_close(batch.condition, rows)
    assert batch.instance_rows == 2 and batch.condition_is_embedding


def test_the_vae_takes_channels_last_pixels_on_a_cpu_and_gives_the_same_posterior(make_config):
    """oneDNN's convolutions run faster on NHWC input (bench/README.md "Step overhead"), so on
    a CPU the encoder gets it; the posterior is NCHW's to float rounding, and contiguous."""
    config = make_config()
    vae = load_pipeline(config.base_model, config.model_cache_dir()).vae
    pixels = torch.rand((2, 3, 64, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen: list[torch.Tensor] = []
    hook = vae.encoder.conv_in.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        posterior = data.encode_distribution(vae, pixels)
    finally:
        hook.remove()
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert posterior.is_contiguous()
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.parameters
    torch.testing.assert_close(posterior, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def v_prediction_model(make_config, tmp_path: Path) -> str:
    """The tiny model saved with a v-prediction scheduler (like SD 2.x 768)."""
    config = make_config()
    pipeline = load_pipeline(config.base_model, config.model_cache_dir())
    pipeline.scheduler.register_to_config(prediction_type="v_prediction")
    pipeline.save_pretrained(tmp_path / "tiny-v")
    return str(tmp_path / "tiny-v")


OPTIONS = {
    "text-encoder+checkpointing+accumulation": {
        "trainTextEncoder": True,
        "gradientCheckpointing": True,
        "gradientAccumulationSteps": 2,
    },
    "offset-noise+min-snr+cosine-warmup": {
        "offsetNoise": 0.1,
        "snrGamma": 5.0,
        "lrScheduler": "cosine",
        "lrWarmupSteps": 1,
    },
    "bf16+no-latent-cache+batch-2": {
        "mixedPrecision": "bf16",
        "cacheLatents": False,
        "batchSize": 2,
        "centerCrop": False,
    },
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_training_options(make_config, options):
    config = make_config({"training": {"maxSteps": 3, **options}})
    trainer = trainer_for(config)
    unet_before = unet_weights(trainer)
    text_before = copy.deepcopy(trainer.frozen.text_encoder.state_dict())
    trainer.fit()
    assert trainer.step == 3
    unet_after = unet_weights(trainer)
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    assert all(v.dtype == torch.float32 for v in unet_after.values())  # trained in fp32
    text_after = trainer.frozen.text_encoder.state_dict()
    text_changed = any(not torch.equal(text_before[k], text_after[k]) for k in text_before)
    assert text_changed == options.get("trainTextEncoder", False)


def test_v_prediction_comes_from_the_model(make_config, v_prediction_model):
    config = make_config({"baseModel": {"uri": v_prediction_model}, "training": {"snrGamma": 5}})
    trainer = trainer_for(config)
    assert trainer.objective.scheduler.config.prediction_type == "v_prediction"
    metrics = trainer.train_step()
    assert torch.isfinite(torch.tensor(metrics.loss))


def test_min_snr_weights():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([0, 500, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weights = min_snr_weights(scheduler, timesteps, gamma=5.0)
    assert torch.allclose(weights, torch.clamp(snr, max=5.0) / snr)
    assert weights[0] < 1 and weights[2] == pytest.approx(1.0)  # clipped only where SNR > 5
    scheduler.register_to_config(prediction_type="v_prediction")
    weights = min_snr_weights(scheduler, timesteps, gamma=5.0)
    assert torch.allclose(weights, torch.clamp(snr, max=5.0) / (snr + 1))


def test_metrics_report_throughput(make_config):
    trainer = trainer_for(make_config({"training": {"batchSize": 2}}))
    metrics = trainer.train_step()
    assert metrics.images == 4  # 2 instance + 2 class
    assert metrics.images_per_second > 0
    assert metrics.learning_rate == pytest.approx(1e-3)


def test_callbacks_see_every_step(make_config):
    """What callbacks hear of a run: state every N steps, start and end."""

    class Recorder(Callback):
        def __init__(self) -> None:
            self.events: list[object] = []

        def on_train_start(self, trainer: Trainer) -> None:
            self.events.append("start")

        def on_step_end(self, trainer: Trainer, metrics: StepMetrics) -> None:
            if trainer.step % 2 == 0:
                self.events.append(trainer.state_dict()["step"])

        def on_train_end(self, trainer: Trainer) -> None:
            self.events.append("end")

    recorder = Recorder()
    config = make_config({"training": {"maxSteps": 4}})
    build_trainer(config, SUBJECT_DIR, priors.run_priors(config), World(), [recorder]).fit()
    assert recorder.events == ["start", 2, 4, "end"]


def test_the_pause_for_tests_waits_after_its_step_while_its_file_exists(tmp_path: Path):
    assert pause_from_env({}) is None
    with pytest.raises(ValueError, match="STEP:FILE"):
        pause_from_env({PAUSE_ENV: "/tmp/pause"})
    flag = tmp_path / "pause"
    pause = pause_from_env({PAUSE_ENV: f"3:{flag}"})
    assert (pause.step, pause.path) == (3, flag)
    at = types.SimpleNamespace
    pause.on_step_end(at(step=3), None)  # no file: no pause
    flag.touch()
    pause.on_step_end(at(step=2), None)  # another step: no pause
    waiting = threading.Thread(target=pause.on_step_end, args=(at(step=3), None), daemon=True)
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive(), "did not wait while the file exists"
    flag.unlink()
    waiting.join(30)
    assert not waiting.is_alive(), "still waiting after the file is gone"


def test_validation_grids_with_mixed_precision(make_config, tmp_path: Path):
    prompts = ["a photo of sks cube", "a photo of cube"]
    config = make_config(
        {
            "training": {
                "maxSteps": 2,
                "mixedPrecision": "bf16",
                "validation": {"prompts": prompts, "interval": 1, "numInferenceSteps": 2},
            }
        }
    )
    writer = SummaryWriter(str(tmp_path / "logs"))
    samples = ValidationSamples(config.validation, 64, tmp_path / "samples", writer)
    build_trainer(config, SUBJECT_DIR, priors.run_priors(config), World(), [samples]).fit()
    writer.close()
    grids = sorted((tmp_path / "samples").iterdir())
    assert [p.name for p in grids] == ["step-000001.png", "step-000002.png"]
    assert Image.open(grids[0]).size == (64 * len(prompts), 64)
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


def test_fp16_with_loss_scaling(make_config, tmp_path: Path):
    """The GPU default (fp16, text encoder trained, samples rendered) on the CPU, where torch
    autocasts and scales losses too. The API refuses fp16 without GPUs, so it is set here."""
    prompts = ["a photo of sks cube"]
    validation = {"prompts": prompts, "interval": 2, "numInferenceSteps": 2}
    config = make_config(
        {"training": {"maxSteps": 4, "trainTextEncoder": True, "validation": validation}}
    )
    training = config.training.model_copy(update={"mixed_precision": "fp16"})
    config = config.model_copy(update={"training": training})
    samples = ValidationSamples(config.validation, 64, tmp_path / "samples", None)
    trainer = build_trainer(config, SUBJECT_DIR, priors.run_priors(config), World(), [samples])
    unet_before = unet_weights(trainer)
    text_before = copy.deepcopy(trainer.frozen.text_encoder.state_dict())
    trainer.fit()
    assert trainer.step == 4 and trainer.backend.scaler.get_scale() > 1
    unet_after = unet_weights(trainer)
    assert all(v.dtype == torch.float32 and v.isfinite().all() for v in unet_after.values())
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    text_after = trainer.frozen.text_encoder.state_dict()
    assert any(not torch.equal(text_before[k], text_after[k]) for k in text_before)
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]


def test_fp16_steps_that_overflow_are_skipped(make_config):
    """A loss scale too high for fp16 (2^20): the first steps' gradients overflow; those steps
    change nothing, not even the LR schedule, and halve the scale until the steps go through."""
    config = make_config({"training": {"maxSteps": 8, "lrScheduler": "linear"}})
    training = config.training.model_copy(update={"mixed_precision": "fp16"})
    trainer = trainer_for(config.model_copy(update={"training": training}))
    trainer.backend.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    trainer.fit()
    scale = trainer.backend.scaler.get_scale()
    skipped = round(math.log2(2.0**20 / scale))
    assert 0 < skipped < 8, f"scale {scale}: the test needs some steps skipped, some not"
    assert trainer.backend.lr_scheduler.last_epoch == 8 - skipped
    assert trainer.backend.state_dict()["grad_scaler"]["scale"] == scale  # goes in checkpoints


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_a_16_bit_model_takes_float32_inputs_without_autocast(make_config, train_text_encoder):
    """What DeepSpeed does on CUDA: 16-bit weights, the caller's autocast switched off in the
    engine's forward, float32 latents and cached embeddings from the data."""
    config = make_config({"training": {"trainTextEncoder": train_text_encoder}})
    trainer = trainer_for(config)
    model = copy.deepcopy(trainer.model).to(torch.bfloat16)
    batch = trainer.data.batch(0, 1, 0, 1, torch.Generator().manual_seed(0))
    timesteps = torch.tensor([10, 500])
    prediction = model(batch.latents, timesteps, batch.condition, batch.condition_is_embedding)
    assert prediction.dtype == torch.bfloat16 and prediction.shape == batch.latents.shape
