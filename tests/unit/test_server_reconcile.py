"""DreamBoothServer: its API rules, its pure reconcile, and a LoRA job's side of publishing."""

from __future__ import annotations

import copy

import pytest

from dreambooth_contract import names, publication
from dreambooth_contract.validation import JobInvalid, parse_job, parse_server
from dreambooth_operator import builders
from dreambooth_operator.publishing import (
    REASON_BASE_MODEL_MISMATCH,
    REASON_NAMESPACE_NOT_ALLOWED,
    PublicationRequest,
)
from dreambooth_operator.reconcile import (
    COND_FAILED,
    COND_INFERENCE_READY,
    ChildDeployment,
    Create,
    Event,
    Update,
)
from dreambooth_operator.server_reconcile import (
    AnnotatePods,
    ServerObserved,
    reconcile_server,
    view_of,
)
from tests.unit.test_reconcile import DOCUMENT, DONE, NOW, job_with, step

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
SERVER = {
    "apiVersion": "dreambooth.dev/v1alpha1",
    "kind": "DreamBoothServer",
    "metadata": {"name": "shared", "namespace": "team", "uid": "s-1", "generation": 2},
    "spec": {"baseModel": {"uri": "random://tiny-sd"}, "gpus": 0, "maxLoadedAdapters": 3},
}


def server_with(**spec):
    document = copy.deepcopy(SERVER)
    document["spec"].update(spec)
    return parse_server(document)


def request(job="dog", namespace="team", **changes):
    fields = {
        "namespace": namespace,
        "job": job,
        "uid": f"u-{job}",
        "base_model": "random://tiny-sd",
        "base_revision": None,
        "phase": "Serving",
        "artifact_kind": "lora",
        "artifact_uri": f"s3://runs/{job}/export",
        "artifact_digest": DIGEST_A,
    }
    return PublicationRequest(**{**fields, **changes})


def published(decision):
    return [m.name for m in decision.status.models]


def actions_of(decision, kind):
    return [a for a in decision.actions if isinstance(a, kind)]


# -- the API ----------------------------------------------------------------------------------


def test_server_spec_rules_name_their_field():
    with pytest.raises(JobInvalid) as refused:
        parse_server({**SERVER, "spec": {**SERVER["spec"], "allowedNamespaces": ["Team A"]}})
    assert refused.value.problems[0].startswith("spec.allowedNamespaces: ")
    with pytest.raises(JobInvalid) as refused:
        parse_server({**SERVER, "spec": {**SERVER["spec"], "maxLoadedAdapters": 0}})
    assert refused.value.problems[0].startswith("spec.maxLoadedAdapters: ")
    with pytest.raises(JobInvalid) as refused:
        parse_server({**SERVER, "spec": {**SERVER["spec"], "defaultScheduler": "lms"}})
    assert refused.value.problems[0].startswith("spec.defaultScheduler: ")
    assert "'euler_ancestral'" in refused.value.problems[0]  # what is allowed
    vae = {**SERVER["spec"]["baseModel"], "vaeUri": "madebyollin/sdxl-vae-fp16-fix"}
    with pytest.raises(JobInvalid) as refused:
        parse_server({**SERVER, "spec": {**SERVER["spec"], "baseModel": vae}})
    assert refused.value.problems[0].startswith("spec.baseModel.vaeUri: ")
    # The server refuses more steps than its --max-steps: the spec must not ask for them.
    with pytest.raises(JobInvalid) as refused:
        parse_server({**SERVER, "spec": {**SERVER["spec"], "defaultSteps": 151}})
    assert refused.value.problems[0].startswith("spec.defaultSteps: ")


