"""Smoke tests of the test node: Jobs run to completion, logs, kills, deletion, Deployments."""

from __future__ import annotations

import signal
import sys
import textwrap
import urllib.request

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from tests.support.procs import free_port, wait_for

pytestmark = pytest.mark.cluster


def py(code: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(code)]


def field_ref(path: str) -> dict:
    return {"fieldRef": {"fieldPath": path}}


def job_pods(v1, namespace: str, job: str) -> list:
    return v1.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items


def test_batch_job_runs_to_succeeded_with_logs(control_plane, kube_node, namespace):
    api = control_plane.api_client
    v1, batch = kubernetes.client.CoreV1Api(api), kubernetes.client.BatchV1Api(api)
    v1.create_namespaced_config_map(
        namespace,
        {"metadata": {"name": "cfg"}, "data": {"greeting": "hello", "conf.txt": "from a file"}},
    )
    v1.create_namespaced_secret(
        namespace, {"metadata": {"name": "creds"}, "stringData": {"key": "s3cr3t"}}
    )
    script = """
        import os, pathlib, sys
        print(os.environ["GREETING"], "from", os.environ["POD_NAME"], "in", os.environ["POD_NS"])
        print("ip", os.environ["POD_IP"], "secret", os.environ["SECRET"])
        print("rank", os.environ["NODE_RANK"], "master", os.environ["MASTER"])
        print("file", pathlib.Path(sys.argv[1]).read_text())
        print("python", sys.prefix)
    """
    env = [
        {"name": "POD_NAME", "valueFrom": field_ref("metadata.name")},
        {"name": "POD_NS", "valueFrom": field_ref("metadata.namespace")},
        {"name": "POD_IP", "valueFrom": field_ref("status.podIP")},
        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
        {"name": "NODE_RANK", "value": "0"},
        {"name": "MASTER", "value": "rank-$(NODE_RANK)"},
    ]
    job = {
        "metadata": {"name": "hello"},
        "spec": {
            "backoffLimit": 0,
            "parallelism": 1,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "python:3.11",
                            "command": [*py(script), "/etc/cfg/conf.txt"],
                            "env": env,
                            "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}],
                        }
                    ],
                    "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}],
                }
            },
        },
    }
    batch.create_namespaced_job(namespace, job)

    def complete():
        j = batch.read_namespaced_job("hello", namespace)
        return any(c.type == "Complete" and c.status == "True" for c in j.status.conditions or [])

    wait_for("Job hello Complete", complete, 60)
    (pod,) = job_pods(v1, namespace, "hello")
    assert pod.status.phase == "Succeeded"
    assert pod.spec.node_name == kube_node.name
    assert pod.status.pod_ip == "127.0.0.1"
    term = pod.status.container_statuses[0].state.terminated
    assert term.exit_code == 0 and term.reason == "Completed"
    logs = kube_node.logs(namespace, pod.metadata.name)
    assert f"hello from {pod.metadata.name} in {namespace}" in logs
    assert "ip 127.0.0.1 secret s3cr3t" in logs
    assert "rank 0 master rank-0" in logs
    assert "file from a file" in logs
    assert f"python {sys.prefix}\n" in logs  # `python` is this virtualenv's interpreter
    assert kube_node.log_path(namespace, pod.metadata.name).is_file()


def test_pod_killed_on_request_ends_failed(control_plane, kube_node, namespace):
    v1 = kubernetes.client.CoreV1Api(control_plane.api_client)
    pod = {
        "metadata": {"name": "victim"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "busybox",
                    "command": py("import time; print('up', flush=True); time.sleep(300)"),
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                }
            ],
        },
    }
    v1.create_namespaced_pod(namespace, pod)
    kube_node.wait_for_phase(namespace, "victim", "Running", timeout=30)
    wait_for("output", lambda: "up" in kube_node.logs(namespace, "victim"), 20)
    kube_node.kill(namespace, "victim", signal.SIGKILL)
    got = kube_node.wait_for_phase(namespace, "victim", "Failed", timeout=30)
    term = got.status.container_statuses[0].state.terminated
    assert term.exit_code == 128 + signal.SIGKILL
    assert term.reason == "Error"
    assert "up" in term.message  # FallbackToLogsOnError


