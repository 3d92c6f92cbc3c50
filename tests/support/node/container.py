"""One container: its process, started in a process group of its own, and how it ended.

The process runs the container's prepared argv with its environment, output to
``<pod dir>/<container>/container.log``. Its end becomes a terminated state: exitCode (128+N for
signal N), reason Completed/Error, and a message from the terminationMessagePath file, else for
``FallbackToLogsOnError`` the last log lines on failure. SIGKILL reaches every descendant of the
process, also those in sessions of their own (torchrun's workers), as a container runtime kills
a whole cgroup.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from ..procs import tail
from .status import timestamp

TERMINATION_LOG_LINES = 80
TERMINATION_LOG_BYTES = 2048
TERMINATION_MESSAGE_CHARS = 4096
START_ERROR_EXIT_CODE = 128  # what a container that never ran reports


class Container:
    """A container of a pod: its spec, what preparation made of it, and its current run."""

    def __init__(self, spec: dict, directory: Path) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.directory = directory
        self.log_path = directory / "container.log"
        self.termination_log = directory / "termination-log"  # its terminationMessagePath
        # set by preparation: what to run, with which environment, where
        self.argv: list[str] = []
        self.env: dict[str, str] = {}
        self.cwd: str | None = None
        # the current run
        self.proc: subprocess.Popen | None = None
        self.started_at: str | None = None
        self.restart_count = 0
        self.terminated: dict | None = None  # terminated state of the last run
        self.ready = False
        self.next_probe = 0.0
        self.restart_at: float | None = None  # when a restart is due (crash loop back-off)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def succeeded(self) -> bool:
        return self.terminated is not None and self.terminated["exitCode"] == 0

    def back_off(self) -> float:
        """Seconds to wait before the next restart: doubling from half a second, at most 10."""
        return min(10.0, 0.5 * 2**self.restart_count)

    def start(self) -> None:
        """Start a run; a command that cannot start ends the run at once (StartError)."""
        self.terminated = None
        self.ready = False
        initial_delay = (self.spec.get("readinessProbe") or {}).get("initialDelaySeconds")
        self.next_probe = time.monotonic() + float(initial_delay or 0)
        with open(self.log_path, "ab") as log:
            if self.restart_count:
                log.write(f"--- test node: restart {self.restart_count} ---\n".encode())
                log.flush()
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    env=self.env,
                    cwd=self.cwd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            except OSError as exc:
                log.write(f"test node: cannot start {shlex.join(self.argv)}: {exc}\n".encode())
                self._start_failed(exc)
                return
        self.started_at = timestamp()

    def _start_failed(self, exc: OSError) -> None:
        self.proc = None
        self.started_at = timestamp()
        self.terminated = {
            "exitCode": START_ERROR_EXIT_CODE,
            "reason": "StartError",
            "message": str(exc),
            "startedAt": self.started_at,
            "finishedAt": timestamp(),
            "containerID": "testnode://none",
        }

    def record_exit(self) -> None:
        """Turn the ended process into the terminated state of this run."""
        return_code = self.proc.returncode if self.proc is not None else START_ERROR_EXIT_CODE
        signal_number = -return_code if return_code < 0 else None
        exit_code = 128 + signal_number if signal_number else return_code
        state = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": self.started_at,
            "finishedAt": timestamp(),
            "containerID": f"testnode://{self.proc.pid if self.proc else 0}",
        }
        if signal_number:
            state["signal"] = signal_number
        message = self._termination_message(exit_code)
        if message:
            state["message"] = message
        self.terminated = state
        self.ready = False

    def _termination_message(self, exit_code: int) -> str:
        message = ""
        with contextlib.suppress(OSError):
            message = self.termination_log.read_text(errors="replace")[:TERMINATION_MESSAGE_CHARS]
        if not message and exit_code != 0:
            policy = self.spec.get("terminationMessagePolicy") or "File"
            if policy == "FallbackToLogsOnError":
                message = tail(self.log_path, TERMINATION_LOG_LINES, TERMINATION_LOG_BYTES)
        return message

    def signal(self, sig: int) -> None:
        if not self.running():
            return
        # SIGKILL ends every process of a container (its cgroup), also those in sessions of
        # their own, such as torchrun's workers; found before the kill orphans them.
        descendants = []
        if sig == signal.SIGKILL:
            with contextlib.suppress(psutil.Error):
                descendants = psutil.Process(self.proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the container is its own process group
        for process in descendants:
            with contextlib.suppress(psutil.Error):
                process.kill()


def terminate(containers: Sequence[Container], grace: float) -> None:
    """SIGTERM to the running containers, SIGKILL to what still runs after `grace` seconds."""
    running = [container for container in containers if container.running()]
    if not running:
        return
    for container in running:
        container.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(container.running() for container in running):
        time.sleep(0.05)
    for container in running:
        container.signal(signal.SIGKILL)
    for container in running:
        with contextlib.suppress(Exception):
            container.proc.wait(10)
