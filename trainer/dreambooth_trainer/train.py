"""The training loop: a Stateful `Trainer`, and the training phase (`run_training`).

All randomness (crops, latent sampling, noise, timesteps) comes from seeded `torch.Generator`s
whose state is part of `Trainer.state_dict()`, and data order is a pure function of the step, so
a run resumed from a checkpoint continues exactly where it stopped.

Every rank runs the same loop. Calls that gather sharded weights (`trained_model`, `pipeline`,
`save_trained`) and state saving are collective: all ranks make them, rank 0 uses the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from torch.utils.tensorboard import SummaryWriter

from dreambooth_contract.layout import CHECKPOINTS_DIR, LOGS_DIR, SAMPLES_DIR, TRAINED_DIR
from dreambooth_contract.subjects import ClassSet, classes_of, subjects_of
from dreambooth_contract.trainer_config import TrainerConfig

from .callbacks import (
    Callback,
    ProgressBar,
    StatusReport,
    StepMetrics,
    TensorBoardScalars,
    TrainingState,
    pause_from_env,
)
from .checkpoint_files import CheckpointInfo
from .checkpoint_manager import CheckpointManager
from .data import DreamBoothData, build_data
from .locations import fetch_dir, is_s3, publish_dir, staging_dir, store_for, working_dir
from .loss import DreamBoothObjective
from .methods import method_for
from .models.components import DreamBoothModel, FrozenParts, sampling_pipeline
from .models.family import SDXL
from .models.loading import load_pipeline
from .optim import optimizer_factory, scheduler_factory
from .parallel import Backend, BackendOptions, World, create_backend
from .priors import class_image_plan, generated_images
from .progress import LOADING_MODEL, PREPARING_DATA
from .samples import ValidationSamples
from .seeds import derive_seed
from .speedups import Speedups, apply_matmul_precision, prepare_unet, speedups_for
from .storage import local_files
from .timing import PhaseClock
from .tracking import WandbLogger

log = logging.getLogger(__name__)

# Inside a checkpoint (see checkpoint_manager.py).
STATE_DIR = "trainer"
BACKEND_DIR = "backend"


class TrainingInterrupted(Exception):
    """Training stopped early (SIGTERM) after saving a checkpoint; a restart resumes it."""


class Trainer:
    """Runs optimizer steps; `state_dict()` covers weights, optimizer, step, RNG, data position.

    What callbacks see of it is `callbacks.TrainingState`; what the checkpoint manager saves and
    restores, `checkpoint_manager.Checkpointable`."""

    def __init__(
        self,
        config: TrainerConfig,
        model: DreamBoothModel,
        frozen: FrozenParts,
        data: DreamBoothData,
        backend: Backend,
        callbacks: Sequence[Callback] = (),
        checkpoints: CheckpointManager | None = None,
        speedups: Speedups | None = None,
    ):
        self.config = config
        self.training = config.training
        self.frozen = frozen
        self.data = data
        self.backend = backend
        self.callbacks = list(callbacks)
        self.checkpoints = checkpoints
        self.world = backend.world
        # Looked up once: World.device asks CUDA on every call, and each step needs it twice.
        self.device = self.world.device
        self.objective = DreamBoothObjective(
            frozen.noise_scheduler,
            prior_loss_weight=config.prior_preservation.loss_weight,
            offset_noise=self.training.offset_noise,
            snr_gamma=self.training.snr_gamma,
        )
        # Labels of the per-subject losses, computed once (not on every step's host path).
        self.subject_names = [subject.name for subject in subjects_of(config)]
        self.step = 0
        self.micro_step = 0  # micro-batches consumed by every rank: the data position
        self.stop_reason: str | None = None
        # Split each step's time into data/forward/backward/optimizer (StepMetrics.phase_seconds);
        # on a GPU this synchronizes at every phase, so only benchmarks turn it on.
        self.time_phases = False
        # Each rank draws its own noise, all of it from this one generator.
        self.generator = torch.Generator().manual_seed(
            derive_seed(self.training.seed, "noise", self.world.rank)
        )
        # TF32, fused AdamW, channels_last, regional compile: what the device and the job allow
        # (speedups.py), unless the caller (the bench) says which.
        self.speedups = speedups or speedups_for(self.training, self.world.device)
        apply_matmul_precision(self.speedups, self.world.device)
        prepare_unet(model.unet, self.speedups)
        self.model = backend.prepare(
            model,
            optimizer_factory(self.training, fused=self.speedups.fused_adamw),
            scheduler_factory(self.training),
        )

    @property
    def max_steps(self) -> int:
        return self.training.max_steps

    @cached_property
    def images_per_step(self) -> int:
        """Instance and class images all ranks process in one optimizer step."""
        kinds = 1 if self.data.classes is None else 2
        training = self.training
        return (
            kinds
            * training.batch_size
            * training.gradient_accumulation_steps
            * self.world.world_size
        )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.backend.options.autocast_dtype

    @property
    def backend_name(self) -> str:
        return type(self.backend).__name__

    def fit(self) -> None:
        """Train from where the checkpoints say (or step 0) to max_steps, or until a callback or
        SIGTERM asks to stop.

        The checkpoint manager goes first at each point: its resume sets the step the callbacks
        start from, and a step's checkpoint is committed, and announced to the callbacks
        (`on_checkpoint`), before they see the step end. Each hook goes to the callbacks in
        list order."""
        if self.checkpoints is not None:
            self.checkpoints.start(self)
        for callback in self.callbacks:
            callback.on_train_start(self)
        while self.step < self.max_steps and self.stop_reason is None:
            metrics = self.train_step()
            if self.checkpoints is not None:
                self.checkpoints.after_step(self, self.announce_checkpoint)
            for callback in self.callbacks:
                callback.on_step_end(self, metrics)
        if self.checkpoints is not None:
            self.checkpoints.end()
        for callback in self.callbacks:
            callback.on_train_end(self)

    def announce_checkpoint(self, info: CheckpointInfo, seconds: float) -> None:
        """Rank 0: tell the callbacks of a committed checkpoint."""
        for callback in self.callbacks:
            callback.on_checkpoint(self, info, seconds)

    def request_stop(self, reason: str) -> None:
        """End `fit()` after the current step (callbacks call it; every rank must agree)."""
        self.stop_reason = reason

    def train_step(self) -> StepMetrics:
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        started = time.perf_counter()
        clock = PhaseClock(self.device, enabled=self.time_phases)
        accumulation = self.training.gradient_accumulation_steps
        # total, instance and prior loss, then each subject's instance loss
        totals = torch.zeros(3 + len(self.data.subjects), device=self.device)
        for micro in range(accumulation):
            batch = self.data.batch(
                self.micro_step,
                self.training.batch_size,
                self.world.rank,
                self.world.world_size,
                self.generator,
            )
            clock.lap("data")
            with self.backend.accumulate(sync=micro == accumulation - 1):
                with self.backend.autocast():
                    losses = self.objective(self.model, batch, self.generator, self.device)
                clock.lap("forward")
                self.backend.backward(losses.total)
                clock.lap("backward")
            totals += losses.detached()
            self.micro_step += 1
        grad_norm = self.backend.step()
        clock.lap("optimizer")
        self.step += 1
        # The losses reach the host once, after the optimizer's work is queued: on a GPU a copy
        # per micro-batch would wait for its backward, leaving the device idle meanwhile.
        reduced = self.backend.all_reduce_mean(totals.cpu() / accumulation)
        loss, instance_loss, prior_loss, *subject_losses = reduced.tolist()
        return StepMetrics(
            step=self.step,
            loss=float(loss),
            instance_loss=float(instance_loss),
            prior_loss=float(prior_loss),
            subject_losses=self.subject_losses(subject_losses),
            grad_norm=grad_norm,
            learning_rate=self.backend.learning_rate,
            images=self.images_per_step,
            seconds=time.perf_counter() - started,
            phase_seconds=clock.seconds,
        )

    def subject_losses(self, losses: list[float]) -> dict[str, float]:
        """Each subject's instance loss by its name; none for one subject (it is the instance
        loss)."""
        if len(losses) < 2:
            return {}
        return dict(zip(self.subject_names, losses, strict=True))

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's full training state (weights and optimizer through the backend)."""
        return {**self.loop_state_dict(), "backend": self.backend.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_loop_state_dict(state)
        self.backend.load_state_dict(state["backend"])

    def loop_state_dict(self) -> dict[str, Any]:
        """Position and randomness of this rank's loop: everything but the backend's state."""
        state = {
            "step": self.step,
            "micro_step": self.micro_step,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.world.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.world.device)
        return state

    def load_loop_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.micro_step = state["micro_step"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.world.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.world.device)

    # The same state as files, for checkpoints: the backend's under backend/ (shards per rank
    # for sharded backends) and each rank's loop state under trainer/.

    @property
    def state_file(self) -> str:
        return f"{STATE_DIR}/rank-{self.world.rank:05d}.pt"

    def save_state(self, directory: Path) -> None:
        """Collective. This rank's files of the full training state, under `directory`."""
        self.backend.save_to_dir(directory / BACKEND_DIR)
        path = directory / self.state_file
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.loop_state_dict(), path)

    def load_state(self, directory: Path) -> None:
        """Collective. Load what `save_state` wrote; `directory` holds this rank's files."""
        state = torch.load(directory / self.state_file, weights_only=True)
        self.load_loop_state_dict(state)
        self.backend.load_from_dir(directory / BACKEND_DIR)

    def needs_file(self, path: str) -> bool:
        """Whether this rank reads `path` (relative to a saved state's directory) to load it."""
        head, _, rest = path.partition("/")
        if head == BACKEND_DIR:
            return self.backend.needs_file(rest)
        return path == self.state_file

    # -- results -----------------------------------------------------------------------------------

    @property
    def trained_model(self) -> DreamBoothModel:
        """Collective. The trained module with full weights on rank 0."""
        return self.backend.unwrap()

    def pipeline(self) -> StableDiffusionPipeline:
        """Collective. A sampling pipeline over the current weights (usable on rank 0)."""
        return sampling_pipeline(self.trained_model, self.frozen)

    def save_trained(self, directory: Path) -> None:
        """Collective. Rank 0 writes what the export phase starts from (the training method's
        `save_trained`)."""
        model = self.trained_model
        if self.world.is_main:
            method_for(self.training).save_trained(model, directory)


