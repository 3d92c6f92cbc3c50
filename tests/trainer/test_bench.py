"""The benchmarks measure what they say: one training run end to end, the plan, the plots."""

from __future__ import annotations

import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import bench.training
from bench import Settings, lora_sizes, multi_adapter, overhead, step_variants
from bench.__main__ import main
from bench.hardware import cpu_description, parse_cpuinfo
from bench.plots import write_plots
from bench.training import BACKENDS, TrainingRun, measure, planned_runs, prepare_class_images

pytestmark = pytest.mark.trainer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_a_training_run_reports_throughput_split_memory_and_flops(tmp_path: Path):
    settings = Settings(quick=True, work_dir=tmp_path)
    prepare_class_images(settings)
    figures = measure(TrainingRun(cache_latents=False), settings, steps=3, gpus=0)
    assert "error" not in figures, figures
    assert figures["world_size"] == 1 and figures["cache_latents"] is False
    assert figures["backend_class"] == "SingleProcessBackend"
    assert figures["family"] == "sd"  # read from the model (random://tiny-sd)
    assert figures["steps_per_second"] > 0 and figures["images_per_second"] > 0
    split = figures["phase_seconds"]
    assert set(split) == {"data", "forward", "backward", "optimizer", "other"}
    # Without the latent cache the VAE encodes every step, inside the data phase.
    assert split["data"] > 0 and split["forward"] > 0 and split["backward"] > 0
    assert all(seconds >= 0 for seconds in split.values())  # timed apart from the throughput
    assert figures["peak_rss_mib"] > 100
    assert figures["optimizer_state_mib"] > 0  # AdamW's moments, after the first steps
    assert figures["model_tflop_per_step"] > 0 and figures["mfu"] is None  # no peak for a CPU
    assert "checkpoint_bytes" not in figures  # written files are measured only when asked


def test_a_lora_run_writes_far_smaller_checkpoints_and_trained_weights(tmp_path: Path):
    """The method sweep's runs, as measured: LoRA saves its adapter and its optimizer state,
    full fine-tuning the whole UNet and AdamW's moments over it."""
    settings = Settings(quick=True, work_dir=tmp_path)
    prepare_class_images(settings)
    full, lora = (
        measure(run, settings, steps=2, gpus=0, file_sizes=True)
        for run in planned_runs(quick=True, on_gpu=False)["method"]
    )
    assert "error" not in full, full
    assert "error" not in lora, lora
    assert (full["method"], lora["method"]) == ("full", "lora")
    assert lora["steps_per_second"] > 0 and lora["images_per_second"] > 0
    # The tiny UNet's LoRA at rank 4 has about 1 % of its parameters (see lora_sizes).
    assert 0 < lora["checkpoint_bytes"] < full["checkpoint_bytes"] / 10
    assert 0 < lora["trained_bytes"] < full["trained_bytes"] / 10


def test_with_one_gpu_the_backend_still_wraps_the_model(tmp_path: Path):
    """What a single-GPU machine runs: ZeRO-3 in a process group of one (here on the CPU)."""
    settings = Settings(quick=True, work_dir=tmp_path)
    prepare_class_images(settings)
    figures = measure(TrainingRun(backend="zero3"), settings, steps=2, gpus=1)
    assert "error" not in figures, figures
    assert figures["world_size"] == 1 and figures["steps_per_second"] > 0
    assert figures["backend_class"] == "DeepSpeedBackend"


def test_a_failing_run_is_reported_not_raised(tmp_path: Path):
    settings = Settings(model=str(tmp_path / "no-such-model"), work_dir=tmp_path)
    figures = measure(TrainingRun(), settings, steps=1, gpus=0)
    assert figures["error"].startswith("exit ") and figures["log_tail"]


