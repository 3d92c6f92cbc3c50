"""The pieces of the sharded backends that need no process group."""

from __future__ import annotations

import pytest
import torch

from dreambooth_trainer.parallel.base import BackendOptions, apply_update
from dreambooth_trainer.parallel.full_weights import FullWeights
from dreambooth_trainer.parallel.trainable import load_trainable_state, trainable_state

from . import toy


def test_full_weights_skeleton_costs_no_memory_for_trainable_parameters():
    model = toy.Toy()
    full = FullWeights(model)
    for name, param in full.skeleton.named_parameters():
        expected = "meta" if name in full.trainable else "cpu"
        assert param.device.type == expected, name
    assert "frozen.weight" not in full.trainable


def test_full_weights_load_assigns_weights_and_live_buffers():
    model = toy.Toy()
    full = FullWeights(model)
    model.scale.fill_(2.0)  # a buffer that changed during training
    trainable = {n: p.detach() + 1 for n, p in model.named_parameters() if p.requires_grad}
    loaded = full.load(trainable, model)
    assert loaded is full.skeleton
    for name, tensor in trainable.items():
        assert torch.equal(loaded.get_parameter(name), tensor)
    assert torch.equal(loaded.frozen.weight, model.frozen.weight)
    assert float(loaded.scale) == 2.0
    assert loaded(torch.zeros(1, toy.FEATURES)).shape == (1, toy.FEATURES)


def test_full_weights_refuses_incomplete_weights():
    model = toy.Toy()
    full = FullWeights(model)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    trainable.pop("head.bias")
    with pytest.raises(KeyError, match="head.bias"):
        full.load(trainable, model)
    assert full.load(None, model) is full.skeleton  # other ranks: structure only


def test_trainable_state_leaves_out_frozen_parameters_only():
    state = trainable_state(toy.Toy())
    assert "frozen.weight" not in state and "frozen.bias" not in state
    assert "scale" in state  # buffers may change in training
    assert state.keys() == toy.Toy().state_dict().keys() - {"frozen.weight", "frozen.bias"}


def test_trainable_state_loads_into_a_model_with_its_own_frozen_weights():
    trained, fresh = toy.Toy(seed=1), toy.Toy(seed=2)
    load_trainable_state(fresh, trainable_state(trained))
    assert torch.equal(fresh.head.weight, trained.head.weight)
    assert torch.equal(fresh.frozen.weight, toy.Toy(seed=2).frozen.weight)  # not overwritten


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_trainable_state_load_is_strict_about_everything_but_frozen_weights(change):
    state = trainable_state(toy.Toy())
    if change == "missing":
        del state["head.bias"]
    else:
        state["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=change):
        load_trainable_state(toy.Toy(), state)


def test_fsdp_units_are_unet_blocks_and_text_encoder_layers():
    from dreambooth_trainer.models.random_models import TINY_SD, build_pipeline
    from dreambooth_trainer.parallel.fsdp import is_block, shard_units

    pipeline = build_pipeline(TINY_SD)
    model = torch.nn.ModuleDict({"unet": pipeline.unet, "text_encoder": pipeline.text_encoder})
    names = {id(m): n for n, m in model.named_modules()}
    units = [names[id(m)] for m in shard_units(model, is_block)]
    unet_units = sorted(u for u in units if u.startswith("unet."))
    assert unet_units == [
        "unet.down_blocks.0",
        "unet.down_blocks.1",
        "unet.mid_block",
        "unet.up_blocks.0",
        "unet.up_blocks.1",
    ]
    # transformers moved CLIP's encoder (text_model.encoder -> encoder); match either.
    encoder_units = sorted(u for u in units if u.startswith("text_encoder."))
    assert [u.rsplit("encoder.", 1)[1] for u in encoder_units] == ["layers.0", "layers.1"]


@pytest.mark.parametrize(
    ("path", "rank", "reads"),
    [
        ("zero/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 1, True),
        ("zero/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 0, False),
        ("zero/zero_pp_rank_0_mp_rank_00_model_states.pt", 0, True),
        ("zero/zero_pp_rank_10_mp_rank_00_model_states.pt", 1, False),
        ("zero/mp_rank_00_model_states.pt", 1, True),  # ZeRO-2: written by rank 0, read by all
    ],
)
def test_deepspeed_rank_reads_own_shards_and_shared_files(path, rank, reads):
    from dreambooth_trainer.parallel.deepspeed import rank_reads

    assert rank_reads(path, rank) is reads


def test_deepspeed_config_follows_options():
    from dreambooth_trainer.parallel.deepspeed import deepspeed_config

    options = BackendOptions(
        gradient_accumulation_steps=4, max_grad_norm=None, mixed_precision="fp16"
    )
    config = deepspeed_config(options, zero_stage=3, on_gpu=True)
    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.0  # no clipping
    assert config["fp16"]["enabled"] and config["fp16"]["loss_scale"] == 0  # dynamic scaling
    assert not config["bf16"]["enabled"]
    assert config["zero_optimization"]["stage"] == 3
    bf16 = deepspeed_config(BackendOptions(mixed_precision="bf16"), zero_stage=2, on_gpu=False)
    assert bf16["bf16"]["enabled"] and not bf16["fp16"]["enabled"]
    assert not bf16["zero_optimization"]["overlap_comm"]


def test_a_step_the_loss_scaler_skips_leaves_the_learning_rate_schedule_alone():
    """fp16 overflow: no optimizer step, the scale halves, and warm-up does not advance."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step + 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(weight.sum()).backward()
    weight.grad[0] = float("inf")
    apply_update(optimizer, schedule, scaler)
    assert torch.equal(weight.detach(), torch.ones(2)) and schedule.last_epoch == 0
    assert scaler.get_scale() == 512.0
    scaler.scale(weight.sum()).backward()
    apply_update(optimizer, schedule, scaler)
    assert schedule.last_epoch == 1 and not torch.equal(weight.detach(), torch.ones(2))
