"""The life of one pod on the node, in a thread of its own: prepare (retrying missing
references), run the init containers one after the other, then the containers together, restart
them by restartPolicy (Always/OnFailure: Deployment pods keep running), report each change, and
end Succeeded/Failed or, when deleted, by SIGTERM, SIGKILL after the grace period, and removal of
the pod object.

While it runs, its configMap, secret, downwardAPI and projected volumes are synced like kubelet's:
at once when the pod object changes (``pod_updated``: the node calls it for each newer version of
the pod it sees; a change of spec, labels or annotations counts, the status the node writes does
not), else every ``node.volume_sync_seconds``. A sync rewrites only the volumes whose content
changed, each in one atomic swap."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING

from .container import Container, terminate
from .network import PortMap
from .prepare import pod_volumes, prepare_pod
from .probes import probe_readiness
from .references import ConfigError
from .status import config_error_status, pod_status, timestamp
from .volumes import CachedTokens

if TYPE_CHECKING:
    from .testnode import TestNode

POLL_SECONDS = 0.05
CONFIG_RETRY_SECONDS = 1.0


class PodRunner(threading.Thread):
    """Runs one pod (by uid) from preparation to its final status or deletion."""

    def __init__(self, node: TestNode, pod: dict) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.node = node
        self.pod = pod  # the latest version of the object the node has seen
        self.namespace: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.dir = node.workdir / "pods" / self.namespace / f"{self.pod_name}-{self.uid[:8]}"
        self.restart_policy = pod["spec"].get("restartPolicy", "Always")
        self.init_containers = self._containers(pod["spec"].get("initContainers") or [])
        self.containers = self._containers(pod["spec"]["containers"])
        self.lock = threading.RLock()
        self.delete_requested: float | None = None  # the grace period asked for, in seconds
        self.deadline: float | None = None  # when that grace period ends (monotonic)
        self.finished = threading.Event()
        self.phase = "Pending"
        self.start_time: str | None = None
        self.ports = PortMap()  # set by preparation
        self.tokens = CachedTokens(node.apiserver.service_account_token)
        self.volumes_stale = threading.Event()  # the pod changed: sync its volumes now
        self.next_volume_sync = 0.0  # when the periodic volume sync is due (monotonic)

    def _containers(self, specs: list[dict]) -> list[Container]:
        return [Container(spec, self.dir / spec["name"]) for spec in specs]

    @property
    def all_containers(self) -> list[Container]:
        return self.init_containers + self.containers

    # -- control from the node's thread and the test -------------------------------------------
    def request_delete(self, grace: float) -> None:
        with self.lock:
            if self.delete_requested is None or grace < self.delete_requested:
                self.delete_requested = grace
                self.deadline = time.monotonic() + grace

    def pod_updated(self, pod: dict) -> None:
        """The node saw this version of the pod object (from its thread). A change of spec,
        labels or annotations (an operator annotating the pod) makes the runner sync the pod's
        volumes at once, as a pod update makes kubelet's pod worker do."""
        changed = _synced_fields(pod) != _synced_fields(self.pod)
        self.pod = pod  # before the event: the sync it wakes reads this version
        if changed:
            self.volumes_stale.set()

    def kill(self, sig: int, container: str | None = None) -> None:
        """Send `sig` to one container's process group, or to every container's."""
        with self.lock:
            for each in self.all_containers:
                if container is None or each.name == container:
                    each.signal(sig)

    def terminate(self, grace: float) -> None:
        terminate(self.all_containers, grace)

    def mark_node_stopped(self) -> None:
        """Report a pod the stopping node leaves unfinished Failed (reason NodeStopped), so that
        a later node does not run it again."""
        if self.phase not in ("Pending", "Running") or self.delete_requested is not None:
            return
        status = self._status(phase="Failed", ready=False)
        self._patch_status({**status, "reason": "NodeStopped", "message": "the test node stopped"})

    # -- thread body ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run_pod()
        except Exception as exc:  # noqa: BLE001 - a node bug must not hang the test silently
            self.node.record_error(f"{self.namespace}/{self.pod_name}: {exc!r}")
            with contextlib.suppress(Exception):
                self._patch_status(
                    {
                        "phase": "Failed",
                        "reason": "TestNodeError",
                        "message": f"test node error: {exc!r}"[:1000],
                    }
                )
            self.terminate(0)
        finally:
            if self.delete_requested is not None:
                self.terminate(self._grace_left())
                self.node.apiserver.delete_pod(self.namespace, self.pod_name, self.uid)
            self.finished.set()

    def _should_stop(self) -> bool:
        """The pod is being deleted or the node is stopping (each ends the containers itself)."""
        return self.delete_requested is not None or self.node.stopping()

    def _grace_left(self) -> float:
        return max(0.0, (self.deadline or 0) - time.monotonic())

    def _run_pod(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self._prepare():
            return
        self.start_time = timestamp()
        if not self._run_init_containers():
            return
        for container in self.containers:
            container.start()
        self.phase = "Running"
        self._report_running()
        self._supervise()

    def _prepare(self) -> bool:
        """Materialise the volumes and resolve the environment, retrying while a reference is
        missing, like a kubelet; False if the pod or the node stops first."""
        while not self._should_stop():
            try:
                self.ports = prepare_pod(
                    self.node, self.pod, self.dir, self.all_containers, self.tokens
                )
                self.next_volume_sync = time.monotonic() + self.node.volume_sync_seconds
                return True
            except ConfigError as exc:
                self._patch_status(config_error_status(self.containers, str(exc)))
                time.sleep(CONFIG_RETRY_SECONDS)
        return False

    def _run_init_containers(self) -> bool:
        """Each init container in turn until it succeeds, restarted after a back-off unless the
        policy is Never; False if the pod ended (Failed) or stopped meanwhile."""
        for container in self.init_containers:
            while True:
                container.start()
                self._report_running()
                if not self._wait_exit(container):
                    return False
                if container.succeeded():
                    break
                if self.restart_policy == "Never":
                    self._report_final("Failed")
                    return False
                time.sleep(container.back_off())
                container.restart_count += 1
        return True

    def _wait_exit(self, container: Container) -> bool:
        """Wait for the container to end and record how; False if the pod stops first."""
        while container.running():
            if self._should_stop():
                return False
            self._sync_volumes_if_due()
            time.sleep(POLL_SECONDS)
        container.record_exit()
        return True

    def _supervise(self) -> None:
        """Watch the containers until each has ended for good (no restart due), then report
        the pod Succeeded, or Failed if any ended with a non-zero exit code."""
        while not self._should_stop():
            now = time.monotonic()
            changed = False
            with self.lock:
                for container in self.containers:
                    changed |= self._reap(container, now)
                    changed |= self._restart_if_due(container, now)
                    changed |= self._probe_if_due(container, now)
            if all(c.terminated is not None and c.restart_at is None for c in self.containers):
                failed = not all(c.succeeded() for c in self.containers)
                self._report_final("Failed" if failed else "Succeeded")
                return
            if changed:
                self._report_running()
            self._sync_volumes_if_due()
            time.sleep(POLL_SECONDS)

    def _reap(self, container: Container, now: float) -> bool:
        """Record a container's exit, scheduling its restart if the policy wants one."""
        if container.proc is None or container.terminated is not None or container.running():
            return False
        container.record_exit()
        if self.restart_policy == "Always" or (
            self.restart_policy == "OnFailure" and not container.succeeded()
        ):
            container.restart_at = now + container.back_off()
        return True

    def _restart_if_due(self, container: Container, now: float) -> bool:
        if container.restart_at is None or now < container.restart_at:
            return False
        container.restart_at = None
        container.restart_count += 1
        container.start()
        return True

    def _probe_if_due(self, container: Container, now: float) -> bool:
        """Probe a running container's readiness when due; True if its readiness changed."""
        if not container.running() or now < container.next_probe:
            return False
        ready = probe_readiness(container, self.ports)
        if ready == container.ready:
            return False
        container.ready = ready
        return True

    def _sync_volumes_if_due(self) -> None:
        """Sync the volumes made of files if the pod changed or the periodic sync is due."""
        now = time.monotonic()
        if not self.volumes_stale.is_set() and now < self.next_volume_sync:
            return
        self.volumes_stale.clear()  # before reading self.pod: a later update wakes us again
        self.next_volume_sync = now + self.node.volume_sync_seconds
        pod_volumes(self.node, self.pod, self.dir, self.tokens).refresh()

    # -- status --------------------------------------------------------------------------------
    def _status(self, *, phase: str, ready: bool, initialized: bool = True) -> dict:
        return pod_status(
            self.pod,
            self.start_time,
            self.init_containers,
            self.containers,
            phase=phase,
            ready=ready,
            initialized=initialized,
        )

    def _report_running(self) -> None:
        """Pending while init containers run, then Running, Ready when every container is."""
        with self.lock:
            initialized = all(c.succeeded() for c in self.init_containers)
            ready = initialized and all(c.ready and c.running() for c in self.containers)
            phase = "Running" if initialized else "Pending"
            status = self._status(phase=phase, ready=ready, initialized=initialized)
        self._patch_status(status)

    def _report_final(self, phase: str) -> None:
        self.phase = phase
        with self.lock:
            status = self._status(phase=phase, ready=False)
        self._patch_status(status)

    def _patch_status(self, status: dict) -> None:
        self.node.apiserver.patch_pod_status(self.namespace, self.pod_name, self.uid, status)


def _synced_fields(pod: dict) -> tuple:
    """What kubelet compares to tell a pod update from its own status writes."""
    meta = pod["metadata"]
    return (pod["spec"], meta.get("labels"), meta.get("annotations"))
