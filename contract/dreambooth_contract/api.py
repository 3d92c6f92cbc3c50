"""The DreamBoothJob API: the single source of truth.

The CRD schema (the operator's crd.py), offline validation (validation.py), the operator's
builders and the trainer's config (trainer_config.py) are all derived from these models; no field
is spelled out anywhere else.

Python attributes are snake_case, the Kubernetes wire format is camelCase (aliases).
Cross-field rules raise `FieldRuleError`, which names the offending field so that every
rejection reads `spec.<path>: <what is allowed>`.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "dreambooth.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DreamBoothJob"
PLURAL = "dreamboothjobs"
SINGULAR = "dreamboothjob"
SHORT_NAMES = ["dbj"]

# Children are named "<job>-priors-<i>", "<job>-train-<i>", "<job>-inference-..." and job
# names end up in label values and pod hostnames (63 characters at most).
MAX_JOB_NAME_LENGTH = 40
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Job names also name Services, which must be DNS-1035 labels: a letter first.
JOB_NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
# A DreamBoothServer named from a job: NAME, or NAMESPACE/NAME.
SERVER_REF = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?/)?[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# Models with random weights, built in code: the only models this project can use without a hub.
RANDOM_MODELS = ("random://tiny-sd", "random://sd15", "random://tiny-sdxl", "random://sdxl")
# s3://bucket/key. Object storage has no parent directories: the trainer's storage refuses '.'
# and '..' key segments rather than resolve them, so the schema refuses them too. A segment is
# anything without '/' but '.' and '..' (written without look-ahead: the API server's RE2 and
# pydantic's regex engine have none).
S3_URI = r"s3://[a-z0-9.\-]{3,63}(/([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+)?)*"
# A local path: no scheme (no ":/"), so that s3:// and unsupported schemes cannot pass as one.
# Local paths may contain '..': a local run resolves them against the job file's directory.
LOCAL_PATH = r"[/.~\w]([^:]|:[^/])*:?"
# Hugging Face repo id ("org/name"), s3://bucket/key, a local path, or a random-weights model.
RANDOM_URI = "random://(" + "|".join(uri.removeprefix("random://") for uri in RANDOM_MODELS) + ")"
MODEL_URI = rf"^({S3_URI}|{RANDOM_URI}|[/.~].*|[\w.\-]+/[\w.\-]+)$"
DATA_URI = rf"^({S3_URI}|{LOCAL_PATH})$"
QUANTITY = r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i?|[mkMGTPE]|n|u)?$"

DEFAULT_TRAINER_IMAGE = "ghcr.io/dreambooth-operator/trainer:0.1.0"


class FieldRuleError(ValueError):
    """A cross-field rule broken by `field` (camelCase, relative to the model that checks it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


class ApiModel(BaseModel):
    """Base for every spec model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_enum_values=True,
    )


def field(default=..., description: str = "", **constraints):
    """Field with a description (it becomes the CRD's, so `kubectl explain` documents it)."""
    if isinstance(default, type) and issubclass(default, BaseModel):
        # `{}` rather than a factory: pydantic validates it in place (errors keep their path)
        # and the CRD gets `default: {}`, so the API server fills in the nested defaults.
        return Field({}, description=description, **constraints)
    if default in (list, dict):
        return Field(default_factory=default, description=description, **constraints)
    return Field(default, description=description, **constraints)


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not re.match(QUANTITY, value):
        raise ValueError("must be a Kubernetes quantity such as 2, 500m, 16Gi or 1e3")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    Field(description="A Kubernetes quantity, e.g. 2, 500m or 16Gi."),
]


def no_dot_segments(value):
    """Before the pattern: say why an s3:// URI with '.' or '..' segments is refused."""
    s3 = isinstance(value, str) and value.startswith("s3://")
    if s3 and any(segment in (".", "..") for segment in value.split("/")[3:]):
        raise ValueError(
            "'.' and '..' path segments are not allowed in s3:// URIs (object storage has "
            "no parent directories; the trainer's storage refuses them)"
        )
    return value


# Container resource names, as the API server checks them (ValidateResourceRequirements):
# standard names, hugepages-<page size>, or extended resources "<DNS subdomain>/<name>".
STANDARD_RESOURCES = ("cpu", "memory", "ephemeral-storage")
HUGEPAGES_RESOURCE = r"^hugepages-[0-9]+([KMGTPE]i|[kMGTPE])?$"
QUALIFIED_NAME_PART = r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$"
RESOURCE_NAME_RULE = (
    "not a resource name the API server accepts for containers; allowed: cpu, memory, "
    "ephemeral-storage, hugepages-<size> (e.g. hugepages-2Mi), or an extended resource "
    "<domain>/<name> (e.g. nvidia.com/gpu)"
)


def is_container_resource_name(name: str) -> bool:
    """True for the resource names the API server accepts in a container's requests/limits.

    Stricter in one place: hugepages-<size> needs a page size (the server takes any suffix, and
    no node would ever offer it).
    """
    if "/" not in name:
        return name in STANDARD_RESOURCES or re.match(HUGEPAGES_RESOURCE, name) is not None
    domain, _, short = name.partition("/")
    if not (
        len(domain) <= 253
        and re.match(DNS_SUBDOMAIN, domain)
        and len(short) <= 63
        and re.match(QUALIFIED_NAME_PART, short)
    ):
        return False
    if "kubernetes.io/" in name:
        return True  # a "native" resource to the API server, checked no further
    # Extended resources get a quota name "requests.<name>", which must be a qualified name too.
    return not name.startswith("requests.") and len(f"requests.{domain}") <= 253


# ---------------------------------------------------------------------------------------------
# spec


class BaseModelSpec(ApiModel):
    uri: str = field(
        description="Stable Diffusion (1.x, 2.x or XL) base model in the diffusers layout: a "
        "Hugging Face repo id (org/name), s3://bucket/prefix, a local directory, or "
        "random://tiny-sd / sd15 / tiny-sdxl / sdxl (random weights, for tests and benchmarks). "
        "The family comes from the model's model_index.json.",
        pattern=MODEL_URI,
        min_length=1,
        max_length=512,
    )
    revision: str | None = field(
        None, description="Hugging Face revision (branch, tag or commit).", max_length=128
    )
    variant: Literal["fp16"] | None = field(
        None, description="Weights variant to load (diffusers' 'variant')."
    )
    vae_uri: str | None = field(
        None,
        description="A VAE to use instead of the base model's (diffusers' "
        "--pretrained_vae_model_name_or_path), in the diffusers layout (its config.json): a "
        "Hugging Face repo id, s3://, a local directory, or a random:// model's VAE. For SDXL "
        "with mixedPrecision fp16: SDXL's own VAE overflows in fp16, so it is kept in fp32 "
        "(its config says force_upcast); an fp16-fixed one such as "
        "madebyollin/sdxl-vae-fp16-fix (force_upcast false) runs in fp16, saving memory and "
        "time. It is used for training, class images and the export.",
        pattern=MODEL_URI,
        min_length=1,
        max_length=512,
    )

    _uri_segments = field_validator("uri", "vae_uri", mode="before")(no_dot_segments)


class InstanceSpec(ApiModel):
    images_uri: str = field(
        description="Directory (local path or s3://bucket/prefix) holding the 3-5 subject photos.",
        pattern=DATA_URI,
        min_length=1,
        max_length=1024,
    )
    prompt: str = field(
        description='Prompt with the rare identifier, e.g. "a photo of sks dog".',
        min_length=1,
        max_length=1000,
    )
    captions: Literal["append", "replace", "ignore"] = field(
        "append",
        description="What a photo's own caption does to the prompt: NAME.txt beside NAME.jpg "
        '(kohya\'s convention) or a metadata.jsonl line {"file_name": "NAME.jpg", '
        '"text": "..."} (Hugging Face imagefolder\'s). append: "PROMPT, CAPTION"; replace: '
        "the caption alone (it should name the identifier); ignore: every photo gets the "
        "prompt. A photo without a caption gets the prompt.",
    )

    _uri_segments = field_validator("images_uri", mode="before")(no_dot_segments)


# Subjects per job: each adds its photos and its class set to every step's batch.
MAX_SUBJECTS = 16
SUBJECT_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class SubjectSpec(InstanceSpec):
    """One subject of several (spec.subjects): instance's fields plus its own class."""

    name: str | None = field(
        None,
        description="The subject's label in metrics, TensorBoard and logs; default its index "
        "(0, 1, ...).",
        pattern=SUBJECT_NAME,
        max_length=63,
    )
    class_prompt: str | None = field(
        None,
        description='The subject\'s class, e.g. "a photo of dog". Required when '
        "priorPreservation.enabled; subjects of one class share its class images.",
        min_length=1,
        max_length=1000,
    )
    class_images_uri: str | None = field(
        None,
        description="Your own class images for this subject's class (as "
        "priorPreservation.classImagesUri does for one subject); subjects with the same "
        "classPrompt must give the same one.",
        pattern=DATA_URI,
        min_length=1,
        max_length=1024,
    )

    _class_uri_segments = field_validator("class_images_uri", mode="before")(no_dot_segments)

    def label(self, index: int) -> str:
        """Its label in metrics and logs: its name, or its index in spec.subjects."""
        return self.name or str(index)


def identifier_words(prompt: str, class_prompt: str | None) -> set[str]:
    """The words of an instance prompt that its class prompt lacks: the subject's identifier
    (e.g. {"sks"} for "a photo of sks dog" of class "a photo of dog")."""
    words = set(re.findall(r"[\w']+", prompt.lower()))
    return words - set(re.findall(r"[\w']+", (class_prompt or "").lower()))


class PriorGenerationSpec(ApiModel):
    steps: int = field(50, description="Denoising steps per class image.", ge=1, le=1000)
    guidance_scale: float = field(7.5, description="Classifier-free guidance scale.", ge=1, le=50)
    seed: int = field(0, description="Base seed; image i uses seed + i.", ge=0, le=2**31 - 1)
    batch_size: int = field(4, description="Images generated per forward pass.", ge=1, le=64)
    negative_prompt: str | None = field(None, description="Negative prompt.", max_length=1000)


class PriorPreservationSpec(ApiModel):
    enabled: bool = field(True, description="Train with the prior-preservation loss.")
    class_prompt: str | None = field(
        None,
        description='The subject\'s class, e.g. "a photo of dog". Required when enabled, with '
        "instance (with subjects each subject names its own: subjects[].classPrompt).",
        min_length=1,
        max_length=1000,
    )
    num_class_images: int = field(
        200,
        description="Class images per class: those of classImagesUri first (at most this "
        "many), the shortfall generated by the base model. With several subjects each distinct "
        "classPrompt gets this many (its own set, cached under its own key).",
        ge=1,
        le=10000,
    )
    class_images_uri: str | None = field(
        None,
        description="Your own class images (local path or s3://bucket/prefix), e.g. real photos "
        "of the class, as regularization images for people are usually given: the class set "
        "takes up to numClassImages of them (in file-name order) and only the shortfall is "
        "generated. With instance (with subjects: subjects[].classImagesUri).",
        pattern=DATA_URI,
        min_length=1,
        max_length=1024,
    )
    loss_weight: float = field(1.0, description="Weight of the prior loss.", ge=0, le=100)
    generation: PriorGenerationSpec = field(
        PriorGenerationSpec, description="Class-image sampling."
    )

    _class_uri_segments = field_validator("class_images_uri", mode="before")(no_dot_segments)

    # That classPrompt is given when enabled is checked by DreamBoothJobSpec: with
    # spec.subjects each subject names its own class instead.


class ShardingBackend(str, Enum):
    deepspeed = "deepspeed"
    ddp = "ddp"
    fsdp = "fsdp"


ZeroStage = Literal[2, 3]
DEFAULT_ZERO_STAGE: ZeroStage = 2


class ShardingSpec(ApiModel):
    backend: ShardingBackend = field(
        ShardingBackend.deepspeed,
        description="deepspeed (ZeRO), ddp (replicated) or fsdp (FSDP2 fully_shard).",
    )
    zero_stage: ZeroStage | None = field(
        None,
        description="DeepSpeed ZeRO stage (2 or 3); only with backend deepspeed; "
        f"default {DEFAULT_ZERO_STAGE}.",
    )

    @model_validator(mode="after")
    def _zero_stage_only_with_deepspeed(self) -> ShardingSpec:
        if self.backend == ShardingBackend.deepspeed.value:
            if self.zero_stage is None:
                self.zero_stage = DEFAULT_ZERO_STAGE
        elif self.zero_stage is not None:
            raise FieldRuleError(
                "zeroStage", f"only allowed with backend deepspeed (backend is {self.backend})"
            )
        return self


class CheckpointSpec(ApiModel):
    interval: int = field(100, description="Save a checkpoint every N optimizer steps.", ge=1)
    keep: int = field(2, description="Committed checkpoints kept (newest first).", ge=1, le=100)


class ValidationSpec(ApiModel):
    prompts: list[
        Annotated[str, Field(description="A sample prompt.", min_length=1, max_length=1000)]
    ] = field(
        list, description="Prompts rendered into a sample grid during training.", max_length=16
    )
    interval: int = field(200, description="Render samples every N steps.", ge=1)
    num_inference_steps: int = field(25, description="Denoising steps per sample.", ge=1, le=200)
    guidance_scale: float = field(7.5, description="Guidance scale for samples.", ge=1, le=50)
    seed: int = field(0, description="Seed for samples (fixed, so grids are comparable).", ge=0)


LrScheduler = Literal[
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
]
MixedPrecision = Literal["fp16", "bf16", "no"]


# diffusers' train_dreambooth_lora.py: LoRA on the UNet's attention projections, and on the CLIP
# text encoder's attention projections when the text encoder trains too.
DEFAULT_LORA_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
LORA_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Default peak learning rates per method: a LoRA adapter starts at zero and needs a far larger
# step than the full model's weights do.
FULL_LEARNING_RATE = 5e-6
FULL_WITH_TEXT_ENCODER_LEARNING_RATE = 2e-6
LORA_LEARNING_RATE = 1e-4
TrainingMethod = Literal["full", "lora"]
# torch.compile of the UNet: off, or "regional": each of its repeated transformer blocks on its
# own (diffusers' compile_repeated_blocks), a fraction of a whole-model compile's time.
CompileMode = Literal["off", "regional"]


class LoraSpec(ApiModel):
    rank: int = field(4, description="Rank r of each adapter matrix pair.", ge=1, le=1024)
    alpha: float | None = field(
        None,
        description="Scaling alpha: the adapter's update is scaled by alpha/rank; default the "
        "rank (scale 1).",
        gt=0,
    )
    dropout: float = field(0.0, description="Dropout on the adapter's input.", ge=0, lt=1)
    target_modules: list[
        Annotated[
            str,
            Field(
                description="A module name suffix, e.g. to_q.",
                min_length=1,
                max_length=200,
                pattern=r"^[A-Za-z0-9_.]+$",
            ),
        ]
    ] = field(
        list(DEFAULT_LORA_UNET_TARGETS),
        description="UNet modules that get an adapter (name suffixes); default the attention "
        "projections to_q, to_k, to_v and to_out.0. With trainTextEncoder the text encoder's "
        "attention projections (q_proj, k_proj, v_proj, out_proj) get one too.",
        min_length=1,
        max_length=64,
    )

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else self.alpha


class TrainingSpec(ApiModel):
    method: TrainingMethod = field(
        "full",
        description="Fine-tuning method: full (every UNet weight) or lora (a low-rank adapter; "
        "the base model stays frozen).",
    )
    lora: LoraSpec | None = field(
        None, description="LoRA settings; only with method lora (defaults apply when omitted)."
    )
    train_text_encoder: bool = field(
        False,
        description="Also fine-tune the text encoder (with method lora: give it adapters too).",
    )
    max_steps: int = field(
        800, description="Optimizer steps (800 with priors is the usual recipe).", ge=1, le=10**6
    )
    learning_rate: float | None = field(
        None,
        description=f"Peak learning rate; default {FULL_LEARNING_RATE:g} "
        f"({FULL_WITH_TEXT_ENCODER_LEARNING_RATE:g} when the text encoder is trained) for method "
        f"full, {LORA_LEARNING_RATE:g} for method lora.",
        gt=0,
        le=1,
    )
    lr_scheduler: LrScheduler = field("constant", description="Learning-rate schedule.")
    lr_warmup_steps: int = field(0, description="Linear warmup steps.", ge=0)
    batch_size: int = field(
        1,
        description="Instance images per device per step (as many class images join them). "
        "With several subjects at least their number: the rows go to the subjects in turn, so "
        "every micro-batch holds every subject.",
        ge=1,
        le=64,
    )
    gradient_accumulation_steps: int = field(
        1, description="Micro-batches per optimizer step.", ge=1, le=1024
    )
    resolution: int = field(
        512,
        description="Training resolution in pixels (multiple of 8). SD1.x trains at 512, SD2 "
        "at 768, SDXL best at 1024 (set it: the default stays 512 for every model).",
        ge=64,
        le=2048,
    )
    center_crop: bool = field(
        False,
        description="Crop each photo's centre to a square; otherwise one square at a random "
        "place, drawn once per photo (from the seed) and kept for the whole run, unless "
        "cropEachStep draws a new one every step.",
    )
    crop_each_step: bool = field(
        False,
        description="Crop each photo anew, at a random place, every step (more variety from "
        "3-5 photos). Needs cacheLatents: false (the latent cache encodes one crop per photo) "
        "and centerCrop: false. Not for SDXL, whose UNet is told each photo's crop.",
    )
    random_flip: bool = field(
        False,
        description="Mirror each photo left-right half the time, drawn per photo and step. With "
        "cacheLatents the cache holds each photo and its mirror image (twice the encoding at "
        "the start). Leave off for subjects that are not symmetric (text, a parting).",
    )
    mixed_precision: MixedPrecision = field(
        "fp16", description="fp16 (loss scaling, GPU only), bf16 or no."
    )
    sharding: ShardingSpec = field(ShardingSpec, description="Data-parallel / sharding backend.")
    gradient_checkpointing: bool = field(True, description="Recompute activations to save memory.")
    seed: int = field(0, description="Training seed.", ge=0, le=2**31 - 1)
    max_grad_norm: float = field(1.0, description="Gradient clipping norm.", gt=0)
    use_8bit_adam: bool = field(
        False,
        description="8-bit AdamW (bitsandbytes): moments in 8 bits; not with fsdp.",
        alias="use8bitAdam",
    )
    offset_noise: float = field(0.0, description="Offset-noise strength (0 = off).", ge=0, le=1)
    snr_gamma: float | None = field(
        None, description="Min-SNR weighting gamma (5.0 is usual).", gt=0
    )
    cache_latents: bool = field(True, description="Encode images with the VAE once, not per step.")
    cache_text_embeddings: bool = field(
        True,
        description="Encode prompts with the frozen text encoder once, not per step "
        "(no effect when trainTextEncoder is true).",
    )
    compile: CompileMode = field(
        "off",
        description="torch.compile of the UNet: off, or regional (each repeated transformer "
        "block compiled on its own). Compiling takes time at the first step (reported in the "
        "trainer's log); whether it pays depends on the GPU and the run's length. Not with "
        "DeepSpeed ZeRO-3.",
    )
    checkpointing: CheckpointSpec = field(CheckpointSpec, description="Checkpoints and retention.")
    validation: ValidationSpec = field(ValidationSpec, description="Sample grids during training.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, value):
        # YAML 1.1 reads an unquoted `no` as false; say so instead of a puzzling type error.
        if value is False:
            raise ValueError(
                'must be "fp16", "bf16" or "no"; quote "no" in YAML (unquoted it is false)'
            )
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError("must be a multiple of 8 (the VAE downsamples by 8)")
        return value

    @model_validator(mode="after")
    def _warmup_within_steps(self) -> TrainingSpec:
        if self.lr_warmup_steps >= self.max_steps:
            raise FieldRuleError("lrWarmupSteps", f"must be less than maxSteps ({self.max_steps})")
        return self

    @model_validator(mode="after")
    def _crop_each_step_needs_pixels(self) -> TrainingSpec:
        if self.crop_each_step and self.cache_latents:
            raise FieldRuleError(
                "cropEachStep",
                "needs cacheLatents: false (the latent cache encodes one crop per photo, once)",
            )
        if self.crop_each_step and self.center_crop:
            raise FieldRuleError("cropEachStep", "contradicts centerCrop: true; set one of them")
        return self

    @model_validator(mode="after")
    def _lora_settings_only_with_lora(self) -> TrainingSpec:
        if self.method == "lora":
            if self.lora is None:
                self.lora = LoraSpec()
        elif self.lora is not None:
            raise FieldRuleError("lora", f"only allowed with method lora (method is {self.method})")
        return self

    @model_validator(mode="after")
    def _8bit_adam_not_with_fsdp(self) -> TrainingSpec:
        # bitsandbytes' kernels take plain tensors; FSDP2's parameters are DTensors.
        if self.use_8bit_adam and self.sharding.backend == ShardingBackend.fsdp:
            raise FieldRuleError(
                "use8bitAdam",
                "8-bit AdamW cannot step FSDP2's sharded parameters: use sharding.backend "
                '"deepspeed" (ZeRO shards the 8-bit state too) or "ddp"',
            )
        return self

    @model_validator(mode="after")
    def _compile_not_with_zero3(self) -> TrainingSpec:
        # ZeRO-3 gathers each block's parameters as it runs it: the compiled blocks see other
        # shapes at every gather, recompile until torch's limit, then run uncompiled.
        sharding = self.sharding
        zero3 = sharding.backend == ShardingBackend.deepspeed.value and sharding.zero_stage == 3
        if self.compile != "off" and zero3:
            raise FieldRuleError(
                "compile",
                "regional compilation does not work with DeepSpeed ZeRO-3 (its parameter "
                "gathering makes torch recompile every block): use sharding.zeroStage 2, "
                'sharding.backend "fsdp" or "ddp", or compile "off"',
            )
        return self

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        if self.method == "lora":
            return LORA_LEARNING_RATE
        if self.train_text_encoder:
            return FULL_WITH_TEXT_ENCODER_LEARNING_RATE
        return FULL_LEARNING_RATE


class ResourceRequirements(ApiModel):
    requests: dict[str, Quantity] = field(
        dict,
        description="Resource requests: cpu, memory, ephemeral-storage, hugepages-<size> or an "
        "extended resource such as nvidia.com/gpu.",
    )
    limits: dict[str, Quantity] = field(
        dict, description="Resource limits (the same names as requests)."
    )

    @model_validator(mode="after")
    def _resource_names(self) -> ResourceRequirements:
        # Checked here, not in the CRD: the 1.20 API server knows no propertyNames (kubectl
        # refuses the field, the server drops it) and forbids patternProperties. The operator
        # refuses such a job (InvalidSpec) before it creates a pod that would be refused.
        for kind in ("requests", "limits"):
            for name in getattr(self, kind):
                if not is_container_resource_name(name):
                    raise FieldRuleError(f"{kind}.{name}", RESOURCE_NAME_RULE)
        return self


class Toleration(ApiModel):
    """A toleration of a node taint (core/v1 Toleration)."""

    key: str | None = field(None, description="Taint key.")
    operator: Literal["Exists", "Equal"] = field("Equal", description="Exists or Equal.")
    value: str | None = field(None, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = field(
        None, description="Taint effect."
    )
    toleration_seconds: int | None = field(None, description="For NoExecute taints.", ge=0)

    @model_validator(mode="after")
    def _as_the_api_server_checks_it(self) -> Toleration:
        # The pod would be refused at creation; say so now, naming the field.
        if self.operator == "Exists" and self.value:
            raise FieldRuleError("value", "must be empty when operator is Exists")
        if not self.key and self.operator != "Exists":
            raise FieldRuleError(
                "operator", 'must be "Exists" when key is empty (that tolerates every taint)'
            )
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise FieldRuleError("tolerationSeconds", "only allowed with effect NoExecute")
        return self


class ResourcesSpec(ApiModel):
    nodes: int = field(1, description="Training pods (torchrun nodes).", ge=1, le=128)
    gpus_per_node: int = field(1, description="GPUs per training pod.", ge=0, le=16)
    processes_per_node: int | None = field(
        None,
        description="torchrun processes per pod; default gpusPerNode (set it for CPU training).",
        ge=1,
        le=64,
    )
    image: str = field(DEFAULT_TRAINER_IMAGE, description="Trainer image.", min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = field(
        "IfNotPresent", description="Image pull policy."
    )
    resources: ResourceRequirements = field(
        ResourceRequirements, description="Per-pod requests and limits (GPUs are added)."
    )
    node_selector: dict[str, Annotated[str, Field(description="Node label value.")]] = field(
        dict, description="Node selector for training pods."
    )
    tolerations: list[Toleration] = field(list, description="Tolerations for training pods.")
    priority_class_name: str | None = field(None, description="Priority class of training pods.")
    service_account_name: str | None = field(
        None, description="Service account of the job's pods (default: one per job)."
    )
    cache_size: Quantity = field(
        "100Gi",
        description="Size limit of each pod's cache volume (the base model, class images, "
        "checkpoint staging; for inference pods, the exported pipeline). A pod that writes more "
        "is evicted.",
    )

    @property
    def processes(self) -> int:
        return self.processes_per_node or self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes

    @model_validator(mode="after")
    def _some_workers(self) -> ResourcesSpec:
        if self.world_size == 0:
            raise FieldRuleError(
                "gpusPerNode",
                "nodes x gpusPerNode is 0: set gpusPerNode >= 1, or processesPerNode >= 1 "
                "for CPU training",
            )
        return self


class SecretKeyRef(ApiModel):
    name: str = field(description="Secret name.", pattern=DNS_SUBDOMAIN, max_length=253)
    access_key_id_key: str = field("AWS_ACCESS_KEY_ID", description="Key of the access key id.")
    secret_access_key_key: str = field(
        "AWS_SECRET_ACCESS_KEY", description="Key of the secret access key."
    )


class S3Spec(ApiModel):
    endpoint: str | None = field(
        None,
        description="S3 endpoint URL for MinIO and friends (default: AWS).",
        pattern=r"^https?://[^\s/]+(/.*)?$",
    )
    region: str | None = field(None, description="Region.", max_length=64)
    credentials_secret: SecretKeyRef | None = field(
        None,
        description="Secret holding the credentials (never put keys in the spec). Default: the "
        "environment's (instance profile, IRSA).",
    )


class StorageSpec(ApiModel):
    output_uri: str = field(
        description="Where checkpoints, the exported pipeline and samples go (s3:// or a path).",
        pattern=DATA_URI,
        min_length=1,
        max_length=1024,
    )
    prior_cache_uri: str | None = field(
        None,
        description="Shared class-image cache (content-addressed); default <outputUri>/../priors.",
        pattern=DATA_URI,
    )
    s3: S3Spec = field(S3Spec, description="S3 connection settings.")

    _uri_segments = field_validator("output_uri", "prior_cache_uri", mode="before")(no_dot_segments)


class ExportSpec(ApiModel):
    fuse: bool = field(
        False,
        description="With training.method lora: also export a full pipeline with the adapter "
        "fused into the base weights (pipeline/ and model.safetensors beside the adapter files), "
        "for tools that cannot apply an adapter.",
    )


class InferenceSpec(ApiModel):
    enabled: bool = field(
        False,
        description="Serve the exported pipeline once training ends, on a Deployment of the "
        "job's own (replicas, image, resources, gpus below).",
    )
    server: str | None = field(
        None,
        description="Instead of a Deployment of its own: publish the adapter to this "
        "DreamBoothServer, NAME in the job's namespace or NAMESPACE/NAME (which the server must "
        "allow). With training.method lora only; the model name is NAMESPACE/JOB. Deleting or "
        "suspending the job unpublishes it.",
        pattern=SERVER_REF,
        max_length=63 + 1 + MAX_JOB_NAME_LENGTH,
    )
    replicas: int = field(1, description="Inference replicas.", ge=0, le=100)
    image: str | None = field(None, description="Server image (default: the trainer image).")
    resources: ResourceRequirements = field(
        ResourceRequirements, description="Per-replica requests and limits."
    )
    gpus: int = field(1, description="GPUs per replica (0 for CPU).", ge=0, le=8)

    @property
    def serves(self) -> bool:
        """Served once exported: on a Deployment of its own or on a shared server."""
        return self.enabled or self.server is not None

    def server_key(self, namespace: str) -> tuple[str, str] | None:
        """(namespace, name) of the DreamBoothServer named, relative to the job's namespace."""
        if self.server is None:
            return None
        server_namespace, _, name = self.server.rpartition("/")
        return server_namespace or namespace, name


# The DreamBooth paper's evaluation encoders (Ruiz et al., CVPR 2023, section 4.1): CLIP ViT-B/32
# for CLIP-I and CLIP-T, self-supervised DINO ViT-S/16 for DINO and PRES.
DEFAULT_CLIP_URI = "openai/clip-vit-base-patch32"
DEFAULT_DINO_URI = "facebook/dino-vits16"
# A transformers model: a hub id (org/name), s3://, a local directory, or one built in code.
CLIP_URI = rf"^({S3_URI}|random://tiny-clip|[/.~].*|[\w.\-]+/[\w.\-]+)$"
DINO_URI = rf"^({S3_URI}|random://tiny-dino|[/.~].*|[\w.\-]+/[\w.\-]+)$"


class EvaluationSpec(ApiModel):
    enabled: bool = field(
        True,
        description="After export, measure the trained model and the base model the way the "
        "DreamBooth paper does: subject fidelity (DINO, CLIP-I), prompt fidelity (CLIP-T), "
        "prior drift (PRES, with a class prompt) and diversity (DIV). On by default: with the "
        "defaults it generates 2 models x 6 prompts x 4 images, about a minute on one GPU at "
        "512 px, little beside the training it judges.",
    )
    prompts: list[
        Annotated[str, Field(description="A prompt of the subject.", min_length=1, max_length=1000)]
    ] = field(
        list,
        description="Prompts of the subject (with the instance prompt's identifier); default: "
        'the instance prompt and recontextualizations of it ("... on the beach", "... in the '
        'snow", ...). The class prompt is added for PRES.',
        max_length=25,
    )
    images_per_prompt: int = field(
        4,
        description="Images generated per prompt and model (at least 2: diversity compares "
        "images of the same prompt).",
        ge=2,
        le=16,
    )
    steps: int = field(25, description="Denoising steps per image.", ge=1, le=200)
    guidance_scale: float = field(7.5, description="Classifier-free guidance scale.", ge=1, le=50)
    seed: int = field(
        0,
        description="Image i of every prompt starts from the noise of seed + i, for both models: "
        "base and trained scores compare like with like.",
        ge=0,
        le=2**31 - 1,
    )
    clip_uri: str = field(
        DEFAULT_CLIP_URI,
        description="CLIP model for CLIP-I and CLIP-T (transformers CLIPModel with its processor): "
        "a Hugging Face repo id, s3://bucket/prefix, a local directory, or random://tiny-clip "
        f"(random weights, for tests). Default the paper's {DEFAULT_CLIP_URI}.",
        pattern=CLIP_URI,
        min_length=1,
        max_length=512,
    )
    dino_uri: str = field(
        DEFAULT_DINO_URI,
        description="DINO ViT for DINO and PRES (transformers ViTModel, CLS embedding): a Hugging "
        "Face repo id, s3://bucket/prefix, a local directory, or random://tiny-dino (random "
        f"weights, for tests). Default the paper's {DEFAULT_DINO_URI}.",
        pattern=DINO_URI,
        min_length=1,
        max_length=512,
    )

    @field_validator("clip_uri", "dino_uri", mode="before")
    @classmethod
    def _explain_uri(cls, value, info):
        # Before the pattern, whose regex would be the whole message.
        pattern, random_uri = {
            "clip_uri": (CLIP_URI, "random://tiny-clip"),
            "dino_uri": (DINO_URI, "random://tiny-dino"),
        }[info.field_name]
        if isinstance(value, str) and not re.match(pattern, value):
            raise ValueError(
                "must be a Hugging Face repo id (org/name), s3://bucket/prefix, a local "
                f"directory (starting with /, . or ~) or {random_uri}"
            )
        return value

    # Defined after _explain_uri so that it runs first (before-validators run last-defined
    # first): a URI with '..' segments gets the reason, not the list of forms.
    _uri_segments = field_validator("clip_uri", "dino_uri", mode="before")(no_dot_segments)


class SecretKeySelector(ApiModel):
    """One key of a Secret in the job's namespace."""

    name: str = field(description="Secret name.", pattern=DNS_SUBDOMAIN, max_length=253)
    key: str = field(description="Key within the Secret.", pattern=r"^[-._a-zA-Z0-9]+$")


class WandbSpec(ApiModel):
    project: str = field(
        description="W&B project the run is logged to.",
        min_length=1,
        max_length=128,
        pattern=r"^[^/\\#?%:]+$",
    )
    entity: str | None = field(
        None, description="W&B entity (user or team); default the API key's.", max_length=128
    )
    run_name: str | None = field(
        None, description="Display name of the run; default the job's name.", max_length=128
    )
    api_key_secret: SecretKeySelector | None = field(
        None,
        description="The Secret key holding the W&B API key, given to the training and "
        "evaluation pods as WANDB_API_KEY (never put the key itself in the spec). Without it the "
        "run is logged offline into <outputUri>/logs/wandb, for `wandb sync` later.",
    )


class TrackingSpec(ApiModel):
    wandb: WandbSpec | None = field(
        None,
        description="Log to Weights & Biases too (TensorBoard is always written): the training "
        "scalars, the sample grids and the evaluation, in one run per job.",
    )


class RunPolicy(ApiModel):
    backoff_limit: int = field(
        3, description="Gang restarts allowed before the job fails.", ge=0, le=100
    )
    active_deadline_seconds: int | None = field(
        None,
        description="Fail the job when priors, training and export have run this many seconds, "
        "counted from its first pod running: time waiting to be scheduled, suspended or "
        "serving does not count.",
        ge=1,
    )
    ttl_seconds_after_finished: int | None = field(
        None, description="Delete the job this long after it finished.", ge=0
    )
    suspend: bool = field(
        False, description="Stop the pods, keep the checkpoints; set false to resume."
    )


class DreamBoothJobSpec(ApiModel):
    base_model: BaseModelSpec = field(description="The model to fine-tune.")
    instance: InstanceSpec | None = field(
        None,
        description="The subject: photos and prompt (the class is priorPreservation.classPrompt)."
        " For several subjects use subjects instead.",
    )
    subjects: list[SubjectSpec] = field(
        list,
        description="Several subjects in one job (instead of instance): each with its photos, "
        "its prompt (its own rare identifier) and its classPrompt. Every step trains every "
        "subject (training.batchSize must be at least their number) with class images of its "
        "class.",
        max_length=MAX_SUBJECTS,
    )
    prior_preservation: PriorPreservationSpec = field(
        PriorPreservationSpec, description="Class-prior preservation."
    )
    training: TrainingSpec = field(TrainingSpec, description="Training hyper-parameters.")
    resources: ResourcesSpec = field(ResourcesSpec, description="Pods and hardware.")
    storage: StorageSpec = field(description="Output and object storage.")
    export: ExportSpec = field(ExportSpec, description="What the export phase writes.")
    inference: InferenceSpec = field(InferenceSpec, description="Inference deployment.")
    evaluation: EvaluationSpec = field(
        EvaluationSpec, description="Subject and prompt fidelity of the trained model."
    )
    tracking: TrackingSpec = field(
        TrackingSpec, description="Experiment tracking beyond TensorBoard."
    )
    run_policy: RunPolicy = field(RunPolicy, description="Restarts, deadlines and suspension.")

    @model_validator(mode="after")
    def _subject_rules(self) -> DreamBoothJobSpec:
        if self.instance is None and not self.subjects:
            raise FieldRuleError("instance", "required (or subjects, for several subjects)")
        if self.instance is not None and self.subjects:
            raise FieldRuleError(
                "subjects", "set either instance (one subject) or subjects (several), not both"
            )
        priors = self.prior_preservation
        if self.instance is not None:
            if priors.enabled and not priors.class_prompt:
                raise FieldRuleError(
                    "priorPreservation.classPrompt",
                    "required when priorPreservation.enabled is true (or disable it)",
                )
            return self
        for name in ("class_prompt", "class_images_uri"):
            if getattr(priors, name) is not None:
                wire = to_camel(name)
                raise FieldRuleError(
                    f"priorPreservation.{wire}",
                    f"not with subjects: each subject names its own (subjects[i].{wire})",
                )
        check_subjects(self.subjects, priors.enabled)
        if self.training.batch_size < len(self.subjects):
            raise FieldRuleError(
                "training.batchSize",
                f"must be at least the number of subjects ({len(self.subjects)}), so that every "
                "micro-batch holds every subject (raise it, or lower gradient accumulation to "
                "keep the effective batch)",
            )
        return self

    @model_validator(mode="after")
    def _cross_section_rules(self) -> DreamBoothJobSpec:
        on_cpu = self.resources.gpus_per_node == 0
        if on_cpu and self.training.mixed_precision == "fp16":
            raise FieldRuleError(
                "training.mixedPrecision",
                'fp16 needs GPUs (gpusPerNode is 0): use "bf16" or "no" on CPU',
            )
        if self.inference.server is not None:
            if self.training.method != "lora":
                raise FieldRuleError(
                    "inference.server",
                    f"only allowed with training.method lora (method is {self.training.method}): "
                    "a server shares one base model among adapters; a full fine-tune is served "
                    "with inference.enabled",
                )
            if self.inference.enabled:
                raise FieldRuleError(
                    "inference.server",
                    "set either inference.enabled (a Deployment of the job's own) or "
                    "inference.server (a shared DreamBoothServer), not both",
                )
        if self.export.fuse and self.training.method != "lora":
            raise FieldRuleError(
                "export.fuse",
                f"only allowed with training.method lora (method is {self.training.method}: "
                "a full fine-tune always exports the whole pipeline)",
            )
        return self


def check_subjects(subjects: list[SubjectSpec], priors_enabled: bool) -> None:
    """Rules between subjects: names, prompts and identifiers of their own, one class-image
    source per class."""
    seen_names: dict[str, int] = {}
    identifiers: list[set[str]] = []
    class_images: dict[str, tuple[int, str | None]] = {}
    class_spellings: dict[str, int] = {}  # each class prompt, lowercased and spaced once
    for i, subject in enumerate(subjects):
        at = f"subjects[{i}]"
        if priors_enabled and not subject.class_prompt:
            raise FieldRuleError(
                f"{at}.classPrompt", "required when priorPreservation.enabled is true"
            )
        label = subject.label(i)
        if label in seen_names:
            raise FieldRuleError(
                f"{at}.name", f"{label!r} is subjects[{seen_names[label]}]'s label already"
            )
        seen_names[label] = i
        words = identifier_words(subject.prompt, subject.class_prompt)
        if not words:
            raise FieldRuleError(
                f"{at}.prompt",
                "has no word beyond its classPrompt: add the subject's rare identifier "
                '(e.g. "a photo of sks dog" for "a photo of dog")',
            )
        for j, other in enumerate(identifiers):
            if words <= other or other <= words:
                raise FieldRuleError(
                    f"{at}.prompt",
                    f"does not tell it from subjects[{j}]: beyond their class prompts, the words "
                    f"{sorted(words & other)} are all one of them has; give each subject a rare "
                    "token of its own",
                )
        identifiers.append(words)
        if subject.class_prompt:
            # CLIP's tokenizer lowercases and collapses spaces: two spellings of one prompt
            # would be two classes with two sets of the same images.
            spelling = " ".join(subject.class_prompt.lower().split())
            first = class_spellings.setdefault(spelling, i)
            if subjects[first].class_prompt != subject.class_prompt:
                raise FieldRuleError(
                    f"{at}.classPrompt",
                    f"is subjects[{first}].classPrompt written another way "
                    f"({subjects[first].class_prompt!r}): write it the same way, so that they "
                    "share one class and its class images",
                )
            own = subject.class_images_uri
            first, uri = class_images.setdefault(subject.class_prompt, (i, own))
            if uri != subject.class_images_uri:
                raise FieldRuleError(
                    f"{at}.classImagesUri",
                    f"differs from subjects[{first}].classImagesUri, whose classPrompt is the "
                    "same: one class, one set of class images",
                )


# ---------------------------------------------------------------------------------------------
# status


class Phase(str, Enum):
    pending = "Pending"
    generating_priors = "GeneratingPriors"
    training = "Training"
    exporting = "Exporting"
    evaluating = "Evaluating"
    serving = "Serving"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"


# The status field stores plain strings; the enum above is the one list of them.
PhaseName = Literal[tuple(p.value for p in Phase)]  # type: ignore[valid-type]
TERMINAL_PHASES = (Phase.succeeded.value, Phase.failed.value)


class StatusModel(BaseModel):
    """Status models tolerate unknown fields: an older operator must not choke on a newer status."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(StatusModel):
    """metav1.Condition."""

    type: str = field(description="Condition type, e.g. Ready, Training, Failed.")
    status: Literal["True", "False", "Unknown"] = field(description="True, False or Unknown.")
    reason: str = field(
        description="CamelCase reason.", pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
    )
    message: str = field("", description="Human-readable detail.", max_length=32768)
    last_transition_time: datetime = field(description="When the status last changed.")
    observed_generation: int | None = field(None, description="Spec generation seen.", ge=0)


class Progress(StatusModel):
    step: int = field(0, description="Optimizer steps done.", ge=0)
    total_steps: int = field(0, description="Optimizer steps in total.", ge=0)
    loss: float | None = field(None, description="Recent training loss.")
    images_per_second: float | None = field(None, description="Training throughput.")
    eta_seconds: int | None = field(None, description="Estimated seconds to finish training.")
    activity: str | None = field(
        None,
        description="What the trainer is doing: loading the base model, preparing the data "
        "(encoding the caches), training. Set from the moment a training pod starts, so that a "
        "job at step 0 says why.",
        max_length=200,
    )
    summary: str | None = field(None, description='"step/total", for kubectl get.')
    updated_at: datetime | None = field(None, description="When the trainer last reported.")

    @model_validator(mode="after")
    def _summarize(self) -> Progress:
        # Printer columns cannot compute, so the "step/total" string is stored.
        self.summary = f"{self.step}/{self.total_steps}"
        return self


MANIFEST_DIGEST = r"^sha256:[0-9a-f]{64}$"


# Written by the trainer after each commit and read back before a resume: the one place that
# says which checkpoint this job wrote, out of reach of whoever may write its storage.
class CheckpointStatus(StatusModel):
    step: int = field(description="Step of the newest committed checkpoint.", ge=0)
    uri: str = field(description="Where it lies.")
    time: datetime | None = field(None, description="When it was committed.")
    manifest_digest: str | None = field(
        None,
        description="sha256 of its manifest.json as committed. The trainer resumes only from "
        "this checkpoint, and only while its manifest (which lists every file's sha256) still "
        "has this digest.",
        pattern=MANIFEST_DIGEST,
    )


ArtifactKind = Literal["pipeline", "lora"]


class ArtifactStatus(StatusModel):
    uri: str = field(description="Where the export lies.")
    digest: str = field(description="sha256 digest of the export manifest.")
    kind: ArtifactKind = field(
        "pipeline",
        description="pipeline (a whole diffusers pipeline) or lora (an adapter that needs "
        "baseModel).",
    )
    base_model: str | None = field(
        None, description="With kind lora: the URI of the base model the adapter applies to."
    )


class PriorsStatus(StatusModel):
    cache_key: str = field(description="Content-addressed key of the class images.")
    uri: str = field(description="Where the class images lie.")
    images: int = field(0, description="Class images present.", ge=0)


class InferenceStatus(StatusModel):
    endpoint: str | None = field(None, description="In-cluster URL of the inference Service.")
    ready_replicas: int = field(0, description="Ready inference pods.", ge=0)
    digest: str | None = field(None, description="Artifact digest being served.")
    server: str | None = field(
        None, description="With inference.server: the DreamBoothServer (NAMESPACE/NAME)."
    )
    model: str | None = field(
        None,
        description="With inference.server: the OpenAI `model` value that selects this job's "
        "adapter (NAMESPACE/JOB).",
    )


class EvaluationScores(StatusModel):
    """One model's scores; cosine similarities lie in [-1, 1], in practice in [0, 1]."""

    dino: float = field(
        description="Subject fidelity: mean DINO cosine similarity of generated to real subject "
        "images (higher is better; the paper's SD run: 0.668)."
    )
    clip_i: float = field(
        description="Subject fidelity: the same with CLIP image embeddings (paper: 0.803)."
    )
    clip_t: float = field(
        description="Prompt fidelity: mean CLIP cosine similarity of each image to its prompt "
        "(paper: 0.305)."
    )
    pres: float | None = field(
        None,
        description="Prior drift: mean DINO similarity of class-prompt images to the real subject "
        "(lower is better); absent without a class prompt.",
    )
    div: float = field(
        description="Diversity: mean pairwise distance between images of the same prompt "
        "(higher is better); see diversityMethod."
    )

    @field_validator("dino", "clip_i", "clip_t", "pres", "div")
    @classmethod
    def _four_decimals(cls, value: float | None) -> float | None:
        # The paper reports three; more digits are noise in `kubectl get` and the report.
        return None if value is None else round(value, 4)


class EvaluationStatus(StatusModel):
    trained: EvaluationScores = field(description="The exported model's scores.")
    base: EvaluationScores = field(description="The base model's scores on the same prompts.")
    diversity_method: Literal["lpips", "dino"] = field(
        description="lpips: LPIPS distance (the paper's); dino: 1 - cosine similarity of DINO "
        "embeddings (when LPIPS is not installed)."
    )
    images: int = field(0, description="Images generated per model.", ge=0)
    report_uri: str | None = field(None, description="The JSON report.")
    grid_uri: str | None = field(None, description="The image grid (base left, trained right).")
    summary: str | None = field(None, description='"DINO 0.61 (+0.12)", for kubectl get.')

    @model_validator(mode="after")
    def _summarize(self) -> EvaluationStatus:
        gain = self.trained.dino - self.base.dino
        self.summary = f"DINO {self.trained.dino:.3f} ({gain:+.3f})"
        return self


class DreamBoothJobStatus(StatusModel):
    phase: PhaseName | None = field(None, description="Where the job is in its lifecycle.")
    conditions: list[Condition] = field(list, description="Standard conditions.")
    progress: Progress | None = field(None, description="Training progress.")
    checkpoint: CheckpointStatus | None = field(None, description="Newest committed checkpoint.")
    priors: PriorsStatus | None = field(None, description="Class-image cache.")
    artifact: ArtifactStatus | None = field(None, description="Exported pipeline.")
    inference: InferenceStatus | None = field(None, description="Inference deployment.")
    evaluation: EvaluationStatus | None = field(
        None, description="Scores of the trained and the base model."
    )
    restarts: int = field(0, description="Gang restarts so far.", ge=0)
    observed_generation: int | None = field(None, description="Spec generation acted on.", ge=0)
    start_time: datetime | None = field(None, description="When the job started running.")
    completion_time: datetime | None = field(None, description="When the job finished.")


# ---------------------------------------------------------------------------------------------
# the object


class ObjectMeta(BaseModel):
    """The part of metav1.ObjectMeta that validation looks at; the rest passes through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(
        description="Job name (DNS label).",
        min_length=1,
        max_length=MAX_JOB_NAME_LENGTH,
        pattern=JOB_NAME,
    )
    namespace: str | None = Field(None, max_length=63, pattern=DNS_LABEL)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name", mode="before")
    @classmethod
    def _explain_name(cls, value):
        if isinstance(value, str) and (
            len(value) > MAX_JOB_NAME_LENGTH or not re.match(JOB_NAME, value)
        ):
            raise ValueError(
                f"must be a DNS-1035 label (lower-case letters, digits and '-', starting with a "
                f"letter, ending with a letter or digit) of at most {MAX_JOB_NAME_LENGTH} "
                f"characters, so that child names (Services among them) are valid"
            )
        return value


class DreamBoothJob(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    api_version: Literal["dreambooth.dev/v1alpha1"] = Field(
        API_VERSION, description=f"The versioned schema of this object: {API_VERSION}."
    )
    kind: Literal["DreamBoothJob"] = Field(
        KIND, description=f"The REST resource this object represents: {KIND}."
    )
    metadata: ObjectMeta
    spec: DreamBoothJobSpec = Field(
        description="The job: base model, subject photos and prompts, training, resources, "
        "storage and serving."
    )
    status: DreamBoothJobStatus | None = Field(
        None,
        description="What the operator and the trainers observed (phase, conditions, progress); "
        "written by them, not by users.",
    )
