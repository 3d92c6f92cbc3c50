"""Fixtures for the torchrun tests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.needs import require_module

from .harness import worker_env

# DeepSpeed JIT-compiles its CPU shared-memory collective op the first time a process group
# starts (about a minute, once per machine; cached in ~/.cache/torch_extensions).
BUILD_DEEPSPEED_OPS = """
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and builder.is_compatible():
    builder.load()
"""


@pytest.fixture(scope="session")
def deepspeed_ops() -> None:
    """DeepSpeed importable and its ops built before any timed torchrun starts."""
    require_module("deepspeed")
    subprocess.run(
        [sys.executable, "-c", BUILD_DEEPSPEED_OPS],
        env=worker_env(),
        check=True,
        timeout=600,
        capture_output=True,
    )