def test_a_servers_request_defaults_reach_its_pods():
    def args_of(server) -> list[str]:
        return builders.server_deployment(server)["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]

    def value(args: list[str], flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args else None

    tuned = args_of(server_with(defaultSteps=30, defaultGuidanceScale=4, defaultScheduler="ddim"))
    assert [value(tuned, f"--default-{k}") for k in ("steps", "guidance-scale", "scheduler")] == [
        "30",
        "4.0",
        "ddim",
    ]
    plain = args_of(server_with())
    assert value(plain, "--default-scheduler") is None  # the model's own scheduler


def test_inference_server_needs_lora_and_excludes_a_deployment_of_its_own():
    document = copy.deepcopy(DOCUMENT)
    document["spec"]["inference"] = {"server": "shared"}
    with pytest.raises(JobInvalid) as refused:
        parse_job(document)
    assert refused.value.problems[0].startswith("spec.inference.server: only allowed with")
    document["spec"]["training"]["method"] = "lora"
    document["spec"]["inference"]["enabled"] = True
    with pytest.raises(JobInvalid) as refused:
        parse_job(document)
    assert "not both" in refused.value.problems[0]
    document["spec"]["inference"] = {"server": "Other/shared"}
    with pytest.raises(JobInvalid) as refused:
        parse_job(document)
    assert refused.value.problems[0].startswith("spec.inference.server: ")


# -- the server's reconcile -------------------------------------------------------------------


def test_a_new_server_gets_its_children_and_an_empty_index():
    decision = reconcile_server(server_with(), ServerObserved(now=NOW))
    kinds = [a.manifest["kind"] for a in actions_of(decision, Create)]
    assert kinds == ["ConfigMap", "Service", "ServiceAccount", "Deployment"]
    config_map = actions_of(decision, Create)[0].manifest
    assert publication.parse(config_map["data"][publication.PUBLICATIONS_FILE]).models == ()
    deployment = actions_of(decision, Create)[-1].manifest
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False  # the server holds no token
    args = pod["containers"][0]["args"]
    assert args[args.index("--max-loaded-adapters") + 1] == "3"
    assert args[args.index("--publications") + 1] == builders.PUBLICATIONS_MOUNT
    assert args[args.index("--device") + 1] == "cpu"
    assert not actions_of(decision, AnnotatePods)  # no pods to nudge yet


def test_only_the_jobs_the_server_takes_are_published():
    requests = (
        request("dog"),
        request("cat", namespace="team-b"),  # namespace not allowed
        request("owl", base_model="random://sd15"),  # another base
        request("fox", phase="Training"),  # not exported yet
        request("emu", suspended=True),
        request("yak", deleting=True),
        request("bat", artifact_kind="pipeline"),  # a full fine-tune
    )
    decision = reconcile_server(server_with(), ServerObserved(now=NOW, requests=requests))
    assert published(decision) == ["team/dog"]
    allowed = server_with(allowedNamespaces=["team-b"])
    decision = reconcile_server(allowed, ServerObserved(now=NOW, requests=requests))
    assert published(decision) == ["team-b/cat", "team/dog"]


def test_a_changed_index_replaces_the_config_map_and_nudges_the_pods():
    server = server_with()
    empty = publication.render(publication.Publications())
    observed = ServerObserved(now=NOW, index=empty, requests=(request("dog"),))
    decision = reconcile_server(server, observed)
    (update,) = actions_of(decision, Update)
    index = update.manifest["data"][publication.PUBLICATIONS_FILE]
    model = publication.parse(index).models[0]
    assert (model.name, model.uri, model.digest) == ("team/dog", "s3://runs/dog/export", DIGEST_A)
    (nudge,) = actions_of(decision, AnnotatePods)
    assert nudge.selector == names.server_selector("shared")
    assert set(nudge.annotations) == {names.ANNOTATION_PUBLICATIONS}
    assert [e.reason for e in actions_of(decision, Event)] == ["Published"]
    # Unchanged: nothing is written again.
    settled = reconcile_server(
        parse_server({**SERVER, "status": decision.status_patch()}),
        ServerObserved(now=NOW, index=index, requests=(request("dog"),)),
    )
    assert not actions_of(settled, Update) and not actions_of(settled, AnnotatePods)
    assert "Published" not in [e.reason for e in actions_of(settled, Event)]
    # The job is deleted: unpublished.
    gone = reconcile_server(
        parse_server({**SERVER, "status": decision.status_patch()}),
        ServerObserved(now=NOW, index=index),
    )
    assert published(gone) == [] and actions_of(gone, AnnotatePods)
    assert "Unpublished" in [e.reason for e in actions_of(gone, Event)]


def test_ready_replicas_count_only_for_the_deployment_as_specified():
    server = server_with()
    wanted = builders.server_deployment(server)["metadata"]["annotations"]
    current = ChildDeployment(wanted[builders.ANNOTATION_TEMPLATE_HASH], 1, "s-1")
    decision = reconcile_server(server, ServerObserved(now=NOW, deployment=current))
    assert decision.status.ready_replicas == 1
    ready = next(c for c in decision.status.conditions if c.type == "Ready")
    assert ready.status == "True"
    outdated = reconcile_server(
        server_with(replicas=2), ServerObserved(now=NOW, deployment=current)
    )
    assert outdated.status.ready_replicas == 0
    assert [a.manifest["kind"] for a in actions_of(outdated, Update)] == ["Deployment"]


# -- a job that names a server ----------------------------------------------------------------

LORA = {"method": "lora"}
ARTIFACT = {
    "uri": "s3://runs/dog/export",
    "digest": DIGEST_A,
    "kind": "lora",
    "baseModel": "random://tiny-sd",
}


def view(**spec):
    return view_of(server_with(**spec))


def test_a_job_the_server_refuses_fails_before_training():
    job = job_with(training=LORA, inference={"server": "shared"})
    decision, _ = step(job, server=view(baseModel={"uri": "random://sd15"}))
    assert decision.status.phase == "Failed"
    failed = next(c for c in decision.status.conditions if c.type == COND_FAILED)
    assert failed.reason == "ServerRefused"
    assert "random://tiny-sd" in failed.message and "random://sd15" in failed.message
    other = job_with(training=LORA, inference={"server": "serving/shared"})
    decision, _ = step(other, server=view_of(parse_server(_in_namespace("serving"))))
    failed = next(c for c in decision.status.conditions if c.type == COND_FAILED)
    assert "does not allow jobs of namespace team" in failed.message


def _in_namespace(namespace):
    document = copy.deepcopy(SERVER)
    document["metadata"]["namespace"] = namespace
    return document


def test_an_exported_job_reports_where_it_is_served():
    status = {"conditions": DONE, "artifact": ARTIFACT}
    job = job_with(status=status, training=LORA, inference={"server": "shared"})
    decision, _ = step(job)  # no such server (yet)
    assert decision.status.phase == "Serving"
    assert decision.status.inference.model == "team/dog"
    assert decision.status.inference.server == "team/shared"
    assert _ready(decision) == ("False", "ServerNotFound")
    decision, _ = step(job, server=view())
    assert _ready(decision) == ("False", "Publishing")
    assert not [a for a in decision.actions if isinstance(a, Create)]  # no Deployment of its own
    serving = view_of(
        parse_server(
            {
                **SERVER,
                "status": {
                    "readyReplicas": 1,
                    "models": [{"name": "team/dog", "digest": DIGEST_A}],
                },
            }
        )
    )
    decision, _ = step(job, server=serving)
    assert _ready(decision) == ("True", "Published")
    assert decision.status.inference.endpoint == "http://shared-server.team.svc"
    stale = {"readyReplicas": 1, "models": [{"name": "team/dog", "digest": DIGEST_B}]}
    decision, _ = step(job, server=view_of(parse_server({**SERVER, "status": stale})))
    assert _ready(decision) == ("False", "Publishing")  # the server lists another digest


def test_a_server_changed_after_export_only_unreadies_the_job():
    status = {"conditions": DONE, "artifact": ARTIFACT}
    job = job_with(status=status, training=LORA, inference={"server": "shared"})
    decision, _ = step(job, server=view(baseModel={"uri": "random://sd15"}))
    assert decision.status.phase == "Serving"
    assert _ready(decision) == ("False", REASON_BASE_MODEL_MISMATCH)


def test_namespace_refusal_reason():
    status = {"conditions": DONE, "artifact": ARTIFACT}
    job = job_with(status=status, training=LORA, inference={"server": "serving/shared"})
    decision, _ = step(job, server=view_of(parse_server(_in_namespace("serving"))))
    assert _ready(decision) == ("False", REASON_NAMESPACE_NOT_ALLOWED)


def _ready(decision):
    ready = next(c for c in decision.status.conditions if c.type == COND_INFERENCE_READY)
    return ready.status, ready.reason
