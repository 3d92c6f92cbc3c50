"""moto's S3 server on loopback, as a separate process (``python -m moto.server``)."""

from __future__ import annotations

import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .procs import ManagedProcess, free_port, wait_for

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION
    process: ManagedProcess | None = field(default=None, repr=False)

    @classmethod
    def start(cls, workdir: Path | None = None, timeout: float = 30.0) -> S3Server:
        workdir = Path(workdir or tempfile.mkdtemp(prefix="dbj-moto-"))
        port = free_port()
        proc = ManagedProcess(
            "moto_server",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            workdir / "moto.log",
        )
        server = cls(endpoint_url=f"http://127.0.0.1:{port}", process=proc)

        def up():
            proc.check_alive()
            with urllib.request.urlopen(f"{server.endpoint_url}/moto-api/", timeout=2) as r:
                return r.status == 200

        try:
            wait_for("moto S3 server", up, timeout, on_timeout=proc.log_tail)
        except BaseException:
            proc.stop()
            raise
        return server

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def env(self) -> dict[str, str]:
        """Environment for boto3 in a subprocess/pod (AWS_ENDPOINT_URL needs botocore >= 1.31)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def client(self, **kwargs):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            **kwargs,
        )

    def reset(self) -> None:
        """Forget every bucket and object."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass
