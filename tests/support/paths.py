"""Where the test binaries live: the same rules as hack/kube-binaries.sh and hack/test-tools.sh.

- control plane (etcd, kube-apiserver, kube-controller-manager): ``$KUBEBUILDER_ASSETS`` if set,
  else ``<cache>/kube-1.20.2/bin``, else a directory on PATH holding all three;
- helm, kubectl, prometheus, promtool: ``<cache>/bin`` (never /usr/bin/kubectl, which may be an
  unrelated build);

where ``<cache>`` is ``$DREAMBOOTH_CACHE_DIR``, else ``$XDG_CACHE_HOME/dreambooth-operator``, else
``~/.cache/dreambooth-operator``. ``bash hack/setup-test-infra.sh`` fills the cache.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

KUBE_VERSION = "1.20.2"
CONTROL_PLANE_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
TOOLS = ("helm", "kubectl", "prometheus", "promtool")
SETUP_HINT = "run `bash hack/setup-test-infra.sh` (or set KUBEBUILDER_ASSETS)"


def cache_dir() -> Path:
    if os.environ.get("DREAMBOOTH_CACHE_DIR"):
        return Path(os.environ["DREAMBOOTH_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dreambooth-operator"


def _has_all(directory: Path, names: tuple[str, ...]) -> bool:
    return all(os.access(directory / n, os.X_OK) and (directory / n).is_file() for n in names)


def kube_assets_dir() -> Path | None:
    """Directory with etcd, kube-apiserver and kube-controller-manager, or None."""
    env = os.environ.get("KUBEBUILDER_ASSETS")
    if env:
        return Path(env) if _has_all(Path(env), CONTROL_PLANE_BINARIES) else None
    cached = cache_dir() / f"kube-{KUBE_VERSION}" / "bin"
    if _has_all(cached, CONTROL_PLANE_BINARIES):
        return cached
    found = [shutil.which(b) for b in CONTROL_PLANE_BINARIES]
    if all(found) and len({Path(f).parent for f in found}) == 1:
        return Path(found[0]).parent
    return None


def tools_bin_dir() -> Path:
    return cache_dir() / "bin"


def tool(name: str) -> Path | None:
    """Path of helm/kubectl/prometheus/promtool from the cache dir, or None."""
    p = tools_bin_dir() / name
    return p if p.is_file() and os.access(p, os.X_OK) else None
