"""Volumes on the local disk, and the path mapping that lets a container find them.

configMap, secret, downwardAPI and projected (incl. serviceAccountToken) volumes are written as
files; emptyDir is a directory of the pod; persistentVolumeClaim a directory per claim, shared by
the node's pods; hostPath the path itself. **Path mapping**: a container cannot see its
mountPath, so the node rewrites every occurrence of a mountPath (at a path boundary) in command,
args, env values and workingDir to the local directory (``PathMap``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .references import ConfigError, DownwardApi, References

# a volume file: its bytes, and its mode (None: the default umask)
Files = dict[str, tuple[bytes, int | None]]


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
            paths = sorted(self.mapping, key=len, reverse=True)
            self._re = re.compile(
                r"(?<![\w.\-/])(" + "|".join(re.escape(p) for p in paths) + r")(?=/|$|[^\w.\-])"
            )
        return self._re.sub(lambda match: self.mapping[match.group(1)], value)


@dataclass
class Volumes:
    """Materialises the volumes of one pod under `pod_dir` (claims under `claims_dir`)."""

    pod: dict
    pod_dir: Path
    claims_dir: Path
    references: References
    downward: DownwardApi
    service_account_token: Callable[[dict, dict], str]  # (pod, token source) -> token

    def materialise(self) -> dict[str, Path]:
        """Every volume of the pod: its name -> its local directory."""
        return {
            volume["name"]: self._volume(volume) for volume in self.pod["spec"].get("volumes") or []
        }

    def _volume(self, volume: dict) -> Path:
        directory = self._directory(volume)
        if directory is not None:
            return directory
        local = self.pod_dir / "volumes" / volume["name"]
        files = self._files(volume)
        if files is None:  # unsupported kind: an empty directory
            local.mkdir(parents=True, exist_ok=True)
            return local
        _write_files(local, files)
        return local

    def _directory(self, volume: dict) -> Path | None:
        """The directory of a volume that is one (hostPath, emptyDir, a claim); else None."""
        if "hostPath" in volume:
            local = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") == "DirectoryOrCreate":
                local.mkdir(parents=True, exist_ok=True)
            return local
        if "emptyDir" in volume:
            local = self.pod_dir / "volumes" / volume["name"]
        elif "persistentVolumeClaim" in volume:
            namespace = self.pod["metadata"]["namespace"]
            local = self.claims_dir / namespace / volume["persistentVolumeClaim"]["claimName"]
        else:
            return None
        local.mkdir(parents=True, exist_ok=True)
        return local

    def _files(self, volume: dict) -> Files | None:
        """The files of a volume made of them (configMap, secret, ...); None for other kinds."""
        files: Files = {}
        if "configMap" in volume:
            source = volume["configMap"]
            self._config_map(source, files, source.get("defaultMode"))
        elif "secret" in volume:
            source = volume["secret"]
            self._secret(
                {"name": source.get("secretName"), **source}, files, source.get("defaultMode")
            )
        elif "downwardAPI" in volume:
            self._downward(volume["downwardAPI"], files)
        elif "projected" in volume:
            for source in volume["projected"].get("sources") or []:
                self._projected_source(source, files)
        else:
            return None
        return files

    def _projected_source(self, source: dict, files: Files) -> None:
        if "configMap" in source:
            self._config_map(source["configMap"], files, None)
        elif "secret" in source:
            self._secret(source["secret"], files, None)
        elif "downwardAPI" in source:
            self._downward(source["downwardAPI"], files)
        elif "serviceAccountToken" in source:
            token_source = source["serviceAccountToken"]
            token = self.service_account_token(self.pod, token_source)
            files[token_source["path"]] = (token.encode(), None)

    def _config_map(self, source: dict, files: Files, default_mode: int | None) -> None:
        data = self.references.config_map_files(source["name"], source.get("optional"))
        if data is not None:
            _select_items(data, source, files, default_mode)

    def _secret(self, source: dict, files: Files, default_mode: int | None) -> None:
        data = self.references.secret_files(source["name"], source.get("optional"))
        if data is not None:
            _select_items(data, source, files, default_mode)

    def _downward(self, source: dict, files: Files) -> None:
        for item in source.get("items") or []:
            if "fieldRef" in item:
                value = self.downward.field(item["fieldRef"]["fieldPath"])
            else:
                value = self.downward.resource(item["resourceFieldRef"])
            files[item["path"]] = (value.encode(), item.get("mode"))


def _select_items(
    data: dict[str, bytes], source: dict, files: Files, default_mode: int | None
) -> None:
    """Add the keys `source` lists under ``items`` (each at its path), else every key."""
    items = source.get("items")
    if not items:
        for key, value in data.items():
            files[key] = (value, default_mode)
        return
    for item in items:
        if item["key"] not in data:
            if source.get("optional"):
                continue
            raise ConfigError(f"key {item['key']!r} not found in {source.get('name')!r}")
        files[item.get("path") or item["key"]] = (data[item["key"]], item.get("mode", default_mode))


def _write_files(directory: Path, files: Files) -> None:
    """Write the volume afresh: a retried preparation must not keep a file that has gone."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for relative, (data, mode) in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mode is not None:
            os.chmod(path, mode & 0o777)
