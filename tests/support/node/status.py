"""The pod status documents the node reports: Pending, Running (podIP 127.0.0.1, containers
running, Ready once their readiness probes pass), then Succeeded/Failed with each container's
terminated state; a restarting container waits in CrashLoopBackOff."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .network import POD_IP

if TYPE_CHECKING:
    from .container import Container


def timestamp() -> str:
    """Now, as the API server writes times (seconds, UTC)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions(ready: bool, initialized: bool = True) -> list[dict]:
    now = timestamp()

    def condition(kind: str, holds: bool) -> dict:
        return {"type": kind, "status": "True" if holds else "False", "lastTransitionTime": now}

    return [
        condition("Initialized", initialized),
        condition("Ready", ready),
        condition("ContainersReady", ready),
        condition("PodScheduled", True),
    ]


def waiting_status(container: Container, reason: str, message: str = "") -> dict:
    """The status of a container that has not started, for `reason`."""
    return {
        "name": container.name,
        "image": container.spec.get("image", ""),
        "imageID": "",
        "ready": False,
        "restartCount": container.restart_count,
        "started": False,
        "state": {"waiting": {"reason": reason, "message": message}},
    }


def container_status(container: Container) -> dict:
    running = container.running()
    status: dict[str, Any] = {
        "name": container.name,
        "image": container.spec.get("image", ""),
        "imageID": "",
        "restartCount": container.restart_count,
        "ready": bool(container.ready and running),
        "started": running,
    }
    if running:
        status["state"] = {"running": {"startedAt": container.started_at}}
        status["containerID"] = f"testnode://{container.proc.pid}"
    elif container.terminated is not None and container.restart_at is not None:
        status["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
        status["lastState"] = {"terminated": container.terminated}
    elif container.terminated is not None:
        status["state"] = {"terminated": container.terminated}
        status["containerID"] = container.terminated.get("containerID")
    else:
        status["state"] = {"waiting": {"reason": "PodInitializing"}}
    return status


def pod_status(
    pod: dict,
    start_time: str | None,
    init_containers: Sequence[Container],
    containers: Sequence[Container],
    *,
    phase: str,
    ready: bool,
    initialized: bool = True,
) -> dict:
    """The whole status of a pod whose containers the node has started."""
    status = {
        "hostIP": POD_IP,
        "podIP": POD_IP,
        "podIPs": [{"ip": POD_IP}],
        "startTime": start_time or timestamp(),
        "qosClass": pod.get("status", {}).get("qosClass", "BestEffort"),
        "phase": phase,
        "conditions": conditions(ready, initialized),
        "containerStatuses": [container_status(c) for c in containers],
    }
    if init_containers:
        status["initContainerStatuses"] = [container_status(c) for c in init_containers]
    return status


def config_error_status(containers: Sequence[Container], message: str) -> dict:
    """Pending: a reference the pod needs is missing (retried, like the kubelet)."""
    return {
        "phase": "Pending",
        "conditions": conditions(False),
        "containerStatuses": [
            waiting_status(c, "CreateContainerConfigError", message) for c in containers
        ],
    }
