"""Helpers of hack/gpu-wheelhouse.sh: slim a wheel, check the wheelhouse, measure what travels.

    python -m bench.gpu.wheelhouse slim WHEEL --drop REGEX [--keep REGEX]
    python -m bench.gpu.wheelhouse check DIR     # every requirement met there or on the device
    python -m bench.gpu.wheelhouse size DIR [--limit-mib 60]

The device machine (see the device tool's KINDS.md) has Python 3.12 and the packages in
`DEVICE_PACKAGES`; the wheelhouse carries the rest. `check` reads each wheel's Requires-Dist
(markers evaluated for CPython 3.12 on x86_64 Linux, no extras) and fails when one is met
neither by another wheel in the wheelhouse (at the right version) nor by the device.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LIMIT_MIB = 60.0
# The device's interpreter, for requirement markers.
DEVICE_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
# Versions seen there (KINDS.md's pip list, 2026-11); other packages' versions are unknown.
DEVICE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
}
# Packages the device image holds (KINDS.md, as read on 2026-11-17).
_DEVICE_PACKAGE_NAMES = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
    lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx
    ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
    nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
    pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf
    psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
    pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz
    torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
    treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
    werkzeug wheel wrapt xarray xxhash yarl zipp
"""
DEVICE_PACKAGES = frozenset(canonicalize_name(name) for name in _DEVICE_PACKAGE_NAMES.split())


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canonicalize_name(name), version


def metadata(path: Path) -> dict:
    with zipfile.ZipFile(path) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(wheel.read(member).decode())


def requirements(path: Path) -> list[Requirement]:
    """What the wheel needs on the device (no extras, markers for CPython 3.12 Linux)."""
    needed = []
    for line in metadata(path).get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(DEVICE_MARKERS):
            needed.append(requirement)
    return needed


def problems(directory: Path) -> list[str]:
    """Requirements of the wheels in `directory` that neither it nor the device meets."""
    wheels = sorted(directory.glob("*.whl"))
    carried = dict(wheel_name_version(w) for w in wheels)
    found = []
    names = [wheel_name_version(w)[0] for w in wheels]
    for name in {n for n in names if names.count(n) > 1}:
        found.append(f"{name}: more than one wheel (pip would refuse to install both)")
    for wheel in wheels:
        for requirement in requirements(wheel):
            name = canonicalize_name(requirement.name)
            version = carried.get(name) or DEVICE_VERSIONS.get(name)
            where = "carried" if name in carried else "on the device"
            if name not in carried and name not in DEVICE_PACKAGES:
                found.append(f"{wheel.name} needs {requirement}: neither carried nor on the device")
            elif version and not requirement.specifier.contains(Version(version), True):
                found.append(f"{wheel.name} needs {requirement}: {version} {where}")
    return sorted(found)


def slim(path: Path, drop: str, keep: str | None = None) -> list[str]:
    """Rewrite the wheel at `path` without the members matching `drop` (unless they match
    `keep`), and without their RECORD lines; the members dropped."""
    drop_re, keep_re = re.compile(drop), re.compile(keep) if keep else None

    def dropped(name: str) -> bool:
        return bool(drop_re.search(name)) and not (keep_re and keep_re.search(name))

    slimmed = path.with_name(path.name + ".slim")
    removed = []
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(slimmed, "w") as target:
        for info in source.infolist():
            if dropped(info.filename):
                removed.append(info.filename)
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(x for x in lines if not dropped(x.split(",")[0])).encode()
            target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    slimmed.replace(path)
    return removed


def travelling_bytes(repo: Path = REPO) -> int:
    """Bytes of the working tree the device tool sends: tracked files and untracked ones git
    does not ignore (the wheelhouse, being ignored, travels only as `carry`)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, check=True, capture_output=True,
    ).stdout.decode()  # fmt: skip
    paths = {repo / name for name in listing.split("\0") if name}
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.wheelhouse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    slim_parser = commands.add_parser("slim", help="drop members from a wheel")
    slim_parser.add_argument("wheel", type=Path)
    slim_parser.add_argument("--drop", required=True, help="regex of member names to drop")
    slim_parser.add_argument("--keep", help="regex of member names to keep anyway")
    check_parser = commands.add_parser("check", help="requirements met on the device")
    check_parser.add_argument("directory", type=Path)
    size_parser = commands.add_parser("size", help="tree + wheelhouse under the limit")
    size_parser.add_argument("directory", type=Path)
    size_parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    args = parser.parse_args(argv)
    if args.command == "slim":
        before = args.wheel.stat().st_size
        removed = slim(args.wheel, args.drop, args.keep)
        after = args.wheel.stat().st_size
        print(f"{args.wheel.name}: dropped {len(removed)} files, {mib(before)} -> {mib(after)}")
        return 0
    if args.command == "check":
        found = problems(args.directory)
        for problem in found:
            print(f"wheelhouse: {problem}", file=sys.stderr)
        count = len(list(args.directory.glob("*.whl")))
        print(f"wheelhouse: {count} wheels, " + ("requirements met" if not found else "PROBLEMS"))
        return 1 if found else 0
    wheels = sum(p.stat().st_size for p in args.directory.glob("*.whl"))
    tree = travelling_bytes()
    total = wheels + tree
    for wheel in sorted(args.directory.glob("*.whl"), key=lambda p: -p.stat().st_size):
        print(f"  {mib(wheel.stat().st_size):>10}  {wheel.name}")
    print(
        f"wheelhouse {mib(wheels)} + working tree {mib(tree)} = {mib(total)} "
        f"(limit {args.limit_mib:.0f} MiB; the device tool takes 64 MiB)"
    )
    if total > args.limit_mib * 2**20:
        print("over the limit: carry fewer or smaller wheels", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
