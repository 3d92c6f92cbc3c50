#!/usr/bin/env bash
# The GPU check: bash bench/gpu/run.sh OUTDIR [--smoke] [--only PREFIX ...]
#
# On a GPU machine (Python 3.12 with CUDA torch, transformers, peft, accelerate; no diffusers,
# DeepSpeed, pydantic or web stack; no network): installs the wheelhouse that
# hack/gpu-wheelhouse.sh built here (.whl/, or $GPU_WHEELHOUSE) into a temporary directory, puts
# it and this tree on PYTHONPATH, and runs the steps (python -m bench.gpu) within 9 minutes.
# With --smoke: the same steps on the CPU with the tiny model, from .venv, no wheelhouse.
# Writes OUTDIR/gpu-check.json and OUTDIR/steps.log, prints a one-screen summary; exits 1 when
# a step failed.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
started=$(date +%s)

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash bench/gpu/run.sh OUTDIR [--smoke] [--only PREFIX ...]" >&2
  exit 2
fi
outdir="$1"
shift
smoke=0
for arg in "$@"; do
  [ "$arg" = "--smoke" ] && smoke=1
done
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"

if [ "$smoke" = 1 ] && [ -z "${GPU_WHEELHOUSE:-}" ]; then
  python="${GPU_CHECK_PYTHON:-$repo/.venv/bin/python}"
else
  # Also with --smoke when GPU_WHEELHOUSE is set: the wheelhouse tried out on a CPU, in an
  # environment like the device's (GPU_CHECK_PYTHON).
  python="${GPU_CHECK_PYTHON:-python3}"
  wheels="${GPU_WHEELHOUSE:-$repo/.whl}"
  if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "run.sh: no wheels in $wheels: run hack/gpu-wheelhouse.sh and carry .whl" >&2
    exit 2
  fi
  site="$(mktemp -d /tmp/gpu-check-site.XXXXXX)"
  trap 'rm -rf "$site"' EXIT
  echo "run.sh: installing $(ls "$wheels"/*.whl | wc -l) wheels ($(du -sh "$wheels" | cut -f1)) into $site" >&2
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --disable-pip-version-check --target "$site" "$wheels"/*.whl
  # The wheelhouse first (it shadows older copies on the machine), then this tree: the code
  # under test is the working tree itself, never a wheel of it that could be stale.
  export PYTHONPATH="$site:$repo/contract:$repo/operator:$repo/trainer:$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
setup=$(($(date +%s) - started))
cd "$repo"
"$python" -m bench.gpu "$outdir" --setup-seconds "$setup" "$@"
