"""Networking: every pod shares loopback, so cluster names and ports are rewritten to local ones.

- Cluster DNS names of Services and of pods (``<hostname>.<subdomain>``,
  ``<svc>.<ns>.svc.cluster.local`` ...) that appear in env values or args as a host (whole value,
  ``host:port`` or ``scheme://host``) are rewritten to 127.0.0.1 (``HostMap``).
- With ``TestNode(map_ports=True)`` each namespace gets host ports of its own: a containerPort P
  declared by a pod of namespace N becomes ``node.host_port(N, P)``, a free port allocated on
  first use (``free_host_port``) and kept for the node's life. P is rewritten to that port where
  it stands as a whole literal env value, a whole arg, or after ``:`` or ``=`` at the end of
  either (``PortMap``), and readiness probes use it.
"""

from __future__ import annotations

import random
import re
import socket
from collections.abc import Iterable
from pathlib import Path

POD_IP = "127.0.0.1"
CLUSTER_DOMAIN = "cluster.local"

_RANDOM = random.SystemRandom()  # not the global generator, which tests may seed


class HostMap:
    """Rewrites cluster DNS names used as hosts in a string to 127.0.0.1.

    Dotted names (``svc.ns``, ``host.subdomain`` ...) are rewritten where a host can stand: at the
    start of the value, after ``://``, ``@`` or ``=``, when followed by the end, ``:<port>`` or
    ``/``. Single-label names (a bare Service name) only in URLs (after ``://``), since a bare
    word equal to a Service name is more often a name than a host.
    """

    def __init__(self, names: Iterable[str]) -> None:
        names = sorted({name for name in names if name}, key=len, reverse=True)
        dotted = [re.escape(name) for name in names if "." in name]
        single = [re.escape(name) for name in names if "." not in name]
        end = r"(?=$|:\d|/)"
        alternatives = []
        if dotted:
            alternatives.append(r"(?:^|(?<=://)|(?<=@)|(?<==))(?:" + "|".join(dotted) + ")" + end)
        if single:
            alternatives.append(r"(?<=://)(?:" + "|".join(single) + ")" + end)
        self._re = re.compile("|".join(alternatives)) if alternatives else None

    def __call__(self, value: str) -> str:
        if self._re is None or not value:
            return value
        return self._re.sub(POD_IP, value)


def service_host_names(base: str, namespace: str) -> set[str]:
    """The names cluster DNS answers for `base` in `namespace`, short to fully qualified."""
    return {
        f"{base}.{namespace}",
        f"{base}.{namespace}.svc",
        f"{base}.{namespace}.svc.{CLUSTER_DOMAIN}",
    }


class PortMap:
    """Rewrites container port numbers to host ports where a port stands in a string: the whole
    value, or after ``:`` or ``=`` at its end (``host:8000``, ``--port=8000``)."""

    def __init__(self, mapping: dict[int, int] | None = None) -> None:
        self.mapping = dict(mapping or {})
        ports = "|".join(str(port) for port in sorted(self.mapping, reverse=True))
        self._re = re.compile(rf"(?:^|(?<=[:=]))({ports})$") if ports else None

    def __call__(self, value: str) -> str:
        if self._re is None or not value:
            return value
        return self._re.sub(lambda match: str(self.mapping[int(match.group(1))]), value)

    def port(self, container_port: int) -> int:
        return self.mapping.get(container_port, container_port)


def declared_ports(pod: dict) -> set[int]:
    """The containerPorts declared by any container of the pod, init containers included."""
    spec = pod["spec"]
    containers = (spec.get("initContainers") or []) + spec["containers"]
    return {int(port["containerPort"]) for c in containers for port in c.get("ports") or []}


def free_host_port(taken: set[int], attempts: int = 200) -> int:
    """A port nothing listens on, below the kernel's ephemeral range: bind(0) and outgoing
    connections draw from that range, so a port from below it stays free between allocation
    and the pod's bind (minutes, for a trainer), unless a process binds it by number."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first = 10000 if low > 12000 else 1024
    for _ in range(attempts):
        port = _RANDOM.randrange(first, low)
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in [{first}, {low}) after {attempts} attempts")
