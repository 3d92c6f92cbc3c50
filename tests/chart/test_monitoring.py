"""Opt-in monitoring: ServiceMonitor, PodMonitors, the PrometheusRule's alerts (promtool check and
unit tests) and the Grafana dashboard (its PromQL checked by promtool too)."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess

import pytest
import yaml

from .conftest import CHART, HERE, NAMESPACE, RELEASE, VARIANTS, WATCHED, find

DASHBOARD = CHART / "dashboards" / "dreambooth-operator.json"
ALERTS = {"DreamBoothJobFailed", "DreamBoothTrainingStalled", "DreamBoothOperatorDown"}


def promtool(promtool_bin, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(promtool_bin), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r


def rule_groups(render, *args: str) -> dict:
    """The PrometheusRule's .spec: a Prometheus rule file ({groups: [...]})."""
    objects = render("--set", "monitoring.prometheusRule.enabled=true", *args)
    return find(objects, "PrometheusRule")["spec"]


def test_monitoring_is_opt_in(render):
    kinds = {o["kind"] for o in render()}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}


# -- alerts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["default", "all"])
def test_promtool_check_rules(render, promtool_bin, tmp_path, variant):
    spec = rule_groups(render, *VARIANTS[variant])
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = promtool(promtool_bin, "check", "rules", str(path)).stdout
    assert "SUCCESS: 3 rules found" in out
    alerts = {r["alert"] for g in spec["groups"] for r in g["rules"]}
    assert alerts == ALERTS


