"""A container's environment: what it inherits from the test, and what its spec asks for.

The base environment is a small allow-list of the test's environment (PATH, HOME, LANG, HF_* ...),
not all of it, so credentials reach a pod only through its spec; ``python``/``torchrun`` resolve
to this interpreter's virtualenv first (its bin dir leads PATH); then ``node.extra_env``. The
spec's ``env`` takes plain values with ``$(VAR)`` expansion, ``fieldRef``, ``resourceFieldRef``,
``configMapKeyRef`` and ``secretKeyRef``; ``envFrom`` takes whole ConfigMaps and Secrets.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from .references import ConfigError, DownwardApi, References

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


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known vars replaced, unknown left, ``$$`` -> ``$``."""
    out, position, length = [], 0, len(value)
    while position < length:
        char = value[position]
        if char == "$" and position + 1 < length:
            following = value[position + 1]
            if following == "$":
                out.append("$")
                position += 2
                continue
            if following == "(":
                end = value.find(")", position + 2)
                if end != -1:
                    name = value[position + 2 : end]
                    out.append(env[name] if name in env else value[position : end + 1])
                    position = end + 1
                    continue
        out.append(char)
        position += 1
    return "".join(out)


def inherited_environment(extra_env: dict[str, str]) -> dict[str, str]:
    """The allow-listed part of the test's environment, this virtualenv first on PATH, then
    `extra_env`."""
    env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
    )
    env.update(extra_env)
    return env


def api_server_environment(host: str, port: int) -> dict[str, str]:
    """The variables every container gets for the ``kubernetes`` Service: the API server."""
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": str(port),
        "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
        "KUBERNETES_PORT": f"tcp://{host}:{port}",
    }


class EnvResolver:
    """Resolves a container's ``envFrom`` and ``env`` entries through the pod's references."""

    def __init__(self, references: References, downward: DownwardApi) -> None:
        self.references = references
        self.downward = downward

    def env_from(self, sources: list[dict]) -> dict[str, str]:
        """The variables of the ConfigMaps and Secrets in ``envFrom``, each with its prefix."""
        env: dict[str, str] = {}
        for source in sources:
            prefix = source.get("prefix") or ""
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = self.references.config_map_text(ref["name"], ref.get("optional"))
            elif "secretRef" in source:
                ref = source["secretRef"]
                data = self.references.secret_text(ref["name"], ref.get("optional"))
            else:
                continue
            for name, value in (data or {}).items():
                env[prefix + name] = value
        return env

    def value(self, entry: dict, container_spec: dict, env: dict[str, str]) -> str | None:
        """The value of one ``env`` entry given the variables before it; None when it refers
        to something optional that is missing (the variable is then not set)."""
        value_from = entry.get("valueFrom")
        if value_from is None:
            return expand(entry.get("value") or "", env)
        if "fieldRef" in value_from:
            return self.downward.field(value_from["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in value_from:
            return self.downward.resource(value_from["resourceFieldRef"], container_spec)
        for kind, lookup in (
            ("configMapKeyRef", self.references.config_map_text),
            ("secretKeyRef", self.references.secret_text),
        ):
            if kind in value_from:
                return _key_of(kind, value_from[kind], lookup)
        return ""


def _key_of(
    kind: str, ref: dict, lookup: Callable[[str, bool | None], dict[str, str] | None]
) -> str | None:
    data = lookup(ref["name"], ref.get("optional"))
    if data is None:
        return None
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(f"couldn't find key {ref['key']} in {kind} {ref['name']}")
    return data[ref["key"]]
