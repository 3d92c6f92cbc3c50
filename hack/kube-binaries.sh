#!/usr/bin/env bash
# Provide etcd, kube-apiserver and kube-controller-manager for the test control plane.
#
# Prints (as the last line of stdout) a directory holding the three binaries.
#   1. If KUBEBUILDER_ASSETS is set (the envtest convention), that directory is used as is.
#   2. Otherwise the cached build under ${DREAMBOOTH_CACHE_DIR:-~/.cache/dreambooth-operator}/kube-1.20.2/bin
#      is used; on a cold cache it is built (Debian only, needs root or sudo, ~9 min on 2 cores)
#      from Debian bookworm's `kubernetes` source package (1.20.2) with Go 1.19.
# Idempotent; progress goes to stderr. tests/support/controlplane.py finds the same directory.
set -euo pipefail

log() { echo "[kube-binaries] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

BINARIES=(etcd kube-apiserver kube-controller-manager)

have_all() {
    local dir=$1 b
    for b in "${BINARIES[@]}"; do
        [[ -x "$dir/$b" ]] || return 1
    done
}

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
    have_all "$KUBEBUILDER_ASSETS" \
        || die "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks one of: ${BINARIES[*]}"
    log "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
    echo "$KUBEBUILDER_ASSETS"
    exit 0
fi

CACHE_DIR=${DREAMBOOTH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dreambooth-operator}
KUBE_VERSION=1.20.2
OUT_DIR="$CACHE_DIR/kube-$KUBE_VERSION/bin"

if have_all "$OUT_DIR"; then
    log "cached: $OUT_DIR"
    echo "$OUT_DIR"
    exit 0
fi

mkdir -p "$CACHE_DIR"
# One build at a time (setup script and a test run may race).
exec 9>"$CACHE_DIR/kube-build.lock"
flock 9
if have_all "$OUT_DIR"; then
    log "cached (built by a concurrent run): $OUT_DIR"
    echo "$OUT_DIR"
    exit 0
fi

command -v apt-get >/dev/null || die "no cached binaries and no apt-get: set KUBEBUILDER_ASSETS"
SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "building needs root (apt-get); run as root or set KUBEBUILDER_ASSETS"
    SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive

# --- system packages --------------------------------------------------------------------------
SRC_LIST=/etc/apt/sources.list.d/dreambooth-deb-src.sources
if ! grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding a deb-src entry for bookworm ($SRC_LIST)"
    "${SUDO[@]}" tee "$SRC_LIST" >/dev/null <<'SOURCES'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    "${SUDO[@]}" apt-get update -q >&2
fi
PKGS=(etcd-server golang-go rsync jq make golang-github-modern-go-reflect2-dev)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || { "${SUDO[@]}" apt-get update -q >&2 && "${SUDO[@]}" apt-get install -y -q \
            --no-install-recommends "${missing[@]}" >&2; }
fi

REFLECT2_SRC=$(dpkg -L golang-github-modern-go-reflect2-dev | grep '/src/github.com/modern-go/reflect2$' || true)
REFLECT2_SRC=${REFLECT2_SRC%%$'\n'*}
[[ -d "$REFLECT2_SRC" ]] || die "cannot locate reflect2 source from golang-github-modern-go-reflect2-dev"

# --- source -----------------------------------------------------------------------------------
BUILD_DIR="$CACHE_DIR/build"
rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"
cd "$BUILD_DIR"
log "downloading the kubernetes source package"
apt-get source --download-only kubernetes >&2
ORIG=$(find . -maxdepth 1 -name 'kubernetes_*.orig.tar.gz' | head -n1)
log "unpacking $ORIG"
tar xzf "$ORIG"
SRC=$(find . -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' -printf '%f\n' | sort | tail -n1)
[[ -n "$SRC" ]] || die "no kubernetes-* directory in $ORIG"
cd "$SRC"
[[ -f vendor/modules.txt ]] || die "unexpected source tree: no vendor/ in $SRC"

log "replacing vendor/github.com/modern-go/reflect2 with $REFLECT2_SRC (Go 1.19 needs reflect2 >= 1.0.2)"
rm -rf vendor/github.com/modern-go/reflect2
mkdir -p vendor/github.com/modern-go/reflect2
cp -rL "$REFLECT2_SRC/." vendor/github.com/modern-go/reflect2/

mkdir -p .go/src/k8s.io
ln -sfn ../../.. .go/src/k8s.io/kubernetes

# --- build ------------------------------------------------------------------------------------
log "building kube-apiserver and kube-controller-manager (about 9 minutes on 2 cores)"
start=$SECONDS
GOPATH="$PWD/.go" CGO_ENABLED=0 make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2
log "build took $((SECONDS - start)) s"

TMP_OUT="$OUT_DIR.tmp"
rm -rf "$TMP_OUT"
mkdir -p "$TMP_OUT"
cp _output/bin/kube-apiserver _output/bin/kube-controller-manager "$TMP_OUT/"
cp "$(command -v etcd || echo /usr/bin/etcd)" "$TMP_OUT/etcd"
chmod +x "$TMP_OUT"/*
"$TMP_OUT/kube-apiserver" --version >&2
rm -rf "$OUT_DIR"
mv "$TMP_OUT" "$OUT_DIR"

cd /
rm -rf "$BUILD_DIR"
log "done: $OUT_DIR"
echo "$OUT_DIR"
