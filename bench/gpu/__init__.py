"""The GPU check: one prepared command that proves and measures what a GPU changes.

    bash bench/gpu/run.sh OUTDIR            # on a machine with one H100/H200 (see bench/README.md)
    bash bench/gpu/run.sh OUTDIR --smoke    # the same steps on the CPU, tiny model (CI runs it)

A run is a list of steps (`STEPS`), in order. Correctness first: training in fp16 (with loss
scaling) and bf16 on a fixed batch per backend, a checkpoint saved and resumed, priors and
inference in fp16; then figures from the `bench` modules. Each step has a time budget of its own;
the orchestrator (`python -m bench.gpu`) runs the steps in a worker process
(`bench.gpu.worker`) and kills it when a step overruns, records that step as failed and starts a
new worker for the rest. Everything goes into OUTDIR/gpu-check.json, the workers' output into
OUTDIR/steps.log, and a one-screen summary to stdout.

This module is the plan: which steps, their budgets, and the two profiles. It imports nothing
beyond the standard library, so the orchestrator and the tests read it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REPORT_FILE = "gpu-check.json"
LOG_FILE = "steps.log"


@dataclass(frozen=True)
class Profile:
    """Sizes of one kind of run: the real one on a GPU, or the smoke run on a CPU."""

    name: str
    model: str
    resolution: int
    # Correctness: optimizer steps on one fixed batch (loss must fall), learning rate there.
    fixed_batch_steps: int
    learning_rate: float
    # Resume: steps before the checkpoint, then as many after it, straight and resumed.
    resume_steps: int
    # Figures: timed steps per `bench.training` run, and which backends get a row.
    figure_steps: int
    figure_backends: tuple[str, ...]
    # The inference benchmark: model, size, denoising steps, requests per client.
    inference_model: str
    inference_size: str
    inference_steps: int
    inference_requests: int
    # bench.inference's modes (dynamic batching on, and one request at a time).
    inference_modes: tuple[str, ...]
    # The memory run with 8-bit AdamW too (bitsandbytes), not only 32-bit.
    memory_8bit: bool
    # SDXL served by the server's loader and engine: model and size (SDXL's native 1024 px);
    # and trained (the `sdxl.` steps' LoRA check and figures) at this resolution.
    sdxl_model: str
    sdxl_size: str
    sdxl_resolution: int
    # The whole run, setup included; steps that would start later are not run (failed).
    total_seconds: float
    # Whether the step may run at all here: fp16 in DeepSpeed needs CUDA.
    on_gpu: bool = True

    @property
    def precisions(self) -> tuple[str, str]:
        return ("fp16", "bf16")

    def trained_model(self, model: str = "") -> tuple[str, int]:
        """URI and resolution the training steps use: the profile's model, or its `model` one
        ("sdxl": sdxl_model at sdxl_resolution)."""
        if not model:
            return self.model, self.resolution
        return getattr(self, f"{model}_model"), getattr(self, f"{model}_resolution")


GPU = Profile(
    name="gpu",
    model="random://sd15",
    resolution=512,
    fixed_batch_steps=10,
    learning_rate=1e-4,
    resume_steps=2,
    figure_steps=10,
    figure_backends=("single", "ddp", "zero2", "zero3", "fsdp"),
    inference_model="random://sd15",
    inference_size="512x512",
    inference_steps=10,
    inference_requests=4,
    inference_modes=("batching", "one_at_a_time"),
    memory_8bit=True,
    sdxl_model="random://sdxl",
    sdxl_size="1024x1024",
    sdxl_resolution=1024,
    # The device call's limit is 560 s: the last step is stopped at 520 s (then up to 20 s to
    # end its processes), leaving the report and the summary inside the limit.
    total_seconds=520.0,
)

SMOKE = Profile(
    name="smoke",
    model="random://tiny-sd",
    resolution=64,
    fixed_batch_steps=6,
    learning_rate=1e-3,
    resume_steps=2,
    figure_steps=2,
    # One row per figures step on a CPU: the point is that the step runs, not the figure.
    figure_backends=("single",),
    inference_model="random://tiny-sd",
    inference_size="64x64",
    inference_steps=2,
    inference_requests=1,
    # Each mode starts a server process: one is enough to keep the step from rotting.
    inference_modes=("batching",),
    memory_8bit=False,
    sdxl_model="random://tiny-sdxl",
    sdxl_size="64x64",
    sdxl_resolution=64,
    total_seconds=600.0,
    on_gpu=False,
)

PROFILES = {profile.name: profile for profile in (GPU, SMOKE)}


@dataclass(frozen=True)
class Step:
    """One step: `target` ("module:function") is called as function(ctx, **args) in a worker.

    `budget` is seconds per profile name. `skip` says why a step does not run in a profile
    (a reason, never silence); `"*"` applies to every profile.
    """

    name: str
    target: str
    budget: dict[str, float]
    args: dict[str, Any] = field(default_factory=dict)
    skip: dict[str, str] = field(default_factory=dict)

    def budget_for(self, profile: str) -> float:
        return self.budget[profile]

    def skip_reason(self, profile: str) -> str | None:
        return self.skip.get(profile, self.skip.get("*"))


CHECKS = "bench.gpu.checks"
FIGURES = "bench.gpu.figures"
DS_FP16_ON_CPU = "DeepSpeed's fp16 (loss scaling) needs CUDA; the smoke run has none"


# On a CPU, DeepSpeed's first engine compiles its shared-memory op (a minute or more on a busy
# 2-core machine, once per machine: torch caches it); on a GPU it builds nothing.
SMOKE_DEEPSPEED = 240


def _budget(gpu: float, smoke: float) -> dict[str, float]:
    return {"gpu": gpu, "smoke": smoke}


def _train_steps() -> list[Step]:
    # Seconds on a GPU: load the 4 GB model, set up the backend (ZeRO-3 partitions 860 M
    # parameters), ten steps at 512 px. A new worker after a kill pays the imports too.
    gpu = {"single": 60, "zero2": 75, "zero3": 90, "fsdp": 75}
    steps = []
    for backend in ("single", "zero2", "zero3", "fsdp"):
        for precision in ("fp16", "bf16"):
            skip = {}
            if precision == "fp16" and backend.startswith("zero"):
                skip["smoke"] = DS_FP16_ON_CPU
            steps.append(
                Step(
                    f"train.{backend}.{precision}",
                    f"{CHECKS}:train_fixed_batch",
                    _budget(gpu[backend], SMOKE_DEEPSPEED if backend.startswith("zero") else 90),
                    {"backend": backend, "precision": precision},
                    skip,
                )
            )
    return steps


STEPS: list[Step] = [
    # Imports everything (the wheelhouse's packages too) and says what the machine is.
    Step("environment", f"{CHECKS}:environment", _budget(60, 120)),
    # The random model (built once, 4 GB for SD1.5) and the class images, as the priors phase
    # makes them (fp16 on a GPU).
    Step("prepare", f"{CHECKS}:prepare", _budget(150, 120)),
    *_train_steps(),
    Step(
        "resume.single.fp16",
        f"{CHECKS}:resume",
        _budget(100, 90),
        {"backend": "single", "precision": "fp16"},
    ),
    Step("priors.fp16", f"{CHECKS}:priors_fp16", _budget(60, 60)),
    Step("inference.fp16", f"{CHECKS}:inference_fp16", _budget(60, 60)),
    # LoRA as diffusers trains it by default: fp16 autocast, fp32 adapters on a frozen base,
    # at LoRA's learning rate (the profile's is a full fine-tune's).
    Step(
        "lora.train",
        f"{CHECKS}:train_fixed_batch",
        _budget(60, 90),
        {"backend": "single", "precision": "fp16", "method": "lora", "learningRate": 1e-4},
    ),
    # Figures: `python -m bench` rows for the profile's model and resolution.
    Step(
        "figures.training.fp16",
        f"{FIGURES}:training",
        _budget(150, 60),
        {"precision": "fp16"},
        {"smoke": "the bench's fp16 runs need a GPU (the API refuses fp16 without GPUs)"},
    ),
    Step("figures.memory", f"{FIGURES}:memory", _budget(90, SMOKE_DEEPSPEED)),
    Step("figures.training.bf16", f"{FIGURES}:training", _budget(150, 60), {"precision": "bf16"}),
    # Model load twice (caches on, off), then alternating blocks of our and the bare step.
    Step("figures.step_overhead", f"{FIGURES}:step_overhead", _budget(150, 120)),
    # Six trainers (a plain one per precision, one per variant but TF32; two at a time), 4 GB
    # to load each from the page cache, a few dozen steps each, and regional compilation of
    # the UNet's transformer blocks.
    Step("figures.step_variants", f"{FIGURES}:step_variants", _budget(240, 120)),
    Step("figures.priors", f"{FIGURES}:priors", _budget(60, 60)),
    Step("figures.inference", f"{FIGURES}:inference", _budget(90, 120)),
    Step(
        "resume.zero3.fp16",
        f"{CHECKS}:resume",
        _budget(120, SMOKE_DEEPSPEED),
        {"backend": "zero3", "precision": "fp16"},
        {"smoke": DS_FP16_ON_CPU},
    ),
    Step(
        "resume.zero3.bf16",
        f"{CHECKS}:resume",
        _budget(120, SMOKE_DEEPSPEED),
        {"backend": "zero3", "precision": "bf16"},
        {"gpu": "the GPU run resumes ZeRO-3 in fp16 (resume.zero3.fp16)"},
    ),
    Step("figures.lora", f"{FIGURES}:methods", _budget(120, 120)),
    # SDXL last, together, so that `--only sdxl.` runs them in one device call (~9 minutes with
    # the model's build): the SD steps do not fit in the same one.
    # SDXL at 1024 px through the server's loader and engine in fp16 (its VAE upcast to fp32,
    # as diffusers does for a VAE that says force_upcast): images finite and not blank, seconds
    # per image. On a GPU the random model is built first: 3.5 B parameters drawn and written
    # as 14 GB of fp32 safetensors, then read back as fp16 (~2 min together, then ~10 s).
    Step(
        "sdxl.inference.fp16",
        f"{CHECKS}:inference_fp16",
        _budget(200, 90),
        {"model": "sdxl"},
    ),
    # LoRA on SDXL at 1024 px as `lora.train` on SD (fp16 autocast, fp32 adapters; SDXL's VAE
    # stays fp32 under fp16, by the trainer's rule), from the model the step above built: load
    # (~14 GB of fp32 weights from the page cache), 4 class images at 1024 px, both encoders'
    # embeddings and the latents cached, then 10 steps of the 2.6 B UNet (~1-2 steps/s).
    Step(
        "sdxl.lora.train",
        f"{CHECKS}:train_fixed_batch",
        _budget(120, 90),
        {
            "backend": "single",
            "precision": "fp16",
            "method": "lora",
            "learningRate": 1e-4,
            "model": "sdxl",
        },
    ),
    # `python -m bench training` rows for SDXL at 1024 px, each its own process (load ~20 s,
    # 2 + 2 x 10 steps): LoRA, then full fine-tuning with gradient checkpointing (the 2.6 B
    # UNet's fp32 weights, gradients and AdamW moments alone are ~42 GB).
    Step("sdxl.figures", f"{FIGURES}:sdxl", _budget(170, 120)),
]
