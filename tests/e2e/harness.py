"""The operator as a real process: used by the end-to-end tests and by bench/operator.py."""

from __future__ import annotations

import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import yaml

from dreambooth_contract import api
from tests.support.procs import ManagedProcess, free_port, port_open, wait_for

REPO = Path(__file__).resolve().parents[2]
SUBJECT = REPO / "examples" / "local" / "subject"
SECRET = "s3-credentials"


def job_document(name: str, **spec: Any) -> dict[str, Any]:
    """A DreamBoothJob that needs nothing outside the cluster to be accepted."""
    document = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "random://tiny-sd"},
            "instance": {"imagesUri": "s3://data/subject", "prompt": "a photo of sks toy"},
            "priorPreservation": {"classPrompt": "a photo of a toy", "numClassImages": 4},
            "training": {"maxSteps": 4, "resolution": 64, "mixedPrecision": "no"},
            "resources": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1},
            "storage": {"outputUri": f"s3://runs/{name}"},
        },
    }
    for section, values in spec.items():
        document["spec"].setdefault(section, {}).update(values)
    return document


def stage_s3_inputs(
    s3_server, bucket: str, namespace: str, api_client, access_key_id: str, secret_key: str
) -> None:
    """The local example's subject photos in `bucket`/subject and the S3 credentials Secret
    (SECRET) in `namespace`: what s3_job_document's jobs read."""
    client = s3_server.client()
    for photo in sorted(SUBJECT.iterdir()):
        client.upload_file(str(photo), bucket, f"subject/{photo.name}")
    kubernetes.client.CoreV1Api(api_client).create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": SECRET},
            "stringData": {"AWS_ACCESS_KEY_ID": access_key_id, "AWS_SECRET_ACCESS_KEY": secret_key},
        },
    )


def s3_job_document(name: str, s3_server, bucket: str, **spec_changes: Any) -> dict[str, Any]:
    """The local example as a tiny 2-node DDP job on S3 (inputs from stage_s3_inputs): 4 class
    images, 24 steps checkpointed every 8; `spec_changes` update the spec's sections."""
    document = yaml.safe_load((REPO / "examples" / "local-tiny.yaml").read_text())
    document["metadata"] = {"name": name}
    spec = document["spec"]
    spec["instance"]["imagesUri"] = f"s3://{bucket}/subject"
    spec["priorPreservation"]["numClassImages"] = 4
    spec["training"].update(maxSteps=24, checkpointing={"interval": 8, "keep": 2})
    spec["training"]["validation"] = {"prompts": [], "interval": 1000}
    spec["training"]["sharding"] = {"backend": "ddp"}
    # An evaluation costs a pod (the example's, a minute of CPU): only the tests of it ask for
    # one (evaluation=EVALUATION or their own).
    spec["evaluation"]["enabled"] = False
    spec["resources"] = {"nodes": 2, "gpusPerNode": 0, "processesPerNode": 1}
    spec["storage"] = {
        "outputUri": f"s3://{bucket}/runs/{name}",
        "priorCacheUri": f"s3://{bucket}/priors",
        "s3": {
            "endpoint": s3_server.endpoint_url,
            "region": s3_server.region,
            "credentialsSecret": {"name": SECRET},
        },
    }
    for section, values in spec_changes.items():
        spec.setdefault(section, {}).update(values)
    return document


@dataclass
class OperatorProcess:
    """`dreambooth operator` in its own process; restartable (for the restart tests)."""

    kubeconfig: Path
    namespaces: tuple[str, ...]
    log_dir: Path
    process: ManagedProcess | None = None
    metrics_port: int = 0
    starts: int = 0
    extra_args: tuple[str, ...] = ()

    def start(self) -> OperatorProcess:
        self.metrics_port, health_port = free_port(), free_port()
        self.starts += 1
        argv = [sys.executable, "-m", "dreambooth_operator.cli", "operator"]
        argv += ["--metrics-port", str(self.metrics_port), "--health-port", str(health_port)]
        for namespace in self.namespaces:
            argv += ["-n", namespace]
        argv += self.extra_args
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        self.process = ManagedProcess(
            "operator", argv, self.log_dir / f"operator-{self.starts}.log", env=env, cwd=REPO
        )
        wait_for(
            "operator metrics endpoint",
            lambda: self.process.check_alive() or port_open(self.metrics_port),
            timeout=60,
            on_timeout=self.process.log_tail,
        )
        return self

    def stop(self) -> None:
        if self.process:
            self.process.stop(grace=15)

    def log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.log_dir.glob("operator-*.log"))
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as r:
            return r.read().decode()

    def peak_rss_bytes(self) -> int:
        """High-water mark of the operator's resident memory (VmHWM), while it runs."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc status")
