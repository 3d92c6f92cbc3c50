"""Stores for the storage tests: a local directory and a bucket on moto's S3 server.

The S3 store gets its credentials the way a pod does, from AWS_* environment variables, and a
deliberately recognisable secret so tests can assert it never shows up in errors or logs.
"""

from __future__ import annotations

import pytest
from boto3.s3.transfer import TransferConfig

from dreambooth_trainer.storage import LocalStore, S3Store, Store, open_store

SECRET = "SECRET-must-never-appear-in-output"
# 5 MiB is S3's smallest part: an 11 MiB file then uploads in three parts.
MULTIPART = 5 << 20
BACKENDS = ("local", "s3")


@pytest.fixture
def aws_env(monkeypatch, s3_server) -> None:
    """Credentials in the environment only, as from a Secret; no profile or config file."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


def small_transfer_config() -> TransferConfig:
    return TransferConfig(
        multipart_threshold=MULTIPART, multipart_chunksize=MULTIPART, max_concurrency=4
    )


@pytest.fixture
def s3_store(aws_env, s3_server, s3_bucket) -> S3Store:
    store = open_store(
        f"s3://{s3_bucket}/jobs/test",
        endpoint=s3_server.endpoint_url,
        region=s3_server.region,
        transfer_config=small_transfer_config(),
    )
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def local_store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture(params=BACKENDS)
def store(request) -> Store:
    """Each test using it runs once per backend."""
    return request.getfixturevalue(f"{request.param}_store")
