"""The benchmark entry point prints JSON with the figures the issue asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main

pytestmark = pytest.mark.trainer


def test_training_benchmark_prints_json(capsys, tmp_path: Path):
    assert main(["--quick", "--work-dir", str(tmp_path), "training"]) == 0
    report = json.loads(capsys.readouterr().out)
    runs = report["benchmarks"]["training"]["runs"]
    assert {run["cache_latents"] for run in runs} == {True, False}
    assert all(run["steps_per_second"] > 0 and run["images_per_second"] > 0 for run in runs)
    assert report["environment"]["model"] == "random://tiny-sd"


def test_unknown_benchmark_is_refused(capsys):
    assert main(["no-such-benchmark"]) == 2
    assert "known:" in capsys.readouterr().err
