"""A LoRA job's export: the adapter in diffusers' and kohya's formats, the base it belongs to,
optionally the fused pipeline; each loads where users load them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from dreambooth_contract.api import BaseModelSpec
from dreambooth_contract.layout import EXPORT_DIR, PIPELINE_DIR, TRAINED_DIR
from dreambooth_trainer.digest import MANIFEST, verify
from dreambooth_trainer.export import SINGLE_FILE, run_export
from dreambooth_trainer.methods.lora_export import KOHYA_WEIGHTS
from dreambooth_trainer.methods.lora_files import LORA_WEIGHTS
from dreambooth_trainer.models import base_identity, random_models
from tests.support.lora import ALPHA, write_random_adapter

pytestmark = pytest.mark.trainer

PROMPT = "a photo of sks cube"


def image(pipeline: StableDiffusionPipeline) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipeline(
        PROMPT, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    ).images[0]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The tiny random model as a local directory: a base that is files we read."""
    cache = tmp_path_factory.mktemp("lora-base-cache")
    source = random_models.materialize("random://tiny-sd", cache)
    return Path(shutil.copytree(source, tmp_path_factory.mktemp("lora-base") / "tiny-sd"))


@pytest.fixture
def lora_job(make_config, base_dir):
    """(config, expected image, the adapted pipeline): a LoRA job whose training wrote a
    random adapter."""

    def make(export: dict | None = None):
        config = make_config(
            {
                "baseModel": {"uri": str(base_dir)},
                "training": {"method": "lora", "trainTextEncoder": True},
                "export": export or {},
            }
        )
        pipeline = StableDiffusionPipeline.from_pretrained(base_dir)
        write_random_adapter(pipeline, Path(config.output(TRAINED_DIR)))
        return config, image(pipeline), pipeline

    return make


def test_export_holds_the_adapter_both_formats_and_the_base_it_belongs_to(lora_job, base_dir):
    config, _, _ = lora_job()
    result = run_export(config)
    files = {p.name for p in result.directory.iterdir()}
    assert files == {LORA_WEIGHTS, KOHYA_WEIGHTS, base_identity.BASE_MODEL_FILE, MANIFEST}
    trained = Path(config.output(TRAINED_DIR)) / LORA_WEIGHTS
    assert (result.directory / LORA_WEIGHTS).read_bytes() == trained.read_bytes()

    manifest = json.loads((result.directory / MANIFEST).read_text())
    assert manifest["kind"] == "lora"
    record = manifest["baseModel"]
    assert record == base_identity.read_record(result.directory)
    assert (record["uri"], record["revision"], record["source"]) == (str(base_dir), None, "files")
    assert record["filesDigest"] == base_identity.files_digest(base_dir)
    assert result.digest == manifest["digest"] == verify(result.directory)
    status = result.status()
    assert (status.kind, status.base_model, status.digest) == ("lora", str(base_dir), result.digest)


def test_a_random_base_is_recorded_as_built_in_code(tmp_path):
    spec = BaseModelSpec(uri="random://tiny-sd")
    source = str(random_models.materialize(spec.uri, tmp_path))
    record = base_identity.base_model_record(spec, source)
    assert record == {
        "uri": "random://tiny-sd",
        "revision": None,
        "variant": None,
        "source": "builtInCode",
    }


def test_kohya_file_records_the_adapters_alpha_not_its_rank(lora_job):
    config, _, _ = lora_job()
    result = run_export(config)
    with safe_open(result.directory / KOHYA_WEIGHTS, "pt") as weights:
        keys = list(weights.keys())
        alphas = {weights.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        assert weights.metadata()["ss_network_alpha"] == str(ALPHA)
    assert alphas == {ALPHA}
    assert any(k.startswith("lora_unet_") for k in keys)
    # kohya's name for the one text encoder of SD1/SD2, in the original CLIP module layout.
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)


# The start of every script run in a fresh process with diffusers alone (nothing of ours):
# PIPELINE stands for the pipeline class (fresh_script).
FRESH_PRELUDE = """
import sys
import numpy as np
import torch
from diffusers import PIPELINE

# One thread, as in the test process (conftest): the same summation order, the same pixels.
torch.set_num_threads(1)

def image(pipeline):
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipeline(prompt, num_inference_steps=2, height=64, width=64, generator=generator,
                    output_type="np").images[0]
"""


