"""A toy model trained through any `Backend`, the same way in one process and under torchrun.

The global batch of micro-step m is drawn from a generator seeded with m and split by rank, so
a single process fed the whole global batch computes the same gradients as N ranks fed their
slices: the reference the parallel backends are compared against.

Run as a torchrun worker (``python -m tests.distributed.toy``) it trains, for each precision and
optimizer: "straight" (all steps in one go) and twice half the steps, the state handed to a fresh
backend, the other half: "via_files" (save_to_dir / load_from_dir) and "via_state_dict". Rank 0
writes every run's losses, pre-clip gradient norms and consolidated weights to
``<out>/result.pt``.

Two optimizers, for two questions. SGD with momentum moves each weight by a linear function of its
gradients, so a backend's weights can be compared with the single process's closely: the
all-reduce's summation order changes the gradients by rounding only, and SGD keeps it rounding.
AdamW divides by the root of the second moment: a weight whose gradient is near zero turns that
rounding into a step of up to the learning rate, so AdamW runs are compared only with themselves
(the state hand-off, bit for bit), where it matters that its two moments travel whole.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dreambooth_contract.api import MixedPrecision
from dreambooth_trainer.cli import exit_without_teardown
from dreambooth_trainer.parallel.base import Backend, BackendOptions, OptimizerFactory, World

FEATURES = 8
HIDDEN = 32
BLOCKS = 3
PER_RANK_BATCH = 2
OPTIMIZERS = ("sgd", "adamw")
# SGD: four steps move the weights by about 0.3 (L2 norm over the model), 0.04 at most for one.
LEARNING_RATE = {"sgd": 1e-1, "adamw": 1e-2}
# Pre-clip gradient norms are 0.6 to 1.0 on every step: all steps are clipped, so clipping is
# part of what is compared.
MAX_GRAD_NORM = 0.5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.linear = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.linear(self.norm(x)))


class Toy(nn.Module):
    """Blocks under `layers` (FSDP units), a frozen projection and a buffer, like the real one."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.frozen = nn.Linear(FEATURES, FEATURES)
            self.embed = nn.Linear(FEATURES, HIDDEN)
            self.layers = nn.ModuleList([Block() for _ in range(BLOCKS)])
            self.head = nn.Linear(HIDDEN, FEATURES)
        self.frozen.requires_grad_(False)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.frozen(x))
        for block in self.layers:
            h = block(h)
        return self.head(h) * self.scale


def global_batch(micro_step: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + micro_step)
    x = torch.randn(world_size * PER_RANK_BATCH, FEATURES, generator=generator)
    return x, torch.sin(3 * x).flip(-1)


