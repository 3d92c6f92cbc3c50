#!/usr/bin/env bash
# Build the wheelhouse for the GPU check (bench/gpu/run.sh): hack/gpu-wheelhouse.sh [DIR]
#
# The device machine has Python 3.12, CUDA torch, transformers, peft and accelerate, and no
# network; it lacks diffusers, DeepSpeed, pydantic, the server's web stack and boto3. This
# downloads those as cp312 / py3-none-any manylinux wheels, pinned to the versions in .venv,
# builds DeepSpeed's wheel from its sdist without ops (DS_BUILD_OPS=0: pure Python, ops are
# JIT-built if ever needed), keeps only bitsandbytes' CPU and CUDA 13 libraries (the device's
# torch is cu130), checks every requirement is met there, and fails if the working tree plus
# the wheelhouse passes 60 MiB. DIR defaults to .whl (git-ignored; carry it in the device
# call). The project itself does not travel as a wheel: run.sh puts the tree on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-.whl}"
python=.venv/bin/python
# The device's Python; another only to try the wheelhouse out elsewhere.
python_version="${GPU_PYTHON_VERSION:-3.12}"
log() { echo "gpu-wheelhouse: $*" >&2; }

# Wheels from PyPI, at .venv's versions.
BINARY=(
  diffusers importlib_metadata lazy-importer                                # models, pipelines
  hjson                                                                     # DeepSpeed's config
  pydantic pydantic_core annotated-types typing-inspection typing_extensions  # the API models
  fastapi starlette uvicorn opentelemetry-api                               # the server
  boto3 botocore s3transfer jmespath                                        # storage (imported)
  bitsandbytes                                                              # 8-bit AdamW
)
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done

version() {
  "$python" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$1"
}

[ -x "$python" ] || { log "no .venv: run hack/install.sh first"; exit 1; }
rm -rf "$out"
mkdir -p "$out"
specs=()
for name in "${BINARY[@]}"; do
  specs+=("$name==$(version "$name")")
done
log "downloading ${#specs[@]} wheels"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version "$python_version" --implementation cp "${PLATFORMS[@]}" -d "$out" "${specs[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

ds_version=$(version deepspeed)
log "building deepspeed $ds_version without ops"
sdist=$(mktemp -d)
trap 'rm -rf "$sdist"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: \
  -d "$sdist" "deepspeed==$ds_version" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
DS_BUILD_OPS=0 uv build -q --wheel --no-build-isolation --python "$python" \
  --out-dir "$sdist/wheel" "$sdist/deepspeed-$ds_version.tar.gz"
mv "$sdist"/wheel/deepspeed-*.whl "$out/"

"$python" -m bench.gpu.wheelhouse slim "$out"/bitsandbytes-*.whl \
  --drop 'libbitsandbytes_.*\.so$' --keep 'libbitsandbytes_(cpu|cuda13[0-9])\.so$'
"$python" -m bench.gpu.wheelhouse check "$out"
"$python" -m bench.gpu.wheelhouse size "$out" --limit-mib 60
