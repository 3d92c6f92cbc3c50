"""A Kubernetes node for tests: pods run as local processes.

``TestNode`` registers a Node object, binds every pending pod to itself (there is no scheduler),
and runs each container's command + args as a local subprocess with the pod's environment, so
the real trainer runs inside "pods". One module per concern, each documenting its part:

- ``testnode``: ``TestNode``, the node's loop over the API server's pods, and the test's API.
- ``apiserver``: what the node says to the API server (Node, lease, binding, pod status).
- ``runner``: one pod's life in a thread: init containers, containers, restarts, deletion, and
  volume syncs (on a pod update, ``PodRunner.pod_updated``, else every ``volume_sync_seconds``).
- ``prepare``: a pod's spec -> each container's argv, environment and working directory.
  - ``volumes``: volumes on the local disk, and the mountPath rewriting (``PathMap``).
  - ``atomic_writer``: kubelet's layout of configMap/secret/... volumes (``KEY -> ..data/KEY``).
  - ``environment``: the inherited environment, ``env``/``envFrom`` and ``$(VAR)`` expansion.
  - ``references``: ConfigMaps, Secrets and the downward API; ``ConfigError`` when missing.
  - ``network``: loopback for every pod: cluster names (``HostMap``), host ports (``PortMap``).
- ``container``: one container's process, its signals and its terminated state.
- ``probes``: readiness probes (httpGet, tcpSocket, exec).
- ``status``: the pod status documents the node reports.

Also: logs, one file per container: ``node.log_path(ns, pod)`` / ``node.logs(ns, pod)``; fault
injection: ``node.kill(ns, pod, signal.SIGKILL)``; ports: with ``TestNode(map_ports=True)`` a
test calls ``node.host_port(ns, port)`` to reach a pod, or to point Prometheus at it before the
pod exists; volume syncs: a running pod's configMap, secret, downwardAPI and projected volumes
follow their sources at once when the pod object changes (say, an annotation), else every
``TestNode(volume_sync_seconds=...)`` (10 s; kubelet's is about a minute).

Usage::

    with TestNode(api_client) as node:
        ...
        node.wait_for_phase("default", "mypod", {"Succeeded"})
        print(node.logs("default", "mypod"))
"""

from __future__ import annotations

from .environment import expand
from .network import POD_IP, HostMap, PortMap, free_host_port
from .references import ConfigError
from .testnode import TestNode
from .volumes import PathMap

__all__ = [
    "POD_IP",
    "ConfigError",
    "HostMap",
    "PathMap",
    "PortMap",
    "TestNode",
    "expand",
    "free_host_port",
]
