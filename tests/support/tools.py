"""helm and kubectl from the test tool cache (never /usr/bin/kubectl)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class CLI:
    """A command-line tool bound to a kubeconfig: ``kubectl("get", "pods", "-o", "json")``."""

    def __init__(self, path: Path, kubeconfig: Path | None = None) -> None:
        self.path = Path(path)
        self.kubeconfig = kubeconfig

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.kubeconfig is not None:
            env["KUBECONFIG"] = str(self.kubeconfig)
        env.setdefault("HELM_CACHE_HOME", str(Path.home() / ".cache" / "helm"))
        return env

    def __call__(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [str(self.path), *map(str, args)],
            env=self.env(),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise RuntimeError(
                f"{self.path.name} {' '.join(map(str, args))} failed ({r.returncode}):\n"
                f"{r.stderr}\n{r.stdout}"
            )
        return r

    def json(self, *args: str, **kwargs):
        import json

        return json.loads(self(*args, "-o", "json", **kwargs).stdout)


def promtool_check_metrics(promtool: Path, exposition: str) -> None:
    """Fail with promtool's own words unless the /metrics text passes `promtool check metrics`."""
    checked = subprocess.run(
        [str(promtool), "check", "metrics"], input=exposition, capture_output=True, text=True
    )
    # Lint findings (naming, units) come back as output even when the exit code is 0.
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), (
        checked.stdout + checked.stderr
    )
