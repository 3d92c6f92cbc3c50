"""Offline validation: each bad spec fails with the exact message a user would see."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from dreambooth_contract import api
from dreambooth_contract.validation import JobInvalid, load_jobs, parse_job
from dreambooth_operator.cli import main
from dreambooth_operator.crd import crd

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

MINIMAL = {
    "apiVersion": "dreambooth.dev/v1alpha1",
    "kind": "DreamBoothJob",
    "metadata": {"name": "dog"},
    "spec": {
        "baseModel": {"uri": "runwayml/stable-diffusion-v1-5"},
        "instance": {"imagesUri": "s3://data/dog/", "prompt": "a photo of sks dog"},
        "priorPreservation": {"classPrompt": "a photo of dog"},
        "storage": {"outputUri": "s3://runs/dog"},
    },
}

DOT_SEGMENT_RULE = (
    "'.' and '..' path segments are not allowed in s3:// URIs (object storage has no parent "
    "directories; the trainer's storage refuses them)"
)
RESOURCE_NAME_RULE = (
    "not a resource name the API server accepts for containers; allowed: cpu, memory, "
    "ephemeral-storage, hugepages-<size> (e.g. hugepages-2Mi), or an extended resource "
    "<domain>/<name> (e.g. nvidia.com/gpu)"
)

REMOVE = object()
NAME_RULE = (
    "must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter, "
    "ending with a letter or digit) of at most 40 characters, so that child names (Services "
    "among them) are valid"
)


def spec_with(**changes: object) -> dict:
    """MINIMAL with dotted paths set (or removed with REMOVE)."""
    document = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = document
        for key in parents:
            node = node.setdefault(key, {})
        if value is REMOVE:
            node.pop(leaf)
        else:
            node[leaf] = value
    return document


BAD_SPECS = [
    # (id, document, the line it must produce)
    (
        "wrong-api-version",
        spec_with(apiVersion="v1"),
        "apiVersion: Input should be 'dreambooth.dev/v1alpha1' (got 'v1')",
    ),
    ("wrong-kind", spec_with(kind="Job"), "kind: Input should be 'DreamBoothJob' (got 'Job')"),
    (
        "name-uppercase",
        spec_with(metadata__name="Dog"),
        f"metadata.name: {NAME_RULE} (got 'Dog')",
    ),
    (
        "name-starts-with-a-digit",
        spec_with(metadata__name="2024-dog"),
        f"metadata.name: {NAME_RULE} (got '2024-dog')",
    ),
    (
        "name-too-long",
        spec_with(metadata__name="d" * 41),
        f"metadata.name: {NAME_RULE} (got '{'d' * 41}')",
    ),
    ("no-spec", spec_with(spec=REMOVE), "spec: required field is missing"),
    (
        "no-base-model",
        spec_with(spec__baseModel=REMOVE),
        "spec.baseModel: required field is missing",
    ),
    (
        "base-model-uri-bad",
        spec_with(spec__baseModel__uri="ftp://x"),
        f"spec.baseModel.uri: String should match pattern '{api.MODEL_URI}' (got 'ftp://x')",
    ),
    (
        "unknown-random-model",
        spec_with(spec__baseModel__uri="random://big"),
        f"spec.baseModel.uri: String should match pattern '{api.MODEL_URI}' (got 'random://big')",
    ),
    (
        "base-model-uri-dot-dot",
        spec_with(spec__baseModel__uri="s3://models/sd15/../sd21"),
        f"spec.baseModel.uri: {DOT_SEGMENT_RULE} (got 's3://models/sd15/../sd21')",
    ),
    (
        "images-uri-dot-dot",
        spec_with(spec__instance__imagesUri="s3://data/dog/../cat/"),
        f"spec.instance.imagesUri: {DOT_SEGMENT_RULE} (got 's3://data/dog/../cat/')",
    ),
    (
        "images-uri-other-scheme",
        spec_with(spec__instance__imagesUri="gs://data/dog/"),
        f"spec.instance.imagesUri: String should match pattern '{api.DATA_URI}' "
        "(got 'gs://data/dog/')",
    ),
    (
        "output-uri-ends-in-dot-dot",
        spec_with(spec__storage__outputUri="s3://runs/dog/.."),
        f"spec.storage.outputUri: {DOT_SEGMENT_RULE} (got 's3://runs/dog/..')",
    ),
    (
        "prior-cache-uri-dot",
        spec_with(spec__storage__priorCacheUri="s3://runs/./priors"),
        f"spec.storage.priorCacheUri: {DOT_SEGMENT_RULE} (got 's3://runs/./priors')",
    ),
    (
        "variant-bad",
        spec_with(spec__baseModel__variant="int8"),
        "spec.baseModel.variant: Input should be 'fp16' (got 'int8')",
    ),
    (
        "no-instance-prompt",
        spec_with(spec__instance__prompt=REMOVE),
        "spec.instance.prompt: required field is missing",
    ),
    (
        "empty-instance-prompt",
        spec_with(spec__instance__prompt=""),
        "spec.instance.prompt: String should have at least 1 character (got '')",
    ),
    (
        "class-prompt-missing",
        spec_with(spec__priorPreservation={}),
        "spec.priorPreservation.classPrompt: required when priorPreservation.enabled is true "
        "(or disable it)",
    ),
    (
        "class-images-zero",
        spec_with(spec__priorPreservation__numClassImages=0),
        "spec.priorPreservation.numClassImages: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "prior-weight-negative",
        spec_with(spec__priorPreservation__lossWeight=-1),
        "spec.priorPreservation.lossWeight: Input should be greater than or equal to 0 (got -1)",
    ),
    (
        "generation-steps-too-many",
        spec_with(spec__priorPreservation__generation={"steps": 5000}),
        "spec.priorPreservation.generation.steps: Input should be less than or equal to 1000 "
        "(got 5000)",
    ),
    (
        "generation-batch-zero",
        spec_with(spec__priorPreservation__generation={"batchSize": 0}),
        "spec.priorPreservation.generation.batchSize: Input should be greater than or equal to 1 "
        "(got 0)",
    ),
    (
        "typo-in-training",
        spec_with(spec__training={"learningrate": 1e-6}),
        "spec.training.learningrate: unknown field; allowed: batchSize, cacheLatents, "
        "cacheTextEmbeddings, centerCrop, checkpointing, compile, cropEachStep, gradientAccumulationSteps, gradientCheckpointing, learningRate, lora, lrScheduler, "
        "lrWarmupSteps, maxGradNorm, maxSteps, method, mixedPrecision, offsetNoise, randomFlip, resolution, seed, "
        "sharding, snrGamma, trainTextEncoder, use8bitAdam, validation",
    ),
    (
        "unknown-top-level-spec-field",
        spec_with(spec__gpus=8),
        "spec.gpus: unknown field; allowed: baseModel, evaluation, export, inference, instance, "
        "priorPreservation, resources, runPolicy, storage, subjects, tracking, training",
    ),
    (
        "evaluation-one-image-per-prompt",
        spec_with(spec__evaluation={"imagesPerPrompt": 1}),
        "spec.evaluation.imagesPerPrompt: Input should be greater than or equal to 2 (got 1)",
    ),
    (
        "evaluation-dino-model-as-clip",
        spec_with(spec__evaluation={"clipUri": "random://tiny-dino"}),
        "spec.evaluation.clipUri: must be a Hugging Face repo id (org/name), s3://bucket/prefix, "
        "a local directory (starting with /, . or ~) or random://tiny-clip "
        "(got 'random://tiny-dino')",
    ),
    (
        "evaluation-unknown-scheme",
        spec_with(spec__evaluation={"dinoUri": "gs://models/dino"}),
        "spec.evaluation.dinoUri: must be a Hugging Face repo id (org/name), s3://bucket/prefix, "
        "a local directory (starting with /, . or ~) or random://tiny-dino (got 'gs://models/dino')",
    ),
    (
        "evaluation-dot-segments",
        spec_with(spec__evaluation={"dinoUri": "s3://models/../dino"}),
        f"spec.evaluation.dinoUri: {DOT_SEGMENT_RULE} (got 's3://models/../dino')",
    ),
    (
        "evaluation-empty-prompt",
        spec_with(spec__evaluation={"prompts": [""]}),
        "spec.evaluation.prompts[0]: String should have at least 1 character (got '')",
    ),
    (
        "evaluation-typo",
        spec_with(spec__evaluation={"imagesPerPromt": 4}),
        "spec.evaluation.imagesPerPromt: unknown field; allowed: clipUri, dinoUri, enabled, "
        "guidanceScale, imagesPerPrompt, prompts, seed, steps",
    ),
    (
        "method-unknown",
        spec_with(spec__training={"method": "dora"}),
        "spec.training.method: Input should be 'full' or 'lora' (got 'dora')",
    ),
    (
        "export-fuse-with-full",
        spec_with(spec__export={"fuse": True}),
        "spec.export.fuse: only allowed with training.method lora (method is full: a full "
        "fine-tune always exports the whole pipeline)",
    ),
    (
        "export-unknown-field",
        spec_with(spec__export={"fp16": True}),
        "spec.export.fp16: unknown field; allowed: fuse",
    ),
    (
        "lora-settings-with-full",
        spec_with(spec__training={"lora": {"rank": 8}}),
        "spec.training.lora: only allowed with method lora (method is full)",
    ),
    (
        "lora-rank-zero",
        spec_with(spec__training={"method": "lora", "lora": {"rank": 0}}),
        "spec.training.lora.rank: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "lora-target-not-a-name",
        spec_with(spec__training={"method": "lora", "lora": {"targetModules": ["to q"]}}),
        "spec.training.lora.targetModules[0]: String should match pattern '^[A-Za-z0-9_.]+$' "
        "(got 'to q')",
    ),
    (
        "learning-rate-zero",
        spec_with(spec__training={"learningRate": 0}),
        "spec.training.learningRate: Input should be greater than 0 (got 0)",
    ),
    (
        "learning-rate-string",
        spec_with(spec__training={"learningRate": "fast"}),
        "spec.training.learningRate: Input should be a valid number, unable to parse string as a "
        "number (got 'fast')",
    ),
    (
        "scheduler-unknown",
        spec_with(spec__training={"lrScheduler": "onecycle"}),
        "spec.training.lrScheduler: Input should be 'constant', 'constant_with_warmup', 'linear', "
        "'cosine', 'cosine_with_restarts' or 'polynomial' (got 'onecycle')",
    ),
    (
        "warmup-longer-than-run",
        spec_with(spec__training={"maxSteps": 100, "lrWarmupSteps": 100}),
        "spec.training.lrWarmupSteps: must be less than maxSteps (100)",
    ),
    (
        "8bit-adam-with-fsdp",
        spec_with(spec__training={"use8bitAdam": True, "sharding": {"backend": "fsdp"}}),
        "spec.training.use8bitAdam: 8-bit AdamW cannot step FSDP2's sharded parameters: use "
        'sharding.backend "deepspeed" (ZeRO shards the 8-bit state too) or "ddp"',
    ),
    (
        "crop-each-step-with-the-latent-cache",
        spec_with(spec__training={"cropEachStep": True}),
        "spec.training.cropEachStep: needs cacheLatents: false (the latent cache encodes one crop "
        "per photo, once)",
    ),
    (
        "crop-each-step-with-center-crop",
        spec_with(spec__training={"cropEachStep": True, "cacheLatents": False, "centerCrop": True}),
        "spec.training.cropEachStep: contradicts centerCrop: true; set one of them",
    ),
    (
        "compile-mode-unknown",
        spec_with(spec__training={"compile": "full"}),
        "spec.training.compile: Input should be 'off' or 'regional' (got 'full')",
    ),
    (
        "compile-with-zero3",
        spec_with(spec__training={"compile": "regional", "sharding": {"zeroStage": 3}}),
        "spec.training.compile: regional compilation does not work with DeepSpeed ZeRO-3 (its "
        "parameter gathering makes torch recompile every block): use sharding.zeroStage 2, "
        'sharding.backend "fsdp" or "ddp", or compile "off"',
    ),
    (
        "max-steps-zero",
        spec_with(spec__training={"maxSteps": 0}),
        "spec.training.maxSteps: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "resolution-not-multiple-of-8",
        spec_with(spec__training={"resolution": 500}),
        "spec.training.resolution: must be a multiple of 8 (the VAE downsamples by 8) (got 500)",
    ),
    (
        "resolution-too-small",
        spec_with(spec__training={"resolution": 32}),
        "spec.training.resolution: Input should be greater than or equal to 64 (got 32)",
    ),
    (
        "mixed-precision-unknown",
        spec_with(spec__training={"mixedPrecision": "fp8"}),
        "spec.training.mixedPrecision: Input should be 'fp16', 'bf16' or 'no' (got 'fp8')",
    ),
    (
        "mixed-precision-unquoted-no",
        spec_with(spec__training={"mixedPrecision": False}),
        'spec.training.mixedPrecision: must be "fp16", "bf16" or "no"; quote "no" in YAML '
        "(unquoted it is false) (got False)",
    ),
    (
        "backend-unknown",
        spec_with(spec__training={"sharding": {"backend": "horovod"}}),
        "spec.training.sharding.backend: Input should be 'deepspeed', 'ddp' or 'fsdp' "
        "(got 'horovod')",
    ),
    (
        "zero-stage-with-ddp",
        spec_with(spec__training={"sharding": {"backend": "ddp", "zeroStage": 2}}),
        "spec.training.sharding.zeroStage: only allowed with backend deepspeed (backend is ddp)",
    ),
    (
        "zero-stage-1",
        spec_with(spec__training={"sharding": {"zeroStage": 1}}),
        "spec.training.sharding.zeroStage: Input should be 2 or 3 (got 1)",
    ),
    (
        "checkpoint-keep-zero",
        spec_with(spec__training={"checkpointing": {"keep": 0}}),
        "spec.training.checkpointing.keep: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "checkpoint-interval-zero",
        spec_with(spec__training={"checkpointing": {"interval": 0}}),
        "spec.training.checkpointing.interval: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "validation-prompt-empty",
        spec_with(spec__training={"validation": {"prompts": [""]}}),
        "spec.training.validation.prompts[0]: String should have at least 1 character (got '')",
    ),
    (
        "snr-gamma-zero",
        spec_with(spec__training={"snrGamma": 0}),
        "spec.training.snrGamma: Input should be greater than 0 (got 0)",
    ),
    (
        "no-workers",
        spec_with(spec__resources={"gpusPerNode": 0}),
        "spec.resources.gpusPerNode: nodes x gpusPerNode is 0: set gpusPerNode >= 1, or "
        "processesPerNode >= 1 for CPU training",
    ),
    (
        "nodes-zero",
        spec_with(spec__resources={"nodes": 0}),
        "spec.resources.nodes: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "fp16-on-cpu",
        spec_with(spec__resources={"gpusPerNode": 0, "processesPerNode": 2}),
        'spec.training.mixedPrecision: fp16 needs GPUs (gpusPerNode is 0): use "bf16" or "no" on CPU',
    ),
    (
        "quantity-bad",
        spec_with(spec__resources={"resources": {"limits": {"memory": "lots"}}}),
        "spec.resources.resources.limits.memory: must be a Kubernetes quantity such as 2, 500m, 16Gi "
        "or 1e3 (got 'lots')",
    ),
    (
        "toleration-effect-bad",
        spec_with(spec__resources={"tolerations": [{"key": "gpu", "effect": "Evict"}]}),
        "spec.resources.tolerations[0].effect: Input should be 'NoSchedule', 'PreferNoSchedule' or "
        "'NoExecute' (got 'Evict')",
    ),
    (
        "toleration-without-key-needs-exists",
        spec_with(spec__resources={"tolerations": [{"effect": "NoSchedule"}]}),
        'spec.resources.tolerations[0].operator: must be "Exists" when key is empty (that '
        "tolerates every taint)",
    ),
    (
        "toleration-exists-with-value",
        spec_with(
            spec__resources={"tolerations": [{"key": "gpu", "operator": "Exists", "value": "a"}]}
        ),
        "spec.resources.tolerations[0].value: must be empty when operator is Exists",
    ),
    (
        "toleration-seconds-without-noexecute",
        spec_with(
            spec__resources={
                "tolerations": [{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 5}]
            }
        ),
        "spec.resources.tolerations[0].tolerationSeconds: only allowed with effect NoExecute",
    ),
    (
        "resource-name-typo",
        spec_with(spec__resources={"resources": {"requests": {"memroy": "16Gi"}}}),
        f"spec.resources.resources.requests.memroy: {RESOURCE_NAME_RULE}",
    ),
    (
        "resource-name-gpu-without-domain",
        spec_with(spec__resources={"resources": {"limits": {"gpu": 1}}}),
        f"spec.resources.resources.limits.gpu: {RESOURCE_NAME_RULE}",
    ),
    (
        "resource-name-upper-case-domain",
        spec_with(spec__resources={"resources": {"limits": {"NVIDIA.com/gpu": 1}}}),
        f"spec.resources.resources.limits.NVIDIA.com/gpu: {RESOURCE_NAME_RULE}",
    ),
    (
        "inference-resource-name-typo",
        spec_with(spec__inference={"resources": {"requests": {"cpus": "2"}}}),
        f"spec.inference.resources.requests.cpus: {RESOURCE_NAME_RULE}",
    ),
    (
        "pull-policy-bad",
        spec_with(spec__resources={"imagePullPolicy": "Sometimes"}),
        "spec.resources.imagePullPolicy: Input should be 'Always', 'IfNotPresent' or 'Never' "
        "(got 'Sometimes')",
    ),
    ("no-output", spec_with(spec__storage={}), "spec.storage.outputUri: required field is missing"),
    (
        "credentials-inline",
        spec_with(spec__storage__s3={"accessKeyId": "AKIA..."}),
        "spec.storage.s3.accessKeyId: unknown field; allowed: credentialsSecret, endpoint, region",
    ),
    (
        "endpoint-not-url",
        spec_with(spec__storage__s3={"endpoint": "minio:9000"}),
        "spec.storage.s3.endpoint: String should match pattern '^https?://[^\\s/]+(/.*)?$' "
        "(got 'minio:9000')",
    ),
    (
        "secret-name-bad",
        spec_with(spec__storage__s3={"credentialsSecret": {"name": "S3_Creds"}}),
        "spec.storage.s3.credentialsSecret.name: String should match pattern "
        "'^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$' (got 'S3_Creds')",
    ),
    (
        "inference-replicas-negative",
        spec_with(spec__inference={"replicas": -1}),
        "spec.inference.replicas: Input should be greater than or equal to 0 (got -1)",
    ),
    (
        "backoff-limit-string",
        spec_with(spec__runPolicy={"backoffLimit": "three"}),
        "spec.runPolicy.backoffLimit: Input should be a valid integer, unable to parse string as an "
        "integer (got 'three')",
    ),
    (
        "deadline-zero",
        spec_with(spec__runPolicy={"activeDeadlineSeconds": 0}),
        "spec.runPolicy.activeDeadlineSeconds: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "wandb-api-key-in-the-spec",
        spec_with(spec__tracking={"wandb": {"project": "p", "apiKey": "0123abcd"}}),
        # The value is not echoed: a key put there by mistake goes into no event or log.
        "spec.tracking.wandb.apiKey: unknown field; allowed: apiKeySecret, entity, project, "
        "runName",
    ),
    (
        "suspend-not-bool",
        spec_with(spec__runPolicy={"suspend": "later"}),
        "spec.runPolicy.suspend: Input should be a valid boolean, unable to interpret input "
        "(got 'later')",
    ),
]


def test_there_are_at_least_30_distinct_bad_specs():
    assert len({case[0] for case in BAD_SPECS}) == len(BAD_SPECS) >= 30


@pytest.mark.parametrize(
    ("document", "expected"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS]
)
def test_bad_spec_is_rejected_with_its_message(document: dict, expected: str):
    with pytest.raises(JobInvalid) as rejected:
        parse_job(document)
    assert expected in rejected.value.problems, rejected.value.problems


def test_minimal_spec_is_valid_and_gets_defaults():
    job = parse_job(MINIMAL)
    training = job.spec.training
    assert (training.max_steps, training.resolution, training.effective_learning_rate) == (
        800,
        512,
        5e-6,
    )
    assert job.spec.prior_preservation.num_class_images == 200
    assert job.spec.prior_preservation.loss_weight == 1.0
    assert training.sharding.zero_stage == 2


def test_text_encoder_training_lowers_the_default_learning_rate():
    job = parse_job(spec_with(spec__training={"trainTextEncoder": True}))
    assert job.spec.training.effective_learning_rate == 2e-6


def test_a_lora_job_may_fuse_its_export_and_does_not_by_default():
    lora = parse_job(spec_with(spec__training={"method": "lora"}))
    assert lora.spec.export.fuse is False
    fused = parse_job(spec_with(spec__training={"method": "lora"}, spec__export={"fuse": True}))
    assert fused.spec.export.fuse is True


def test_evaluation_is_on_by_default_with_the_papers_encoders():
    evaluation = parse_job(MINIMAL).spec.evaluation
    assert evaluation.enabled and evaluation.prompts == []
    assert (evaluation.clip_uri, evaluation.dino_uri) == (
        "openai/clip-vit-base-patch32",
        "facebook/dino-vits16",
    )


@pytest.mark.parametrize(
    ("field", "uri"),
    [
        ("clipUri", "random://tiny-clip"),
        ("dinoUri", "random://tiny-dino"),
        ("clipUri", "s3://models/clip-vit-b32"),
        ("dinoUri", "./encoders/dino"),
    ],
)
def test_evaluation_encoders_come_from_anywhere_models_do(field: str, uri: str):
    job = parse_job(spec_with(spec__evaluation={field: uri}))
    assert job.spec.evaluation.model_dump(by_alias=True)[field] == uri


def test_priors_can_be_disabled_without_a_class_prompt():
    job = parse_job(spec_with(spec__priorPreservation={"enabled": False}))
    assert job.spec.prior_preservation.class_prompt is None


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_valid(path: Path):
    assert load_jobs(path.read_text())


def test_validate_command_reports_each_problem_and_fails(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_with(spec__training={"maxSteps": 0, "resolution": 500})))
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: spec.training.maxSteps: Input should be greater than or equal to 1" in (
        result.output
    )
    assert "spec.training.resolution: must be a multiple of 8" in result.output


def test_validate_command_accepts_the_realistic_example():
    result = CliRunner().invoke(main, ["validate", str(ROOT / "examples/dreamboothjob.yaml")])
    assert result.exit_code == 0, result.output
    assert "ok: DreamBoothJob sks-dog" in result.output


def test_yaml_syntax_errors_are_reported_not_raised():
    with pytest.raises(JobInvalid, match="yaml:"):
        load_jobs("spec: [unclosed")


# -- URIs: what the trainer's storage refuses, the schema refuses ----------------------------------
DOT_SEGMENT_URIS = [
    "s3://data/../dog",
    "s3://data/dog/..",
    "s3://data/dog/../",
    "s3://data/./dog",
    "s3://data/.",
]
GOOD_URIS = [
    "s3://data",
    "s3://data/",
    "s3://data/dog/",
    "s3://data/dog..v2/.hidden/...",
    "s3://data//dog",
    "./local/subject",
    "../photos/dog",  # local paths may climb: a local run resolves them against the file
    "/mnt/data/../dog",
    "subjects/dog",
    "~/dog",
]


def crd_pattern(*path: str) -> re.Pattern:
    """The pattern the generated CRD gives the spec field at `path` (the API server's check)."""
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for name in path:
        schema = schema["properties"][name]
    return re.compile(schema["pattern"])


URI_FIELDS = [("instance", "imagesUri"), ("storage", "outputUri"), ("storage", "priorCacheUri")]


@pytest.mark.parametrize("uri", DOT_SEGMENT_URIS)
def test_s3_uris_with_dot_segments_are_refused_by_validate_and_the_crd(uri: str):
    for section, name in URI_FIELDS:
        with pytest.raises(JobInvalid) as rejected:
            parse_job(spec_with(**{f"spec__{section}__{name}": uri}))
        assert f"spec.{section}.{name}: {DOT_SEGMENT_RULE} (got {uri!r})" in (
            rejected.value.problems
        )
        assert not crd_pattern(section, name).match(uri), (section, name, uri)
    assert not crd_pattern("baseModel", "uri").match(uri)


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_other_uris_stay_valid(uri: str):
    parse_job(spec_with(spec__instance__imagesUri=uri, spec__storage__outputUri=uri))
    for section, name in URI_FIELDS:
        assert crd_pattern(section, name).match(uri), (section, name, uri)


def test_validate_command_names_the_uri_field(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec_with(spec__instance__imagesUri="s3://data/../dog")))
    result = CliRunner().invoke(main, ["validate", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: spec.instance.imagesUri: {DOT_SEGMENT_RULE}" in result.output


# -- resource names: what the API server accepts for containers --------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "cpu",
        "memory",
        "ephemeral-storage",
        "hugepages-2Mi",
        "hugepages-1Gi",
        "nvidia.com/gpu",
        "amd.com/gpu",
        "example.com/foo",
        "rdma.example.com/hca_shared-devices.a",
    ],
)
def test_resource_names_the_api_server_accepts_are_valid(name: str):
    resources = {"requests": {name: 1}, "limits": {name: 1}}
    job = parse_job(
        spec_with(
            spec__resources={"resources": resources}, spec__inference={"resources": resources}
        )
    )
    assert job.spec.resources.resources.requests == {name: 1}


@pytest.mark.parametrize(
    "name",
    [
        "memroy",
        "gpu",
        "CPU",
        "hugepages",
        "hugepages-",
        "hugepages-two",  # the API server takes it, but no node offers a page size "two"
        "nvidia.com/",
        "/gpu",
        "nvidia.com/gpu/0",
        "Nvidia.com/gpu",
        "nvidia_com/gpu",
        "nvidia.com/-gpu",
        "requests.nvidia.com/gpu",
        "nvidia.com/" + "g" * 64,
    ],
)
def test_resource_names_no_container_can_get_are_invalid(name: str):
    for section in ("resources", "inference"):
        for kind in ("requests", "limits"):
            with pytest.raises(JobInvalid) as rejected:
                parse_job(spec_with(**{f"spec__{section}": {"resources": {kind: {name: 1}}}}))
            prefix = (
                "spec.resources.resources" if section == "resources" else "spec.inference.resources"
            )
            assert f"{prefix}.{kind}.{name}: {RESOURCE_NAME_RULE}" in rejected.value.problems
