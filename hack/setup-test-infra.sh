#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian (bookworm) machine, run as root (or with sudo):
#   - system packages (etcd-server, Go toolchain and friends for the control-plane build),
#   - etcd + kube-apiserver + kube-controller-manager  (hack/kube-binaries.sh, ~5-9 min cold),
#   - helm, kubectl, prometheus, promtool              (hack/test-tools.sh, seconds).
# Idempotent: with warm caches it touches nothing and returns in well under a second.
# The pytest fixtures (tests/support/paths.py) find the cached binaries by the same rules, so no
# environment variable is needed afterwards; the two directories are printed for information.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "[setup-test-infra] $*" >&2; }

SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)

PKGS=(ca-certificates openssl)
if [[ -z "${KUBEBUILDER_ASSETS:-}" ]]; then
    PKGS+=(etcd-server golang-go rsync jq make golang-github-modern-go-reflect2-dev)
fi
if ! python3 -m pip --version >/dev/null 2>&1 && ! command -v uv >/dev/null; then
    PKGS+=(python3-pip)
fi

if command -v apt-get >/dev/null; then
    missing=()
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "apt-get update; installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        "${SUDO[@]}" apt-get update -q >&2
        "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    else
        log "system packages present"
    fi
else
    log "no apt-get: expecting KUBEBUILDER_ASSETS and the tool cache to be provided"
fi

start=$SECONDS
KUBE_DIR=$(bash "$HERE/kube-binaries.sh" | tail -n1)
TOOLS_DIR=$(bash "$HERE/test-tools.sh" | tail -n1)
log "ready in $((SECONDS - start)) s"
echo "KUBE_ASSETS_DIR=$KUBE_DIR"
echo "TEST_TOOLS_BIN=$TOOLS_DIR"
