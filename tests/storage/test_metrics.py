"""Trainer metrics: Prometheus naming conventions, exporter on rank 0 only, no torch imported."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dreambooth_trainer.metrics import PREFIX, TrainerMetrics, start_exporter
from tests.support.tools import promtool_check_metrics


def exposition(metrics: TrainerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def populated() -> TrainerMetrics:
    m = TrainerMetrics()
    m.total_steps.set(800)
    m.observe_step(12, loss=0.3, images_per_second=5.5)
    with m.checkpoint_save(12):
        pass
    return m


def test_names_follow_prometheus_conventions():
    families = {f.name: f for f in text_string_to_metric_families(exposition(populated()))}
    assert set(families) >= {
        f"{PREFIX}_step",
        f"{PREFIX}_loss",
        f"{PREFIX}_images_per_second",
        f"{PREFIX}_checkpoint_save_seconds",
    }
    for family in families.values():
        assert family.name.startswith(f"{PREFIX}_")
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        if family.type == "histogram":
            assert family.name.endswith("_seconds")


def test_values_recorded():
    samples = {
        s.name: s.value
        for f in text_string_to_metric_families(exposition(populated()))
        for s in f.samples
    }
    assert samples[f"{PREFIX}_step"] == 12
    assert samples[f"{PREFIX}_checkpoint_save_seconds_count"] == 1
    assert samples[f"{PREFIX}_checkpoint_step"] == 12


def test_promtool_accepts_the_metrics(promtool_bin):
    promtool_check_metrics(promtool_bin, exposition(populated()))


def test_exporter_serves_on_rank_zero_only(monkeypatch):
    m = populated()
    assert start_exporter(m, rank=1, port=0) is None
    monkeypatch.setenv("DREAMBOOTH_METRICS_PORT", "off")
    assert start_exporter(m, rank=0) is None

    server = start_exporter(m, rank=0, port=0, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert f"{PREFIX}_step 12.0" in response.read().decode()
    finally:
        server.shutdown()


def test_storage_side_imports_no_torch():
    """The operator image has no torch: these modules must import without it."""
    code = (
        "import sys\n"
        "import dreambooth_trainer.storage, dreambooth_trainer.checkpoint_files\n"
        "import dreambooth_trainer.progress, dreambooth_trainer.metrics\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_priors_pod_serves_the_sum_of_its_processes(tmp_path, promtool_bin):
    """prometheus_client's multiprocess mode: each generating process writes its count under
    PROMETHEUS_MULTIPROC_DIR, and the pod's exporter serves their sum (promtool-clean)."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"), "PYTHONPATH": "."}
    generate = (
        "import sys; from dreambooth_trainer.metrics import PriorMetrics, prepare_multiprocess_dir;"
        "prepare_multiprocess_dir(); PriorMetrics().images_generated.inc(int(sys.argv[1]))"
    )
    for count in (3, 5):  # two processes, one after the other: files outlive them
        subprocess.run([sys.executable, "-c", generate, str(count)], env=env, check=True)
    serve = (
        "from prometheus_client import generate_latest;"
        "from dreambooth_trainer.metrics import PriorMetrics;"
        "print(generate_latest(PriorMetrics().served_registry()).decode())"
    )
    text = subprocess.run(
        [sys.executable, "-c", serve], env=env, check=True, capture_output=True, text=True
    ).stdout
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[f"{PREFIX}_prior_images_generated_total"] == 8
    promtool_check_metrics(promtool_bin, text)
