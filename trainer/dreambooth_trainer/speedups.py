"""What makes a step faster without changing what it computes beyond rounding: the decisions
(pure: `speedups_for`, `adamw_options`) and where they are applied (`apply_matmul_precision`,
`prepare_unet`).

- TF32 matmuls (CUDA): fp32 matmuls on tensor cores, inputs rounded to 10 mantissa bits and
  accumulated in fp32 (what PyTorch already does for cuDNN convolutions by default). Every
  precision we train in keeps fp32 master weights and optimizer state; under fp16/bf16 autocast
  the matmuls run in 16 bits anyway and TF32 reaches only the fp32 rest (the frozen encoders
  outside autocast, for one). So: on, on CUDA.
- Fused AdamW (CUDA): one kernel for the whole update instead of a few per tensor group. Not for
  bitsandbytes' 8-bit AdamW (its own kernels), and not under DeepSpeed, whose ZeRO optimizer
  swaps its own flat fp32 partitions into the optimizer (unmeasured with the fused kernel).
- channels_last: the UNet's weights in NHWC. Off until the GPU check shows it pays.
- Regional torch.compile (`training.compile: regional`, any device): diffusers'
  `compile_repeated_blocks` compiles each of the UNet's repeated transformer blocks on its own,
  in place (parameter names, state dicts and checkpoints stay as they are). Compilation happens
  at the first step; the trainer reports how long that step took beyond the next one. Not with
  DeepSpeed ZeRO-3 (the API refuses it: its parameter gathering makes every block recompile).

On a CPU `speedups_for` turns nothing on but what the job asks for (compile), so CPU runs are
unchanged. The bench passes its own `Speedups` to compare each one alone
(bench/step_variants.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dreambooth_contract.api import CompileMode, ShardingBackend, TrainingSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Speedups:
    tf32: bool = False
    fused_adamw: bool = False
    channels_last: bool = False
    compile: CompileMode = "off"
    # torch.compile's backend: inductor generates kernels; the bench's CPU smoke run uses
    # "eager" (dynamo traces the blocks, nothing is code-generated) to test the path cheaply.
    compile_backend: str | Callable[..., Any] = "inductor"


def speedups_for(training: TrainingSpec, device: torch.device) -> Speedups:
    """What a job gets on `device`: TF32 and fused AdamW on CUDA (see the module's docstring),
    compile as the job says."""
    cuda = device.type == "cuda"
    deepspeed = training.sharding.backend == ShardingBackend.deepspeed.value
    return Speedups(
        tf32=cuda,
        fused_adamw=cuda and not training.use_8bit_adam and not deepspeed,
        compile=training.compile,
    )


def adamw_options(parameters: list[nn.Parameter], fused: bool) -> dict[str, Any]:
    """torch.optim.AdamW's `fused` argument: asked for, and every parameter a floating-point
    tensor on one device type (what the fused kernel takes)."""
    kinds = {p.device.type for p in parameters}
    if fused and len(kinds) == 1 and all(p.is_floating_point() for p in parameters):
        return {"fused": True}
    return {}


def apply_matmul_precision(speedups: Speedups, device: torch.device) -> None:
    """On CUDA: TF32 for fp32 matmuls, or full fp32 (PyTorch's default); process-wide.

    Through `set_float32_matmul_precision`, which keeps torch's legacy and new TF32 flags in
    agreement (setting one of them alone makes reads of the other raise). On a CPU nothing is
    set: "high" there would let oneDNN round fp32 matmuls too."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if speedups.tf32 else "highest")


def prepare_unet(unet: nn.Module, speedups: Speedups) -> None:
    """channels_last weights and regional compilation, in place, before the backend wraps the
    model."""
    if speedups.channels_last:
        unet.to(memory_format=torch.channels_last)
    if speedups.compile == "regional":
        # diffusers' regional compilation: torch.compile on each module of the classes the
        # model lists in `_repeated_blocks` (the UNet's BasicTransformerBlock).
        unet.compile_repeated_blocks(backend=speedups.compile_backend)
        log.info("regional torch.compile (%s) of the UNet's repeated blocks: compiled at the "
                 "first step", speedups.compile_backend)  # fmt: skip


def compile_seconds(first_step: float, later_steps: Iterable[float]) -> float:
    """What compiling added to the first step: its time beyond the fastest of the next ones."""
    return max(0.0, first_step - min(later_steps))