def build_trainer(
    config: TrainerConfig,
    instance_dir: Path,
    class_dir: Path | None,
    world: World | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoints: CheckpointManager | None = None,
    announce: Callable[[str], None] = lambda activity: None,
    speedups: Speedups | None = None,
) -> Trainer:
    """Load the base model, prepare data and backend: a Trainer ready to `fit()`.

    `announce` hears what it is doing meanwhile (progress.LOADING_MODEL, PREPARING_DATA);
    `speedups` overrides what `speedups.speedups_for` decides (benchmarks compare them)."""
    world = world or World.from_env()
    training = config.training
    announce(LOADING_MODEL)
    torch.manual_seed(derive_seed(training.seed, "torch", world.rank))
    options = BackendOptions(
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_grad_norm=training.max_grad_norm,
        mixed_precision=training.mixed_precision,
        micro_batch_size=training.batch_size * (2 if config.uses_priors else 1),
    )
    # Load before joining the process group: transformers writes files only on global rank
    # 0 once torch.distributed is up, so a node's first build of a random model (or any
    # save into its own cache) would come out empty on the other nodes.
    pipeline = load_pipeline(config.base_model, config.model_cache_dir(), config.s3)
    sharding = training.sharding
    backend = create_backend(sharding.backend, world, options, sharding.zero_stage)
    model, frozen = method_for(training).split_pipeline(pipeline, training, world.device)
    announce(PREPARING_DATA)
    data = build_data(
        config,
        frozen.vae,
        frozen.tokenizer,
        None if training.train_text_encoder else frozen.text_encoder,
        *data_dirs(config, instance_dir, class_dir),
        micro_conditioning=frozen.family == SDXL,
    )
    return Trainer(config, model, frozen, data, backend, callbacks, checkpoints, speedups)