def test_failing_job_ends_failed(control_plane, kube_node, namespace):
    api = control_plane.api_client
    v1, batch = kubernetes.client.CoreV1Api(api), kubernetes.client.BatchV1Api(api)
    container = {
        "name": "main",
        "image": "x",
        "command": py("import sys; print('bad input'); sys.exit(3)"),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    spec = {"restartPolicy": "Never", "containers": [container]}
    batch.create_namespaced_job(
        namespace,
        {"metadata": {"name": "boom"}, "spec": {"backoffLimit": 0, "template": {"spec": spec}}},
    )

    def failed():
        j = batch.read_namespaced_job("boom", namespace)
        return any(c.type == "Failed" and c.status == "True" for c in j.status.conditions or [])

    wait_for("Job boom Failed", failed, 60)
    (pod,) = job_pods(v1, namespace, "boom")
    term = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, term.exit_code) == ("Failed", 3)
    assert "bad input" in term.message


def test_deleted_pod_gets_sigterm_then_is_removed(control_plane, kube_node, namespace):
    v1 = kubernetes.client.CoreV1Api(control_plane.api_client)
    script = """
        import signal, sys, time
        def bye(*_):
            print("got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("ready", flush=True)
        time.sleep(300)
    """
    v1.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "graceful"},
            "spec": {
                "restartPolicy": "Never",
                # Far beyond the wait below: only a SIGTERM that ends the process removes the
                # pod in time; a node that waited out the grace period would hang the test.
                "terminationGracePeriodSeconds": 3600,
                "containers": [{"name": "main", "image": "x", "command": py(script)}],
            },
        },
    )
    wait_for("ready", lambda: "ready" in _logs(kube_node, namespace, "graceful"), 30)
    v1.delete_namespaced_pod("graceful", namespace)

    def gone():
        try:
            v1.read_namespaced_pod("graceful", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for("pod removed", gone, 120)  # guards against a hang only: the grace is an hour
    assert "got SIGTERM" in kube_node.logs(namespace, "graceful")


def test_deployment_pod_serves_and_becomes_ready(control_plane, kube_node, namespace):
    api = control_plane.api_client
    apps = kubernetes.client.AppsV1Api(api)
    port = free_port()
    labels = {"app": "web"}
    container = {
        "name": "web",
        "image": "x",
        "command": ["python", "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
            },
        },
    )

    def available():
        d = apps.read_namespaced_deployment("web", namespace)
        return (d.status.available_replicas or 0) >= 1

    wait_for("Deployment web available", available, 60)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        assert r.status == 200
    # deleting the Deployment ends the server process
    apps.delete_namespaced_deployment("web", namespace, propagation_policy="Foreground")
    v1 = kubernetes.client.CoreV1Api(api)
    wait_for(
        "web pods removed",
        lambda: not v1.list_namespaced_pod(namespace, label_selector="app=web").items,
        60,
    )
    wait_for("port closed", lambda: not _port_open(port), 10)


def test_pod_uses_its_service_account_token(control_plane, kube_node, namespace):
    v1 = kubernetes.client.CoreV1Api(control_plane.api_client)
    script = """
        import json, os, ssl, urllib.request, urllib.error
        sa = os.environ["TEST_NODE_SERVICEACCOUNT_DIR"]
        token = open(os.path.join(sa, "token")).read()
        ns = open(os.path.join(sa, "namespace")).read()
        ctx = ssl.create_default_context(cafile=os.path.join(sa, "ca.crt"))
        host = os.environ["KUBERNETES_SERVICE_HOST"]; port = os.environ["KUBERNETES_SERVICE_PORT"]
        req = urllib.request.Request(
            f"https://{host}:{port}/api/v1/namespaces/{ns}/secrets",
            headers={"Authorization": "Bearer " + token})
        try:
            urllib.request.urlopen(req, context=ctx)
            print("status 200")
        except urllib.error.HTTPError as e:
            print("status", e.code)
    """
    v1.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "insider"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "x", "command": py(script)}],
            },
        },
    )
    pod = kube_node.wait_for_phase(namespace, "insider", {"Succeeded", "Failed"}, timeout=30)
    logs = kube_node.logs(namespace, "insider")
    assert pod.status.phase == "Succeeded", logs
    assert "status 403" in logs  # authenticated as system:serviceaccount:<ns>:default


def _logs(node, namespace, name) -> str:
    try:
        return node.logs(namespace, name)
    except KeyError:
        return ""


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
