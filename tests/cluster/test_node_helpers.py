"""Pure unit tests of the test node's rewriting helpers (no control plane needed)."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.support.node import HostMap, PathMap, PortMap, expand, free_host_port


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


def test_port_map_rewrites_whole_ports_only():
    pm = PortMap({8000: 23456, 29500: 23457})
    assert pm("8000") == "23456"
    assert pm("--port=8000") == "--port=23456"
    assert pm("127.0.0.1:29500") == "127.0.0.1:23457"
    for untouched in ("18000", "80000", "8000x", "--steps 8000 more", "9400", ""):
        assert pm(untouched) == untouched
    assert pm.port(8000) == 23456 and pm.port(9400) == 9400
    assert PortMap()("8000") == "8000"


def test_free_host_ports_are_bindable_outside_the_ephemeral_range():
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    taken: set[int] = set()
    for _ in range(20):
        port = free_host_port(taken)
        assert port < low and port not in taken
        taken.add(port)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0", port))