# -- the phase -------------------------------------------------------------------------------------


def class_images_dir(
    config: TrainerConfig, cache_dir: Path, class_set: ClassSet | None = None
) -> Path | None:
    """The generated class images of `class_set` (default the first class's), local
    (downloaded when they live in S3); None when there are none to read (no prior
    preservation, or the user supplied every class image)."""
    if not config.uses_priors:
        return None
    class_set = class_set or classes_of(config)[0]
    generated = class_image_plan(config, class_set).generated
    if not generated:
        return None
    store = store_for(class_set.uri, config.s3)
    if not generated_images(store, config, class_set, generated):
        raise RuntimeError(f"class images {class_set.uri}: not generated; run the priors phase")
    return fetch_dir(class_set.uri, config.s3, cache_dir)


def data_dirs(
    config: TrainerConfig, instance_dir: Path, class_dir: Path | None
) -> tuple[list[Path], list[Path | None]]:
    """Each subject's photos and each class's generated images, local: the first subject's and
    class's as the caller gives them, the others' (several subjects) fetched here."""
    cache = config.model_cache_dir()
    subjects, classes = subjects_of(config), classes_of(config)
    instance_dirs = [instance_dir]
    instance_dirs += [fetch_dir(s.spec.images_uri, config.s3, cache) for s in subjects[1:]]
    class_dirs = [class_dir] + [class_images_dir(config, cache, c) for c in classes[1:]]
    return instance_dirs, class_dirs[: len(classes)]


def checkpoint_manager_for(config: TrainerConfig) -> CheckpointManager:
    """Checkpoints in <outputUri>/checkpoints, staged in a local directory per rank."""
    spec = config.training.checkpointing
    return CheckpointManager(
        store=store_for(config.output_uri, config.s3),
        staging=staging_dir(config.output(CHECKPOINTS_DIR), config.model_cache_dir()),
        interval=spec.interval,
        keep=spec.keep,
        metadata={"job": config.job_name},
        identity=config.weights_identity(),
    )


