"""`dreambooth serve --model URI [--adapter URI | --publications DIR]`: verify and serve.

--adapter serves one LoRA export; --publications serves every adapter published in DIR (the
operator's mounted ConfigMap, contract publication.py) on the one base --model names.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import click

from dreambooth_contract.env import CACHE_DIR_ENV, DEFAULT_CACHE_DIR
from dreambooth_contract.sampling import MAX_GUIDANCE_SCALE, SCHEDULER_NAMES

from .config import MAX_BODY_BYTES, REQUEST_TIMEOUT_S, BatchingSettings, Limits, ServeSettings

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The API key itself (e.g. from a Secret via env valueFrom); --api-key-file is the other way.
API_KEY_ENV = "DREAMBOOTH_API_KEY"
API_KEY_FILE_ENV = "DREAMBOOTH_API_KEY_FILE"


def read_api_key(key_file: Path | None, environ: dict[str, str] | None = None) -> str | None:
    """The API key from --api-key-file or $DREAMBOOTH_API_KEY (one of them), else None.

    Error messages never contain the key.
    """
    from_env = (os.environ if environ is None else environ).get(API_KEY_ENV, "")
    if key_file is not None and from_env:
        raise click.BadParameter(
            f"give the API key once: either this or ${API_KEY_ENV}", param_hint="--api-key-file"
        )
    if key_file is not None:
        try:
            key, source = key_file.read_text().strip(), str(key_file)
        except (OSError, UnicodeDecodeError) as error:
            raise click.BadParameter(
                f"cannot read {key_file}: {error}", param_hint="--api-key-file"
            ) from None
    elif from_env:
        key, source = from_env.strip(), f"${API_KEY_ENV}"
    else:
        return None
    # What a client can send in an Authorization header: printable ASCII, no spaces.
    if not key or not key.isascii() or not key.isprintable() or " " in key:
        raise click.BadParameter(
            f"the API key in {source} must be non-empty printable ASCII without spaces",
            param_hint="--api-key-file",
        )
    return key


@click.command("serve")
@click.option(
    "--model",
    "model_uri",
    required=True,
    metavar="URI",
    help="Exported artifact: a directory or s3://bucket/prefix (random://tiny-sd for demos). "
    "With --adapter: the base model the adapter was trained on, as its job's baseModel.uri.",
)
@click.option(
    "--adapter",
    "adapter_uri",
    metavar="URI",
    help="A LoRA job's export (a directory or s3://bucket/prefix), applied to --model; it is "
    "refused unless it was trained on exactly that base.",
)
@click.option(
    "--publications",
    "publications_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory with the publication index (publications.json, re-read when it changes): "
    "serve every LoRA export published there on --model, chosen by the request's `model`.",
)
@click.option(
    "--max-loaded-adapters",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="With --publications: adapters kept loaded; the least recently used beyond are evicted.",
)
@click.option(
    "--publications-poll-interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="With --publications: seconds between checks of the index for changes.",
)
@click.option(
    "--digest",
    envvar="DREAMBOOTH_MODEL_DIGEST",
    help="Expected artifact digest (sha256:...), e.g. status.artifact.digest; refuse any other. "
    "With --adapter: the adapter's.",
)
@click.option("--served-model-name", help="Model id in the API (default: the --model URI).")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--max-batch-size",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images per pipeline call; 1 serves one request at a time.",
)
@click.option(
    "--max-queue",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Waiting requests; beyond that requests get 429.",
)
@click.option(
    "--batch-timeout-ms",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="How long a batch waits for compatible requests to join.",
)
@click.option(
    "--request-timeout",
    default=REQUEST_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request may wait and run; then 504, and its queued work is dropped.",
)
@click.option(
    "--max-request-bytes",
    default=MAX_BODY_BYTES,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest request body; larger ones get 413 unread.",
)
@click.option(
    "--api-key-file",
    envvar=API_KEY_FILE_ENV,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"File holding the API key clients must send as 'Authorization: Bearer KEY' on /v1/ "
    f"(or the key itself in ${API_KEY_ENV}). Default: no key. Health and metrics stay open.",
)
@click.option("--max-images", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-size", default=1024, show_default=True, type=click.IntRange(min=8))
@click.option("--max-steps", default=150, show_default=True, type=click.IntRange(min=1))
@click.option("--default-steps", default=25, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--default-guidance-scale",
    default=7.5,
    show_default=True,
    type=click.FloatRange(0, MAX_GUIDANCE_SCALE),
    help="Classifier-free guidance of a request that names none.",
)
@click.option(
    "--default-scheduler",
    type=click.Choice(SCHEDULER_NAMES),
    help="Sampler of a request that names none (default: the model's own scheduler).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1...")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float16", "bfloat16", "float32"]),
    help="auto: float16 on GPU, float32 on CPU.",
)
@click.option(
    "--cpu-threads",
    type=click.IntRange(min=1),
    help="torch intra-op threads (default: all cores; set it to the pod's CPU limit).",
)
@click.option(
    "--cache-dir",
    envvar=CACHE_DIR_ENV,
    default=DEFAULT_CACHE_DIR,
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where s3:// artifacts are downloaded.",
)
@click.option("--s3-endpoint", help="S3 endpoint (MinIO...); default AWS_ENDPOINT_URL_S3 or AWS.")
@click.option("--s3-region", help="S3 region; default AWS_REGION.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def serve(
    model_uri: str,
    adapter_uri: str | None,
    publications_dir: Path | None,
    max_loaded_adapters: int,
    publications_poll_interval: float,
    digest: str | None,
    served_model_name: str | None,
    host: str,
    port: int,
    max_batch_size: int,
    max_queue: int,
    batch_timeout_ms: float,
    request_timeout: float,
    max_request_bytes: int,
    api_key_file: Path | None,
    max_images: int,
    max_size: int,
    max_steps: int,
    default_steps: int,
    default_guidance_scale: float,
    default_scheduler: str | None,
    device: str,
    dtype: str,
    cpu_threads: int | None,
    cache_dir: Path,
    s3_endpoint: str | None,
    s3_region: str | None,
    log_level: str,
) -> None:
    """Serve an exported pipeline, or a base model with a LoRA adapter (--adapter) or with every
    adapter published to it (--publications), over HTTP (OpenAI Images API, /readyz, /metrics).

    The artifact is downloaded, checked against its sha256 manifest (and --digest) and loaded in
    the background: /healthz answers at once, /readyz once the model is ready. A refused
    artifact stops the server with exit status 1.
    """
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    if publications_dir is not None and (adapter_uri or digest):
        raise click.BadParameter(
            "the index gives each adapter and its digest; drop --adapter and --digest",
            param_hint="--publications",
        )
    if default_steps > max_steps:
        raise click.BadParameter("must not exceed --max-steps", param_hint="--default-steps")
    api_key = read_api_key(api_key_file)
    # Heavy imports (torch, diffusers) only once the arguments are known to be good.
    from ..lean_imports import skip_unused_imports

    skip_unused_imports()  # before the imports below load diffusers' models
    import torch
    import uvicorn
    from diffusers.utils import logging as diffusers_logging

    from . import artifact
    from .adapters import AdapterVerifier
    from .app import create_app
    from .catalog import AdapterCatalog
    from .publications import PublicationSource

    diffusers_logging.disable_progress_bar()  # loading bars are noise in a server's log
    if cpu_threads:
        # torch sizes its pool from the node's cores, not the container's CPU limit; more
        # threads than cores makes every op wait for descheduled threads.
        torch.set_num_threads(cpu_threads)
    settings = ServeSettings(
        model_id=served_model_name or adapter_uri or model_uri,
        limits=Limits(max_n=max_images, max_side=max_size, max_steps=max_steps),
        batching=BatchingSettings(max_batch_size, max_queue, batch_timeout_ms),
        default_steps=default_steps,
        default_guidance_scale=default_guidance_scale,
        default_scheduler=default_scheduler,
        request_timeout_s=request_timeout,
        max_body_bytes=max_request_bytes,
        api_key=api_key,
    )
    log.info("API key: %s", "required on /v1/" if api_key else "none (open API)")
    s3 = artifact.S3Location(s3_endpoint, s3_region)
    cache = cache_dir.expanduser()
    catalog = None
    if publications_dir is not None:
        catalog = AdapterCatalog(
            PublicationSource(publications_dir),
            AdapterVerifier(cache, s3),
            max_loaded=max_loaded_adapters,
            poll_interval_s=publications_poll_interval,
        )
        loader = partial(catalog.load_base, model_uri, cache, device=device, dtype=dtype)
    else:
        if adapter_uri:
            load = partial(artifact.load_with_adapter, model_uri, adapter_uri)
        else:
            load = partial(artifact.load, model_uri)
        loader = partial(
            load, cache_dir=cache, expected_digest=digest, s3=s3, device=device, dtype=dtype
        )
    server: uvicorn.Server | None = None

    def stop(_: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, loader, on_load_failure=stop, catalog=catalog)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    server.run()
    if app.state.host.error:
        raise click.ClickException(f"the model was not loaded: {app.state.host.error}")