def test_promtool_unit_tests_of_the_alerts(render, promtool_bin, tmp_path):
    """rules_test.yaml: each alert fires when it should and stays quiet when it should not."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups(render)))
    shutil.copy(HERE / "rules_test.yaml", tmp_path / "rules_test.yaml")
    out = promtool(promtool_bin, "test", "rules", str(tmp_path / "rules_test.yaml")).stdout
    assert "SUCCESS" in out


def test_alert_settings_reach_the_rules(render):
    spec = rule_groups(render, *VARIANTS["all"])
    rules = {r["alert"]: r for g in spec["groups"] for r in g["rules"]}
    assert (
        "changes(dreambooth_trainer_step[20m]) == 0" in rules["DreamBoothTrainingStalled"]["expr"]
    )
    assert rules["DreamBoothOperatorDown"]["for"] == "3m"
    # The operator's `job` label is its metrics Service's name (ServiceMonitor default).
    assert f'job="{RELEASE}-metrics"' in rules["DreamBoothOperatorDown"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["team"] == "ml-platform"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


# -- scrape objects -------------------------------------------------------------------------------
def test_service_monitor_scrapes_the_metrics_service(render):
    objects = render(*VARIANTS["all"])
    monitor = find(objects, "ServiceMonitor")
    service = find(objects, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["metadata"]["labels"]["scope"] == "operator"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert endpoint["path"] == "/metrics"


def test_pod_monitors_match_the_operators_pods(render):
    """Selectors and relabelings agree with the labels and ports the operator's builders use."""
    from dreambooth_contract import names

    def meta_label(label: str) -> str:
        return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)

    objects = render(*VARIANTS["all"])
    trainers = find(objects, "PodMonitor", f"{RELEASE}-trainers")["spec"]
    inference = find(objects, "PodMonitor", f"{RELEASE}-inference")["spec"]
    for spec in (trainers, inference):
        assert spec["selector"]["matchLabels"][names.LABEL_MANAGED_BY] == names.MANAGER
        assert spec["namespaceSelector"] == {"any": True}
        targets = {
            r["targetLabel"]: r["sourceLabels"]
            for r in spec["podMetricsEndpoints"][0]["relabelings"]
            if "targetLabel" in r
        }
        assert targets["dreambooth_job"] == [meta_label(names.LABEL_JOB)]
        assert targets["dreambooth_component"] == [meta_label(names.LABEL_COMPONENT)]
    (expr,) = trainers["selector"]["matchExpressions"]
    assert expr["key"] == names.LABEL_COMPONENT
    assert set(expr["values"]) == {names.PRIORS, names.TRAIN, names.EXPORT}
    (endpoint,) = trainers["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"  # containerPort env.TRAINER_METRICS_PORT
    keep = endpoint["relabelings"][0]
    assert keep["sourceLabels"] == [meta_label(names.LABEL_COMPONENT), meta_label(names.LABEL_RANK)]
    assert keep["action"] == "keep"
    kept = {  # Prometheus anchors relabel regexes, as fullmatch does
        (component, rank)
        for component in (names.PRIORS, names.TRAIN, names.EXPORT)
        for rank in ("", "0", "1", "10")
        if re.fullmatch(keep["regex"], f"{component}{keep['separator']}{rank}")
    }
    assert kept == {(names.PRIORS, rank) for rank in ("", "0", "1", "10")} | {
        (component, rank) for component in (names.TRAIN, names.EXPORT) for rank in ("", "0")
    }
    assert inference["selector"]["matchLabels"][names.LABEL_COMPONENT] == names.INFERENCE
    assert inference["podMetricsEndpoints"][0]["port"] == "http"
    assert inference["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_pod_monitors_follow_the_watched_namespaces(render):
    objects = render(*VARIANTS["namespaced"], "--set", "monitoring.podMonitor.enabled=true")
    for monitor in (o for o in objects if o["kind"] == "PodMonitor"):
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": list(WATCHED)}


# -- Grafana dashboard ----------------------------------------------------------------------------
def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_config_map(render):
    config_map = find(render(*VARIANTS["all"]), "ConfigMap", f"{RELEASE}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "DreamBooth"}
    (body,) = config_map["data"].values()
    assert json.loads(body) == json.loads(DASHBOARD.read_text())
    other = render(
        "--set",
        "monitoring.grafanaDashboard.enabled=true",
        "--set",
        "monitoring.grafanaDashboard.namespace=grafana",
    )
    assert find(other, "ConfigMap")["metadata"]["namespace"] == "grafana"


def test_dashboard_has_the_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    wanted = {
        "DreamBoothJobs by phase": "dreambooth_operator_jobs",
        "Training loss": "dreambooth_trainer_loss",
        "Throughput (images/s)": "dreambooth_trainer_images_per_second",
        "Gang restarts (per hour)": "dreambooth_operator_gang_restarts_total",
        "Inference latency p95": "dreambooth_inference_request_duration_seconds_bucket",
    }
    for title, metric in wanted.items():
        assert title in panels, title
        assert any(metric in t["expr"] for t in panels[title]["targets"]), title
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "dreambooth-operator"
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "namespace"}


def test_dashboard_queries_are_valid_promql(promtool_bin, tmp_path):
    """Each panel query, with Grafana's variables filled in, as a recording rule for promtool."""
    grafana_vars = {"$__rate_interval": "5m", "$namespace": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs(json.loads(DASHBOARD.read_text()))):
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = promtool(promtool_bin, "check", "rules", str(path)).stdout
    assert f"SUCCESS: {len(rules)} rules found" in out


# -- metric names ---------------------------------------------------------------------------------
# The series a family of each type puts on a scrape page (prometheus_client's exposition).
SERIES_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}


def exported_names() -> set[str]:
    """Series names the operator, the trainer and the inference server export, read from the
    collectors their metrics modules define (module-level metrics, and the classes that fill a
    registry of their own), not spelled out here."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from dreambooth_operator import metrics as operator_metrics
    from dreambooth_trainer import metrics as trainer_metrics
    from dreambooth_trainer.serve import metrics as serve_metrics

    names = set()
    for module in (operator_metrics, trainer_metrics, serve_metrics):
        registries = [CollectorRegistry()]
        for value in vars(module).values():
            if isinstance(value, MetricWrapperBase):
                registries[0].register(value)
            elif (
                isinstance(value, type)
                and value.__module__ == module.__name__
                and "registry" in inspect.signature(value).parameters
            ):
                registries.append(value(registry=CollectorRegistry()).registry)
        if module is operator_metrics:  # counted at scrape time from the operator's index
            registries[0].register(operator_metrics.PhaseCollector(lambda: []))
        families = [f for r in registries for f in r.collect()]
        assert families, f"no collectors found in {module.__name__}"
        for family in families:
            names.update(family.name + s for s in SERIES_SUFFIXES.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)
    return names


def test_rules_and_dashboard_use_exported_metric_names(render):
    spec = rule_groups(render)
    texts = [r["expr"] for g in spec["groups"] for r in g["rules"]]
    texts += dashboard_exprs(json.loads(DASHBOARD.read_text()))
    used = {m for t in texts for m in re.findall(r"\bdreambooth_[a-z_]+\b", t)}
    used -= {"dreambooth_job", "dreambooth_component"}  # target labels, not metrics
    known = exported_names()
    assert used and used <= known, sorted(used - known)