def test_the_quick_plan_covers_every_backend_cache_and_precision(monkeypatch):
    monkeypatch.setattr(bench.training, "native_bf16", lambda: True)
    plan = planned_runs(quick=True, on_gpu=False)
    assert [run.backend for run in plan["backends"]] == list(BACKENDS)
    runs = [run for runs in plan.values() for run in runs]
    assert {(r.cache_latents, r.cache_text_embeddings) for r in runs} == {
        (True, True), (True, False), (False, True), (False, False)
    }  # fmt: skip
    assert {r.precision for r in runs} == {"bf16", "no"}
    assert {r.precision for r in planned_runs(quick=True, on_gpu=True)["backends"]} == {"fp16"}
    memory, memory_8bit = plan["full_finetune_memory"]
    assert memory.backend == "zero3" and memory.train_text_encoder
    assert memory.gradient_checkpointing and memory.batch_size == 1
    assert not memory.use_8bit_adam and memory_8bit == replace(memory, use_8bit_adam=True)


@pytest.mark.parametrize("quick", [True, False])
def test_both_plans_compare_full_and_lora_alike_in_all_else(monkeypatch, quick: bool):
    monkeypatch.setattr(bench.training, "native_bf16", lambda: True)
    full, lora = planned_runs(quick=quick, on_gpu=False)["method"]
    assert full == TrainingRun(precision="bf16")  # single process, the first precision
    assert lora == replace(full, method="lora", lora_rank=4)
    assert lora.training_spec()["lora"] == {"rank": 4}


def test_a_cpu_without_bf16_hardware_measures_fp32_only(monkeypatch):
    monkeypatch.setattr(bench.training, "native_bf16", lambda: False)
    runs = [run for runs in planned_runs(quick=True, on_gpu=False).values() for run in runs]
    assert {r.precision for r in runs} == {"no"}


