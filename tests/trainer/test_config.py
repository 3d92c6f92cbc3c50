"""TrainerConfig: the one mapping from a DreamBoothJob, and its wire format."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from dreambooth_contract.api import DreamBoothJobSpec
from dreambooth_contract.priors_key import cache_key, generation_params
from dreambooth_contract.trainer_config import TrainerConfig, sibling_uri

from .conftest import REPO, make_job, merged

pytestmark = pytest.mark.trainer

# Every spec section either reaches the trainer or is the operator's alone (pods, serving,
# restarts): a new section fails test_every_spec_section_is_decided until someone decides.
CARRIED_SECTIONS = {
    "base_model", "instance", "prior_preservation", "training", "evaluation", "export", "tracking"
}  # fmt: skip
# Carried without these: the pods get the Secret's value as a variable, the config must not
# name where it lies.
WITHHELD_FIELDS = {"tracking.wandb.api_key_secret"}
OPERATOR_SECTIONS = {"resources", "storage", "inference", "run_policy"}
# Lists of models, carried item by item (instead of instance: checked with SUBJECTS below).
CARRIED_LISTS = {"subjects"}

# A job whose every trainer-relevant field differs from its default, so that a field dropped
# on the way cannot pass unnoticed.
FULL_SPEC: dict[str, Any] = {
    "baseModel": {"uri": "org/model", "revision": "v2", "variant": "fp16", "vaeUri": "org/vae"},
    "instance": {
        "imagesUri": "s3://bucket/subject",
        "prompt": "a photo of zwx toy",
        "captions": "replace",
    },
    "priorPreservation": {
        "enabled": False,
        "classPrompt": "a photo of toy",
        "numClassImages": 321,
        "classImagesUri": "s3://bucket/regularization/toys",
        "lossWeight": 0.5,
        "generation": {
            "steps": 33,
            "guidanceScale": 6.5,
            "seed": 7,
            "batchSize": 8,
            "negativePrompt": "blurry",
        },
    },
    "training": {
        "method": "lora",
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.1, "targetModules": ["to_q", "to_v"]},
        "trainTextEncoder": True,
        "maxSteps": 1234,
        "learningRate": 3e-6,
        "lrScheduler": "cosine",
        "lrWarmupSteps": 50,
        "batchSize": 2,
        "gradientAccumulationSteps": 3,
        "resolution": 768,
        "centerCrop": True,
        "randomFlip": True,
        "mixedPrecision": "bf16",
        # ZeRO-2 set explicitly (the default is unset, then 2): regional compile refuses ZeRO-3.
        "sharding": {"backend": "deepspeed", "zeroStage": 2},
        "gradientCheckpointing": False,
        "seed": 42,
        "maxGradNorm": 0.5,
        "use8bitAdam": True,
        "offsetNoise": 0.1,
        "snrGamma": 5.0,
        "cacheLatents": False,
        "cacheTextEmbeddings": False,
        "compile": "regional",
        "checkpointing": {"interval": 25, "keep": 5},
        "validation": {
            "prompts": ["a photo of zwx toy on the moon"],
            "interval": 77,
            "numInferenceSteps": 12,
            "guidanceScale": 4.0,
            "seed": 9,
        },
    },
    "export": {"fuse": True},  # training.method is lora above
    "tracking": {
        "wandb": {
            "project": "dreambooth",
            "entity": "team",
            "runName": "run-1",
            "apiKeySecret": {"name": "wandb", "key": "api-key"},
        }
    },
    "evaluation": {
        "enabled": False,
        "prompts": ["a photo of zwx toy in a garden"],
        "imagesPerPrompt": 3,
        "steps": 20,
        "guidanceScale": 6.0,
        "seed": 5,
        "clipUri": "s3://bucket/encoders/clip",
        "dinoUri": "org/dino",
    },
    "resources": {"nodes": 2, "gpusPerNode": 4, "processesPerNode": 4},
    "storage": {
        "outputUri": "s3://bucket/jobs/run-1",
        "s3": {
            "endpoint": "http://minio:9000",
            "region": "eu-west-1",
            "credentialsSecret": {"name": "s3-creds"},
        },
    },
}
# Not the default, yet only one value is allowed today; or a field whose other value
# contradicts another one's here (checked by a spec of its own below).
SINGLE_VALUE_FIELDS = {"training.sharding.backend", "training.crop_each_step"}


def leaves(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted field path -> value, for every field of `model` and its sub-models."""
    found: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            found.update(leaves(value, path + "."))
        else:
            found[path] = value
    return found


