"""Training throughput, per-step time split, peak memory and FLOPs per parallel backend, and
full fine-tuning against LoRA (with what each writes: a checkpoint, the trained weights).

Every configuration (a `TrainingRun`) trains in processes of its own, through torchrun for the
parallel backends (`bench.training_worker`), so that each peak-memory figure is its own and a
backend is measured as the trainer really runs it. On a CPU the parallel backends run 2 ranks
(gloo, one thread each); on CUDA one rank per GPU, and with a single GPU the backend still wraps
the model (ZeRO-3 on one GPU is what its memory figure is about).

    python -m bench training [--quick] [--model random://sd15 --resolution 512]
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from . import Settings, benchmark
from .hardware import native_bf16

REPO = Path(__file__).resolve().parents[1]
SUBJECT_DIR = REPO / "examples" / "local" / "subject"
BACKENDS = ("single", "ddp", "zero2", "zero3", "fsdp")
# backend name -> training.sharding
SHARDING = {
    "single": {"backend": "ddp"},  # one process: the trainer needs no parallel backend
    "ddp": {"backend": "ddp"},
    "zero2": {"backend": "deepspeed", "zeroStage": 2},
    "zero3": {"backend": "deepspeed", "zeroStage": 3},
    "fsdp": {"backend": "fsdp"},
}
RUN_TIMEOUT = 1200.0


@dataclass(frozen=True)
class TrainingRun:
    """One configuration to measure."""

    backend: str = "single"
    precision: str = "bf16"
    cache_latents: bool = True
    cache_text_embeddings: bool = True
    batch_size: int = 1
    train_text_encoder: bool = False
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    method: str = "full"  # training.method: full or lora
    lora_rank: int | None = None  # training.lora.rank (method lora; None: the default rank)

    def training_spec(self) -> dict[str, Any]:
        lora = {} if self.lora_rank is None else {"lora": {"rank": self.lora_rank}}
        return {
            "method": self.method,
            **lora,  # the contract refuses a rank without method lora
            "sharding": SHARDING[self.backend],
            "mixedPrecision": self.precision,
            "cacheLatents": self.cache_latents,
            "cacheTextEmbeddings": self.cache_text_embeddings,
            "batchSize": self.batch_size,
            "trainTextEncoder": self.train_text_encoder,
            "gradientCheckpointing": self.gradient_checkpointing,
            "use8bitAdam": self.use_8bit_adam,
            "maxSteps": 10**6,
        }


def config_for(settings: Settings, training: dict[str, Any], class_images: int = 4):
    """A TrainerConfig for `settings.model` (through the same mapping the operator uses)."""
    import torch

    from dreambooth_contract.api import DreamBoothJob
    from dreambooth_contract.trainer_config import TrainerConfig

    gpus_per_node = 1 if torch.cuda.is_available() else 0  # fp16 is refused without GPUs
    spec = {
        "baseModel": {"uri": settings.model},
        "instance": {"imagesUri": str(SUBJECT_DIR), "prompt": "a photo of sks cube"},
        "priorPreservation": {
            "classPrompt": "a photo of cube",
            "numClassImages": class_images,
            "generation": {"steps": 4, "batchSize": 4},
        },
        "training": {
            "resolution": settings.resolution,
            "mixedPrecision": "no",
            "gradientCheckpointing": False,
            "validation": {"prompts": []},
            **training,
        },
        "resources": {"gpusPerNode": gpus_per_node, "processesPerNode": 1},
        "storage": {"outputUri": str(settings.work_dir.resolve() / "output")},
    }
    job = DreamBoothJob.model_validate(
        {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob",
         "metadata": {"name": "bench"}, "spec": spec}
    )  # fmt: skip
    config = TrainerConfig.from_job(job)
    return config.model_copy(update={"cache_dir": str(settings.work_dir.resolve() / "models")})


# -- which runs --------------------------------------------------------------------------------


def precisions(on_gpu: bool) -> tuple[str, ...]:
    """fp16 needs a GPU (loss scaling). A CPU gets bf16 and plain fp32 where it has bf16 in
    hardware; elsewhere fp32 only: emulated bf16 measures the emulation, at a third of the
    speed, and would push the quick run past its 10 minutes."""
    if on_gpu:
        return ("fp16", "bf16")
    return ("bf16", "no") if native_bf16() else ("no",)


def planned_runs(quick: bool, on_gpu: bool) -> dict[str, list[TrainingRun]]:
    """Sweeps by what they vary. Quick: each backend once, then caches and precision on the
    first; full: every backend x caches on/off x precision, and batch 4. Both: full fine-tuning
    against LoRA at its default rank, back to back, all else alike."""
    first, *other_precisions = precisions(on_gpu)
    caches = [(True, True), (False, True), (True, False), (False, False)]
    if quick:
        plan = {
            "backends": [TrainingRun(backend=b, precision=first) for b in BACKENDS],
            "caches": [
                TrainingRun(precision=first, cache_latents=lat, cache_text_embeddings=txt)
                for lat, txt in caches[1:]
            ],
            "precision": [TrainingRun(precision=p) for p in other_precisions],
        }
    else:
        plan = {
            "backends": [
                TrainingRun(backend=b, precision=p, cache_latents=c, cache_text_embeddings=c)
                for b, p, c in itertools.product(BACKENDS, precisions(on_gpu), (True, False))
            ],
            "caches": [
                TrainingRun(precision=first, cache_latents=lat, cache_text_embeddings=txt)
                for lat, txt in caches[1:]
            ],
            "batch_size": [TrainingRun(precision=first, batch_size=4)],
        }
    # The memory figure the issue asks for: UNet and text encoder fine-tuned together, batch 1,
    # ZeRO-3 sharding, gradient checkpointing (at 512 px with --model random://sd15); then the
    # same with AdamW's moments in 8 bits.
    full_finetune = TrainingRun(
        backend="zero3", precision=first, train_text_encoder=True, gradient_checkpointing=True
    )
    plan["full_finetune_memory"] = [full_finetune, replace(full_finetune, use_8bit_adam=True)]
    from dreambooth_contract.api import LoraSpec

    lora = TrainingRun(precision=first, method="lora", lora_rank=LoraSpec().rank)  # the default
    plan["method"] = [TrainingRun(precision=first), lora]
    return plan


# -- running one -------------------------------------------------------------------------------


def processes_for(run: TrainingRun, gpus: int) -> int:
    if run.backend == "single":
        return 1
    return gpus if gpus else 2


def worker_env(processes: int, gpus: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if not gpus:  # share the cores between the ranks instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


def measure(
    run: TrainingRun, settings: Settings, steps: int, gpus: int, file_sizes: bool = False
) -> dict[str, Any]:
    """Train `run` in its own processes; its figures, or an error with the log's tail.

    With `file_sizes`, also the bytes of a checkpoint and of the trained weights, as the run
    writes them (a full SD1.5 run writes gigabytes of each: only the method sweep asks)."""
    processes = processes_for(run, gpus)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        result_path, log_path = Path(scratch) / "result.json", Path(scratch) / "log"
        argv = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={processes}", "-m", "bench.training_worker",
            "--training-run", json.dumps(asdict(run)), "--steps", str(steps),
            "--out", str(result_path),
            "--model", settings.model, "--resolution", str(settings.resolution),
            "--work-dir", str(settings.work_dir),
        ] + (["--file-sizes"] if file_sizes else [])  # fmt: skip
        with open(log_path, "wb") as log:
            try:
                code = subprocess.run(
                    argv, env=worker_env(processes, gpus), cwd=REPO, stdout=log,
                    stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT,
                ).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                code = "timeout"
        if code != 0 or not result_path.exists():
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            return {**asdict(run), "error": f"exit {code}", "log_tail": tail}
        return json.loads(result_path.read_text())


def prepare_class_images(settings: Settings) -> None:
    """The class images every run trains with, generated once (the priors phase)."""
    from dreambooth_trainer import priors

    priors.run_priors(config_for(settings, {}))


@benchmark("training")
def training(settings: Settings) -> dict[str, Any]:
    """Steps/s, images/s, step-time split, peak memory and FLOPs for each planned run; for the
    method sweep, checkpoint and trained-weight bytes too."""
    import torch

    gpus = torch.cuda.device_count()
    steps = 20 if settings.quick else 50
    prepare_class_images(settings)
    sweeps = {
        sweep: [measure(run, settings, steps, gpus, file_sizes=sweep == "method") for run in runs]
        for sweep, runs in planned_runs(settings.quick, gpus > 0).items()
    }
    return {"steps_measured": steps, "gpus": gpus, "sweeps": sweeps}
