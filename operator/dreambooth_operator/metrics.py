"""The operator's Prometheus metrics (prometheus_client, default registry)."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from dreambooth_contract.api import EvaluationScores, Phase

JOBS_CREATED = Counter(
    "dreambooth_operator_jobs_created_total", "DreamBoothJobs seen for the first time."
)
JOBS_SUCCEEDED = Counter(
    "dreambooth_operator_jobs_succeeded_total", "DreamBoothJobs that succeeded."
)
JOBS_FAILED = Counter(
    "dreambooth_operator_jobs_failed_total", "DreamBoothJobs that failed.", ["reason"]
)
GANG_RESTARTS = Counter("dreambooth_operator_gang_restarts_total", "Restarts of a job's pods.")
RECONCILE_SECONDS = Histogram(
    "dreambooth_operator_reconcile_duration_seconds",
    "Time to reconcile one DreamBoothJob (decide and act).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TIME_TO_FIRST_STEP = Histogram(
    "dreambooth_operator_time_to_first_step_seconds",
    "From a DreamBoothJob's creation to its first reported training step.",
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400),
)


class PhaseCollector(Collector):
    """dreambooth_operator_jobs{phase}: counted at scrape time from the operator's index."""

    def __init__(self, phases: Callable[[], Iterable[str]]):
        self.phases = phases

    def collect(self):
        gauge = GaugeMetricFamily(
            "dreambooth_operator_jobs", "DreamBoothJobs by phase.", labels=["phase"]
        )
        counts = Tally(self.phases())
        for phase in Phase:
            gauge.add_metric([phase.value], counts.get(phase.value, 0))
        yield gauge


# (namespace, job name, status.evaluation as the job holds it)
JobEvaluation = tuple[str, str, dict[str, Any]]
EVALUATED_MODELS = ("trained", "base")


class EvaluationCollector(Collector):
    """dreambooth_operator_evaluation_score{dreambooth_namespace, dreambooth_job, model, metric}:
    every existing job's scores, read at scrape time from the operator's index, like
    kube-state-metrics' per-object series. The labels are bounded: metric is one of the five
    scores, model trained or base, and a job's series go when the job does (its TTL, or a
    delete)."""

    def __init__(self, evaluations: Callable[[], Iterable[JobEvaluation]]):
        self.evaluations = evaluations

    def collect(self):
        gauge = GaugeMetricFamily(
            "dreambooth_operator_evaluation_score",
            "Evaluation scores of a DreamBoothJob's trained model and of its base model "
            "(metric: dino, clip_i, clip_t, pres, div; see status.evaluation).",
            # Not `namespace` and `job`: the scrape's own target labels (the operator's).
            labels=["dreambooth_namespace", "dreambooth_job", "model", "metric"],
        )
        for namespace, job, evaluation in self.evaluations():
            for model in EVALUATED_MODELS:
                scores = evaluation.get(model) or {}
                for metric, info in EvaluationScores.model_fields.items():
                    value = scores.get(info.alias or metric)
                    if isinstance(value, int | float):
                        gauge.add_metric([namespace, job, model, metric], float(value))
        yield gauge


def serve(
    port: int,
    phases: Callable[[], Iterable[str]],
    evaluations: Callable[[], Iterable[JobEvaluation]] = tuple,
) -> None:
    REGISTRY.register(PhaseCollector(phases))
    REGISTRY.register(EvaluationCollector(evaluations))
    start_http_server(port)
