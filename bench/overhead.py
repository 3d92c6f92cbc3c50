"""Our training step against the bare model step, side by side in one process.

The bare step is what no trainer can avoid: the UNet's forward on fixed tensors of the job's
shapes, the MSE, backward, clipping and an AdamW step. With the caches off the bare step also
runs what every step then needs besides: the VAE encoder over the pixel batch and the frozen
text encoder over the prompt ids (both without gradients). Anything our step costs beyond that
is overhead: data handling, copies, casts, synchronisation, callbacks.

Blocks of our steps and blocks of bare steps alternate, so that whatever else the machine does
falls on both alike; the figures are the medians over the blocks. Then single steps alternate
(`paired`): the median step of each kind, a finer figure than the blocks' where the machine's
speed drifts between blocks (on a CPU the blocks of one run ranged over +-10 %).

    python -m bench step_overhead [--quick] [--model random://sd15 --resolution 512]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import Settings, benchmark
from .training import SUBJECT_DIR, config_for, prepare_class_images


@dataclass(frozen=True)
class Rounds:
    warmup: int  # steps of each kind before timing
    blocks: int  # alternating blocks of each kind
    steps: int  # steps per block
    paired: int = 0  # then steps of each kind timed one by one, the two kinds in turn


QUICK = Rounds(warmup=3, blocks=5, steps=10, paired=10)
FULL = Rounds(warmup=5, blocks=9, steps=25, paired=300)


def precision_for(on_gpu: bool) -> str:
    """bf16 on a GPU (the bare step has no fp16 loss scaler to mirror); fp32 on a CPU, where
    the tiny model's step is not bound by matmuls and autocast's casts would be most of it."""
    return "bf16" if on_gpu else "no"


class BareStep:
    """One optimizer step of the trained UNet on fixed tensors shaped like `trainer`'s batch."""

    def __init__(self, trainer, with_encoders: bool):
        import torch

        self.torch = torch
        self.trainer = trainer
        self.device = trainer.world.device
        self.unet = trainer.trained_model.unet
        # Looked up once: diffusers' `unet.dtype` walks every submodule, work no step needs.
        self.dtype = self.unet.dtype
        self.parameters = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=trainer.training.effective_learning_rate
        )
        self.max_grad_norm = trainer.training.max_grad_norm
        generator = torch.Generator().manual_seed(0)
        batch = trainer.data.batch(
            0, trainer.training.batch_size, 0, trainer.world.world_size, generator
        )
        self.latents = batch.latents.to(self.device)
        self.target = torch.randn(self.latents.shape, generator=generator).to(self.device)
        steps = trainer.frozen.noise_scheduler.config.num_train_timesteps
        self.timesteps = torch.randint(0, steps, (len(self.latents),), generator=generator)
        self.timesteps = self.timesteps.to(self.device)
        self.with_encoders = with_encoders
        frozen = trainer.frozen
        rows = len(self.latents)
        resolution = trainer.training.resolution
        self.pixels = torch.rand((rows, 3, resolution, resolution), generator=generator) * 2 - 1
        self.pixels = self.pixels.to(self.device, frozen.vae.dtype)
        self.ids = frozen.tokenizer(
            ["a photo of sks dog"] * rows,
            padding="max_length",
            max_length=frozen.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(self.device)
        with torch.no_grad():
            self.hidden_states = frozen.text_encoder(self.ids)[0]

    def encode(self):
        """The per-step work the caches save: VAE encoder and frozen text encoder forwards."""
        frozen = self.trainer.frozen
        with self.torch.no_grad():
            frozen.vae.encode(self.pixels).latent_dist.sample()
            return frozen.text_encoder(self.ids)[0]

    def __call__(self) -> None:
        torch = self.torch
        with self.trainer.backend.autocast():
            hidden_states = self.encode() if self.with_encoders else self.hidden_states
            prediction = self.unet(
                self.latents.to(self.dtype),
                self.timesteps,
                encoder_hidden_states=hidden_states.to(self.dtype),
            ).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), self.target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # ours synchronizes once per step too


@dataclass(frozen=True)
class Block:
    wall: float  # seconds per step
    cpu: float  # seconds of this process's CPU time per step


