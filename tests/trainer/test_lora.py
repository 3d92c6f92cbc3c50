"""LoRA training: only the adapter trains (fp32, on a frozen base), checkpoints hold only the
adapter and its optimizer state, and the saved adapter changes a plain diffusers pipeline."""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from dreambooth_trainer.methods.lora_files import LORA_WEIGHTS, sort_safetensors_header
from dreambooth_trainer.models import random_models
from dreambooth_trainer.parallel.single import STATE_FILE

from .test_train import instance_loss, trainer_for

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.trainer

LORA = {"method": "lora"}
NO_PRIORS = {"priorPreservation": {"enabled": False}}
OPTIONS = {
    # Prior preservation on (BASE_SPEC's default): class images condition the adapter too.
    "bf16+text-encoder+checkpointing+priors": {
        "mixedPrecision": "bf16",
        "trainTextEncoder": True,
        "gradientCheckpointing": True,
    },
    "8bit-adam+accumulation+no-latent-cache": {
        "use8bitAdam": True,
        "gradientAccumulationSteps": 2,
        "cacheLatents": False,
    },
}


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def parameters(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.trained_model.named_parameters()}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_only_the_adapter_trains_in_fp32_on_a_frozen_base(make_config, options):
    config = make_config({"training": {**LORA, "maxSteps": 3, **options}})
    trainer = trainer_for(config)
    model = trainer.trained_model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter(n) for n in trainable)
    components = {"unet", "text_encoder"} if options.get("trainTextEncoder") else {"unet"}
    assert {n.split(".")[0] for n in trainable} == components
    base_dtype = torch.bfloat16 if options.get("mixedPrecision") == "bf16" else torch.float32
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if name in trainable else base_dtype), name
    # Prompts stay token ids while the text encoder (its adapter) trains: no text cache.
    text_encoder_trains = "text_encoder" in components
    assert trainer.data.prompts.is_embedding is not text_encoder_trains
    before = parameters(trainer)
    text_before = copy.deepcopy(trainer.frozen.text_encoder.state_dict())

    trainer.fit()

    after = parameters(trainer)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable, f"frozen weights changed: {sorted(changed - trainable)[:5]}"
    assert {n.split(".")[0] for n in changed} == components
    assert all(after[n].dtype == torch.float32 for n in trainable)
    if not text_encoder_trains:
        text_after = trainer.frozen.text_encoder.state_dict()
        assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)


def test_loss_on_the_instance_images_falls(make_config):
    config = make_config({**NO_PRIORS, "training": {**LORA, "maxSteps": 60, "learningRate": 1e-2}})
    trainer = trainer_for(config)
    before = instance_loss(trainer)
    trainer.fit()
    after = instance_loss(trainer)
    assert after < 0.85 * before, (before, after)


def checkpoint(trainer, directory: Path) -> dict:
    trainer.backend.save_to_dir(directory)
    return torch.load(directory / STATE_FILE, weights_only=True)


def test_checkpoint_holds_the_adapter_and_its_optimizer_state_only(make_config, tmp_path: Path):
    training = {"maxSteps": 1, "trainTextEncoder": True}
    lora = trainer_for(make_config({**NO_PRIORS, "training": {**training, **LORA}}))
    lora.fit()
    state = checkpoint(lora, tmp_path / "lora")
    trainable = [n for n, p in lora.trained_model.named_parameters() if p.requires_grad]
    assert sorted(state["model"]) == sorted(trainable)  # no base weight, no VAE
    assert len(state["optimizer"]["state"]) == len(trainable)
    full = trainer_for(make_config({**NO_PRIORS, "training": training}))
    full.fit()
    checkpoint(full, tmp_path / "full")
    lora_bytes, full_bytes = ((tmp_path / m / STATE_FILE).stat().st_size for m in ("lora", "full"))
    assert lora_bytes < full_bytes / 10, (lora_bytes, full_bytes)

    # The base comes from the model, the adapter from the checkpoint: all of it, or nothing.
    fresh = trainer_for(make_config({**NO_PRIORS, "training": {**training, **LORA}}))
    fresh.backend.load_from_dir(tmp_path / "lora")
    assert all(torch.equal(parameters(fresh)[n], parameters(lora)[n]) for n in trainable)
    incomplete = copy.deepcopy(state)
    del incomplete["model"][trainable[-1]]
    with pytest.raises(KeyError, match="missing"):
        fresh.backend.load_state_dict(incomplete)


def generate(pipeline: StableDiffusionPipeline) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        "a photo of sks cube",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def test_saved_adapter_changes_a_plain_diffusers_pipeline(make_config, tmp_path: Path):
    config = make_config(
        {**NO_PRIORS, "training": {**LORA, "maxSteps": 2, "trainTextEncoder": True}}
    )
    trainer = trainer_for(config)
    trainer.fit()
    trainer.save_trained(tmp_path / "trained")
    assert (tmp_path / "trained" / LORA_WEIGHTS).is_file()

    base_dir = random_models.materialize(config.base_model.uri, config.model_cache_dir())
    pipeline = StableDiffusionPipeline.from_pretrained(base_dir)
    base_image = generate(pipeline)
    pipeline.load_lora_weights(tmp_path / "trained")
    assert set(pipeline.get_list_adapters()) == {"unet", "text_encoder"}
    assert not np.array_equal(generate(pipeline), base_image)


ADAPTER_IN_A_FRESH_PROCESS = """
import hashlib, sys, torch
from pathlib import Path
from dreambooth_trainer.models import random_models
from tests.support.lora import write_random_adapter
torch.manual_seed(0)
pipeline = random_models.build_pipeline(random_models.architecture_for("random://tiny-sd"))
path = write_random_adapter(pipeline, Path(sys.argv[1]))
print(hashlib.sha256(path.read_bytes()).hexdigest())
"""


def test_the_adapter_file_is_the_same_bytes_in_every_process(tmp_path: Path):
    """Written as it came, the same adapter got another sha256 (and artifact digest) per run:
    peft keeps target_modules as a set, whose order follows PYTHONHASHSEED, and safetensors
    writes its metadata map in a per-process order."""
    digests = set()
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        result = subprocess.run(
            [sys.executable, "-c", ADAPTER_IN_A_FRESH_PROCESS, str(out)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        digests.add(result.stdout.split()[-1])
        metadata = safe_open(out / LORA_WEIGHTS, "pt").metadata()["lora_adapter_metadata"]
        assert "/root" not in metadata and str(Path.home()) not in metadata
    assert len(digests) == 1, digests


def test_a_safetensors_header_is_rewritten_sorted_and_the_file_still_loads(tmp_path: Path):
    tensors = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata={"z": "1", "format": "pt", "m": "2"})
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    # Put the metadata's keys in reverse order by hand, as some process may have written them.
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items(), reverse=True))
    shuffled = json.dumps(header, separators=(",", ":")).encode().ljust(size, b" ")
    path.write_bytes(data[:8] + shuffled + data[8 + size :])

    sort_safetensors_header(path)

    rewritten = path.read_bytes()
    assert len(rewritten) == len(data) and rewritten[8 + size :] == data[8 + size :]
    keys = list(json.loads(rewritten[8 : 8 + size])["__metadata__"])
    assert keys == ["format", "m", "z"]
    with safe_open(path, "pt") as loaded:
        assert loaded.metadata() == {"z": "1", "format": "pt", "m": "2"}
        assert all(torch.equal(loaded.get_tensor(name), tensors[name]) for name in tensors)