CPUINFO = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma avx512_bf16
"""


def test_the_cpu_model_and_instruction_sets_come_from_the_first_processor():
    assert parse_cpuinfo(CPUINFO) == ("AMD EPYC 7B13", {"fpu", "sse2", "avx", "avx2", "fma"})


def test_the_step_variants_each_change_one_thing_and_tf32_is_compared_in_fp32():
    from dreambooth_trainer.speedups import Speedups

    def changed(variant) -> set[str]:
        plain = Speedups()
        fields = plain.__dataclass_fields__
        return {k for k in fields if getattr(variant.speedups, k) != getattr(plain, k)}

    on_gpu = {v.name: v for v in step_variants.variants(True, "inductor")}
    assert list(on_gpu) == ["fp32_tf32", "defaults", "fused_adamw", "channels_last",
                            "compile_regional"]  # fmt: skip
    assert on_gpu["defaults"].speedups is None  # what speedups_for gives the job
    assert changed(on_gpu["fused_adamw"]) == {"fused_adamw"}
    assert changed(on_gpu["channels_last"]) == {"channels_last"}
    assert changed(on_gpu["compile_regional"]) == {"compile"}
    assert changed(on_gpu["fp32_tf32"]) == {"tf32"} and on_gpu["fp32_tf32"].precision == "no"
    assert {v.precision for n, v in on_gpu.items() if n != "fp32_tf32"} == {"bf16"}
    # Only TF32 is timed on the plain trainer itself (it flips a process-wide flag).
    assert [n for n, v in on_gpu.items() if v.same_model] == ["fp32_tf32"]
    on_cpu = step_variants.variants(False, "eager")
    assert [v.name for v in on_cpu] == ["defaults", "fused_adamw", "channels_last",
                                        "compile_regional"]  # fmt: skip
    assert on_cpu[-1].speedups.compile_backend == "eager"


def test_a_variant_is_timed_in_blocks_alternating_with_the_plain_step():
    from dreambooth_trainer.speedups import Speedups

    calls = []

    class Timed:
        world = types.SimpleNamespace(device=torch.device("cpu"))
        speedups = Speedups()

        def __init__(self, name: str) -> None:
            self.name = name

        def train_step(self) -> None:
            calls.append(self.name)

    rounds = overhead.Rounds(warmup=1, blocks=2, steps=2)
    figures = step_variants.compare(Timed("plain"), Timed("variant"), Speedups(), rounds)
    assert calls == ["variant", "variant", "plain", *(["variant"] * 2 + ["plain"] * 2) * 2]
    assert len(figures["block_speedups"]) == 2 and figures["speedup"] > 0
    assert figures["first_step_seconds"] >= 0 and figures["compile_seconds"] >= 0


def test_the_environment_names_the_cpu_and_its_instruction_sets():
    described = cpu_description()
    assert described["model"]
    assert set(described["isa"]) == {"avx2", "avx512", "avx512_bf16", "amx_bf16"}
    assert described["torch_capability"]  # e.g. AVX2 or AVX512


def test_the_overhead_bench_times_ours_beside_a_bare_step_that_trains(tmp_path: Path):
    settings = Settings(quick=True, work_dir=tmp_path)
    prepare_class_images(settings)
    trainer = overhead.build(settings, caches=False, precision="no")
    try:
        bare = overhead.BareStep(trainer, with_encoders=True)
        before = [p.detach().clone() for p in bare.parameters]
        encoded = []
        vae_encode = trainer.frozen.vae.encode
        trainer.frozen.vae.encode = lambda pixels: (
            encoded.append(pixels.shape) or vae_encode(pixels)
        )
        bare()
        assert encoded == [(2, 3, 64, 64)]  # instance and class rows, at the job's resolution
        assert any(not torch.equal(a, b) for a, b in zip(before, bare.parameters, strict=True))
        rounds = overhead.Rounds(warmup=1, blocks=2, steps=1, paired=2)
        figures = overhead.compare(trainer, bare, rounds)
    finally:
        trainer.backend.close()
    assert figures["ours_steps_per_second"] > 0 and figures["bare_steps_per_second"] > 0
    assert len(figures["block_ratios"]) == 2 and figures["overhead_ratio"] > 0
    assert len(figures["cpu_time_block_ratios"]) == 2 and figures["cpu_time_overhead_ratio"] > 0
    assert figures["paired_clock"] == "process CPU time"
    assert figures["paired_overhead_ratio"] > 0 and len(figures["paired_half_ratios"]) == 2
    assert trainer.step == 5  # warmup, both blocks and both pairs ran our real step


def test_lora_sizes_grow_with_rank_far_below_the_unet_as_peft_counts_them(tmp_path: Path):
    from peft import get_model_status

    from dreambooth_contract.api import DEFAULT_LORA_UNET_TARGETS, LORA_TEXT_ENCODER_TARGETS
    from dreambooth_trainer.methods import method_for

    settings = Settings(work_dir=tmp_path)
    figures = lora_sizes.measure(settings, ranks=(2, 8))
    full, (small, large) = figures["full_unet"], figures["adapters"]
    assert full["unet_parameters"] > 0
    assert full["unet_fp16_bytes"] < full["unet_fp32_bytes"] < 5 * full["unet_parameters"]
    for key in ("unet_parameters", "text_encoder_parameters", "unet_file_bytes"):
        assert 0 < small[key] < large[key], key
    assert small["unet_file_bytes"] < small["with_text_encoder_file_bytes"]
    assert small["unet_file_bytes"] < full["unet_fp32_bytes"] / 10

    # What peft counts as trainable once training's own code added rank 8's adapters, and
    # what the shapes say: r x (in + out) for each targeted linear layer.
    pipeline, _ = lora_sizes.load_base(settings, TrainingRun(precision="no"))
    expected = {
        name: sum(
            8 * (layer.in_features + layer.out_features)
            for path, layer in getattr(pipeline, name).named_modules()
            if isinstance(layer, torch.nn.Linear) and path.endswith(targets)
        )
        for name, targets in (
            ("unet", tuple("." + t for t in DEFAULT_LORA_UNET_TARGETS)),
            ("text_encoder", tuple("." + t for t in LORA_TEXT_ENCODER_TARGETS)),
        )
    }
    run = TrainingRun(precision="no", method="lora", lora_rank=8, train_text_encoder=True)
    pipeline, training = lora_sizes.load_base(settings, run)
    model, _ = method_for(training).split_pipeline(pipeline, training, torch.device("cpu"))
    for name in ("unet", "text_encoder"):
        counted = get_model_status(getattr(model, name)).trainable_params
        assert large[f"{name}_parameters"] == counted == expected[name], name


def test_every_server_gets_the_same_seeded_spread_of_requests():
    plan = multi_adapter.Plan(adapters=3, clients=2, requests_per_client=5)
    names = tuple(multi_adapter.model_names(3))
    spread = multi_adapter.spread(names, plan, seed=1)
    again, one = multi_adapter.spread(names, plan, seed=1), multi_adapter.spread(("x",), plan, 1)
    requests = [(client, i) for client in range(2) for i in range(5)]
    assert [spread(*r) for r in requests] == [again(*r) for r in requests]
    assert {one(*r) for r in requests} == {"x"}
    assert {spread(*r) for r in requests} == set(names)  # so the small cache must miss below
    first = multi_adapter.round_robin(names, clients=2)
    assert {first(client, i) for client in range(2) for i in range(2)} == set(names)


def test_the_multi_adapter_bench_counts_swaps_and_misses_against_a_real_server(tmp_path: Path):
    """Three adapters through two cache slots, two clients: what the full run measures per
    server, and the in-process switching times."""
    from dreambooth_trainer.models import random_models

    plan = multi_adapter.Plan(
        adapters=3, clients=2, cache_sizes=(2,), rounds=1, requests_per_client=5, swap_repeats=1
    )
    base = random_models.materialize(multi_adapter.MODEL, tmp_path / "cache")
    exports = multi_adapter.make_exports(base, tmp_path, plan.adapters)
    switching = multi_adapter.measure_switching(base, exports, plan, tmp_path / "cache")
    assert switching["first_load"]["count"] == 3 and switching["swap_to_loaded"]["count"] == 3
    assert switching["miss_with_eviction"]["p50_s"] > switching["same_adapter"]["p50_s"]

    (served,) = [
        s
        for s in multi_adapter.servers(base, exports, plan, tmp_path)
        if s.models == tuple(multi_adapter.model_names(3))
    ]
    phases: dict[str, float] = {}
    figures = multi_adapter.measure_servers([served], base, plan, tmp_path / "cache", phases)
    measured = figures["published_3_cache_2"]
    assert measured["requests"] == 10 and measured["images_per_s"] > 0
    assert 0 < measured["latency_p50_s"] <= measured["latency_p95_s"]
    # The cache holds two after the warm-up; all three are asked for: one at least misses,
    # and every miss loads one adapter and evicts another.
    assert measured["adapter_cache_misses"] >= 1
    assert measured["adapter_loads"] == measured["adapter_evictions"]
    assert measured["adapter_loads"] == measured["adapter_cache_misses"]
    assert measured["adapter_load_mean_s"] > 0
    assert measured["lifetime_adapter_loads"] >= 3 + measured["adapter_loads"]
    assert set(phases) == {"start_servers", "warm_up", "rounds"}


def test_plots_are_pngs(tmp_path: Path):
    phases = {"data": 0.001, "forward": 0.01, "backward": 0.02, "optimizer": 0.005, "other": 0.0}
    rows = [{"concurrency": c, "images_per_s": c, "latency_p95_s": 0.1 * c} for c in (1, 4, 8)]
    report = {
        "environment": {"device": "cpu"},
        "benchmarks": {
            "priors": {
                "inference_steps": 10,
                "runs": [{"batch_size": b, "images_per_second": b} for b in (1, 2, 4)],
            },
            "inference": {"modes": {"batching": {"max_batch_size": 8, "results": rows}}},
            "training": {
                "sweeps": {
                    "backends": [
                        {
                            "backend": b,
                            "precision": "bf16",
                            "world_size": 2,
                            "phase_seconds": phases,
                        }
                        for b in BACKENDS
                    ]
                }
            },
            "operator": {"skipped": "no control plane"},
        },
    }
    written = write_plots(report, tmp_path)
    assert sorted(Path(p).name for p in written) == ["inference.png", "priors.png", "training.png"]
    assert all(Path(p).read_bytes()[:8] == PNG_SIGNATURE for p in written)


def test_unknown_benchmark_is_refused(capsys):
    assert main(["no-such-benchmark"]) == 2
    assert "known:" in capsys.readouterr().err


def test_list_names_every_benchmark(capsys):
    assert main(["--list"]) == 0
    assert capsys.readouterr().out.split() == [
        "inference", "job_fixed_costs", "lora_sizes", "multi_adapter", "operator", "priors",
        "step_overhead", "step_variants", "training",
    ]  # fmt: skip