def rank_batch(micro_step: int, world: World, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the global batch (a single process takes all `world_size` slices)."""
    x, y = global_batch(micro_step, world_size)
    rows = slice(
        world.rank * PER_RANK_BATCH, world.rank * PER_RANK_BATCH + len(x) // world.world_size
    )
    return x[rows], y[rows]


def optimizer_factory(name: str) -> OptimizerFactory:
    def make(parameters) -> torch.optim.Optimizer:
        if name == "sgd":
            return torch.optim.SGD(parameters, LEARNING_RATE[name], momentum=0.9, weight_decay=0.01)
        return torch.optim.AdamW(parameters, lr=LEARNING_RATE[name], weight_decay=0.01)

    return make


def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))


@dataclass
class Run:
    backend: Backend
    model: nn.Module
    world_size: int  # of the data: a single-process reference sees every rank's rows
    accumulation: int
    step: int = 0
    grad_norms: list[float] = field(default_factory=list)  # before clipping, one per step

    def train(self, steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            total = torch.zeros(())
            for micro in range(self.accumulation):
                x, y = rank_batch(
                    self.step * self.accumulation + micro, self.backend.world, self.world_size
                )
                with self.backend.accumulate(sync=micro == self.accumulation - 1):
                    with self.backend.autocast():
                        loss = F.mse_loss(self.model(x.to(self.backend.world.device)).float(), y)
                    self.backend.backward(loss)
                total += loss.detach().cpu()
            self.grad_norms.append(self.backend.step())
            self.step += 1
            losses.append(float(self.backend.all_reduce_mean(total / self.accumulation)))
        return losses

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """Rank 0: the consolidated weights; other ranks take part and get None."""
        module = self.backend.unwrap()  # collective
        if not self.backend.world.is_main:
            return None
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def start(backend: Backend, optimizer: str, world_size: int, accumulation: int) -> Run:
    model = backend.prepare(Toy(), optimizer_factory(optimizer), make_scheduler)
    return Run(backend, model, world_size, accumulation)


def make_backend(name: str, world: World, options: BackendOptions) -> Backend:
    if name == "single":
        from dreambooth_trainer.parallel.single import SingleProcessBackend

        return SingleProcessBackend(world, options)
    if name == "ddp":
        from dreambooth_trainer.parallel.ddp import DDPBackend

        return DDPBackend(world, options)
    if name in ("zero2", "zero3"):
        from dreambooth_trainer.parallel.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(world, options, zero_stage=int(name[-1]))
    if name == "fsdp":
        from dreambooth_trainer.parallel.fsdp import FSDPBackend

        return FSDPBackend(world, options)
    raise ValueError(f"unknown backend {name}")


def options(precision: MixedPrecision, accumulation: int) -> BackendOptions:
    return BackendOptions(
        gradient_accumulation_steps=accumulation,
        max_grad_norm=MAX_GRAD_NORM,
        mixed_precision=precision,
        micro_batch_size=PER_RANK_BATCH,
    )


Handoff = Callable[[Backend, Backend], None]


@dataclass(frozen=True)
class Setup:
    """What a run trains with; `world_size` is that of the data (see `rank_batch`)."""

    backend: str
    world: World
    precision: MixedPrecision
    optimizer: str
    accumulation: int
    world_size: int

    def start(self) -> Run:
        backend = make_backend(self.backend, self.world, options(self.precision, self.accumulation))
        return start(backend, self.optimizer, self.world_size, self.accumulation)


def outcome(run: Run, losses: list[float], grad_norms: list[float]) -> dict[str, Any]:
    return {"losses": losses, "grad_norms": grad_norms, "weights": run.full_weights(),
            "backend": run.backend}  # fmt: skip


def straight(setup: Setup, steps: int) -> dict[str, Any]:
    run = setup.start()
    losses = run.train(steps)
    return outcome(run, losses, run.grad_norms)


def resumed(setup: Setup, steps: int, handoff: Handoff) -> dict[str, Any]:
    """Half the steps; `handoff` moves the state into a fresh backend; the other half there."""
    first = setup.start()
    losses = first.train(steps // 2)
    second = setup.start()
    handoff(first.backend, second.backend)
    second.step = first.step
    losses += second.train(steps - steps // 2)
    return outcome(second, losses, first.grad_norms + second.grad_norms)


def via_files(scratch: Path) -> Handoff:
    """save_to_dir into a directory per rank; each rank loads what it would download: the
    files of every rank's directory that it `needs_file`."""

    def handoff(old: Backend, new: Backend) -> None:
        rank = old.world.rank
        old.save_to_dir(scratch / f"saved-rank{rank}")
        old.world.barrier()
        load_dir = scratch / f"load-rank{rank}"
        for rank_dir in sorted(scratch.glob("saved-rank*")):
            for path in sorted(rank_dir.rglob("*")):
                rel = path.relative_to(rank_dir).as_posix()
                if path.is_file() and new.needs_file(rel):
                    (load_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, load_dir / rel)
        new.load_from_dir(load_dir)

    return handoff


def via_state_dict(old: Backend, new: Backend) -> None:
    new.load_state_dict(old.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--precisions", default="no")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    world = World.from_env()
    results: dict[str, Any] = {}
    backends = []  # kept alive to the end: none is freed while the group runs
    for precision in args.precisions.split(","):
        for optimizer in OPTIMIZERS:
            setup = Setup(
                args.backend, world, precision, optimizer, args.accumulation, world.world_size
            )
            scratch = args.out / f"scratch-{precision}-{optimizer}"
            runs = {
                "straight": straight(setup, args.steps),
                "via_files": resumed(setup, args.steps, via_files(scratch)),
                "via_state_dict": resumed(setup, args.steps, via_state_dict),
            }
            backends += [run.pop("backend") for run in runs.values()]
            results[precision, optimizer] = runs
    if world.is_main:
        torch.save(results, args.out / "result.pt")
    world.barrier()
    # As `dreambooth train` ends: freeing a dozen backends' gloo groups at teardown can abort
    # ("terminate called without an active exception", seen once in CI) or hang.
    exit_without_teardown(0)


if __name__ == "__main__":
    main()
