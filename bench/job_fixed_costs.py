"""The fixed costs of a job: everything around the training steps of the tiny 2-node job.

The e2e test's job (tests/e2e/harness.py s3_job_document: random://tiny-sd, 4 class images on
2 priors pods, 24 DDP steps on 2 nodes, export, evaluation, one inference replica) on the test
cluster (control plane, the test node running pods as local processes, moto's S3), watched as
`kubectl get dbj -w` would. Prints JSON:

    python -m bench job_fixed_costs        (or python -m bench.job_fixed_costs)

- job: seconds from apply to each phase and activity first shown, to the first and the last
  step, to the artifact, to Serving and to the inference replica being ready; the time in each
  phase; "fixed_seconds" is apply -> inference ready less the steps (rank 0's log line as its
  loop starts -> the last step shown; the status shows a step only every few seconds).
- pods: for each pod, start (Running) -> ready / done, and the gaps between its own log lines
  (imports, model load, caches, upload: whatever the pod logs), so a slow stretch has a name.

Times are wall-clock on one machine (the pods' log lines carry wall-clock stamps); the job's
status is polled every POLL_SECONDS, the pods watched.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import kubernetes

from bench import Settings, benchmark
from bench.operator import PodWatch
from dreambooth_contract import api

POLL_SECONDS = 0.2
TIMEOUT_SECONDS = 900
NAME = "tiny"
START_OF_STEPS = re.compile(r"training from step|resumed from")
LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) (\S+): (.*)$")


class JobTimeline(threading.Thread):
    """When each phase, activity and step of the job's status was first seen (wall clock)."""

    def __init__(self, custom: kubernetes.client.CustomObjectsApi, namespace: str):
        super().__init__(daemon=True)
        self.custom, self.namespace = custom, namespace
        self.events: list[tuple[float, str]] = []
        self.seen: set[str] = set()
        self.status: dict = {}
        self.stop = threading.Event()

    def mark(self, what: str) -> None:
        if what not in self.seen:
            self.seen.add(what)
            self.events.append((time.time(), what))

    def run(self) -> None:
        while not self.stop.is_set():
            obj = self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, self.namespace, api.PLURAL, NAME
            )
            self.status = status = obj.get("status") or {}
            if status.get("phase"):
                self.mark(f"phase {status['phase']}")
            progress = status.get("progress") or {}
            if progress.get("activity"):
                self.mark(f"activity {progress['activity']}")
            if progress.get("step"):
                self.mark("first step")
                if progress["step"] == progress.get("totalSteps"):
                    self.mark("last step")
            if status.get("artifact"):
                self.mark("artifact")
            if (status.get("inference") or {}).get("readyReplicas"):
                self.mark("inference ready")
            time.sleep(POLL_SECONDS)

    def first(self, what: str) -> float | None:
        return next((t for t, w in self.events if w == what), None)


class PodTimeline(PodWatch):
    """When each pod was created, ran, became ready and finished (wall clock, a watch)."""

    timeout_seconds = TIMEOUT_SECONDS

    def __init__(self, core: kubernetes.client.CoreV1Api, namespace: str):
        super().__init__(core, namespace)
        self.pods: dict[str, dict[str, float]] = {}

    def record(self, pod) -> None:
        now = time.time()
        seen = self.pods.setdefault(pod.metadata.name, {"created": now})
        phase = pod.status.phase
        if phase in ("Running", "Succeeded", "Failed"):
            seen.setdefault("running", now)
        ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        if ready:
            seen.setdefault("ready", now)
        if phase in ("Succeeded", "Failed"):
            seen.setdefault("done", now)


def log_lines(text: str) -> list[tuple[float, str]]:
    """(wall-clock time, "logger: message") of each stamped line of a pod's log."""
    lines = []
    for line in text.splitlines():
        match = LOG_STAMP.match(line)
        if match:
            stamp = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            lines.append((stamp.timestamp(), f"{match.group(3)}: {match.group(4)}"))
    return lines


def pod_log(node, namespace: str, name: str) -> str:
    try:
        return node.logs(namespace, name)
    except KeyError:  # never ran on the node
        return ""


def pod_breakdown(seen: dict[str, float], lines: list[tuple[float, str]]) -> dict[str, Any]:
    """A pod's start -> ready/done, and each gap between its log lines (from its start): the
    first gap is the process's start-up (interpreter, imports) up to its first line."""
    start = seen.get("running", seen["created"])
    result: dict[str, Any] = {"created_to_running": round(start - seen["created"], 1)}
    for key in ("ready", "done"):
        if key in seen:
            result[f"running_to_{key}"] = round(seen[key] - start, 1)
    gaps, previous = [], start
    for when, message in lines:
        gaps.append([round(when - previous, 1), message[:100]])
        previous = when
    if "done" in seen:
        gaps.append([round(seen["done"] - previous, 1), "(exit)"])
    result["gaps"] = gaps
    return result


