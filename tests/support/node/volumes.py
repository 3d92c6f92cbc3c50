"""Volumes on the local disk, and the path mapping that lets a container find them.

configMap, secret, downwardAPI and projected (incl. serviceAccountToken) volumes are files laid out
as kubelet does (``atomic_writer``: ``KEY -> ..data/KEY``, ``..data`` swapped in one rename), and
``refresh`` rewrites those whose content changed, for the pod runner's volume syncs; emptyDir is
a directory of the pod; persistentVolumeClaim a directory per claim, shared by the node's pods;
hostPath the path itself. **Path mapping**: a container cannot see its
mountPath, so the node rewrites every occurrence of a mountPath (at a path boundary) in command,
args, env values and workingDir to the local directory (``PathMap``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .apiserver import DEFAULT_TOKEN_SECONDS
from .atomic_writer import Files, write_atomically
from .references import ConfigError, DownwardApi, References

TOKEN_REFRESH_FRACTION = 0.8  # kubelet's token manager renews a token at 80% of its lifetime


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


class CachedTokens:
    """The projected service-account tokens of one pod, each requested again only once 80% of
    its lifetime has passed, as kubelet's token manager does: a volume sync must not mint a new
    token (and rewrite its file) every time."""

    def __init__(self, request: Callable[[dict, dict], str]) -> None:
        self._request = request  # (pod, token source) -> a new token
        self._tokens: dict[tuple, tuple[str, float]] = {}  # source -> (token, renew at)

    def __call__(self, pod: dict, source: dict) -> str:
        key = (source.get("audience"), source.get("expirationSeconds"))
        cached = self._tokens.get(key)
        if cached is None or time.monotonic() >= cached[1]:
            lifetime = source.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS
            renew_at = time.monotonic() + TOKEN_REFRESH_FRACTION * lifetime
            cached = self._tokens[key] = (self._request(pod, source), renew_at)
        return cached[0]


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

    def refresh(self) -> list[str]:
        """Rewrite each volume made of files whose content changed; the names of those rewritten.
        A volume whose ConfigMap or Secret has gone (or lost a key) keeps its last content, like
        kubelet's, unless the reference is optional: then its files go."""
        rewritten = []
        for volume in self.pod["spec"].get("volumes") or []:
            try:
                files = self._files(volume)
            except ConfigError:
                continue
            if files is not None and write_atomically(self._local(volume), files):
                rewritten.append(volume["name"])
        return rewritten

    def _local(self, volume: dict) -> Path:
        return self.pod_dir / "volumes" / volume["name"]

    def _volume(self, volume: dict) -> Path:
        directory = self._directory(volume)
        if directory is not None:
            return directory
        local = self._local(volume)
        files = self._files(volume)
        if files is None:  # unsupported kind: an empty directory
            local.mkdir(parents=True, exist_ok=True)
            return local
        write_atomically(local, files)  # a retried preparation drops the files that have gone
        return local

    def _directory(self, volume: dict) -> Path | None:
        """The directory of a volume that is one (hostPath, emptyDir, a claim); else None."""
        if "hostPath" in volume:
            local = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") == "DirectoryOrCreate":
                local.mkdir(parents=True, exist_ok=True)
            return local
        if "emptyDir" in volume:
            local = self._local(volume)
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
            source = volume["downwardAPI"]
            self._downward(source, files, source.get("defaultMode"))
        elif "projected" in volume:
            default_mode = volume["projected"].get("defaultMode")
            for source in volume["projected"].get("sources") or []:
                self._projected_source(source, files, default_mode)
        else:
            return None
        return files

    def _projected_source(self, source: dict, files: Files, default_mode: int | None) -> None:
        if "configMap" in source:
            self._config_map(source["configMap"], files, default_mode)
        elif "secret" in source:
            self._secret(source["secret"], files, default_mode)
        elif "downwardAPI" in source:
            self._downward(source["downwardAPI"], files, default_mode)
        elif "serviceAccountToken" in source:
            token_source = source["serviceAccountToken"]
            token = self.service_account_token(self.pod, token_source)
            files[token_source["path"]] = (token.encode(), default_mode)

    def _config_map(self, source: dict, files: Files, default_mode: int | None) -> None:
        data = self.references.config_map_files(source["name"], source.get("optional"))
        if data is not None:
            _select_items(data, source, files, default_mode)

    def _secret(self, source: dict, files: Files, default_mode: int | None) -> None:
        data = self.references.secret_files(source["name"], source.get("optional"))
        if data is not None:
            _select_items(data, source, files, default_mode)

    def _downward(self, source: dict, files: Files, default_mode: int | None) -> None:
        for item in source.get("items") or []:
            if "fieldRef" in item:
                value = self.downward.field(item["fieldRef"]["fieldPath"])
            else:
                value = self.downward.resource(item["resourceFieldRef"])
            files[item["path"]] = (value.encode(), item.get("mode", default_mode))


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