def fresh_script(body: str, pipeline_class: str = "StableDiffusionPipeline") -> str:
    script = (
        FRESH_PRELUDE
        + body
        + """
assert not [m for m in sys.modules if m.startswith("dreambooth")]
"""
    )
    return script.replace("PIPELINE", pipeline_class)


# What a user with diffusers alone does with the base and the export.
FRESH_LORA_BODY = """
prompt, base, export, kohya, out = sys.argv[1:]
plain = PIPELINE.from_pretrained(base)
before = image(plain)
plain.load_lora_weights(export)
diffusers_format = image(plain)
other = PIPELINE.from_pretrained(base)
other.load_lora_weights(export, weight_name=kohya)
kohya_format = image(other)
np.savez(out, before=before, diffusers_format=diffusers_format, kohya_format=kohya_format)
"""
FRESH_PROCESS = fresh_script(FRESH_LORA_BODY)


def test_a_fresh_diffusers_process_loads_both_files_and_gets_the_adapters_image(
    lora_job, base_dir, tmp_path
):
    config, expected, _ = lora_job()
    result = run_export(config)
    out = tmp_path / "images.npz"
    subprocess.run(
        # -I: no PYTHONPATH, so none of this project's code is importable by accident.
        [sys.executable, "-I", "-c", FRESH_PROCESS, PROMPT, str(base_dir), str(result.directory)]
        + [KOHYA_WEIGHTS, str(out)],
        check=True,
        timeout=600,
    )
    images = np.load(out)
    # The adapter changes the image, into exactly the one the adapted pipeline made.
    assert np.abs(images["diffusers_format"] - images["before"]).max() > 0.05
    np.testing.assert_array_equal(images["diffusers_format"], expected)
    # The kohya file holds the same weights and scale: the same image.
    np.testing.assert_array_equal(images["kohya_format"], images["diffusers_format"])


def merged_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """W + (alpha / r) B A of each adapted layer, computed by hand, by the layer's weight name."""
    merged = {}
    for name, layer in module.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            merged[f"{name}.weight"] = layer.base_layer.weight + delta * layer.scaling["default"]
    return merged


def test_fused_export_is_a_full_pipeline_with_the_adapter_merged_in(lora_job, base_dir):
    config, _, adapted = lora_job({"fuse": True})
    result = run_export(config)
    assert (result.directory / PIPELINE_DIR / "model_index.json").is_file()
    assert (result.directory / SINGLE_FILE).is_file()
    assert (result.directory / LORA_WEIGHTS).is_file()  # the adapter is still there
    assert verify(result.directory) == result.digest
    fused = StableDiffusionPipeline.from_pretrained(result.directory / PIPELINE_DIR)
    assert not getattr(fused.unet, "peft_config", None)  # plain weights, no adapter layers
    for name in ("unet", "text_encoder"):
        expected = merged_weights(getattr(adapted, name))
        weights = getattr(fused, name).state_dict()
        assert expected
        for key, tensor in expected.items():
            # The same sum, perhaps in another order: float32 rounding only.
            torch.testing.assert_close(weights[key], tensor, rtol=1e-5, atol=1e-6)
    plain = StableDiffusionPipeline.from_pretrained(base_dir)
    assert np.abs(image(fused) - image(plain)).max() > 0.05


def test_export_of_a_lora_job_needs_its_adapter(make_config):
    config = make_config({"training": {"method": "lora"}})
    with pytest.raises(FileNotFoundError, match="no LoRA adapter; train first"):
        run_export(config)


def test_final_samples_of_a_local_run_come_from_the_base_with_the_exported_adapter(
    lora_job, tmp_path
):
    from dreambooth_trainer.export import load_exported
    from dreambooth_trainer.local import render_final_samples

    config, expected, _ = lora_job()
    run_export(config)
    output = Path(config.output_uri)
    np.testing.assert_array_equal(image(load_exported(config, output / EXPORT_DIR)), expected)
    assert render_final_samples(config, output).is_file()
