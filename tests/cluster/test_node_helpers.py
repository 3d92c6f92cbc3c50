"""Pure unit tests of the test node's rewriting helpers (no control plane needed)."""

from __future__ import annotations

from tests.support.node import HostMap, PathMap, expand


def test_expand_follows_kubernetes_rules():
    env = {"RANK": "1", "ADDR": "a.b"}
    assert expand("--rank=$(RANK) --addr=$(ADDR)", env) == "--rank=1 --addr=a.b"
    assert expand("$(MISSING) $$(RANK) $$ $", env) == "$(MISSING) $(RANK) $ $"
    assert expand("$(RANK", env) == "$(RANK"


def test_path_map_rewrites_at_path_boundaries_longest_first():
    pm = PathMap()
    pm.add("/data", "/tmp/v1")
    pm.add("/data/cache", "/tmp/v2")
    assert pm("/data/x.txt") == "/tmp/v1/x.txt"
    assert pm("/data/cache/y") == "/tmp/v2/y"
    assert pm("--dir=/data") == "--dir=/tmp/v1"
    assert pm("/database") == "/database"
    assert pm("/other/data") == "/other/data"
    assert pm("s3://bucket/data/x") == "s3://bucket/data/x"


def test_host_map_rewrites_cluster_names_used_as_hosts():
    hm = HostMap({"job-train-0.job-train", "job-train", "job-train.ns.svc"})
    assert hm("job-train-0.job-train") == "127.0.0.1"
    assert hm("--master_addr=job-train-0.job-train") == "--master_addr=127.0.0.1"
    assert hm("job-train.ns.svc:29500") == "127.0.0.1:29500"
    assert hm("http://job-train:8080/v1") == "http://127.0.0.1:8080/v1"
    assert hm("job-train") == "job-train"  # a bare single label is a name, not a host
    assert hm("s3://b/job-train/x") == "s3://b/job-train/x"
