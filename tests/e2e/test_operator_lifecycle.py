"""The operator against the real control plane, without running the pods' code.

The Job controller creates pods; no node runs them here (see test_end_to_end.py for that).
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import job_document, wait_until
from tests.support.tools import promtool_check_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]


def _names(items) -> list[str]:
    return sorted(i.metadata.name for i in items)


def test_new_job_gets_shared_objects_first_phase_jobs_and_status(
    operator_factory, jobs, namespace, kube_api
):
    operator = operator_factory(namespace)
    jobs.create(job_document("toy", resources={"nodes": 2}))
    wait_until(
        "priors Jobs",
        lambda: _names(jobs.batch_jobs()) == ["toy-priors-0", "toy-priors-1"],
        60,
        operator.log,
    )
    status = jobs.wait(
        "toy",
        lambda s: s.get("phase") == "Pending" and s.get("priors"),
        "Pending with priors",
        30,
        operator.log,
    )
    assert len(status["priors"]["cacheKey"]) >= 16
    import kubernetes

    core = kubernetes.client.CoreV1Api(kube_api)
    rbac = kubernetes.client.RbacAuthorizationV1Api(kube_api)
    config = core.read_namespaced_config_map("toy-config", namespace)
    assert '"jobName": "toy"' in config.data["trainer.json"]
    assert core.read_namespaced_service("toy-train", namespace).spec.cluster_ip == "None"
    role = rbac.read_namespaced_role("toy-status-writer", namespace)
    assert role.rules[0].resource_names == ["toy"] and role.rules[0].verbs == ["get", "patch"]
    owner = jobs.batch_jobs()[0].metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.controller) == ("DreamBoothJob", "toy", True)
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=toy").items
    assert any(e.reason == "PhasePending" for e in events), [e.reason for e in events]


def test_operator_restart_creates_no_duplicates(operator_factory, jobs, namespace):
    operator = operator_factory(namespace)
    jobs.create(job_document("toy"))
    wait_until(
        "priors Job", lambda: _names(jobs.batch_jobs()) == ["toy-priors-0"], 60, operator.log
    )
    before = {j.metadata.name: j.metadata.uid for j in jobs.batch_jobs()}
    operator.stop()
    operator.start()
    # Proof that the new process reconciled the job (it is the only one it watches): a pass
    # is counted when it has acted, so any duplicate it made would exist by then.
    wait_until("a pass of the new operator", lambda: passes(operator) >= 1, 60, operator.log)
    after = {j.metadata.name: j.metadata.uid for j in jobs.batch_jobs()}
    assert after == before
    assert not [j.metadata.name for j in jobs.batch_jobs() if j.metadata.deletion_timestamp]
    assert len(jobs.pods()) == 1


def passes(operator) -> float:
    """Reconcile passes the operator process has finished (its own /metrics)."""
    for line in operator.metrics().splitlines():
        if line.startswith("dreambooth_operator_reconcile_duration_seconds_count "):
            return float(line.split()[1])
    return 0.0


def test_invalid_cross_field_spec_fails_with_the_validators_message(
    operator_factory, jobs, namespace
):
    operator = operator_factory(namespace)
    # The CRD schema cannot express "fp16 needs GPUs"; the operator's validation does.
    jobs.create(job_document("cpu-fp16", training={"mixedPrecision": "fp16"}))
    status = jobs.wait("cpu-fp16", lambda s: s.get("phase") == "Failed", "Failed", 30, operator.log)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.training.mixedPrecision: fp16 needs GPUs" in failed["message"]
    assert jobs.batch_jobs() == []


def test_a_child_the_api_server_refuses_fails_the_job_with_its_words(
    operator_factory, jobs, namespace
):
    operator = operator_factory(namespace)
    # Valid to our schema, refused by the API server's pod validation.
    resources = {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}
    jobs.create(job_document("greedy", resources=resources))
    status = jobs.wait("greedy", lambda s: s.get("phase") == "Failed", "Failed", 60, operator.log)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ChildRejected"
    assert "the API server refused Job greedy-priors-0" in failed["message"]
    assert "must be less than or equal to cpu limit" in failed["message"]
    assert jobs.batch_jobs() == []


def test_immutable_spec_change_is_refused_with_a_clear_condition(operator_factory, jobs, namespace):
    operator = operator_factory(namespace)
    jobs.create(job_document("toy"))
    wait_until(
        "priors Job", lambda: _names(jobs.batch_jobs()) == ["toy-priors-0"], 60, operator.log
    )
    jobs.patch("toy", {"spec": {"training": {"maxSteps": 50}}})
    status = jobs.wait(
        "toy",
        lambda s: any(
            c["type"] == "SpecAccepted" and c["status"] == "False" for c in s.get("conditions", [])
        ),
        "SpecAccepted=False",
        30,
        operator.log,
    )
    refused = next(c for c in status["conditions"] if c["type"] == "SpecAccepted")
    assert "spec.training.maxSteps cannot change after the job started" in refused["message"]
    config = jobs.core.read_namespaced_config_map("toy-config", namespace)
    assert '"maxSteps": 4' in config.data["trainer.json"]


def test_suspend_stops_pods_and_resume_recreates_them(operator_factory, jobs, namespace):
    operator = operator_factory(namespace)
    jobs.create(job_document("toy"))
    wait_until(
        "priors Job", lambda: _names(jobs.batch_jobs()) == ["toy-priors-0"], 60, operator.log
    )
    jobs.patch("toy", {"spec": {"runPolicy": {"suspend": True}}})
    jobs.wait("toy", lambda s: s.get("phase") == "Suspended", "Suspended", 30, operator.log)
    wait_until("Jobs deleted", lambda: jobs.batch_jobs() == [], 60, operator.log)
    jobs.patch("toy", {"spec": {"runPolicy": {"suspend": False}}})
    wait_until(
        "priors Job again", lambda: _names(jobs.batch_jobs()) == ["toy-priors-0"], 60, operator.log
    )
    status = jobs.status("toy")
    resumed = next(c for c in status["conditions"] if c["type"] == "Suspended")
    assert (resumed["status"], resumed["reason"]) == ("False", "Resumed")


def test_deleting_a_job_removes_everything_it_owns(operator_factory, jobs, namespace):
    operator = operator_factory(namespace)
    jobs.create(job_document("toy"))
    wait_until(
        "priors Job", lambda: _names(jobs.batch_jobs()) == ["toy-priors-0"], 60, operator.log
    )
    jobs.delete("toy")
    import kubernetes

    def gone() -> bool:
        try:
            jobs.get("toy")
            return False
        except kubernetes.client.ApiException as error:
            return error.status == 404

    wait_until("DreamBoothJob gone (no finalizer left behind)", gone, 30, operator.log)
    selector = "dreambooth.dev/job=toy"
    wait_until("owned Jobs garbage-collected", lambda: jobs.batch_jobs(selector) == [], 60)
    assert jobs.core.list_namespaced_config_map(jobs.namespace, label_selector=selector).items == []


def test_operator_metrics_pass_promtool_and_prometheus_scrapes_them(
    operator_factory, jobs, namespace, prometheus, promtool_bin
):
    operator = operator_factory(namespace)
    jobs.create(job_document("toy"))
    wait_until(
        "priors Job", lambda: _names(jobs.batch_jobs()) == ["toy-priors-0"], 60, operator.log
    )
    exposition = operator.metrics()
    for family in (
        "dreambooth_operator_jobs",
        "dreambooth_operator_jobs_created_total",
        "dreambooth_operator_reconcile_duration_seconds",
        "dreambooth_operator_time_to_first_step_seconds",
    ):
        assert f"# TYPE {family} " in exposition, family
    promtool_check_metrics(promtool_bin, exposition)
    prom = prometheus([f"127.0.0.1:{operator.metrics_port}"])
    pending = prom.wait_for_value(
        'dreambooth_operator_jobs{phase="Pending"}', lambda v: v == 1, timeout=30
    )
    assert pending == 1
    assert prom.value("dreambooth_operator_jobs_created_total") == 1


def test_the_operator_runs_with_the_charts_token_which_cannot_read_secrets(
    operator_kubeconfig, dreambooth_crd
):
    import kubernetes

    client = kubernetes.config.new_client_from_config(str(operator_kubeconfig))
    custom = kubernetes.client.CustomObjectsApi(client)
    custom.list_cluster_custom_object("dreambooth.dev", "v1alpha1", "dreamboothjobs")
    with pytest.raises(kubernetes.client.ApiException) as forbidden:
        kubernetes.client.CoreV1Api(client).list_secret_for_all_namespaces()
    assert forbidden.value.status == 403


def test_a_server_refuses_jobs_of_another_base_or_namespace_and_shows_in_kubectl(
    operator_factory, jobs, namespace, kube_api, kubectl
):
    """A DreamBoothServer gets its Deployment, Service and index; a LoRA job naming it with
    another base model, or from a namespace it does not allow, fails before any pod runs, with a
    condition that says why."""
    import kubernetes

    from dreambooth_contract.server_api import SERVER_PLURAL
    from tests.e2e.conftest import Jobs

    core = kubernetes.client.CoreV1Api(kube_api)
    other = f"{namespace}-b"
    core.create_namespace({"metadata": {"name": other}})
    try:
        operator = operator_factory(namespace, other)
        servers = Jobs(kube_api, namespace, SERVER_PLURAL)
        servers.create(
            {
                "apiVersion": "dreambooth.dev/v1alpha1",
                "kind": "DreamBoothServer",
                "metadata": {"name": "shared"},
                "spec": {"baseModel": {"uri": "random://sd15"}, "gpus": 0},
            }
        )
        apps = kubernetes.client.AppsV1Api(kube_api)
        deployments = lambda: apps.list_namespaced_deployment(namespace).items  # noqa: E731
        # The Deployment is the server's last child (after its index ConfigMap and Service).
        wait_until("the server's Deployment", deployments, 60, operator.log)
        (deployment,) = deployments()
        assert deployment.metadata.name == "shared-server"
        assert core.read_namespaced_config_map("shared-publications", namespace).data
        assert deployment.spec.template.spec.automount_service_account_token is False
        status = servers.wait("shared", lambda s: s.get("endpoint"), "status", 30, operator.log)
        assert status["endpoint"] == f"http://shared-server.{namespace}.svc"
        table = kubectl("get", "dbs", "-n", namespace).stdout
        assert table.split("\n")[0].split() == [
            "NAME",
            "BASE",
            "READY",
            "REPLICAS",
            "ADAPTERS",
            "AGE",
        ]

        lora = {"training": {"method": "lora"}, "inference": {"server": "shared"}}
        jobs.create(job_document("tiny", **lora))  # random://tiny-sd
        failed = jobs.wait("tiny", lambda s: s.get("phase") == "Failed", "Failed", 60, operator.log)
        reason = next(c for c in failed["conditions"] if c["type"] == "Failed")
        assert reason["reason"] == "ServerRefused"
        assert "random://tiny-sd" in reason["message"] and "random://sd15" in reason["message"]
        assert jobs.batch_jobs() == []  # nothing ran

        elsewhere = Jobs(kube_api, other)
        document = job_document("far", **lora)
        document["spec"]["baseModel"]["uri"] = "random://sd15"
        document["spec"]["inference"]["server"] = f"{namespace}/shared"
        elsewhere.create(document)
        failed = elsewhere.wait("far", lambda s: s.get("phase") == "Failed", "Failed", 60)
        reason = next(c for c in failed["conditions"] if c["type"] == "Failed")
        assert f"does not allow jobs of namespace {other}" in reason["message"]
    finally:
        core.delete_namespace(other, propagation_policy="Background")
