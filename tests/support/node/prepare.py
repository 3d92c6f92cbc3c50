"""Preparing a pod: from its spec to, for each container, an argv, an environment and a working
directory that work on this machine.

Each string a container gets (command, args, env values) is rewritten: container ports to host
ports (``PortMap``), cluster DNS names to 127.0.0.1 (``HostMap``), mountPaths to the volumes'
local directories (``PathMap``). The path mapping is also given to the process as JSON in
``TEST_NODE_PATH_MAP`` ({mountPath: localDir}), and the service-account directory (if mounted) as
``TEST_NODE_SERVICEACCOUNT_DIR``; ``KUBERNETES_SERVICE_HOST/PORT`` point at the API server.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .container import Container
from .environment import EnvResolver, api_server_environment, expand, inherited_environment
from .network import HostMap, PortMap
from .references import ConfigError, DownwardApi, References
from .volumes import CachedTokens, PathMap, Volumes

if TYPE_CHECKING:
    from .testnode import TestNode

SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"


def prepare_pod(
    node: TestNode, pod: dict, pod_dir: Path, containers: Sequence[Container], tokens: CachedTokens
) -> PortMap:
    """Materialise the pod's volumes and prepare each container; return the pod's port map.
    Raises ``ConfigError`` while something the pod refers to is missing: the caller retries."""
    preparation = _PodPreparation(node, pod, pod_dir, tokens)
    for container in containers:
        preparation.prepare(container)
    return preparation.ports


def pod_volumes(node: TestNode, pod: dict, pod_dir: Path, tokens: CachedTokens) -> Volumes:
    """The volumes of `pod` (this version of the object: its labels and annotations)."""
    namespace = pod["metadata"]["namespace"]
    return Volumes(
        pod,
        pod_dir,
        claims_dir=node.workdir / "pvc",
        references=References(node.apiserver.read, namespace),
        downward=DownwardApi(pod, node.name, node.capacity),
        service_account_token=tokens,
    )


class _PodPreparation:
    """One attempt at preparing a pod: made with what its containers share (volumes, cluster
    host names, ports), then prepares each container."""

    def __init__(self, node: TestNode, pod: dict, pod_dir: Path, tokens: CachedTokens) -> None:
        self.node = node
        self.pod = pod
        self.pod_dir = pod_dir
        self.namespace: str = pod["metadata"]["namespace"]
        volumes = pod_volumes(node, pod, pod_dir, tokens)
        self.env_resolver = EnvResolver(volumes.references, volumes.downward)
        self.volume_dirs = volumes.materialise()
        self.host_map = HostMap(node.apiserver.cluster_host_names(self.namespace))
        self.ports = node.port_map(self.namespace, pod)

    def prepare(self, container: Container) -> None:
        container.directory.mkdir(parents=True, exist_ok=True)
        paths = self._mounts(container)
        env = self._environment(container, paths)
        container.argv = self._argv(container, env, paths)
        container.cwd = self._working_dir(container, paths)
        container.env = env

    def _mounts(self, container: Container) -> PathMap:
        """The container's mountPaths, and its terminationMessagePath, -> local paths."""
        paths = PathMap()
        for mount in container.spec.get("volumeMounts") or []:
            local = self.volume_dirs.get(mount["name"])
            if local is None:
                raise ConfigError(f"volume {mount['name']!r} not found")
            if mount.get("subPath"):
                # A key of a configMap volume is a symlink through ..data, so this container
                # sees the key's updates, where kubelet's bind mount of a subPath keeps the
                # version it started with: more lenient, never less.
                local = local / mount["subPath"]
                if not local.exists():  # a subPath may name a file of the volume, too
                    local.mkdir(parents=True, exist_ok=True)
            paths.add(mount["mountPath"], local)
        container.termination_log.write_text("")  # empty until the container writes its message
        message_path = container.spec.get("terminationMessagePath")
        paths.add(message_path or DEFAULT_TERMINATION_MESSAGE_PATH, container.termination_log)
        return paths

    def _environment(self, container: Container, paths: PathMap) -> dict[str, str]:
        env = inherited_environment(self.node.extra_env)
        env["HOSTNAME"] = self.pod["spec"].get("hostname") or self.pod["metadata"]["name"]
        env.update(api_server_environment(self.node.apiserver.host, self.node.apiserver.port))
        env.update(self.env_resolver.env_from(container.spec.get("envFrom") or []))
        for entry in container.spec.get("env") or []:
            if "value" in entry:  # a literal, before $(VAR) brings in values mapped already
                entry = {**entry, "value": self.ports(entry["value"] or "")}
            value = self.env_resolver.value(entry, container.spec, env)
            if value is not None:
                env[entry["name"]] = paths(self.host_map(value))
        env.update(self._test_node_environment(paths))
        return env

    def _test_node_environment(self, paths: PathMap) -> dict[str, str]:
        """What the node tells the process about itself: the path mapping, the service account."""
        env = {"TEST_NODE_PATH_MAP": json.dumps(paths.mapping)}
        service_account_dir = paths.mapping.get(SERVICE_ACCOUNT_MOUNT)
        if service_account_dir is not None:
            env["TEST_NODE_SERVICEACCOUNT_DIR"] = service_account_dir
            # The client's in-cluster loader reads a fixed path this node cannot provide;
            # a kubeconfig with the pod's own token gives the same identity and RBAC to code
            # that falls back to KUBECONFIG (the usual in-cluster-else-kubeconfig pattern).
            env["KUBECONFIG"] = self._write_kubeconfig(Path(service_account_dir) / "token")
        return env

    def _write_kubeconfig(self, token_file: Path) -> str:
        """A kubeconfig that authenticates as the pod's service account (its token file)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {
                        "server": f"https://{self.node.apiserver.host}:{self.node.apiserver.port}",
                        "insecure-skip-tls-verify": True,
                    },
                }
            ],
            "users": [{"name": "pod", "user": {"tokenFile": str(token_file)}}],
            "contexts": [
                {
                    "name": "pod",
                    "context": {"cluster": "test", "user": "pod", "namespace": self.namespace},
                }
            ],
            "current-context": "pod",
        }
        path = self.pod_dir / "kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        return str(path)

    def _argv(self, container: Container, env: dict[str, str], paths: PathMap) -> list[str]:
        """command + args (the image's entrypoint known to the node without a command), each
        with its ports mapped, ``$(VAR)`` expanded, then hosts and paths mapped."""
        image = container.spec.get("image", "")
        command = list(container.spec.get("command") or []) or self.node.entrypoints.get(image, [])
        args = list(container.spec.get("args") or [])
        argv = [paths(self.host_map(expand(self.ports(arg), env))) for arg in command + args]
        if not argv:
            raise ConfigError(
                f"container {container.name!r} has no command and image "
                f"{container.spec.get('image')!r} has no entrypoint known to the test node "
                "(TestNode(entrypoints=...))"
            )
        return argv

    def _working_dir(self, container: Container, paths: PathMap) -> str:
        """The mapped workingDir if it exists here, else the container's own directory."""
        working_dir = container.spec.get("workingDir")
        local = paths(working_dir) if working_dir else None
        if local is None or not Path(local).is_dir():
            return str(container.directory)
        return local