def steps_started(logs: dict[str, list[tuple[float, str]]]) -> float | None:
    """When rank 0 began its steps: its checkpoint manager's "training from step" / "resumed
    from" line, logged just before the loop (the status shows steps only every few seconds)."""
    for name, lines in logs.items():
        if name.startswith(f"{NAME}-train-0-"):
            for when, message in lines:
                if START_OF_STEPS.search(message):
                    return when
    return None


def job_summary(timeline: JobTimeline, applied: float, started: float | None) -> dict[str, Any]:
    since = {what: round(when - applied, 1) for when, what in timeline.events}
    if started:
        since["steps started (rank 0's log)"] = round(started - applied, 1)
    phases = [(when, what) for when, what in timeline.events if what.startswith("phase ")]
    in_phase = {
        what.removeprefix("phase "): round(later - when, 1)
        for (when, what), (later, _) in zip(phases, phases[1:], strict=False)
    }
    last, ready = timeline.first("last step"), timeline.first("inference ready")
    summary: dict[str, Any] = {"apply_to": since, "seconds_in_phase": in_phase}
    if started and last and ready:
        steps = last - started
        summary["steps_seconds"] = round(steps, 1)
        summary["fixed_seconds"] = round(ready - applied - steps, 1)
    if last and timeline.first("artifact"):
        summary["last_step_to_artifact"] = round(timeline.first("artifact") - last, 1)
    return summary


def run(workdir: Path) -> dict[str, Any]:
    from dreambooth_operator.crd import RESOURCES, crd
    from tests.e2e.harness import OperatorProcess, s3_job_document, stage_s3_inputs
    from tests.support.controlplane import ControlPlane
    from tests.support.node import TestNode
    from tests.support.paths import SETUP_HINT, kube_assets_dir
    from tests.support.s3 import S3Server

    assets = kube_assets_dir()
    if assets is None:
        return {"skipped": f"no control plane binaries: {SETUP_HINT}"}
    plane = ControlPlane.start(assets, workdir=workdir / "plane")
    s3 = S3Server.start(workdir / "moto")
    try:
        client = plane.api_client
        ext = kubernetes.client.ApiextensionsV1Api(client)
        for resource in RESOURCES.values():
            ext.create_custom_resource_definition(crd(resource))
        namespace = f"bench-{uuid.uuid4().hex[:6]}"
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespace({"metadata": {"name": namespace}})
        plane.service_account_token(namespace, "default")
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3.client().create_bucket(Bucket=bucket)
        stage_s3_inputs(s3, bucket, namespace, client, "AKIABENCH", "bench-secret")
        custom = kubernetes.client.CustomObjectsApi(client)
        document = s3_job_document(NAME, s3, bucket, inference={"enabled": True, "gpus": 0})
        with TestNode(client, workdir=workdir / "node", map_ports=True) as node:
            operator = OperatorProcess(plane.kubeconfig, (namespace,), workdir / "op").start()
            pods = PodTimeline(core, namespace)
            pods.start()
            time.sleep(2)  # the CRDs Established, the operator's watches open
            applied = time.time()
            custom.create_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, document
            )
            timeline = JobTimeline(custom, namespace)
            timeline.start()
            try:
                deadline = time.monotonic() + TIMEOUT_SECONDS
                while timeline.first("inference ready") is None:
                    if time.monotonic() > deadline or timeline.status.get("phase") == "Failed":
                        raise RuntimeError(f"job did not serve: {timeline.status}")
                    time.sleep(POLL_SECONDS)
            finally:
                timeline.stop.set()
                pods.watch.stop()
                operator.stop()
            created = sorted(pods.pods.items(), key=lambda item: item[1]["created"])
            logs = {name: log_lines(pod_log(node, namespace, name)) for name, _ in created}
            breakdown = {name: pod_breakdown(seen, logs[name]) for name, seen in created}
    finally:
        s3.stop()
        plane.stop()
    return {"job": job_summary(timeline, applied, steps_started(logs)), "pods": breakdown}


@benchmark("job_fixed_costs")
def job_fixed_costs(settings: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-fixed-costs-") as workdir:
        return run(Path(workdir))


if __name__ == "__main__":
    print(json.dumps(job_fixed_costs(Settings()), indent=2))
