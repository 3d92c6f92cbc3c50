"""The test node's configMap, secret, downwardAPI and projected volumes: kubelet's layout (modes,
items, subPath) and their syncs into running pods, on a pod update and periodically."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import kubernetes
import pytest

from tests.support.node.atomic_writer import DATA_LINK
from tests.support.procs import wait_for

pytestmark = pytest.mark.cluster

INDEX = "publications.json"
SYNC_ANNOTATION = "dreambooth.dev/config-version"  # any change of the pod object will do
# a reader polling the index the way the inference server does (stat, then read), with no pause;
# it exits at the first read that finds the file missing or not a whole version
TIGHT_READER = """
    import json, os, sys
    path, seen = sys.argv[1], None
    while True:
        try:
            os.stat(path)
            version = json.loads(open(path).read())["version"]
        except (OSError, ValueError) as exc:
            sys.exit(f"BAD read: {exc!r}")
        if version != seen:
            seen = version
            print("seen", version, "via", os.readlink(path), flush=True)
"""


def _py(code: str, *args: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(code), *args]


def _index_config_map(version: int) -> dict:
    pad = "x" * 200_000  # big enough that a write in place would be seen half done
    index = json.dumps({"version": version, "pad": pad})
    return {"metadata": {"name": "publications"}, "data": {INDEX: index}}


def _volume_dir(node, namespace: str, pod: str, volume: str) -> Path:
    return node.runner(namespace, pod).dir / "volumes" / volume


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _pod(name: str, command: list[str], volumes: list[dict], mounts: list[dict]) -> dict:
    container = {"name": "main", "image": "x", "command": command, "volumeMounts": mounts}
    return {
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], "volumes": volumes},
    }


def test_an_annotated_pod_reads_the_replaced_config_map_never_a_partial_file(
    control_plane, kube_node, namespace
):
    kube_node.volume_sync_seconds = 3600  # only the pod update can bring the new versions
    v1 = kubernetes.client.CoreV1Api(control_plane.api_client)
    v1.create_namespaced_config_map(namespace, _index_config_map(0))
    volumes = [
        {"name": "index", "configMap": {"name": "publications"}},
        {
            "name": "podinfo",
            "downwardAPI": {
                "items": [
                    {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}
                ]
            },
        },
    ]
    mounts = [{"name": "index", "mountPath": "/etc/publications"}]
    command = _py(TIGHT_READER, f"/etc/publications/{INDEX}")
    v1.create_namespaced_pod(namespace, _pod("server", command, volumes, mounts))

    def logs() -> str:
        return kube_node.logs(namespace, "server")

    wait_for("version 0 read", lambda: "seen 0 via ..data/" in logs(), 60, on_timeout=logs)
    for version in range(1, 5):
        v1.replace_namespaced_config_map("publications", namespace, _index_config_map(version))
        annotations = {SYNC_ANNOTATION: str(version)}
        v1.patch_namespaced_pod("server", namespace, {"metadata": {"annotations": annotations}})
        wait_for(f"version {version} read", lambda v=version: f"seen {v} " in logs(), 30, 0.1, logs)
    pod = v1.read_namespaced_pod("server", namespace)
    assert pod.status.phase == "Running", logs()  # the reader never found a bad file
    assert "BAD" not in logs()
    podinfo = _volume_dir(kube_node, namespace, "server", "podinfo")
    assert f'{SYNC_ANNOTATION}="4"' in (podinfo / "annotations").read_text()


def test_the_periodic_sync_brings_a_config_map_change_and_keeps_a_deleted_one(
    control_plane, kube_node, namespace
):
    kube_node.volume_sync_seconds = 1.0
    v1 = kubernetes.client.CoreV1Api(control_plane.api_client)
    for name in ("settings", "extras"):
        v1.create_namespaced_config_map(namespace, {"metadata": {"name": name}, "data": {"k": "1"}})
    volumes = [  # the required one first: a sync that drops the optional one has done it too
        {"name": "settings", "configMap": {"name": "settings"}},
        {"name": "extras", "configMap": {"name": "extras", "optional": True}},
    ]
    command = _py("import time; time.sleep(300)")
    v1.create_namespaced_pod(namespace, _pod("sleeper", command, volumes, []))
    kube_node.wait_for_start(namespace, "sleeper")
    settings = _volume_dir(kube_node, namespace, "sleeper", "settings") / "k"
    extras = _volume_dir(kube_node, namespace, "sleeper", "extras") / "k"
    assert settings.read_text() == "1" and extras.read_text() == "1"

    v1.replace_namespaced_config_map(
        "settings", namespace, {"metadata": {"name": "settings"}, "data": {"k": "2"}}
    )
    wait_for("the new value without a pod update", lambda: settings.read_text() == "2", 30)

    v1.delete_namespaced_config_map("settings", namespace)
    v1.delete_namespaced_config_map("extras", namespace)
    wait_for("the optional ConfigMap's file gone", lambda: not os.path.lexists(extras), 30)
    assert settings.read_text() == "2"  # kubelet keeps the last content of a required one


def test_volume_files_keep_items_modes_and_sub_paths(control_plane, kube_node, namespace):
    v1 = kubernetes.client.CoreV1Api(control_plane.api_client)
    v1.create_namespaced_config_map(
        namespace, {"metadata": {"name": "cfg"}, "data": {"a": "A", "b": "B", "c": "C"}}
    )
    v1.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "stringData": {"key": "s3cr3t"}}
    )
    items = [{"key": "a", "path": "sub/a.txt", "mode": 0o600}, {"key": "b", "path": "b.txt"}]
    volumes = [
        {"name": "cfg", "configMap": {"name": "cfg", "defaultMode": 0o640, "items": items}},
        {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o400}},
        {
            "name": "bundle",
            "projected": {
                "defaultMode": 0o444,
                "sources": [
                    {"configMap": {"name": "cfg", "items": [{"key": "c", "path": "c.txt"}]}},
                    {
                        "downwardAPI": {
                            "items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]
                        }
                    },
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}},
                ],
            },
        },
    ]
    mounts = [
        {"name": "cfg", "mountPath": "/etc/cfg"},
        {"name": "cfg", "mountPath": "/etc/b.txt", "subPath": "b.txt"},
        {"name": "creds", "mountPath": "/etc/creds"},
        {"name": "bundle", "mountPath": "/etc/bundle"},
    ]
    script = """
        import sys
        print("read", *(open(path).read() for path in sys.argv[1:]))
    """
    paths = ["/etc/cfg/sub/a.txt", "/etc/b.txt", "/etc/creds/key", "/etc/bundle/c.txt"]
    v1.create_namespaced_pod(namespace, _pod("files", _py(script, *paths), volumes, mounts))
    pod = kube_node.wait_for_phase(namespace, "files", timeout=60)
    logs = kube_node.logs(namespace, "files")
    assert pod.status.phase == "Succeeded", logs
    assert "read A B s3cr3t C" in logs

    cfg = _volume_dir(kube_node, namespace, "files", "cfg")
    assert sorted(name for name in os.listdir(cfg) if not name.startswith("..")) == [
        "b.txt",
        "sub",
    ]
    assert os.readlink(cfg / "sub") == f"{DATA_LINK}/sub"
    assert _mode(cfg / "sub" / "a.txt") == 0o600 and _mode(cfg / "b.txt") == 0o640
    assert _mode(_volume_dir(kube_node, namespace, "files", "creds") / "key") == 0o400
    bundle = _volume_dir(kube_node, namespace, "files", "bundle")
    assert (bundle / "name").read_text() == "files" and (bundle / "token").read_text()
    assert {_mode(bundle / name) for name in ("c.txt", "name", "token")} == {0o444}