def time_block(step: Callable[[], Any], steps: int) -> Block:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return Block((time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps)


def ratios(ours: list[float], bares: list[float]) -> tuple[float, list[float]]:
    """Of the medians, and block by block (> 1: our step takes that much longer)."""
    blocks = [round(o / b, 4) for o, b in zip(ours, bares, strict=True)]
    return round(statistics.median(ours) / statistics.median(bares), 4), blocks


def time_paired(
    ours: Callable[[], Any], bare: Callable[[], Any], pairs: int, on_cpu: bool
) -> dict[str, Any]:
    """Each kind's median step, the two timed in turn step by step (which goes first
    alternating), and the ratio over each half of the pairs (how far the figure moves).

    A median step leaves out the steps that a pause (garbage collection, another process)
    hit. On a CPU, process CPU time (all torch threads'); on a GPU, wall time (each step ends
    synchronized)."""
    if pairs < 2:
        raise ValueError("paired timing needs at least 2 pairs (one per half)")
    clock = time.process_time if on_cpu else time.perf_counter
    kinds = {"ours": ours, "bare": bare}
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    for pair in range(pairs):
        for kind in ("ours", "bare") if pair % 2 == 0 else ("bare", "ours"):
            started = clock()
            kinds[kind]()
            times[kind].append(clock() - started)

    def ratio(part: slice) -> float:
        ours_median = statistics.median(times["ours"][part])
        return round(ours_median / statistics.median(times["bare"][part]), 4)

    half = pairs // 2
    return {
        "paired_clock": "process CPU time" if on_cpu else "wall",
        "paired_ours_seconds": round(statistics.median(times["ours"]), 6),
        "paired_bare_seconds": round(statistics.median(times["bare"]), 6),
        "paired_overhead_ratio": ratio(slice(None)),
        "paired_half_ratios": [ratio(slice(None, half)), ratio(slice(half, None))],
    }


def compare(trainer, bare: BareStep, rounds: Rounds) -> dict[str, Any]:
    """Median seconds per step of ours and of the bare step, from alternating blocks.

    On a CPU also the ratio of the process's CPU time per step: on a machine shared with other
    work, the time this process waits for a core falls unevenly on the blocks and swings the
    wall-clock ratio; CPU time leaves it out. (On a GPU the work is the device's: wall only.)"""
    ours_step = trainer.train_step
    for _ in range(rounds.warmup):
        ours_step()
        bare()
    ours, bares = [], []
    for _ in range(rounds.blocks):
        ours.append(time_block(ours_step, rounds.steps))
        bares.append(time_block(bare, rounds.steps))
    ours_seconds = statistics.median(block.wall for block in ours)
    bare_seconds = statistics.median(block.wall for block in bares)
    overhead, blocks = ratios([b.wall for b in ours], [b.wall for b in bares])
    figures = {
        "ours_steps_per_second": round(1 / ours_seconds, 3),
        "bare_steps_per_second": round(1 / bare_seconds, 3),
        "overhead_ratio": overhead,
        "block_ratios": blocks,
    }
    if trainer.world.device.type == "cpu":
        cpu, cpu_blocks = ratios([b.cpu for b in ours], [b.cpu for b in bares])
        figures |= {"cpu_time_overhead_ratio": cpu, "cpu_time_block_ratios": cpu_blocks}
    if rounds.paired:
        on_cpu = trainer.world.device.type == "cpu"
        figures |= time_paired(ours_step, bare, rounds.paired, on_cpu)
    return figures


def build(settings: Settings, caches: bool, precision: str, speedups=None):
    """A one-process trainer of the bench's job; `speedups` as `build_trainer` takes them."""
    from dreambooth_trainer.parallel import World
    from dreambooth_trainer.train import build_trainer, class_images_dir

    config = config_for(
        settings,
        {
            "sharding": {"backend": "ddp"},  # one process: no parallel backend
            "mixedPrecision": precision,
            "cacheLatents": caches,
            "cacheTextEmbeddings": caches,
            "maxSteps": 10**6,
        },
    )
    class_dir = class_images_dir(config, config.model_cache_dir())
    return build_trainer(config, SUBJECT_DIR, class_dir, World(), speedups=speedups)


@benchmark("step_overhead")
def step_overhead(settings: Settings) -> dict[str, Any]:
    """Our step against the bare step, caches on (UNet alone) and off (UNet + encoders)."""
    import torch

    precision = precision_for(torch.cuda.is_available())
    rounds = QUICK if settings.quick else FULL
    prepare_class_images(settings)
    results: dict[str, Any] = {"precision": precision, "rounds": rounds.__dict__}
    for caches in (True, False):
        trainer = build(settings, caches, precision)
        try:
            bare = BareStep(trainer, with_encoders=not caches)
            results["caches_on" if caches else "caches_off"] = compare(trainer, bare, rounds)
        finally:
            trainer.backend.close()
    return results
