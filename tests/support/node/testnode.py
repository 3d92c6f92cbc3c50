"""``TestNode``: the node itself. It registers a Node object and keeps it Ready, binds every pending
pod to itself (there is no scheduler), starts a ``PodRunner`` per pod bound to it, passes
deletions on, and gives the test its handles: logs, kills, host ports, waits."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import kubernetes
from kubernetes.client.rest import ApiException

from ..procs import tail
from .apiserver import NodeApi
from .network import PortMap, declared_ports, free_host_port
from .runner import PodRunner

HEARTBEAT_SECONDS = 10
# How often a running pod's configMap, secret, downwardAPI and projected volumes are synced
# without a pod update. kubelet's periodic sync is --sync-frequency, 1 minute (plus jitter): the
# test node is quicker so that a test of the periodic path takes seconds, not minutes. Code that
# must see a ConfigMap change soon on a real cluster annotates the pod (an update syncs at once).
VOLUME_SYNC_SECONDS = 10.0
DEFAULT_DELETION_GRACE_SECONDS = 30


class TestNode:
    """Plays the kubelet (and the scheduler) for a control plane without either. See the
    package's doc."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        name: str = "test-node",
        *,
        workdir: Path | str | None = None,
        namespaces: Iterable[str] | None = None,
        extra_env: dict[str, str] | None = None,
        entrypoints: dict[str, list[str]] | None = None,
        capacity: dict[str, str] | None = None,
        poll_interval: float = 0.2,
        stop_grace: float = 5.0,
        map_ports: bool = False,
        volume_sync_seconds: float = VOLUME_SYNC_SECONDS,
    ) -> None:
        self.apiserver = NodeApi(api_client, name)
        self.name = name
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"dbj-{name}-"))
        self.namespaces = set(namespaces) if namespaces else None
        self.extra_env = dict(extra_env or {})  # read as each pod starts: a test may change it
        self.entrypoints = dict(entrypoints or {})  # image -> command, for containers without
        self.capacity = {
            "cpu": str(os.cpu_count() or 1),
            "memory": "16Gi",
            "pods": "110",
            "ephemeral-storage": "100Gi",
            **(capacity or {}),
        }
        self.poll_interval = poll_interval
        self.stop_grace = stop_grace
        self.map_ports = map_ports
        self.volume_sync_seconds = volume_sync_seconds  # read at each sync: a test may change it
        self.host_ports: dict[tuple[str, int], int] = {}  # (namespace, containerPort) -> port
        self.runners: dict[str, PodRunner] = {}  # uid -> runner
        self.by_name: dict[tuple[str, str], PodRunner] = {}  # latest runner per pod name
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_heartbeat = 0.0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> TestNode:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.apiserver.register(self.capacity)
        self._last_heartbeat = time.monotonic()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name=f"node-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the node: end every container (SIGTERM, SIGKILL after ``stop_grace``), mark
        still-running pods Failed (reason NodeStopped) so a later node does not re-run them."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(30)
        with self._lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.terminate(self.stop_grace)
        for runner in runners:
            runner.join(15)
            with contextlib.suppress(Exception):
                runner.mark_node_stopped()
        with contextlib.suppress(Exception):
            self.apiserver.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stopping(self) -> bool:
        return self._stopping.is_set()

    def __enter__(self) -> TestNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test API ------------------------------------------------------------------------------
    def runner(self, namespace: str, name: str) -> PodRunner:
        with self._lock:
            runner = self.by_name.get((namespace, name))
        if runner is None:
            raise KeyError(f"pod {namespace}/{name} has not run on node {self.name}")
        return runner

    def log_path(self, namespace: str, name: str, container: str | None = None) -> Path:
        """Log file of a container (default: the first) of the latest pod with this name."""
        runner = self.runner(namespace, name)
        candidates = (
            runner.containers
            if container is None
            else [c for c in runner.all_containers if c.name == container]
        )
        if not candidates:
            raise KeyError(f"pod {namespace}/{name} has no container {container!r}")
        return candidates[0].log_path

    def logs(self, namespace: str, name: str, container: str | None = None) -> str:
        path = self.log_path(namespace, name, container)
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(
        self, namespace: str, name: str, sig: int = signal.SIGKILL, container: str | None = None
    ) -> None:
        """Fault injection: send ``sig`` to the pod's container process groups."""
        runner = self.runner(namespace, name)
        if not any(c.running() for c in runner.all_containers):
            raise RuntimeError(f"pod {namespace}/{name} has no running container")
        runner.kill(sig, container)

    def host_port(self, namespace: str, container_port: int) -> int:
        """Where containerPort `container_port` of the pods of `namespace` listens on this
        machine: allocated on first use, then fixed (the port itself without ``map_ports``).
        Pods of one namespace that declare the same port share one host port, like containers
        of one pod: rank 1 reaches rank 0's rendezvous port under the same number."""
        if not self.map_ports:
            return container_port
        key = (namespace, int(container_port))
        with self._lock:
            if key not in self.host_ports:
                self.host_ports[key] = free_host_port(set(self.host_ports.values()))
            return self.host_ports[key]

    def pids(self, namespace: str, name: str) -> dict[str, int]:
        runner = self.runner(namespace, name)
        return {c.name: c.proc.pid for c in runner.all_containers if c.running()}

    def wait_for_start(self, namespace: str, name: str, timeout: float = 30.0) -> PodRunner:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                runner = self.by_name.get((namespace, name))
            if runner is not None and any(c.running() for c in runner.containers):
                return runner
            self._raise_errors()
            time.sleep(0.05)
        raise TimeoutError(f"pod {namespace}/{name} did not start on {self.name} in {timeout}s")

    def wait_for_phase(
        self,
        namespace: str,
        name: str,
        phases: Iterable[str] = ("Succeeded", "Failed"),
        timeout: float = 60.0,
    ) -> kubernetes.client.V1Pod:
        """Poll the API server until the pod's phase is one of ``phases``; return the pod."""
        phases = {phases} if isinstance(phases, str) else set(phases)
        deadline = time.monotonic() + timeout
        pod = None
        while time.monotonic() < deadline:
            self._raise_errors()
            with contextlib.suppress(ApiException):
                pod = self.apiserver.core.read_namespaced_pod(name, namespace)
                if pod.status and pod.status.phase in phases:
                    return pod
            time.sleep(0.1)
        logs = ""
        with contextlib.suppress(KeyError):
            logs = "\n--- logs ---\n" + tail(self.log_path(namespace, name), 30)
        phase = pod.status.phase if pod and pod.status else None
        raise TimeoutError(
            f"pod {namespace}/{name} not in {sorted(phases)} after {timeout}s (phase {phase}){logs}"
        )

    def _raise_errors(self) -> None:
        if self.errors:
            raise RuntimeError("test node errors: " + "; ".join(self.errors))

    # -- for the pod runners -------------------------------------------------------------------
    def port_map(self, namespace: str, pod: dict) -> PortMap:
        """The pod's declared containerPorts -> their host ports (none without map_ports)."""
        if not self.map_ports:
            return PortMap()
        return PortMap({port: self.host_port(namespace, port) for port in declared_ports(pod)})

    def record_error(self, message: str) -> None:
        """A node bug: the test's next wait raises it."""
        self.errors.append(message)

    # -- main loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if time.monotonic() - self._last_heartbeat > HEARTBEAT_SECONDS:
                    self.apiserver.heartbeat(self.capacity)
                    self._last_heartbeat = time.monotonic()
                self._sync()
            except Exception as exc:  # noqa: BLE001 - keep serving; surfaced via errors
                if not self._stopping.is_set():
                    self.record_error(f"sync: {exc!r}")
                    time.sleep(1)
            self._stopping.wait(self.poll_interval)

    def _sync(self) -> None:
        """One pass over the cluster's pods: bind the unbound, run or delete the node's own."""
        pods = [pod for pod in self.apiserver.list_pods() if self._watches(pod)]
        for pod in pods:
            meta = pod["metadata"]
            if not pod["spec"].get("nodeName") and meta.get("deletionTimestamp") is None:
                self.apiserver.bind(meta["namespace"], meta["name"], meta["uid"])
        own = [pod for pod in pods if pod["spec"].get("nodeName") == self.name]
        for pod in own:
            self._sync_pod(pod)
        self._forget_vanished({pod["metadata"]["uid"] for pod in own})

    def _watches(self, pod: dict) -> bool:
        return self.namespaces is None or pod["metadata"]["namespace"] in self.namespaces

    def _sync_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        with self._lock:
            runner = self.runners.get(meta["uid"])
        if meta.get("deletionTimestamp") is not None:
            self._on_deletion(meta, runner)
            return
        if runner is not None:
            if meta.get("resourceVersion") != runner.pod["metadata"].get("resourceVersion"):
                runner.pod_updated(pod)  # its volumes follow its labels and annotations
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase not in ("Succeeded", "Failed"):
            self._start_runner(pod)

    def _on_deletion(self, meta: dict, runner: PodRunner | None) -> None:
        """A pod being deleted: remove it if nothing of it runs, else end its containers."""
        if runner is None or runner.finished.is_set():
            self.apiserver.delete_pod(meta["namespace"], meta["name"], meta["uid"])
            return
        grace = meta.get("deletionGracePeriodSeconds")
        runner.request_delete(float(DEFAULT_DELETION_GRACE_SECONDS if grace is None else grace))

    def _start_runner(self, pod: dict) -> None:
        meta = pod["metadata"]
        runner = PodRunner(self, pod)
        with self._lock:
            self.runners[meta["uid"]] = runner
            self.by_name[(meta["namespace"], meta["name"])] = runner
        runner.start()

    def _forget_vanished(self, present: set[str]) -> None:
        """Pods removed behind our back (force deletion): end their processes at once."""
        with self._lock:
            vanished = [runner for uid, runner in self.runners.items() if uid not in present]
        for runner in vanished:
            if not runner.finished.is_set():
                runner.request_delete(0)
            with self._lock:
                self.runners.pop(runner.uid, None)
