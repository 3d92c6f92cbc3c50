"""Step speed-ups (dreambooth_trainer.speedups): which ones a job gets where, and that each is
applied as decided. CUDA runs nowhere here: the decisions are pure functions of the device
(a `torch.device("cuda")` needs no GPU to exist), and what they apply is checked on the CPU."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from dreambooth_contract.api import TrainingSpec
from dreambooth_trainer import priors
from dreambooth_trainer.callbacks import StatusReport, StepMetrics
from dreambooth_trainer.metrics import TrainerMetrics
from dreambooth_trainer.optim import optimizer_factory
from dreambooth_trainer.parallel import World
from dreambooth_trainer.speedups import (
    Speedups,
    adamw_options,
    apply_matmul_precision,
    compile_seconds,
    prepare_unet,
    speedups_for,
)
from dreambooth_trainer.train import build_trainer

from .conftest import SUBJECT_DIR

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def training(**fields) -> TrainingSpec:
    return TrainingSpec.model_validate(fields)


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_on_cuda_a_job_gets_tf32_and_fused_adamw(backend: str):
    chosen = speedups_for(training(sharding={"backend": backend}), CUDA)
    assert chosen == Speedups(tf32=True, fused_adamw=True, channels_last=False, compile="off")


@pytest.mark.parametrize(
    "fields",
    [{"use8bitAdam": True, "sharding": {"backend": "ddp"}}, {"sharding": {"backend": "deepspeed"}}],
    ids=["8-bit-adamw", "deepspeed"],
)
def test_fused_adamw_is_left_to_8bit_adamw_and_deepspeed_themselves(fields: dict):
    chosen = speedups_for(training(**fields), CUDA)
    assert chosen.tf32 and not chosen.fused_adamw


def test_on_a_cpu_only_what_the_job_asks_for():
    assert speedups_for(training(sharding={"backend": "ddp"}), CPU) == Speedups()
    assert speedups_for(training(compile="regional"), CPU) == Speedups(compile="regional")


def test_fused_adamw_only_over_floating_point_parameters_of_one_device_kind():
    floats = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    assert adamw_options(floats, fused=True) == {"fused": True}
    assert adamw_options(floats, fused=False) == {}
    mixed = [*floats, nn.Parameter(torch.zeros(2, device="meta"))]
    assert adamw_options(mixed, fused=True) == {}
    integers = [*floats, nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)]
    assert adamw_options(integers, fused=True) == {}


@pytest.mark.parametrize("fused", [True, False])
def test_the_optimizer_factory_builds_the_fused_adamw_when_told(fused: bool):
    # torch has a fused AdamW for CPUs too, so the factory's choice shows here.
    parameters = (p for p in nn.Linear(2, 2).parameters())  # any iterable, a generator too
    optimizer = optimizer_factory(training(), fused=fused)(parameters)
    assert type(optimizer) is torch.optim.AdamW
    assert bool(optimizer.defaults["fused"]) is fused
    assert len(optimizer.param_groups[0]["params"]) == 2


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_tf32_is_set_for_cuda_and_a_cpu_is_left_alone(matmul_precision):
    torch.set_float32_matmul_precision("highest")
    apply_matmul_precision(Speedups(tf32=True), CPU)
    assert torch.get_float32_matmul_precision() == "highest"
    apply_matmul_precision(Speedups(tf32=True), CUDA)
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    apply_matmul_precision(Speedups(tf32=False), CUDA)  # the bench's baseline after a TF32 run
    assert torch.get_float32_matmul_precision() == "highest"


class FakeUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.compiled_with: list[dict] = []

    def compile_repeated_blocks(self, **kwargs) -> None:
        self.compiled_with.append(kwargs)


def test_regional_compile_goes_through_diffusers_and_channels_last_is_the_weights_layout():
    unet = FakeUNet()
    prepare_unet(unet, Speedups())
    assert unet.compiled_with == [] and unet.conv.weight.is_contiguous()
    prepare_unet(unet, Speedups(channels_last=True, compile="regional"))
    assert unet.compiled_with == [{"backend": "inductor"}]
    assert unet.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_compile_seconds_are_the_first_step_beyond_the_next_ones():
    assert compile_seconds(12.5, [0.5, 0.7]) == 12.0
    assert compile_seconds(0.4, [0.5]) == 0.0  # no compilation seen: nothing, not a negative


def test_rank_0s_report_says_what_compiling_cost(caplog):
    report = StatusReport(TrainerMetrics(), compiled=True)
    report.reporter = type("Quiet", (), {"report": lambda self, *a, **k: None})()
    with caplog.at_level(logging.INFO, logger="dreambooth_trainer.callbacks"):
        for step, seconds in enumerate([30.0, 2.0, 1.0], start=1):
            report.on_step_end(None, StepMetrics(step, 1.0, 1.0, 0.0, 1.0, 1e-4, 2, seconds))
    assert report.metrics.compile_seconds._value.get() == 28.0  # first step beyond the second
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile took about 28.0 s (first step 30.0 s, the next 2.00 s)"
    ]


@pytest.mark.trainer
def test_a_job_with_regional_compile_compiles_the_unets_blocks_in_place(make_config):
    """The API field reaches the UNet: every BasicTransformerBlock compiled (lazily: nothing
    is compiled before a step), and the weights keep their names for checkpoints and export."""
    config = make_config({"training": {"compile": "regional"}})
    trainer = build_trainer(config, SUBJECT_DIR, priors.run_priors(config), World())
    blocks = [m for m in trainer.model.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert not any("_orig_mod" in name for name in trainer.trained_model.state_dict())
    assert trainer.speedups.compile == "regional"


@pytest.mark.trainer
def test_compiled_blocks_train_as_the_plain_ones_do(make_config):
    """Regional compilation through dynamo (a backend that runs the traced graphs as they are:
    nothing is code-generated, so it is cheap here) with gradient checkpointing: dynamo traced
    the blocks, and the losses are the plain UNet's."""
    config = make_config({"training": {"gradientCheckpointing": True}})
    class_dir = priors.run_priors(config)
    graphs = []

    def as_traced(graph: torch.fx.GraphModule, inputs) -> object:
        graphs.append(graph)
        return graph.forward

    losses = {}
    plain = speedups_for(config.training, CPU)
    for name, speedups in {
        "plain": plain,
        "compiled": replace(plain, compile="regional", compile_backend=as_traced),
    }.items():
        trainer = build_trainer(config, SUBJECT_DIR, class_dir, World(), speedups=speedups)
        losses[name] = [trainer.train_step().loss for _ in range(3)]
    assert graphs  # the blocks went through torch.compile
    torch.testing.assert_close(losses["compiled"], losses["plain"])
