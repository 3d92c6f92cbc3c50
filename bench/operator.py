"""Operator benchmark: apply N DreamBoothJobs at once -> all their rank pods exist.

Runs a real control plane (etcd + kube-apiserver + kube-controller-manager, see hack/) and the
operator as a process; no node runs the pods. Prints JSON:
  python -m bench.operator [--jobs 1 100] [--unrelated 2000]

With --unrelated N, the namespace first holds N pods and N ConfigMaps the operator did not make,
and one job is applied to an operator that filters its watches on the server and to one that
receives every object (--no-server-side-filtering), side by side: peak RSS and latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import kubernetes
import urllib3

from bench import Settings, benchmark, percentile
from dreambooth_contract import api, names
from tests.e2e.harness import job_document

RANKS = 2  # nodes per job: "all rank pods" means both priors pods of each job


class PodWatch(threading.Thread):
    """Records when each job's pods first appear (a watch, so no polling granularity)."""

    def __init__(self, core: kubernetes.client.CoreV1Api, namespace: str):
        super().__init__(daemon=True)
        self.core, self.namespace = core, namespace
        self.seen: dict[str, dict[str, float]] = {}
        self.watch = kubernetes.watch.Watch()

    timeout_seconds = 600

    def run(self) -> None:
        stream = self.watch.stream(
            self.core.list_namespaced_pod, self.namespace, timeout_seconds=self.timeout_seconds
        )
        try:
            for event in stream:
                self.record(event["object"])
        except urllib3.exceptions.ProtocolError:
            pass  # stop() closed the connection under the stream

    def record(self, pod) -> None:
        job = (pod.metadata.labels or {}).get(names.LABEL_JOB)
        if job:
            self.seen.setdefault(job, {}).setdefault(pod.metadata.name, time.monotonic())


def apply_and_measure(
    api_client: kubernetes.client.ApiClient, namespace: str, count: int, timeout: float = 600
) -> dict[str, Any]:
    """Create `count` jobs back to back; seconds from each create to its last rank pod."""
    custom = kubernetes.client.CustomObjectsApi(api_client)
    watch = PodWatch(kubernetes.client.CoreV1Api(api_client), namespace)
    watch.start()
    applied: dict[str, float] = {}
    for index in range(count):
        name = f"bench-{index:03d}"
        custom.create_namespaced_custom_object(
            api.GROUP,
            api.VERSION,
            namespace,
            api.PLURAL,
            job_document(name, resources={"nodes": RANKS}),
        )
        applied[name] = time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = {j for j in applied if len(watch.seen.get(j, {})) >= RANKS}
        if len(done) == count:
            break
        time.sleep(0.1)
    watch.watch.stop()
    latencies = [
        max(watch.seen[j].values()) - applied[j]
        for j in applied
        if len(watch.seen.get(j, {})) >= RANKS
    ]
    result: dict[str, Any] = {"jobs": count, "ranks_per_job": RANKS, "completed": len(latencies)}
    if latencies:
        result.update(
            p50_seconds=round(statistics.median(latencies), 3),
            p95_seconds=round(percentile(latencies, 0.95), 3),
            max_seconds=round(max(latencies), 3),
        )
    return result


def unrelated_objects(api_client: kubernetes.client.ApiClient, namespace: str, count: int) -> None:
    """`count` pods (Pending: no node) and `count` ConfigMaps that are none of the operator's."""
    core = kubernetes.client.CoreV1Api(api_client)
    container = {"name": "app", "image": "busybox", "command": ["sleep", "1d"]}
    for index in range(count):
        meta = {"name": f"other-{index:05d}", "labels": {"app": "other"}}
        pod = {"metadata": meta, "spec": {"containers": [container]}}
        core.create_namespaced_pod(namespace, pod)
        core.create_namespaced_config_map(namespace, {"metadata": meta, "data": {"k": "v" * 256}})


def run(job_counts: tuple[int, ...] = (1, 100), unrelated: int = 0) -> dict[str, Any]:
    """Each job count in a fresh namespace; with `unrelated`, one job among that many unrelated
    pods and ConfigMaps, with server-side filtering on and off."""
    from tests.e2e.harness import OperatorProcess
    from tests.support.controlplane import ControlPlane
    from tests.support.paths import SETUP_HINT, kube_assets_dir

    assets = kube_assets_dir()
    if assets is None:
        return {"skipped": f"no control plane binaries: {SETUP_HINT}"}
    from dreambooth_operator.crd import RESOURCES, crd

    runs = [(count, 0, True) for count in job_counts]
    if unrelated:
        runs += [(1, unrelated, True), (1, unrelated, False)]
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as workdir:
        plane = ControlPlane.start(assets, workdir=Path(workdir) / "plane")
        try:
            ext = kubernetes.client.ApiextensionsV1Api(plane.api_client)
            for resource in RESOURCES.values():
                ext.create_custom_resource_definition(crd(resource))
            time.sleep(2)  # Established
            results = []
            for count, others, filtering in runs:
                namespace = f"bench-{uuid.uuid4().hex[:6]}"
                kubernetes.client.CoreV1Api(plane.api_client).create_namespace(
                    {"metadata": {"name": namespace}}
                )
                plane.service_account_token(namespace, "default")
                unrelated_objects(plane.api_client, namespace, others)
                extra = () if filtering else ("--no-server-side-filtering",)
                operator = OperatorProcess(
                    plane.kubeconfig, (namespace,), Path(workdir) / namespace, extra_args=extra
                ).start()
                try:
                    result = apply_and_measure(plane.api_client, namespace, count)
                    result.update(
                        unrelated_pods_and_configmaps=others,
                        server_side_filtering=filtering,
                        operator_peak_rss_mib=round(operator.peak_rss_bytes() / 2**20, 1),
                    )
                    results.append(result)
                finally:
                    operator.stop()
        finally:
            plane.stop()
    return {"apply_to_rank_pods": results}


@benchmark("operator")
def operator_benchmark(settings: Settings) -> dict[str, Any]:
    return run((1, 100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--unrelated", type=int, default=0, help="pods and ConfigMaps not ours")
    args = parser.parse_args()
    print(json.dumps({"operator": run(tuple(args.jobs), args.unrelated)}, indent=2))


if __name__ == "__main__":
    main()
