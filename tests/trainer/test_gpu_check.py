"""The GPU check (bench/gpu): its smoke run passes on the CPU, so the script the rare GPU runs
depend on cannot rot; its orchestrator keeps budgets; the wheelhouse helpers do what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench import gpu
from bench.gpu import LOG_FILE, REPORT_FILE, STEPS
from bench.gpu.summary import render
from bench.gpu.wheelhouse import problems, slim

REPO = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT = 900


def run_check(outdir: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable}
    return subprocess.run(
        ["bash", "bench/gpu/run.sh", str(outdir), *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def steps_by_name(outdir: Path) -> dict[str, dict]:
    report = json.loads((outdir / REPORT_FILE).read_text())
    return {step["name"]: step for step in report["steps"]}


@pytest.mark.trainer
@pytest.mark.slow
def test_the_smoke_run_passes_every_step_or_says_why_not(tmp_path: Path):
    """`bash bench/gpu/run.sh OUT --smoke`: every step of the plan is in the report, and each
    passed or was skipped with its reason (only those the plan skips on a CPU); none failed."""
    done = run_check(tmp_path, "--smoke", timeout=SMOKE_TIMEOUT)
    steps = steps_by_name(tmp_path)
    failed = {name: (s.get("error"), s.get("log_tail", [])[-8:]) for name, s in steps.items()
              if s["status"] == "failed"}  # fmt: skip
    assert not failed, failed
    assert list(steps) == [step.name for step in STEPS]
    assert done.returncode == 0, done.stderr[-3000:]
    expected_skips = {s.name for s in STEPS if s.skip_reason("smoke")}
    assert {n for n, s in steps.items() if s["status"] == "skipped"} == expected_skips
    assert all(steps[name]["reason"] for name in expected_skips)
    assert {s["status"] for s in steps.values()} <= {"passed", "skipped"}
    # What the steps measured, not only that they ran.
    assert steps["train.single.fp16"]["result"]["final_loss"] < steps["train.single.fp16"][
        "result"]["losses"][0]  # fmt: skip
    assert steps["resume.single.fp16"]["result"]["bitwise"] is True  # the CPU is deterministic
    assert steps["figures.training.bf16"]["result"]["rows"][0]["steps_per_second"] > 0
    assert steps["figures.inference"]["result"]["modes"]["batching"]["results"]
    assert steps["sdxl.inference.fp16"]["result"]["model"] == "random://tiny-sdxl"
    sdxl_lora = steps["sdxl.lora.train"]["result"]
    assert (sdxl_lora["model"], sdxl_lora["family"], sdxl_lora["resolution"]) == (
        "random://tiny-sdxl", "sdxl", 64)  # fmt: skip
    # fp16 autocast: fp32 adapters, and SDXL's VAE kept in fp32 (it overflows in fp16).
    assert sdxl_lora["trainable_dtypes"] == ["torch.float32"]
    assert sdxl_lora["vae_dtype"] == "torch.float32"
    assert sdxl_lora["final_loss"] < sdxl_lora["losses"][0]
    sdxl_rows = steps["sdxl.figures"]["result"]["rows"]
    assert [row["label"] for row in sdxl_rows] == ["lora single", "single checkpointed"]
    assert all(row["family"] == "sdxl" and row["steps_per_second"] > 0 for row in sdxl_rows)
    variants = {row["variant"]: row for row in steps["figures.step_variants"]["result"]["rows"]}
    assert set(variants) == {"defaults", "fused_adamw", "channels_last", "compile_regional"}
    assert all(row["speedup"] > 0 for row in variants.values())
    assert variants["compile_regional"]["compile_backend"] == "eager"  # cheap on a CPU
    assert variants["compile_regional"]["compile_seconds"] >= 0
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert report["mode"] == "smoke" and report["environment"]["device"] == "cpu"
    assert (tmp_path / LOG_FILE).stat().st_size > 0
    assert done.stdout.startswith("GPU check (smoke)")
    assert len(done.stdout.splitlines()) < 50  # one screen


def orchestrate(outdir: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        "-m",
        "bench.gpu",
        str(outdir),
        "--plan",
        "tests.trainer.gpu_check_plan",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [*argv, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_step_over_budget_is_killed_and_the_rest_still_runs(tmp_path: Path):
    names = ["first", "hang", "after-hang", "boom", "dies", "after-death", "skips", "not-here",
             "last"]  # fmt: skip
    done = orchestrate(tmp_path, "--smoke", *(f"--only={name}" for name in names))
    assert done.returncode == 1, done.stderr
    steps = steps_by_name(tmp_path)
    assert list(steps) == names
    status = {name: step["status"] for name, step in steps.items()}
    assert status == {
        "first": "passed", "hang": "failed", "after-hang": "passed", "boom": "failed",
        "dies": "failed", "after-death": "passed", "skips": "skipped", "not-here": "skipped",
        "last": "passed",
    }  # fmt: skip
    assert steps["hang"]["error"] == "over its budget of 2 s"
    assert steps["hang"]["result"]["rows"][0]["label"] == "first"  # reported before it hung
    assert steps["boom"]["error"] == "ValueError: boom"
    assert any("ValueError: boom" in line for line in steps["boom"]["log_tail"])
    assert steps["dies"]["error"] == "the worker died (exit 3) during the step"
    assert steps["after-death"]["result"]["value"] == 3
    assert steps["skips"]["reason"] == "nothing to run here"
    assert steps["not-here"]["reason"] == "not built yet: no such thing"
    assert "hang                   failed" in done.stdout


def test_the_run_deadline_stops_the_step_and_what_follows_is_not_run(tmp_path: Path):
    done = orchestrate(tmp_path, "--only=first", "--only=deadline", "--only=last")
    assert done.returncode == 1
    steps = steps_by_name(tmp_path)
    assert steps["first"]["status"] == "passed"
    assert steps["deadline"]["error"].startswith("stopped at the run's deadline (6 s")
    assert steps["last"] == {
        "name": "last", "status": "failed", "error": "not run: the run's 6 s were spent",
        "seconds": 0.0,
    }  # fmt: skip


def test_the_plan_names_every_step_once_and_each_resolves():
    import importlib

    names = [step.name for step in STEPS]
    assert len(names) == len(set(names))
    for step in STEPS:
        assert set(step.budget) == set(gpu.PROFILES)
        module, _, function = step.target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), step.target
    # The device call gives 560 s; the run stops itself before.
    assert gpu.GPU.total_seconds < 560
    assert not [s.name for s in STEPS if "*" in s.skip]  # every step runs somewhere
    # `--only sdxl.` runs the SDXL steps (last, together) in one device call.
    sdxl = [s for s in STEPS if s.name.startswith("sdxl.")]
    assert [s.name for s in sdxl] == ["sdxl.inference.fp16", "sdxl.lora.train", "sdxl.figures"]
    assert STEPS[-len(sdxl) :] == sdxl
    assert sum(s.budget_for("gpu") for s in sdxl) < gpu.GPU.total_seconds


def test_the_summary_fits_one_screen():
    steps = [
        {"name": s.name, "status": "passed", "seconds": 12.0, "budget_seconds": 60.0,
         "result": {"summary": "x" * 300}} for s in STEPS
    ]  # fmt: skip
    steps[-1]["result"]["rows"] = []
    report = {
        "mode": "gpu", "started": "2026-12-01T00:00:00+00:00", "wall_seconds": 500.0,
        "setup_seconds": 12.0, "budget_seconds": 530.0, "environment": {"device": "NVIDIA H200"},
        "counts": {"passed": len(steps), "failed": 0, "skipped": 0}, "steps": steps,
    }  # fmt: skip
    lines = render(report).splitlines()
    assert lines[0].startswith("GPU check (gpu) on NVIDIA H200")
    assert len(lines) < 50 and max(map(len, lines[1:])) <= 100


def make_wheel(directory: Path, name: str, version: str, requires: list[str], files=()) -> Path:
    path = directory / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    members = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}",
               **{f: "x" * 100 for f in files}}  # fmt: skip
    members[f"{info}/RECORD"] = (
        "".join(f"{m},sha256=abc,1\n" for m in members) + f"{info}/RECORD,,\n"
    )
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in members.items():
            wheel.writestr(member, text)
    return path


def test_the_wheelhouse_check_finds_what_neither_it_nor_the_device_has(tmp_path: Path):
    make_wheel(tmp_path, "alpha", "1.0", [
        "beta>=2",                          # carried, but too old
        "numpy",                            # on the device
        "transformers<5",                   # on the device, at 5.17
        "zeta",                             # nowhere
        "gamma; extra == 'docs'",           # an extra: not needed
        "delta; python_version < '3.12'",   # not on the device's Python
    ])  # fmt: skip
    make_wheel(tmp_path, "beta", "1.0", [])
    found = problems(tmp_path)
    assert found == [
        "alpha-1.0-py3-none-any.whl needs beta>=2: 1.0 carried",
        "alpha-1.0-py3-none-any.whl needs transformers<5: 5.17.0 on the device",
        "alpha-1.0-py3-none-any.whl needs zeta: neither carried nor on the device",
    ]
    make_wheel(tmp_path, "beta", "2.0", [])
    assert "beta: more than one wheel (pip would refuse to install both)" in problems(tmp_path)


def test_slimming_a_wheel_drops_files_and_their_record_lines(tmp_path: Path):
    files = ["pkg/__init__.py", "pkg/lib_cpu.so", "pkg/lib_cuda118.so", "pkg/lib_cuda130.so"]
    wheel = make_wheel(tmp_path, "pkg", "1.0", [], files)
    removed = slim(wheel, drop=r"lib_.*\.so$", keep=r"lib_(cpu|cuda13\d)\.so$")
    assert removed == ["pkg/lib_cuda118.so"]
    with zipfile.ZipFile(wheel) as slimmed:
        names = slimmed.namelist()
        record = slimmed.read("pkg-1.0.dist-info/RECORD").decode()
    assert "pkg/lib_cuda118.so" not in names and "pkg/lib_cuda130.so" in names
    assert "lib_cuda118" not in record and "pkg/lib_cpu.so," in record


def test_the_wheelhouse_is_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=REPO)
    assert ignored.returncode == 0
