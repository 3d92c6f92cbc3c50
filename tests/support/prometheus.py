"""A Prometheus server (Debian's package) scraping loopback targets, queried over its HTTP API."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .procs import ManagedProcess, free_port, wait_for


class Prometheus:
    def __init__(
        self,
        binary: Path,
        targets: Sequence[str],
        *,
        job: str = "test",
        scrape_interval: str = "1s",
        metrics_path: str = "/metrics",
        extra_scrape_configs: Sequence[dict] = (),
        workdir: Path | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._own = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dbj-prometheus-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": metrics_path,
                    "scrape_interval": scrape_interval,
                    "scrape_timeout": scrape_interval,
                    "static_configs": [{"targets": list(targets)}],
                },
                *extra_scrape_configs,
            ],
        }
        self.config_path = self.workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process = ManagedProcess(
            "prometheus",
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
            ],
            self.workdir / "prometheus.log",
        )

        def ready():
            self.process.check_alive()
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200

        try:
            wait_for("prometheus /-/ready", ready, timeout, on_timeout=self.process.log_tail)
        except BaseException:
            self.stop()
            raise

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """Instant query; returns the ``result`` list (each {metric, value: [ts, "v"]})."""
        return self.api("query", query=promql)["result"]

    def value(self, promql: str) -> float | None:
        """The single sample value of an instant query, or None when empty."""
        result = self.query(promql)
        if not result:
            return None
        return float(result[0]["value"][1])

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_for_value(
        self,
        promql: str,
        predicate: Callable[[float], bool] = lambda v: True,
        timeout: float = 30.0,
    ) -> float:
        def probe():
            v = self.value(promql)
            return (v,) if v is not None and predicate(v) else None

        def describe():
            return f"targets: {json.dumps(self.targets(), indent=1)[:2000]}\n" + (
                self.process.log_tail(20)
            )

        return wait_for(f"prometheus query {promql!r}", probe, timeout, 0.5, describe)[0]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self._own:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
