#!/usr/bin/env bash
# Create .venv with the operator, trainer, server and test dependencies (CPU torch).
#
# uv resolves this set in seconds where pip backtracks over boto3/botocore/moto for many
# minutes. torch comes from the local CPU wheel that pip's configuration points to when there
# is one (the CUDA build from PyPI is several GB); DeepSpeed's build imports torch, so it is
# built without isolation, after torch.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "install: $*" >&2; }

if ! command -v uv >/dev/null 2>&1; then
  log "installing uv"
  python3 -m pip install --quiet uv
fi

find_links=()
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
wheel_dir=$(python3 -m pip config get global.find-links 2>/dev/null || true)
torch_wheel=$(ls "${wheel_dir:-/nonexistent}"/torch-*+cpu-*.whl 2>/dev/null | sort | tail -n 1 || true)
if [ -n "$torch_wheel" ]; then
  torch_version=$(basename "$torch_wheel" | cut -d- -f2)
  log "using the local CPU torch wheel $torch_wheel"
  find_links=(--find-links "$wheel_dir")
  echo "torch==$torch_version" >"$constraints"
else
  log "no local CPU torch wheel: taking torch from the PyTorch CPU index"
  find_links=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi

[ -x .venv/bin/python ] || uv venv --quiet --python 3.11 .venv
export VIRTUAL_ENV="$PWD/.venv"
uv pip install --quiet "${find_links[@]}" -c "$constraints" torch setuptools wheel
uv pip install --quiet "${find_links[@]}" -c "$constraints" \
  --no-build-isolation-package deepspeed -e ".[train,serve,test,bench]"
log "ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
