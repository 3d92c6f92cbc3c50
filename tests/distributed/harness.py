"""torchrun from tests: the workers' environment, launching, waiting, logs on failure."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.procs import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
# Every worker imports torch, diffusers and deepspeed: thousands of modules. Where the
# environment sets PYTHONDONTWRITEBYTECODE, each process would compile them all again (seconds
# per rank); their bytecode goes to a cache outside the source tree instead.
PYCACHE = Path(tempfile.gettempdir()) / "dreambooth-test-pycache"


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(PYCACHE))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: no oversubscription
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.update(extra or {})
    return env


def torchrun_argv(args: Sequence[str], nproc: int = 2) -> list[str]:
    """`torchrun --standalone` (a free rendezvous port on loopback) running `args`."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", *map(str, args),
    ]  # fmt: skip


def launch(
    args: Sequence[str],
    log_path: Path,
    nproc: int = 2,
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Start torchrun in its own session (so its workers can be signalled as a group)."""
    return ManagedProcess(
        "torchrun", torchrun_argv(args, nproc), log_path, env=worker_env(env), cwd=REPO_ROOT
    )


def wait(proc: ManagedProcess, timeout: float) -> int:
    """The exit code; on timeout the process is stopped and the test fails with its log."""
    try:
        return proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
        raise AssertionError(
            f"torchrun still running after {timeout:.0f}s\n{proc.log_tail(80)}"
        ) from None


def run(
    args: Sequence[str],
    log_path: Path,
    nproc: int = 2,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> None:
    """Run torchrun to completion; fail with the log's tail unless it exits 0."""
    proc = launch(args, log_path, nproc, env)
    code = wait(proc, timeout)
    proc.stop()
    assert code == 0, f"torchrun exited with {code}\n{proc.log_tail(80)}"
