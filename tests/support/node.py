"""A Kubernetes node for tests: pods run as local processes.

``TestNode`` registers a Node object, binds every pending pod to itself (there is no scheduler),
and runs each container's command + args as a local subprocess with the pod's environment:

- ``env``: plain values with ``$(VAR)`` expansion, ``fieldRef`` (metadata.name/namespace/uid/
  labels/annotations, spec.nodeName/serviceAccountName, status.podIP/hostIP = 127.0.0.1),
  ``resourceFieldRef``, ``configMapKeyRef``, ``secretKeyRef``; ``envFrom`` ConfigMaps/Secrets.
  A missing non-optional reference leaves the pod Pending with ``CreateContainerConfigError``
  and is retried, like the kubelet.
- volumes: configMap, secret, downwardAPI, projected (incl. serviceAccountToken), emptyDir,
  persistentVolumeClaim (a directory per claim, shared by the node's pods) and hostPath are
  materialised on the local disk. **Path mapping**: a container cannot see its mountPath, so the
  node rewrites every occurrence of a mountPath (at a path boundary) in command, args, env values
  and workingDir to the local directory. The mapping is also given to the process as JSON in
  ``TEST_NODE_PATH_MAP`` ({mountPath: localDir}), and the service-account directory (if mounted)
  as ``TEST_NODE_SERVICEACCOUNT_DIR``; ``KUBERNETES_SERVICE_HOST/PORT`` point at the API server.
- networking: every pod shares loopback (podIP 127.0.0.1). Cluster DNS names of Services and of
  pods (``<hostname>.<subdomain>``, ``<svc>.<ns>.svc.cluster.local`` ...) that appear in env values
  or args as a host (whole value, ``host:port`` or ``scheme://host``) are rewritten to 127.0.0.1.
- ports (``TestNode(map_ports=True)``): pods sharing loopback would listen on their fixed
  containerPorts side by side with each other and with anything else on the machine. With
  ``map_ports`` each namespace gets host ports of its own instead: a containerPort P declared by
  a pod of namespace N becomes ``node.host_port(N, P)``, a free port allocated on first use
  (below the kernel's ephemeral range, which outgoing connections draw from) and kept for the
  node's life; a test calls ``host_port`` too, to reach a pod or to point Prometheus at it
  before the pod exists. P is rewritten to that port where it stands as a whole literal env
  value, a whole arg, or after ``:`` or ``=`` at the end of either (``$(VAR)`` then expands to
  the rewritten value), and readiness probes use it. Pods of one namespace that declare the
  same port share one host port, like containers of one pod: rank 1 reaches rank 0's
  rendezvous port under the same number.
- processes: ``python``/``torchrun`` resolve to this interpreter's virtualenv first (its bin dir
  leads PATH). The base environment is a small allow-list of the test's environment (PATH, HOME,
  LANG, HF_* ...), not all of it, so credentials reach a pod only through its spec; then
  ``node.extra_env``, which a test may change between pods (it applies to pods started after).
- status: Running (podIP 127.0.0.1, containerStatuses running, Ready once readiness probes pass:
  httpGet/tcpSocket/exec are really probed), then Succeeded/Failed with a terminated
  containerStatus (exitCode; 128+N for signal N; reason Completed/Error; message from the
  terminationMessagePath file, else for ``FallbackToLogsOnError`` the last log lines on failure).
  restartPolicy Always/OnFailure restart containers (Deployment pods keep running).
- deletion (deletionTimestamp set): SIGTERM to each container's process group, SIGKILL after the
  grace period, then the pod object is removed (grace 0). SIGKILL reaches every descendant of the
  container's process, also those in sessions of their own (torchrun's workers), as a container
  runtime kills a whole cgroup.
- logs: one file per container, ``node.log_path(ns, pod)`` / ``node.logs(ns, pod)``.
- fault injection: ``node.kill(ns, pod, signal.SIGKILL)``.

Usage::

    with TestNode(api_client) as node:
        ...
        node.wait_for_phase("default", "mypod", {"Succeeded"})
        print(node.logs("default", "mypod"))
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes
import psutil
from kubernetes.client.rest import ApiException

from .procs import tail

POD_IP = "127.0.0.1"
CLUSTER_DOMAIN = "cluster.local"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
INHERITED_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "TZ",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "PYTHONDONTWRITEBYTECODE",
    "HF_HOME",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "DIFFUSERS_OFFLINE",
    "TORCH_HOME",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "CI",
)
TERMINATION_LOG_LINES = 80
TERMINATION_LOG_BYTES = 2048


_RANDOM = random.SystemRandom()  # not the global generator, which tests may seed


def _free_host_port(taken: set[int], attempts: int = 200) -> int:
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
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in [{first}, {low}) after {attempts} attempts")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConfigError(Exception):
    """A reference (ConfigMap, Secret, key) the pod needs is missing: retry later."""


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known vars replaced, unknown left, ``$$`` -> ``$``."""
    out, i, n = [], 0, len(value)
    while i < n:
        c = value[i]
        if c == "$" and i + 1 < n:
            nxt = value[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = value.find(")", i + 2)
                if end != -1:
                    name = value[i + 2 : end]
                    out.append(env[name] if name in env else value[i : end + 1])
                    i = end + 1
                    continue
        out.append(c)
        i += 1
    return "".join(out)


class PathMap:
    """Rewrites container paths (mountPaths) to local directories, longest prefix first."""

    def __init__(self) -> None:
        self.mapping: dict[str, str] = {}
        self._re: re.Pattern[str] | None = None

    def add(self, container_path: str, local_path: Path | str) -> None:
        self.mapping[container_path.rstrip("/") or "/"] = str(local_path)
        self._re = None

    def __call__(self, value: str) -> str:
        if not self.mapping or not value:
            return value
        if self._re is None:
            keys = sorted(self.mapping, key=len, reverse=True)
            self._re = re.compile(
                r"(?<![\w.\-/])(" + "|".join(re.escape(k) for k in keys) + r")(?=/|$|[^\w.\-])"
            )
        return self._re.sub(lambda m: self.mapping[m.group(1)], value)


class HostMap:
    """Rewrites cluster DNS names used as hosts in a string to 127.0.0.1.

    Dotted names (``svc.ns``, ``host.subdomain`` ...) are rewritten where a host can stand: at the
    start of the value, after ``://``, ``@`` or ``=``, when followed by the end, ``:<port>`` or
    ``/``. Single-label names (a bare Service name) only in URLs (after ``://``), since a bare
    word equal to a Service name is more often a name than a host.
    """

    def __init__(self, names: Iterable[str]) -> None:
        names = sorted({n for n in names if n}, key=len, reverse=True)
        dotted = [re.escape(n) for n in names if "." in n]
        single = [re.escape(n) for n in names if "." not in n]
        end = r"(?=$|:\d|/)"
        parts = []
        if dotted:
            parts.append(r"(?:^|(?<=://)|(?<=@)|(?<==))(?:" + "|".join(dotted) + ")" + end)
        if single:
            parts.append(r"(?<=://)(?:" + "|".join(single) + ")" + end)
        self._re = re.compile("|".join(parts)) if parts else None

    def __call__(self, value: str) -> str:
        if self._re is None or not value:
            return value
        return self._re.sub(POD_IP, value)


class PortMap:
    """Rewrites container port numbers to host ports where a port stands in a string: the whole
    value, or after ``:`` or ``=`` at its end (``host:8000``, ``--port=8000``)."""

    def __init__(self, mapping: dict[int, int] | None = None) -> None:
        self.mapping = dict(mapping or {})
        ports = "|".join(str(p) for p in sorted(self.mapping, reverse=True))
        self._re = re.compile(rf"(?:^|(?<=[:=]))({ports})$") if ports else None

    def __call__(self, value: str) -> str:
        if self._re is None or not value:
            return value
        return self._re.sub(lambda m: str(self.mapping[int(m.group(1))]), value)

    def port(self, container_port: int) -> int:
        return self.mapping.get(container_port, container_port)


def _quantity(q: str | None) -> float:
    if q is None:
        return 0.0
    q = str(q)
    suffixes = {
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
        "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3,
    }  # fmt: skip
    for s, mul in suffixes.items():
        if q.endswith(s):
            return float(q[: -len(s)]) * mul
    return float(q)


class _Container:
    def __init__(self, spec: dict, init: bool = False) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.proc: subprocess.Popen | None = None
        self.started_at: str | None = None
        self.restart_count = 0
        self.terminated: dict | None = None  # terminated state of the last run
        self.ready = False
        self.next_probe = 0.0
        self.restart_at: float | None = None
        self.argv: list[str] = []
        self.env: dict[str, str] = {}
        self.cwd: str | None = None
        self.log_path: Path | None = None
        self.term_path: Path | None = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if not self.running():
            return
        # SIGKILL ends every process of a container (its cgroup), also those in sessions of
        # their own, such as torchrun's workers; found before the kill orphans them.
        tree = []
        if sig == signal.SIGKILL:
            with contextlib.suppress(psutil.Error):
                tree = psutil.Process(self.proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the container is its own process group
        for process in tree:
            with contextlib.suppress(psutil.Error):
                process.kill()


class _PodRunner(threading.Thread):
    """Runs one pod (by uid) from preparation to its final status or deletion."""

    def __init__(self, node: TestNode, pod: dict) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.node = node
        self.pod = pod
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.dir = node.workdir / "pods" / self.ns / f"{self.pod_name}-{self.uid[:8]}"
        self.restart_policy = pod["spec"].get("restartPolicy", "Always")
        self.init_containers = [
            _Container(c, init=True) for c in pod["spec"].get("initContainers") or []
        ]
        self.containers = [_Container(c) for c in pod["spec"]["containers"]]
        self.lock = threading.RLock()
        self.delete_requested: float | None = None  # grace seconds
        self.deadline: float | None = None
        self.finished = threading.Event()
        self.phase = "Pending"
        self.start_time: str | None = None
        self.paths = PathMap()
        self.ports = PortMap()

    # -- control from the node thread -----------------------------------------------------------
    def request_delete(self, grace: float) -> None:
        with self.lock:
            if self.delete_requested is None or grace < self.delete_requested:
                self.delete_requested = grace
                self.deadline = time.monotonic() + grace

    def _pod_kubeconfig(self, sa_dir: Path) -> str:
        """A kubeconfig that authenticates as the pod's service account (its token file)."""
        path = self.dir / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {
                        "server": f"https://{self.node.api_host}:{self.node.api_port}",
                        "insecure-skip-tls-verify": True,
                    },
                }
            ],
            "users": [{"name": "pod", "user": {"tokenFile": str(sa_dir / "token")}}],
            "contexts": [
                {"name": "pod", "context": {"cluster": "test", "user": "pod", "namespace": self.ns}}
            ],
            "current-context": "pod",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        return str(path)

    def kill(self, sig: int, container: str | None = None) -> None:
        with self.lock:
            for c in self.init_containers + self.containers:
                if container is None or c.name == container:
                    c.signal(sig)

    # -- thread body ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - a node bug must not hang the test silently
            self.node._record_error(f"{self.ns}/{self.pod_name}: {exc!r}")
            with contextlib.suppress(Exception):
                self._patch_status(
                    {
                        "phase": "Failed",
                        "reason": "TestNodeError",
                        "message": f"test node error: {exc!r}"[:1000],
                    }
                )
            self._terminate_all(0)
        finally:
            if self.delete_requested is not None:
                self._terminate_all(self._remaining())
                self.node._delete_pod(self.ns, self.pod_name, self.uid)
            self.finished.set()

    def _remaining(self) -> float:
        return max(0.0, (self.deadline or 0) - time.monotonic())

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        # 1. materialise volumes and resolve the environment; retry config errors like a kubelet
        while True:
            if self.delete_requested is not None or self.node._stopping.is_set():
                return
            try:
                self._prepare()
                break
            except ConfigError as exc:
                self._patch_status(
                    {
                        "phase": "Pending",
                        "conditions": self._conditions(False),
                        "containerStatuses": [
                            self._waiting(c, "CreateContainerConfigError", str(exc))
                            for c in self.containers
                        ],
                    }
                )
                time.sleep(1.0)
        self.start_time = _now()
        # 2. init containers, one after the other
        for c in self.init_containers:
            while True:
                self._start(c)
                self._patch_running()
                if not self._wait_exit(c):
                    return  # deleted or node stopping
                if c.terminated["exitCode"] == 0:
                    break
                if self.restart_policy == "Never":
                    self._finish("Failed")
                    return
                time.sleep(min(10.0, 0.5 * 2**c.restart_count))
                c.restart_count += 1
        # 3. the containers, together
        for c in self.containers:
            self._start(c)
        self.phase = "Running"
        self._patch_running()
        self._supervise()

    def _wait_exit(self, c: _Container) -> bool:
        while c.running():
            if self.delete_requested is not None or self.node._stopping.is_set():
                return False
            time.sleep(0.05)
        self._collect(c)
        return True

    def _supervise(self) -> None:
        while True:
            if self.delete_requested is not None or self.node._stopping.is_set():
                return
            changed = False
            now = time.monotonic()
            with self.lock:
                for c in self.containers:
                    if c.proc is not None and c.terminated is None and not c.running():
                        self._collect(c)
                        changed = True
                        ok = c.terminated["exitCode"] == 0
                        if self.restart_policy == "Always" or (
                            self.restart_policy == "OnFailure" and not ok
                        ):
                            c.restart_at = now + min(10.0, 0.5 * 2**c.restart_count)
                    if c.restart_at is not None and now >= c.restart_at:
                        c.restart_at = None
                        c.restart_count += 1
                        self._start(c)
                        changed = True
                    if c.running() and now >= c.next_probe:
                        ready = self._probe(c)
                        if ready != c.ready:
                            c.ready = ready
                            changed = True
            done = all(c.terminated is not None and c.restart_at is None for c in self.containers)
            if done:
                failed = any(c.terminated["exitCode"] != 0 for c in self.containers)
                self._finish("Failed" if failed else "Succeeded")
                return
            if changed:
                self._patch_running()
            time.sleep(0.05)

    # -- preparation ---------------------------------------------------------------------------
    def _prepare(self) -> None:
        spec = self.pod["spec"]
        meta = self.pod["metadata"]
        self.paths = PathMap()
        vol_dirs: dict[str, Path] = {}
        for vol in spec.get("volumes") or []:
            vol_dirs[vol["name"]] = self._volume(vol)
        hosts = self.node._cluster_hostnames(self.ns, self.pod)
        host_map = HostMap(hosts)
        self.ports = ports = self.node._port_map(self.ns, self.pod)
        for c in self.init_containers + self.containers:
            cdir = self.dir / c.name
            cdir.mkdir(parents=True, exist_ok=True)
            paths = PathMap()
            for m in c.spec.get("volumeMounts") or []:
                local = vol_dirs.get(m["name"])
                if local is None:
                    raise ConfigError(f"volume {m['name']!r} not found")
                if m.get("subPath"):
                    local = local / m["subPath"]
                    if not local.exists():
                        local.mkdir(parents=True, exist_ok=True)
                paths.add(m["mountPath"], local)
            term = c.spec.get("terminationMessagePath") or "/dev/termination-log"
            c.term_path = cdir / "termination-log"
            c.term_path.write_text("")
            paths.add(term, c.term_path)
            env: dict[str, str] = {}
            for k in INHERITED_ENV:
                if k in os.environ:
                    env[k] = os.environ[k]
            env["PATH"] = os.pathsep.join(
                [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
            )
            env.update(self.node.extra_env)
            env["HOSTNAME"] = spec.get("hostname") or meta["name"]
            env["KUBERNETES_SERVICE_HOST"] = self.node.api_host
            env["KUBERNETES_SERVICE_PORT"] = str(self.node.api_port)
            env["KUBERNETES_SERVICE_PORT_HTTPS"] = str(self.node.api_port)
            env["KUBERNETES_PORT"] = f"tcp://{self.node.api_host}:{self.node.api_port}"
            for src in c.spec.get("envFrom") or []:
                prefix = src.get("prefix") or ""
                if "configMapRef" in src:
                    ref = src["configMapRef"]
                    data = self._config_map(ref["name"], ref.get("optional"))
                elif "secretRef" in src:
                    ref = src["secretRef"]
                    data = self._secret(ref["name"], ref.get("optional"))
                else:
                    continue
                for k, v in (data or {}).items():
                    env[prefix + k] = v
            for e in c.spec.get("env") or []:
                if "value" in e:  # a literal, before $(VAR) brings in values mapped already
                    e = {**e, "value": ports(e["value"] or "")}
                value = self._env_value(e, c.spec, env)
                if value is None:
                    continue
                env[e["name"]] = paths(host_map(value))
            env["TEST_NODE_PATH_MAP"] = json.dumps(paths.mapping)
            if SA_MOUNT in paths.mapping:
                env["TEST_NODE_SERVICEACCOUNT_DIR"] = paths.mapping[SA_MOUNT]
                # The client's in-cluster loader reads a fixed path this node cannot provide;
                # a kubeconfig with the pod's own token gives the same identity and RBAC to code
                # that falls back to KUBECONFIG (the usual in-cluster-else-kubeconfig pattern).
                env["KUBECONFIG"] = self._pod_kubeconfig(Path(paths.mapping[SA_MOUNT]))
            command = list(c.spec.get("command") or [])
            args = list(c.spec.get("args") or [])
            if not command:
                command = list(self.node.entrypoints.get(c.spec.get("image", ""), []))
            argv = [paths(host_map(expand(ports(a), env))) for a in command + args]
            if not argv:
                raise ConfigError(
                    f"container {c.name!r} has no command and image {c.spec.get('image')!r} "
                    "has no entrypoint known to the test node (TestNode(entrypoints=...))"
                )
            wd = c.spec.get("workingDir")
            c.cwd = paths(wd) if wd else str(cdir)
            if wd and not Path(c.cwd).is_dir():
                c.cwd = str(cdir)
            c.argv, c.env = argv, env
            c.log_path = cdir / "container.log"

    def _volume(self, vol: dict) -> Path:
        name = vol["name"]
        vdir = self.dir / "volumes" / name
        if "emptyDir" in vol:
            vdir.mkdir(parents=True, exist_ok=True)
            return vdir
        if "hostPath" in vol:
            p = Path(vol["hostPath"]["path"])
            if vol["hostPath"].get("type") in ("DirectoryOrCreate",):
                p.mkdir(parents=True, exist_ok=True)
            return p
        if "persistentVolumeClaim" in vol:
            p = self.node.workdir / "pvc" / self.ns / vol["persistentVolumeClaim"]["claimName"]
            p.mkdir(parents=True, exist_ok=True)
            return p
        files: dict[str, tuple[bytes, int | None]] = {}
        if "configMap" in vol:
            self._project_cm(vol["configMap"], files, vol["configMap"].get("defaultMode"))
        elif "secret" in vol:
            src = vol["secret"]
            self._project_secret(
                {"name": src.get("secretName"), **src}, files, src.get("defaultMode")
            )
        elif "downwardAPI" in vol:
            self._project_downward(vol["downwardAPI"], files)
        elif "projected" in vol:
            for source in vol["projected"].get("sources") or []:
                if "configMap" in source:
                    self._project_cm(source["configMap"], files, None)
                elif "secret" in source:
                    self._project_secret(source["secret"], files, None)
                elif "downwardAPI" in source:
                    self._project_downward(source["downwardAPI"], files)
                elif "serviceAccountToken" in source:
                    sat = source["serviceAccountToken"]
                    files[sat["path"]] = (self.node._token_request(self.pod, sat).encode(), None)
        else:
            vdir.mkdir(parents=True, exist_ok=True)  # unsupported kind: an empty directory
            return vdir
        if vdir.exists():
            shutil.rmtree(vdir)
        vdir.mkdir(parents=True)
        for rel, (data, mode) in files.items():
            p = vdir / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            if mode is not None:
                os.chmod(p, mode & 0o777)
        return vdir

    def _project(self, data: dict[str, bytes], src: dict, files: dict, default_mode) -> None:
        items = src.get("items")
        if items:
            for it in items:
                if it["key"] not in data:
                    if src.get("optional"):
                        continue
                    raise ConfigError(f"key {it['key']!r} not found in {src.get('name')!r}")
                files[it.get("path") or it["key"]] = (data[it["key"]], it.get("mode", default_mode))
        else:
            for k, v in data.items():
                files[k] = (v, default_mode)

    def _project_cm(self, src: dict, files: dict, default_mode) -> None:
        cm = self.node._read("config_map", self.ns, src["name"])
        if cm is None:
            if src.get("optional"):
                return
            raise ConfigError(f'configmap "{src["name"]}" not found')
        data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
        self._project(data, src, files, default_mode)

    def _project_secret(self, src: dict, files: dict, default_mode) -> None:
        sec = self.node._read("secret", self.ns, src["name"])
        if sec is None:
            if src.get("optional"):
                return
            raise ConfigError(f'secret "{src["name"]}" not found')
        data = {k: base64.b64decode(v) for k, v in (sec.get("data") or {}).items()}
        self._project(data, src, files, default_mode)

    def _project_downward(self, src: dict, files: dict) -> None:
        for it in src.get("items") or []:
            if "fieldRef" in it:
                value = self._field(it["fieldRef"]["fieldPath"])
            else:
                value = self._resource(it["resourceFieldRef"], None)
            files[it["path"]] = (value.encode(), it.get("mode"))

    def _config_map(self, name: str, optional: bool | None) -> dict[str, str] | None:
        cm = self.node._read("config_map", self.ns, name)
        if cm is None:
            if optional:
                return None
            raise ConfigError(f'configmap "{name}" not found')
        return dict(cm.get("data") or {})

    def _secret(self, name: str, optional: bool | None) -> dict[str, str] | None:
        sec = self.node._read("secret", self.ns, name)
        if sec is None:
            if optional:
                return None
            raise ConfigError(f'secret "{name}" not found')
        return {
            k: base64.b64decode(v).decode("utf-8", "replace")
            for k, v in (sec.get("data") or {}).items()
        }

    def _env_value(self, e: dict, cspec: dict, env: dict[str, str]) -> str | None:
        if "valueFrom" not in e or e["valueFrom"] is None:
            return expand(e.get("value") or "", env)
        vf = e["valueFrom"]
        if "fieldRef" in vf:
            return self._field(vf["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in vf:
            return self._resource(vf["resourceFieldRef"], cspec)
        for kind, getter in (("configMapKeyRef", self._config_map), ("secretKeyRef", self._secret)):
            if kind in vf:
                ref = vf[kind]
                data = getter(ref["name"], ref.get("optional"))
                if data is None:
                    return None
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ref['name']}")
                return data[ref["key"]]
        return ""

    def _field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.node.name,
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.podIP": POD_IP,
            "status.podIPs": POD_IP,
            "status.hostIP": POD_IP,
        }
        if path in simple:
            return simple[path]
        if path in ("metadata.labels", "metadata.annotations"):
            d = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
        raise ConfigError(f"unsupported fieldRef {path!r}")

    def _resource(self, ref: dict, cspec: dict | None) -> str:
        if cspec is None:
            name = ref.get("containerName")
            cspec = next((c.spec for c in self.containers if c.name == name), {})
        kind, _, res = ref["resource"].partition(".")
        resources = (cspec or {}).get("resources") or {}
        value = (resources.get(kind) or {}).get(res) or (resources.get("limits") or {}).get(res)
        if value is None:
            value = self.node.capacity.get(res, "0")
        divisor = _quantity(ref.get("divisor") or "1")
        return str(int(-(-_quantity(value) // divisor)))

    # -- processes -----------------------------------------------------------------------------
    def _start(self, c: _Container) -> None:
        c.terminated = None
        c.ready = False
        c.next_probe = time.monotonic() + float(
            (c.spec.get("readinessProbe") or {}).get("initialDelaySeconds") or 0
        )
        with open(c.log_path, "ab") as log:
            if c.restart_count:
                log.write(f"--- test node: restart {c.restart_count} ---\n".encode())
                log.flush()
            try:
                c.proc = subprocess.Popen(
                    c.argv,
                    env=c.env,
                    cwd=c.cwd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                log.write(f"test node: cannot start {shlex.join(c.argv)}: {exc}\n".encode())
                c.proc = None
                c.started_at = _now()
                c.terminated = {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": str(exc),
                    "startedAt": c.started_at,
                    "finishedAt": _now(),
                    "containerID": "testnode://none",
                }
                return
        c.started_at = _now()
        self.node._record_start(self, c)

    def _collect(self, c: _Container) -> None:
        rc = c.proc.returncode if c.proc is not None else 128
        sig = -rc if rc < 0 else None
        exit_code = 128 + sig if sig else rc
        message = ""
        with contextlib.suppress(OSError):
            message = c.term_path.read_text(errors="replace")[:4096]
        if not message and exit_code != 0:
            policy = c.spec.get("terminationMessagePolicy") or "File"
            if policy == "FallbackToLogsOnError":
                message = tail(c.log_path, TERMINATION_LOG_LINES, TERMINATION_LOG_BYTES)
        state = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": c.started_at,
            "finishedAt": _now(),
            "containerID": f"testnode://{c.proc.pid if c.proc else 0}",
        }
        if sig:
            state["signal"] = sig
        if message:
            state["message"] = message
        c.terminated = state
        c.ready = False

    def _probe(self, c: _Container) -> bool:
        probe = c.spec.get("readinessProbe")
        if not probe:
            return True
        c.next_probe = time.monotonic() + max(0.5, float(probe.get("periodSeconds") or 10) / 5)
        timeout = float(probe.get("timeoutSeconds") or 1)
        try:
            if "httpGet" in probe:
                hg = probe["httpGet"]
                port = self._port(c, hg["port"])
                url = f"{(hg.get('scheme') or 'HTTP').lower()}://127.0.0.1:{port}{hg.get('path', '/')}"
                req = urllib.request.Request(
                    url, headers={h["name"]: h["value"] for h in hg.get("httpHeaders") or []}
                )
                with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310
                    return 200 <= r.status < 400
            if "tcpSocket" in probe:
                port = self._port(c, probe["tcpSocket"]["port"])
                with socket.create_connection(("127.0.0.1", port), timeout=timeout):
                    return True
            if "exec" in probe:
                argv = [expand(a, c.env) for a in probe["exec"]["command"]]
                r = subprocess.run(
                    argv, env=c.env, cwd=c.cwd, capture_output=True, timeout=max(timeout, 5)
                )
                return r.returncode == 0
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False
        return True

    def _port(self, c: _Container, port: int | str) -> int:
        """The host port a probe of `port` (number or name) reaches."""
        if isinstance(port, int) or str(port).isdigit():
            return self.ports.port(int(port))
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return self.ports.port(int(p["containerPort"]))
        raise ValueError(f"unknown named port {port!r}")

    def _terminate_all(self, grace: float) -> None:
        procs = [c for c in self.init_containers + self.containers if c.running()]
        if not procs:
            return
        for c in procs:
            c.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.running() for c in procs):
            time.sleep(0.05)
        for c in procs:
            c.signal(signal.SIGKILL)
        for c in procs:
            with contextlib.suppress(Exception):
                c.proc.wait(10)

    # -- status --------------------------------------------------------------------------------
    def _conditions(self, ready: bool, initialized: bool = True) -> list[dict]:
        now = _now()

        def cond(t: str, ok: bool) -> dict:
            return {"type": t, "status": "True" if ok else "False", "lastTransitionTime": now}

        return [
            cond("Initialized", initialized),
            cond("Ready", ready),
            cond("ContainersReady", ready),
            cond("PodScheduled", True),
        ]

    @staticmethod
    def _waiting(c: _Container, reason: str, message: str = "") -> dict:
        return {
            "name": c.name,
            "image": c.spec.get("image", ""),
            "imageID": "",
            "ready": False,
            "restartCount": c.restart_count,
            "started": False,
            "state": {"waiting": {"reason": reason, "message": message}},
        }

    @staticmethod
    def _status_of(c: _Container) -> dict:
        st: dict[str, Any] = {
            "name": c.name,
            "image": c.spec.get("image", ""),
            "imageID": "",
            "restartCount": c.restart_count,
            "ready": bool(c.ready and c.running()),
            "started": c.running(),
        }
        if c.running():
            st["state"] = {"running": {"startedAt": c.started_at}}
            st["containerID"] = f"testnode://{c.proc.pid}"
        elif c.terminated is not None and c.restart_at is not None:
            st["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
            st["lastState"] = {"terminated": c.terminated}
        elif c.terminated is not None:
            st["state"] = {"terminated": c.terminated}
            st["containerID"] = c.terminated.get("containerID")
        else:
            st["state"] = {"waiting": {"reason": "PodInitializing"}}
        return st

    def _base_status(self) -> dict:
        return {
            "hostIP": POD_IP,
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.start_time or _now(),
            "qosClass": self.pod.get("status", {}).get("qosClass", "BestEffort"),
        }

    def _patch_running(self) -> None:
        with self.lock:
            initialized = all(
                c.terminated is not None and c.terminated["exitCode"] == 0
                for c in self.init_containers
            )
            ready = initialized and all(c.ready and c.running() for c in self.containers)
            status = {
                **self._base_status(),
                "phase": "Running" if initialized else "Pending",
                "conditions": self._conditions(ready, initialized),
                "containerStatuses": [self._status_of(c) for c in self.containers],
            }
            if self.init_containers:
                status["initContainerStatuses"] = [self._status_of(c) for c in self.init_containers]
        self._patch_status(status)

    def _finish(self, phase: str) -> None:
        self.phase = phase
        with self.lock:
            status = {
                **self._base_status(),
                "phase": phase,
                "conditions": self._conditions(False),
                "containerStatuses": [self._status_of(c) for c in self.containers],
            }
            if self.init_containers:
                status["initContainerStatuses"] = [self._status_of(c) for c in self.init_containers]
        self._patch_status(status)

    def _patch_status(self, status: dict) -> None:
        self.node._patch_pod_status(self.ns, self.pod_name, self.uid, status)


class TestNode:
    """Plays the kubelet (and the scheduler) for a control plane without either. See module doc."""

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
    ) -> None:
        self.api = kubernetes.client.ApiClient(api_client.configuration)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.coord = kubernetes.client.CoordinationV1Api(self.api)
        self.name = name
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"dbj-{name}-"))
        self.namespaces = set(namespaces) if namespaces else None
        self.extra_env = dict(extra_env or {})
        self.entrypoints = dict(entrypoints or {})
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
        self.host_ports: dict[tuple[str, int], int] = {}  # (namespace, containerPort) -> port
        host = api_client.configuration.host.split("://", 1)[-1].rstrip("/")
        self.api_host, _, port = host.rpartition(":")
        self.api_port = int(port or 443)
        self.runners: dict[str, _PodRunner] = {}  # uid -> runner
        self.by_name: dict[tuple[str, str], _PodRunner] = {}  # latest runner per pod name
        self.errors: list[str] = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_heartbeat = 0.0

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> TestNode:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._register()
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
        for r in runners:
            r._terminate_all(self.stop_grace)
        for r in runners:
            r.join(15)
            if r.phase in ("Pending", "Running") and r.delete_requested is None:
                with contextlib.suppress(Exception):
                    r._patch_status(
                        {
                            **r._base_status(),
                            "phase": "Failed",
                            "reason": "NodeStopped",
                            "message": "the test node stopped",
                            "conditions": r._conditions(False),
                            "containerStatuses": [r._status_of(c) for c in r.containers],
                        }
                    )
        with contextlib.suppress(Exception):
            self.api.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TestNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test API ------------------------------------------------------------------------------
    def runner(self, namespace: str, name: str) -> _PodRunner:
        with self._lock:
            r = self.by_name.get((namespace, name))
        if r is None:
            raise KeyError(f"pod {namespace}/{name} has not run on node {self.name}")
        return r

    def log_path(self, namespace: str, name: str, container: str | None = None) -> Path:
        """Log file of a container (default: the first) of the latest pod with this name."""
        r = self.runner(namespace, name)
        cs = (
            r.containers
            if container is None
            else [c for c in r.init_containers + r.containers if c.name == container]
        )
        if not cs:
            raise KeyError(f"pod {namespace}/{name} has no container {container!r}")
        return cs[0].log_path or (r.dir / cs[0].name / "container.log")

    def logs(self, namespace: str, name: str, container: str | None = None) -> str:
        p = self.log_path(namespace, name, container)
        return p.read_text(errors="replace") if p.exists() else ""

    def kill(
        self, namespace: str, name: str, sig: int = signal.SIGKILL, container: str | None = None
    ) -> None:
        """Fault injection: send ``sig`` to the pod's container process groups."""
        r = self.runner(namespace, name)
        if not any(c.running() for c in r.init_containers + r.containers):
            raise RuntimeError(f"pod {namespace}/{name} has no running container")
        r.kill(sig, container)

    def host_port(self, namespace: str, container_port: int) -> int:
        """Where containerPort `container_port` of the pods of `namespace` listens on this
        machine: allocated on first use, then fixed (the port itself without ``map_ports``)."""
        if not self.map_ports:
            return container_port
        key = (namespace, int(container_port))
        with self._lock:
            if key not in self.host_ports:
                self.host_ports[key] = _free_host_port(set(self.host_ports.values()))
            return self.host_ports[key]

    def pids(self, namespace: str, name: str) -> dict[str, int]:
        r = self.runner(namespace, name)
        return {c.name: c.proc.pid for c in r.init_containers + r.containers if c.running()}

    def wait_for_start(self, namespace: str, name: str, timeout: float = 30.0) -> _PodRunner:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                r = self.by_name.get((namespace, name))
            if r is not None and any(c.running() for c in r.containers):
                return r
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
                pod = self.core.read_namespaced_pod(name, namespace)
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

    # -- main loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                if time.monotonic() - self._last_heartbeat > 10:
                    self._heartbeat()
                self._sync()
            except Exception as exc:  # noqa: BLE001 - keep serving; surfaced via errors
                if not self._stopping.is_set():
                    self._record_error(f"sync: {exc!r}")
                    time.sleep(1)
            self._stopping.wait(self.poll_interval)

    def _sync(self) -> None:
        resp = self.core.list_pod_for_all_namespaces(_preload_content=False)
        pods = json.loads(resp.data)["items"]
        seen: set[str] = set()
        for pod in pods:
            meta, spec = pod["metadata"], pod["spec"]
            if self.namespaces is not None and meta["namespace"] not in self.namespaces:
                continue
            uid = meta["uid"]
            node_name = spec.get("nodeName")
            deleting = meta.get("deletionTimestamp") is not None
            phase = (pod.get("status") or {}).get("phase")
            if not node_name:
                if not deleting:
                    self._bind(meta["namespace"], meta["name"], uid)
                continue
            if node_name != self.name:
                continue
            seen.add(uid)
            with self._lock:
                runner = self.runners.get(uid)
            if deleting:
                grace = meta.get("deletionGracePeriodSeconds")
                grace = 30 if grace is None else grace
                if runner is None or runner.finished.is_set():
                    self._delete_pod(meta["namespace"], meta["name"], uid)
                else:
                    runner.request_delete(float(grace))
                continue
            if runner is None and phase not in ("Succeeded", "Failed"):
                runner = _PodRunner(self, pod)
                with self._lock:
                    self.runners[uid] = runner
                    self.by_name[(meta["namespace"], meta["name"])] = runner
                runner.start()
        # pods removed behind our back (force deletion): end their processes at once
        with self._lock:
            gone = [r for uid, r in self.runners.items() if uid not in seen]
        for r in gone:
            if not r.finished.is_set():
                r.request_delete(0)
            with self._lock:
                self.runners.pop(r.uid, None)

    def _bind(self, namespace: str, name: str, uid: str) -> None:
        body = kubernetes.client.V1Binding(
            metadata=kubernetes.client.V1ObjectMeta(name=name, namespace=namespace, uid=uid),
            target=kubernetes.client.V1ObjectReference(kind="Node", name=self.name),
        )
        try:
            self.core.create_namespaced_pod_binding(name, namespace, body, _preload_content=False)
        except ApiException as exc:
            # 403: the namespace is being deleted (an earlier test's), which forbids creating
            # anything in it, a binding included; its pods are going anyway.
            if exc.status not in (403, 404, 409):
                raise

    def _register(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "dreambooth.dev/test-node": "true",
                },
            },
        }
        try:
            self.core.create_node(node)
        except ApiException as exc:
            if exc.status != 409:
                raise
        self._heartbeat()

    def _heartbeat(self) -> None:
        now = _now()
        status = {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "addresses": [
                {"type": "InternalIP", "address": POD_IP},
                {"type": "Hostname", "address": self.name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "test node is ready",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": "",
                "containerRuntimeVersion": "testnode://1",
                "kernelVersion": os.uname().release,
                "kubeProxyVersion": "",
                "kubeletVersion": "v1.20.2-testnode",
                "machineID": "",
                "operatingSystem": "linux",
                "osImage": "test node",
                "systemUUID": "",
            },
        }
        self.core.patch_node_status(self.name, {"status": status})
        lease = {
            "metadata": {"name": self.name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": self.name,
                "leaseDurationSeconds": 40,
                "renewTime": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        try:
            self.coord.patch_namespaced_lease(self.name, "kube-node-lease", lease)
        except ApiException as exc:
            if exc.status != 404:
                raise
            with contextlib.suppress(ApiException):
                self.coord.create_namespaced_lease("kube-node-lease", lease)
        self._last_heartbeat = time.monotonic()

    # -- API helpers used by runners -------------------------------------------------------------
    def _record_error(self, msg: str) -> None:
        self.errors.append(msg)

    def _record_start(self, runner: _PodRunner, c: _Container) -> None:
        pass

    def _read(self, kind: str, namespace: str, name: str) -> dict | None:
        try:
            resp = getattr(self.core, f"read_namespaced_{kind}")(
                name, namespace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(resp.data)

    def _token_request(self, pod: dict, source: dict) -> str:
        sa = pod["spec"].get("serviceAccountName") or "default"
        body = {
            "spec": {
                "audiences": [source["audience"]] if source.get("audience") else None,
                "expirationSeconds": source.get("expirationSeconds") or 3600,
                "boundObjectRef": {
                    "kind": "Pod",
                    "apiVersion": "v1",
                    "name": pod["metadata"]["name"],
                    "uid": pod["metadata"]["uid"],
                },
            }
        }
        resp = self.core.create_namespaced_service_account_token(
            sa, pod["metadata"]["namespace"], body
        )
        return resp.status.token

    def _cluster_hostnames(self, namespace: str, pod: dict) -> set[str]:
        names: set[str] = set()

        def forms(base: str, ns: str) -> None:
            names.update(
                {
                    f"{base}.{ns}",
                    f"{base}.{ns}.svc",
                    f"{base}.{ns}.svc.{CLUSTER_DOMAIN}",
                }
            )

        try:
            services = self.core.list_namespaced_service(namespace).items
        except ApiException:
            services = []
        for svc in services:
            names.add(svc.metadata.name)
            forms(svc.metadata.name, namespace)
        for p in self.core.list_namespaced_pod(namespace).items:
            if p.spec.hostname and p.spec.subdomain:
                base = f"{p.spec.hostname}.{p.spec.subdomain}"
                names.add(base)
                forms(base, namespace)
        names.add("kubernetes")
        forms("kubernetes", "default")
        names.discard(self.api_host)
        return names

    def _port_map(self, namespace: str, pod: dict) -> PortMap:
        """The pod's declared containerPorts -> their host ports (none without map_ports)."""
        if not self.map_ports:
            return PortMap()
        spec = pod["spec"]
        containers = (spec.get("initContainers") or []) + spec["containers"]
        declared = {int(p["containerPort"]) for c in containers for p in c.get("ports") or []}
        return PortMap({port: self.host_port(namespace, port) for port in declared})

    def _patch_pod_status(self, namespace: str, name: str, uid: str, status: dict) -> None:
        body = {"metadata": {"uid": uid}, "status": status}
        try:
            self.core.patch_namespaced_pod_status(name, namespace, body)
        except ApiException as exc:
            if exc.status not in (404, 409, 422):
                raise

    def _delete_pod(self, namespace: str, name: str, uid: str) -> None:
        try:
            self.core.delete_namespaced_pod(
                name,
                namespace,
                body=kubernetes.client.V1DeleteOptions(
                    grace_period_seconds=0,
                    preconditions=kubernetes.client.V1Preconditions(uid=uid),
                ),
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
