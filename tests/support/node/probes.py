"""Readiness probes, really probed: httpGet and tcpSocket on loopback (at the host port a
containerPort maps to), exec in the container's environment. No probe means ready."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

from .container import Container
from .environment import expand
from .network import POD_IP, PortMap


def probe_readiness(container: Container, ports: PortMap) -> bool:
    """Run the container's readiness probe once and schedule the next; any failure is "not
    ready"."""
    probe = container.spec.get("readinessProbe")
    if not probe:
        return True
    period = float(probe.get("periodSeconds") or 10)
    container.next_probe = time.monotonic() + max(
        0.5, period / 5
    )  # 5x as often as asked, at most every 0.5 s
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if "httpGet" in probe:
            port = _host_port(container, ports, probe["httpGet"]["port"])
            return _http_get(probe["httpGet"], port, timeout)
        if "tcpSocket" in probe:
            port = _host_port(container, ports, probe["tcpSocket"]["port"])
            with socket.create_connection((POD_IP, port), timeout=timeout):
                return True
        if "exec" in probe:
            return _exec(container, probe["exec"]["command"], timeout)
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return False
    return True


def _http_get(action: dict, port: int, timeout: float) -> bool:
    scheme = (action.get("scheme") or "HTTP").lower()
    url = f"{scheme}://{POD_IP}:{port}{action.get('path', '/')}"
    headers = {header["name"]: header["value"] for header in action.get("httpHeaders") or []}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return 200 <= response.status < 400


def _exec(container: Container, command: list[str], timeout: float) -> bool:
    argv = [expand(arg, container.env) for arg in command]
    result = subprocess.run(
        argv,
        env=container.env,
        cwd=container.cwd,
        capture_output=True,
        timeout=max(timeout, 5),
    )
    return result.returncode == 0


def _host_port(container: Container, ports: PortMap, port: int | str) -> int:
    """The host port a probe of `port` (number or name) reaches."""
    if isinstance(port, int) or str(port).isdigit():
        return ports.port(int(port))
    for declared in container.spec.get("ports") or []:
        if declared.get("name") == port:
            return ports.port(int(declared["containerPort"]))
    raise ValueError(f"unknown named port {port!r}")
