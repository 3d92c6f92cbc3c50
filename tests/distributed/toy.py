"""A toy model trained through any `Backend`, the same way in one process and under torchrun.

The global batch of micro-step m is drawn from a generator seeded with m and split by rank, so
a single process fed the whole global batch computes the same gradients as N ranks fed their
slices: the reference the parallel backends are compared against.

Run as a torchrun worker (``python -m tests.distributed.toy``) it trains, for each precision:
"straight" (all steps in one go) and twice half the steps, the state handed to a fresh backend,
the other half: "via_files" (save_to_dir / load_from_dir) and "via_state_dict". Rank 0 writes
every run's losses and consolidated weights to ``<out>/result.pt``.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dreambooth_trainer.cli import exit_without_teardown
from dreambooth_trainer.parallel.base import Backend, BackendOptions, MixedPrecision, World

FEATURES = 8
HIDDEN = 32
BLOCKS = 3
PER_RANK_BATCH = 2
LEARNING_RATE = 1e-2
MAX_GRAD_NORM = 0.5  # small enough that clipping happens: part of what is compared


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


def make_optimizer(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=0.01)


def make_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))


@dataclass
class Run:
    backend: Backend
    model: nn.Module
    world_size: int  # of the data: a single-process reference sees every rank's rows
    accumulation: int
    step: int = 0

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
            self.backend.step()
            self.step += 1
            losses.append(float(self.backend.all_reduce_mean(total / self.accumulation)))
        return losses

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """Rank 0: the consolidated weights; other ranks take part and get None."""
        module = self.backend.unwrap()  # collective
        if not self.backend.world.is_main:
            return None
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def start(backend: Backend, world_size: int, accumulation: int) -> Run:
    model = backend.prepare(Toy(), make_optimizer, make_scheduler)
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


def straight(name: str, world: World, precision: MixedPrecision, steps: int, accumulation: int,
             world_size: int) -> dict[str, Any]:  # fmt: skip
    run = start(
        make_backend(name, world, options(precision, accumulation)), world_size, accumulation
    )
    losses = run.train(steps)
    return {"losses": losses, "weights": run.full_weights(), "backend": run.backend}


def resumed(name: str, world: World, precision: MixedPrecision, steps: int, accumulation: int,
            handoff: Handoff) -> dict[str, Any]:  # fmt: skip
    """Half the steps; `handoff` moves the state into a fresh backend; the other half there."""
    first = start(
        make_backend(name, world, options(precision, accumulation)), world.world_size, accumulation
    )
    losses = first.train(steps // 2)
    second = start(
        make_backend(name, world, options(precision, accumulation)), world.world_size, accumulation
    )
    handoff(first.backend, second.backend)
    second.step = first.step
    losses += second.train(steps - steps // 2)
    return {"losses": losses, "weights": second.full_weights(), "backend": second.backend}


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
        scratch = args.out / f"scratch-{precision}"
        runs = {
            "straight": straight(
                args.backend, world, precision, args.steps, args.accumulation, world.world_size
            ),
            "via_files": resumed(
                args.backend, world, precision, args.steps, args.accumulation, via_files(scratch)
            ),
            "via_state_dict": resumed(
                args.backend, world, precision, args.steps, args.accumulation, via_state_dict
            ),
        }
        backends += [run.pop("backend") for run in runs.values()]
        results[precision] = runs
    if world.is_main:
        torch.save(results, args.out / "result.pt")
    world.barrier()
    # As `dreambooth train` ends: freeing nine backends' gloo groups at teardown can abort
    # ("terminate called without an active exception", seen once in CI) or hang.
    exit_without_teardown(0)


if __name__ == "__main__":
    main()
