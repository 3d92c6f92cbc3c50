"""What a pod's env and volumes refer to: ConfigMaps and Secrets of its namespace, and its own
fields and resources (the downward API). A missing non-optional reference raises ``ConfigError``:
the pod stays Pending with ``CreateContainerConfigError`` and is retried, like the kubelet."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable

from kubernetes.utils import parse_quantity

from .network import POD_IP


class ConfigError(Exception):
    """A reference (ConfigMap, Secret, key) the pod needs is missing: retry later."""


def _decoded(data: dict[str, str]) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in data.items()}


class References:
    """The ConfigMaps and Secrets of one namespace, read through `read(kind, namespace, name)`,
    as env values (text) or as volume files (bytes). ``None`` for a missing optional one."""

    def __init__(self, read: Callable[[str, str, str], dict | None], namespace: str) -> None:
        self._read = read
        self.namespace = namespace

    def _object(self, kind: str, name: str, optional: bool | None) -> dict | None:
        found = self._read(kind, self.namespace, name)
        if found is None and not optional:
            raise ConfigError(f'{kind.replace("_", "")} "{name}" not found')
        return found

    def config_map_text(self, name: str, optional: bool | None) -> dict[str, str] | None:
        config_map = self._object("config_map", name, optional)
        return None if config_map is None else dict(config_map.get("data") or {})

    def secret_text(self, name: str, optional: bool | None) -> dict[str, str] | None:
        secret = self._object("secret", name, optional)
        if secret is None:
            return None
        data = _decoded(secret.get("data") or {})
        return {key: value.decode("utf-8", "replace") for key, value in data.items()}

    def config_map_files(self, name: str, optional: bool | None) -> dict[str, bytes] | None:
        config_map = self._object("config_map", name, optional)
        if config_map is None:
            return None
        files = {key: value.encode() for key, value in (config_map.get("data") or {}).items()}
        files.update(_decoded(config_map.get("binaryData") or {}))
        return files

    def secret_files(self, name: str, optional: bool | None) -> dict[str, bytes] | None:
        secret = self._object("secret", name, optional)
        return None if secret is None else _decoded(secret.get("data") or {})


class DownwardApi:
    """A pod's own fields (``fieldRef``) and its containers' resources (``resourceFieldRef``)."""

    def __init__(self, pod: dict, node_name: str, node_capacity: dict[str, str]) -> None:
        self.pod = pod
        self.node_name = node_name
        self.node_capacity = node_capacity

    def field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        one_key = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if one_key:
            return (meta.get(one_key.group(1)) or {}).get(one_key.group(2), "")
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.node_name,
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
            "status.podIP": POD_IP,
            "status.podIPs": POD_IP,
            "status.hostIP": POD_IP,
        }
        if path in simple:
            return simple[path]
        if path in ("metadata.labels", "metadata.annotations"):
            pairs = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{key}="{value}"' for key, value in sorted(pairs.items()))
        raise ConfigError(f"unsupported fieldRef {path!r}")

    def resource(self, ref: dict, container_spec: dict | None = None) -> str:
        """A request or limit in units of the divisor, rounded up; the node's capacity where the
        container sets none. A volume's reference names its container (`container_spec` None)."""
        if container_spec is None:
            name = ref.get("containerName")
            containers = self.pod["spec"]["containers"]
            container_spec = next((c for c in containers if c["name"] == name), {})
        kind, _, resource = ref["resource"].partition(".")  # "limits.cpu" -> limits, cpu
        resources = container_spec.get("resources") or {}
        value = (resources.get(kind) or {}).get(resource)
        value = value or (resources.get("limits") or {}).get(resource)
        if value is None:
            value = self.node_capacity.get(resource, "0")
        divisor = parse_quantity(ref.get("divisor") or "1")
        return str(math.ceil(parse_quantity(value) / divisor))
