"""The operator installs without torch; the training extra brings it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.needs import require

ROOT = Path(__file__).resolve().parents[2]


def _resolve(*extras: str) -> set[str]:
    uv = shutil.which("uv") or str(ROOT / ".venv/bin/uv")
    require(Path(uv).exists(), "uv is needed to resolve the dependency set")
    command = [uv, "pip", "compile", "--quiet", "--no-header", "pyproject.toml"]
    command += [arg for extra in extras for arg in ("--extra", extra)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {
        line.split("==")[0].strip().lower()
        for line in result.stdout.splitlines()
        if line and not line.startswith(("#", " "))
    }


@pytest.mark.slow
def test_base_install_does_not_pull_torch():
    base = _resolve()
    assert {"kopf", "kubernetes", "pydantic", "boto3", "prometheus-client", "click"} <= base
    assert not base & {"torch", "diffusers", "transformers", "deepspeed"}


@pytest.mark.slow
def test_train_extra_pulls_the_training_stack():
    assert {"torch", "diffusers", "transformers", "deepspeed"} <= _resolve("train")