def default_leaves(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            defaults.update(default_leaves(value, path + "."))
        elif not info.is_required():
            defaults[path] = info.get_default(call_default_factory=True)
    return defaults


def test_every_spec_section_is_decided():
    assert set(DreamBoothJobSpec.model_fields) == (
        CARRIED_SECTIONS | CARRIED_LISTS | OPERATOR_SECTIONS
    )


def test_the_full_job_sets_every_field_to_a_non_default():
    spec = make_job(FULL_SPEC).spec
    for section in CARRIED_SECTIONS:
        model = getattr(spec, section)
        defaults = default_leaves(model, section + ".")
        same = [
            path
            for path, value in leaves(model, section + ".").items()
            if path in defaults and value == defaults[path] and path not in SINGLE_VALUE_FIELDS
        ]
        assert not same, f"give these fields non-default values in FULL_SPEC: {same}"


def test_from_job_carries_every_field_of_the_carried_sections():
    job = make_job(FULL_SPEC)
    config = TrainerConfig.from_job(job)
    for section in CARRIED_SECTIONS:
        expected = leaves(getattr(job.spec, section), section + ".")
        actual = leaves(getattr(config, section), section + ".")
        for withheld in WITHHELD_FIELDS:
            given = [path for path in expected if path.startswith(withheld)]
            if given:  # the spec sets it; the config leaves it out
                assert actual.pop(withheld) is None, withheld
                for path in given:
                    del expected[path]
        assert actual == expected, section


# FULL_SPEC with several subjects, every field of each not its default.
SUBJECTS = [
    {
        "imagesUri": f"s3://bucket/subject-{i}",
        "prompt": f"a photo of {token} toy",
        "captions": "replace",
        "name": f"toy-{i}",
        "classPrompt": "a photo of toy",
        "classImagesUri": "s3://bucket/regularization/toys",
    }
    for i, token in enumerate(("zwx", "qyx"))
]


def test_from_job_carries_every_field_of_every_subject():
    spec = {key: value for key, value in FULL_SPEC.items() if key != "instance"}
    priors = {**FULL_SPEC["priorPreservation"], "classPrompt": None, "classImagesUri": None}
    job = make_job({**spec, "priorPreservation": priors, "subjects": SUBJECTS})
    for subject in job.spec.subjects:
        defaults = default_leaves(subject)
        assert not [p for p, value in leaves(subject).items() if value == defaults.get(p, ...)]
    config = TrainerConfig.from_job(job)
    assert [leaves(s) for s in config.subjects] == [leaves(s) for s in job.spec.subjects]
    # The phases that read one subject read the first.
    assert config.instance.prompt == SUBJECTS[0]["prompt"]
    assert config.prior_preservation.class_prompt == SUBJECTS[0]["classPrompt"]


def test_crop_each_step_reaches_the_trainer():
    training = {**FULL_SPEC["training"], "centerCrop": False, "cropEachStep": True}
    config = TrainerConfig.from_job(make_job({**FULL_SPEC, "training": training}))
    assert config.training.crop_each_step


def test_from_job_resolves_runtime_values():
    job = make_job(FULL_SPEC)
    config = TrainerConfig.from_job(job)
    assert config.job_name == job.metadata.name
    assert (config.nodes, config.processes_per_node, config.gpus_per_node) == (2, 4, 4)
    assert config.world_size == 8
    assert config.output_uri == "s3://bucket/jobs/run-1"
    assert config.prior_cache_uri == "s3://bucket/jobs/priors"  # <outputUri>/../priors
    assert (config.s3.endpoint, config.s3.region) == ("http://minio:9000", "eu-west-1")
    assert config.s3.credentials_secret is None  # pods get credentials from env only
    assert "s3-creds" not in config.to_json()


def test_effective_learning_rate_is_resolved():
    spec = merged(FULL_SPEC, {"training": {"learningRate": None}})
    assert TrainerConfig.from_job(make_job(spec)).training.learning_rate == 1e-4  # lora
    spec["training"].update(method="full", lora=None, trainTextEncoder=True)
    spec["export"]["fuse"] = False  # LoRA only
    config = TrainerConfig.from_job(make_job(spec))
    assert config.training.learning_rate == 2e-6
    spec["training"]["trainTextEncoder"] = False
    assert TrainerConfig.from_job(make_job(spec)).training.learning_rate == 5e-6


def test_processes_default_to_gpus():
    spec = merged(FULL_SPEC, {"resources": {"processesPerNode": None}})
    assert TrainerConfig.from_job(make_job(spec)).processes_per_node == 4


def test_wire_format_round_trips():
    config = TrainerConfig.from_job(make_job(FULL_SPEC))
    assert TrainerConfig.model_validate_json(config.to_json()) == config
    assert TrainerConfig.model_validate_json(config.model_dump_json()) == config  # snake_case
    assert '"use8bitAdam": true' in config.to_json()  # camelCase like the CR


def test_relative_paths_resolve_against_base_dir(tmp_path: Path):
    spec = merged(
        FULL_SPEC,
        {
            "baseModel": {"uri": "./models/sd", "variant": None, "vaeUri": "./models/vae"},
            "instance": {"imagesUri": "photos"},
            "evaluation": {"clipUri": "./encoders/clip", "dinoUri": "../dino"},
            "storage": {"outputUri": "out/run", "s3": {}},
        },
    )
    config = TrainerConfig.from_job(make_job(spec), base_dir=tmp_path)
    assert config.evaluation.clip_uri == str(tmp_path / "encoders" / "clip")
    assert config.evaluation.dino_uri == str(tmp_path.parent / "dino")
    assert config.base_model.uri == str(tmp_path / "models" / "sd")
    assert config.base_model.vae_uri == str(tmp_path / "models" / "vae")
    assert config.instance.images_uri == str(tmp_path / "photos")
    assert config.output_uri == str(tmp_path / "out" / "run")
    assert config.prior_cache_uri == str(tmp_path / "out" / "priors")


def test_hub_ids_and_remote_uris_stay_as_written(tmp_path: Path):
    config = TrainerConfig.from_job(make_job(FULL_SPEC), base_dir=tmp_path)
    assert config.base_model.uri == "org/model"
    assert config.instance.images_uri == "s3://bucket/subject"
    assert (config.evaluation.clip_uri, config.evaluation.dino_uri) == (
        "s3://bucket/encoders/clip",
        "org/dino",
    )


def test_sibling_uri():
    assert sibling_uri("s3://b/jobs/a/", "priors") == "s3://b/jobs/priors"
    assert sibling_uri("/data/out", "priors") == "/data/priors"


# -- the class-image cache key -----------------------------------------------------------------------


def key_for(overrides: dict[str, Any]) -> str:
    spec = make_job(merged(FULL_SPEC, overrides)).spec
    return cache_key(spec.base_model, spec.prior_preservation, spec.training.resolution)


def test_cache_key_is_stable_and_content_addressed():
    key = key_for({})
    assert key == key_for({}) and len(key) == 32
    changes = [
        {"baseModel": {"uri": "org/other"}},
        {"baseModel": {"revision": "v3"}},
        {"baseModel": {"vaeUri": "org/other-vae"}},  # it decodes the class images
        {"priorPreservation": {"classPrompt": "a photo of doll"}},
        {"priorPreservation": {"numClassImages": 322}},
        {"priorPreservation": {"generation": {"steps": 34}}},
        {"priorPreservation": {"generation": {"guidanceScale": 7.0}}},
        {"priorPreservation": {"generation": {"seed": 8}}},
        {"priorPreservation": {"generation": {"negativePrompt": None}}},
        {"training": {"resolution": 512}},
    ]
    keys = {key_for(change) for change in changes}
    assert key not in keys and len(keys) == len(changes)


def test_cache_key_ignores_what_does_not_change_pixels():
    assert key_for({"priorPreservation": {"generation": {"batchSize": 1}}}) == key_for({})
    assert key_for({"training": {"maxSteps": 99}, "storage": {"outputUri": "/x"}}) == key_for({})


def test_jobs_without_a_vae_override_keep_their_cache_keys():
    """vaeUri came later: unset, it is not in the key's parameters at all, so class-image sets
    generated before it keep their keys."""
    spec = make_job(merged(FULL_SPEC, {"baseModel": {"vaeUri": None}})).spec
    params = generation_params(spec.base_model, spec.prior_preservation, 512)
    assert "vae" not in params


def test_operator_can_compute_the_key_and_config_without_torch():
    code = (
        "import sys; import dreambooth_contract.priors_key, dreambooth_contract.trainer_config; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
