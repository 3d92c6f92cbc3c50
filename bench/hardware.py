"""What the host is: CPU model and the instruction sets that decide which precisions are fast.

bf16 autocast on a CPU without AVX-512-BF16 or AMX runs emulated and is slower than fp32, so
a CPU figure means little without them; the bench records them and picks its rows by them.
"""

from __future__ import annotations

import platform
from pathlib import Path

# /proc/cpuinfo flag -> what the report calls it.
ISA_FLAGS = {
    "avx2": "avx2",
    "avx512f": "avx512",
    "avx512_bf16": "avx512_bf16",
    "amx_bf16": "amx_bf16",
}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and flags (Linux); ('', empty) elsewhere."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return "", set()


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """The first processor's model name and flags."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def cpu_description() -> dict:
    import torch

    model, flags = cpuinfo()
    return {
        "model": model or platform.processor() or platform.machine(),
        "isa": {name: flag in flags for flag, name in ISA_FLAGS.items()},
        # The kernels torch dispatches to on this CPU (DEFAULT, AVX2, AVX512, ...).
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
    }


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (else autocast emulates it)."""
    return any(flag in cpuinfo()[1] for flag in BF16_FLAGS)
