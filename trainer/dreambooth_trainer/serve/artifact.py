"""Find, verify and load the exported pipeline the server is told to serve.

Order matters: the files are checked against the export's sha256 manifest (and, when given, the
digest the operator recorded in status.artifact.digest) BEFORE anything is deserialized, so a
tampered or half-copied artifact is refused instead of served.

A LoRA export (`load_with_adapter`) is served on its base model: the adapter is verified first,
then the base is checked against the one the adapter records (models/base_identity.py), and
only then are the base and the adapter loaded.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from dreambooth_contract.api import BaseModelSpec, S3Spec
from dreambooth_contract.layout import PIPELINE_DIR

from .. import digest as artifact_digest
from ..methods import lora_export
from ..models import base_identity, random_models
from ..models.family import open_pipeline
from ..models.loading import resolve_model_source
from ..storage import open_store

log = logging.getLogger(__name__)

# fp16 weights are a variant of the exported pipeline (export.py).
FP16_VARIANT = "fp16"


@dataclass(frozen=True)
class LoadedModel:
    """What the server runs: the pipeline on its device and the digest it was verified against."""

    pipeline: StableDiffusionPipeline
    digest: str | None = None


class ArtifactError(RuntimeError):
    """The artifact cannot be served: missing, not an export, or not matching its digest."""


@dataclass(frozen=True)
class S3Location:
    endpoint: str | None = None
    region: str | None = None


@dataclass(frozen=True)
class Artifact:
    path: Path
    # "sha256:<hex>" from the manifest; None for random:// models (built in code, no manifest).
    digest: str | None

    @property
    def pipeline_dir(self) -> Path:
        """The export's diffusers pipeline (layout.PIPELINE_DIR); a bare pipeline dir works too."""
        nested = self.path / PIPELINE_DIR
        return nested if (nested / "model_index.json").is_file() else self.path


def fetch(uri: str, cache_dir: Path, s3: S3Location | None = None, version: str = "") -> Path:
    """A local directory with the artifact's files (an s3:// URI is downloaded afresh).

    `version` (an expected digest) gives each version at one URI a download folder of its own,
    so that a re-download never replaces files another version was verified and loaded from."""
    if random_models.is_random_uri(uri):
        return random_models.materialize(uri, cache_dir)
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise ArtifactError(f"{uri}: no such directory")
        return path
    s3 = s3 or S3Location()
    # Always a fresh copy: verification refuses files the manifest does not list, so leftovers
    # of an earlier artifact at the same URI must not linger.
    target = cache_dir / "serve" / hashlib.sha256((uri + version).encode()).hexdigest()[:16]
    shutil.rmtree(target, ignore_errors=True)
    log.info("downloading %s to %s", uri, target)
    files = open_store(uri, s3.endpoint, s3.region).download_dir("", target)
    if not files:
        raise ArtifactError(f"{uri}: no objects under this prefix")
    return target


def verify(uri: str, path: Path, expected_digest: str | None = None) -> Artifact:
    """Check every file against the manifest (and the manifest against `expected_digest`)."""
    if random_models.is_random_uri(uri):
        if expected_digest:
            raise ArtifactError(f"{uri}: a random model has no digest to check against")
        log.warning("serving %s: random weights built in code, nothing to verify", uri)
        return Artifact(path, None)
    if not (path / artifact_digest.MANIFEST).is_file():
        raise ArtifactError(f"{uri}: not an exported artifact ({artifact_digest.MANIFEST} missing)")
    try:
        found = artifact_digest.verify(path)
    except artifact_digest.DigestMismatch as exc:
        raise ArtifactError(f"refusing to serve {uri}: {exc}") from exc
    expected = _normalize(expected_digest) if expected_digest else None
    if expected and found != expected:
        raise ArtifactError(f"refusing to serve {uri}: its digest is {found}, expected {expected}")
    return Artifact(path, found)


def _normalize(digest: str) -> str:
    return digest if digest.startswith("sha256:") else f"sha256:{digest}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp16 on GPU (half the memory, tensor cores), fp32 on CPU (fp16 kernels are slow there)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def load_pipeline(
    source: Path | str,
    device: torch.device,
    dtype: torch.dtype,
    revision: str | None = None,
    variant: str | None = None,
) -> StableDiffusionPipeline:
    """A pipeline from a directory (or, for a LoRA's base, a hub id) on `device`."""
    if variant is None and isinstance(source, Path):
        # The export's fp16 variant, when present, loads half the bytes for an fp16 server.
        has_fp16 = any(source.glob(f"*/*.{FP16_VARIANT}.safetensors"))
        variant = FP16_VARIANT if dtype == torch.float16 and has_fp16 else None
    return open_pipeline(source, dtype, revision, variant).to(device)


