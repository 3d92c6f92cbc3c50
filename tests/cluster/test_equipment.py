"""Smoke tests of the other real parts: S3 (moto server), Prometheus, helm and kubectl."""

from __future__ import annotations

import pytest

from tests.support.procs import free_port

pytestmark = pytest.mark.cluster


def test_boto3_round_trip_through_s3_server(s3_server, s3_bucket, tmp_path):
    s3 = s3_server.client()
    s3.put_object(Bucket=s3_bucket, Key="a/b.txt", Body=b"hello s3")
    assert s3.get_object(Bucket=s3_bucket, Key="a/b.txt")["Body"].read() == b"hello s3"
    # a multipart upload through the TransferManager, as the trainer's checkpoints use it
    from boto3.s3.transfer import TransferConfig

    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (12 * 1024 * 1024))
    cfg = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    s3.upload_file(str(big), s3_bucket, "ckpt/big.bin", Config=cfg)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["a/b.txt", "ckpt/big.bin"]
    out = tmp_path / "back.bin"
    s3.download_file(s3_bucket, "ckpt/big.bin", str(out), Config=cfg)
    assert out.read_bytes() == big.read_bytes()
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")


def test_prometheus_scrapes_loopback_target(prometheus):
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    gauge = Gauge("dbj_smoke_value", "smoke test gauge", registry=registry)
    gauge.set(42)
    port = free_port()
    started = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        prom = prometheus(targets=[f"127.0.0.1:{port}"])
        value = prom.wait_for_value('dbj_smoke_value{job="test"}', lambda v: v == 42, timeout=30)
        assert value == 42
        (target,) = prom.targets()
        assert target["health"] == "up"
    finally:
        if isinstance(started, tuple):  # prometheus_client >= 0.20 returns (server, thread)
            started[0].shutdown()
            started[0].server_close()


def test_helm_and_kubectl_from_the_cache(helm_bin, kubectl, promtool_bin, control_plane):
    import subprocess

    assert "/usr/bin/" not in str(kubectl.path)
    out = subprocess.run([helm_bin, "version", "--short"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("v"), out.stderr
    nodes = kubectl.json("get", "namespaces")
    assert "default" in {i["metadata"]["name"] for i in nodes["items"]}
    r = subprocess.run([promtool_bin, "--version"], capture_output=True, text=True)
    assert r.returncode == 0