def rank_callbacks(
    config: TrainerConfig,
    world: World,
    output: Path,
    progress: bool,
    extra: Sequence[Callback] = (),
) -> tuple[list[Callback], SummaryWriter | None]:
    """This rank's callbacks, in the order the loop calls them; and rank 0's TensorBoard writer.

    The one list of callbacks a training run has. (The checkpoint manager is not among them:
    the loop calls it before them, see `Trainer.fit`.) Why this order:
    - sample grids, on every rank: rendering is collective (all ranks gather the weights), so
      it must be there, and in the same place among the collective calls, on every rank;
    - on rank 0 only: progress bar, status report, publishing to S3, TensorBoard scalars. The
      publisher goes before TensorBoardScalars, whose `on_train_end` closes the writer that
      the publisher flushes;
    - the pause tests may ask for (callbacks.PauseAtStep): it holds training after everything
      the callbacks above do at its step (a checkpoint's report, metrics, samples);
    - last, the caller's `extra` callbacks (tests, benchmarks): they see what ours did, e.g.
      a checkpoint already recorded by the status report when theirs hears of it.
    """
    writer = SummaryWriter(str(output / LOGS_DIR)) if world.is_main else None
    resolution = config.training.resolution
    samples = config.validation.model_copy(update={"prompts": config.sample_prompts})
    callbacks: list[Callback] = [
        ValidationSamples(samples, resolution, output / SAMPLES_DIR, writer),
    ]
    if world.is_main:
        callbacks += [ProgressBar()] if progress else []
        callbacks.append(StatusReport(compiled=config.training.compile != "off"))
        if is_s3(config.output_uri):
            callbacks.append(PublishAsYouGo(output, config, writer))
        callbacks.append(TensorBoardScalars(writer))
        if config.tracking.wandb is not None:
            callbacks.append(WandbLogger(config, output))
    pause = pause_from_env()
    if pause is not None:
        callbacks.append(pause)
    return [*callbacks, *extra], writer


class PublishAsYouGo(Callback):
    """Rank 0 uploads new sample grids and TensorBoard logs with every checkpoint and when
    training stops early, so that a preempted pod loses none of them and users can watch a run
    in S3. (A finished run publishes its whole output directory anyway.)"""

    def __init__(self, output: Path, config: TrainerConfig, writer: SummaryWriter):
        self.output, self.writer = output, writer
        self.store = store_for(config.output_uri, config.s3)
        self.sent: dict[Path, tuple[int, int]] = {}  # file -> (mtime ns, size) uploaded

    def publish(self) -> None:
        self.writer.flush()
        changed = []
        for name in (SAMPLES_DIR, LOGS_DIR):
            for path, key in local_files(self.output / name):
                stat = path.stat()
                if self.sent.get(path) != (stat.st_mtime_ns, stat.st_size):
                    self.sent[path] = (stat.st_mtime_ns, stat.st_size)
                    changed.append((path, f"{name}/{key}"))
        if changed:
            self.store.upload_files(changed)

    def on_checkpoint(self, state: TrainingState, info: CheckpointInfo, seconds: float) -> None:
        self.publish()

    def on_train_end(self, state: TrainingState) -> None:
        if state.stop_reason is not None:
            self.publish()


def announcer(callbacks: Sequence[Callback], total_steps: int, rank: int) -> Callable[[str], None]:
    """Tell rank 0's status report (if among `callbacks`) what building the trainer is doing."""
    reports = [callback for callback in callbacks if isinstance(callback, StatusReport)]

    def announce(activity: str) -> None:
        for report in reports:
            report.announce(activity, total_steps, rank)

    return announce


def run_training(
    config: TrainerConfig,
    world: World | None = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """The training phase on this rank; returns the local output directory.

    Resumes from the newest committed checkpoint, checkpoints every `checkpointing.interval`
    steps and on SIGTERM (then raises TrainingInterrupted). At the end rank 0 saves the trained
    weights (<output>/trained) that the export phase starts from.
    """
    world = world or World.from_env()
    cache = config.model_cache_dir()
    instance_dir = fetch_dir(config.instance.images_uri, config.s3, cache)
    class_dir = class_images_dir(config, cache)
    output = working_dir(config.output_uri, cache)
    callbacks, writer = rank_callbacks(config, world, output, progress, extra=callbacks)
    checkpoints = checkpoint_manager_for(config)
    trainer = build_trainer(
        config,
        instance_dir,
        class_dir,
        world,
        callbacks,
        checkpoints,
        announce=announcer(callbacks, config.training.max_steps, world.rank),
    )
    try:
        trainer.fit()
        if trainer.stop_reason is None:
            trainer.save_trained(output / TRAINED_DIR)
            if world.is_main:
                publish_dir(output, config.output_uri, config.s3)
        world.barrier()
    finally:
        if writer is not None:
            writer.close()
        trainer.backend.close()
    if trainer.stop_reason is not None:
        raise TrainingInterrupted(f"stopped at step {trainer.step} ({trainer.stop_reason})")
    return output