def load(
    uri: str,
    *,
    cache_dir: Path,
    expected_digest: str | None = None,
    s3: S3Location | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> LoadedModel:
    """Fetch, verify, then load: nothing is deserialized before its digest checked out."""
    verified = verify(uri, fetch(uri, cache_dir, s3), expected_digest)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    log.info("loading %s on %s as %s", verified.pipeline_dir, torch_device, torch_dtype)
    return LoadedModel(
        load_pipeline(verified.pipeline_dir, torch_device, torch_dtype), verified.digest
    )


def fetch_adapter(
    adapter_uri: str,
    *,
    cache_dir: Path,
    expected_digest: str | None = None,
    s3: S3Location | None = None,
) -> tuple[Artifact, dict]:
    """A LoRA export's files, checked against its manifest (and `expected_digest`), and the
    record of the base model it was trained on (base_identity)."""
    if random_models.is_random_uri(adapter_uri):
        raise ArtifactError(f"{adapter_uri}: an adapter is a LoRA export, not a random model")
    fetched = fetch(adapter_uri, cache_dir, s3, version=expected_digest or "")
    adapter = verify(adapter_uri, fetched, expected_digest)
    if not (adapter.path / base_identity.BASE_MODEL_FILE).is_file():
        raise ArtifactError(
            f"{adapter_uri}: not a LoRA export ({base_identity.BASE_MODEL_FILE} missing); "
            "serve a pipeline with --model alone"
        )
    return adapter, base_identity.read_record(adapter.path)


class ServedBase:
    """The base model a server runs (`uri` as given to --model, its files in `source`) and the
    check that an adapter was trained on exactly it."""

    def __init__(self, uri: str, source: str):
        self.uri = uri
        self.source = source
        self._files_digest: str | None = None

    def check(self, record: dict, adapter_uri: str) -> None:
        """ArtifactError naming both bases unless the adapter's `record` is this base."""
        try:
            base_identity.check_uri(record, self.uri)
            base_identity.check_files(record, self.source, self._digest_of)
        except base_identity.BaseModelMismatch as exc:
            raise ArtifactError(
                f"refusing to serve {adapter_uri} on --model {self.uri}: {exc}"
            ) from exc

    def _digest_of(self, source: Path) -> str:
        if self._files_digest is None:  # once per server: a base is gigabytes
            self._files_digest = base_identity.files_digest(source)
        return self._files_digest


def resolve_base(uri: str, cache_dir: Path, s3: S3Location | None = None, spec=None) -> ServedBase:
    """The base `uri` names (a directory, s3://, random://, a hub id), ready to load."""
    s3 = s3 or S3Location()
    spec = spec or BaseModelSpec(uri=uri)
    try:
        source = resolve_model_source(
            spec, cache_dir, S3Spec(endpoint=s3.endpoint, region=s3.region)
        )
    except FileNotFoundError as exc:
        raise ArtifactError(f"--model {uri}: {exc}") from exc
    return ServedBase(uri, source)


def load_base(
    base: ServedBase,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
) -> StableDiffusionPipeline:
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    log.info("loading base %s on %s as %s", base.uri, torch_device, torch_dtype)
    local = Path(base.source)
    return load_pipeline(
        local if local.is_dir() else base.source, torch_device, torch_dtype, revision, variant
    )


def load_with_adapter(
    base_uri: str,
    adapter_uri: str,
    *,
    cache_dir: Path,
    expected_digest: str | None = None,
    s3: S3Location | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> LoadedModel:
    """The base model with a LoRA export applied, after checking both: the adapter's files
    against its manifest (and `expected_digest`), the base against the adapter's record."""
    adapter, record = fetch_adapter(
        adapter_uri, cache_dir=cache_dir, expected_digest=expected_digest, s3=s3
    )
    try:
        base_identity.check_uri(record, base_uri)
    except base_identity.BaseModelMismatch as exc:
        raise ArtifactError(
            f"refusing to serve {adapter_uri} on --model {base_uri}: {exc}"
        ) from exc
    # The recorded spec: the base is loaded at the revision and variant it was trained on.
    spec = base_identity.spec_of(record)
    base = resolve_base(base_uri, cache_dir, s3, spec)
    base.check(record, adapter_uri)
    log.info("applying adapter %s", adapter_uri)
    pipeline = load_base(base, device, dtype, spec.revision, spec.variant)
    lora_export.apply_adapter(pipeline, adapter.path)
    return LoadedModel(pipeline, adapter.digest)
