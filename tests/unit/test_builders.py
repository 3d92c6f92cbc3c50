"""Pure builders: the manifests a DreamBoothJob produces, checked by value."""

from __future__ import annotations

import copy

import pytest

from dreambooth_contract import names
from dreambooth_contract.env import CONFIG_FILE
from dreambooth_contract.subjects import classes_of
from dreambooth_contract.trainer_config import TrainerConfig
from dreambooth_contract.validation import parse_job
from dreambooth_operator import builders
from dreambooth_operator.trainer_inputs import trainer_inputs

DOCUMENT = {
    "apiVersion": "dreambooth.dev/v1alpha1",
    "kind": "DreamBoothJob",
    "metadata": {
        "name": "dog",
        "namespace": "team",
        "uid": "u-1",
        "labels": {"kueue.x-k8s.io/queue-name": "gpu", "unrelated": "x"},
    },
    "spec": {
        "baseModel": {"uri": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
        "instance": {"imagesUri": "s3://data/dog", "prompt": "a photo of sks dog"},
        "priorPreservation": {"classPrompt": "a photo of dog"},
        "resources": {
            "nodes": 2,
            "gpusPerNode": 4,
            "resources": {"requests": {"cpu": 8, "memory": "64Gi"}},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "priorityClassName": "training",
        },
        "storage": {
            "outputUri": "s3://runs/dog",
            "s3": {"credentialsSecret": {"name": "s3-creds"}},
        },
    },
}
JOB = parse_job(copy.deepcopy(DOCUMENT))


def env_of(manifest) -> dict:
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_training_job_per_rank_has_stable_dns_and_torchrun_rendezvous():
    rank1 = builders.batch_job(JOB, names.TRAIN, rank=1, attempt=3)
    pod = rank1["spec"]["template"]["spec"]
    assert rank1["metadata"]["name"] == "dog-train-1"
    assert (pod["hostname"], pod["subdomain"]) == ("dog-train-1", "dog-train")
    assert rank1["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    env = env_of(rank1)
    assert env["NNODES"] == "2" and env["NPROC_PER_NODE"] == "4" and env["NODE_RANK"] == "1"
    assert env["MASTER_ADDR"] == "dog-train-0.dog-train.team.svc" and env["MASTER_PORT"] == "29500"
    container = pod["containers"][0]
    assert container["command"] == ["torchrun"]
    assert "--node-rank=$(NODE_RANK)" in container["args"]
    assert container["args"][-3:] == ["train", "--config", "/etc/dreambooth/trainer.json"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert rank1["metadata"]["labels"][names.LABEL_ATTEMPT] == "3"


def test_credentials_only_by_secret_reference():
    env = env_of(builders.batch_job(JOB, names.TRAIN, 0, 0))
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
    }
    config_json, _cache = trainer_inputs(JOB)
    config_map = builders.config_map(JOB, config_json)
    assert "s3-creds" not in str(config_map) and "AWS_" not in str(config_map)
    assert TrainerConfig.model_validate_json(config_json).s3.credentials_secret is None


def test_the_wandb_key_reaches_only_the_pods_that_log_and_only_by_secret_reference():
    document = copy.deepcopy(DOCUMENT)
    key = {"name": "wandb", "key": "api-key"}
    document["spec"]["tracking"] = {"wandb": {"project": "dogs", "apiKeySecret": key}}
    job = parse_job(document)
    for component, logs in ((names.TRAIN, True), (names.EVALUATE, True), (names.PRIORS, False)):
        env = env_of(builders.batch_job(job, component, 0, 0))
        assert env.get("WANDB_API_KEY") == ({"secretKeyRef": key} if logs else None), component
    config_json, _cache = trainer_inputs(job)
    config = TrainerConfig.model_validate_json(config_json)
    assert config.tracking.wandb.project == "dogs" and config.tracking.wandb.api_key_secret is None
    assert "api-key" not in config_json


def test_config_map_holds_the_trainer_config_the_spec_implies():
    config_json, _cache = trainer_inputs(JOB)
    config_map = next(
        o for o in builders.shared_objects(JOB, config_json) if o["kind"] == "ConfigMap"
    )
    assert config_map["metadata"]["name"] == names.config_map("dog")
    assert config_map["metadata"]["namespace"] == "team"
    (key,) = config_map["data"]
    assert key == CONFIG_FILE  # the file the pods' --config points at
    config = TrainerConfig.model_validate_json(config_map["data"][key])
    spec = JOB.spec
    assert (config.job_name, config.namespace) == ("dog", "team")
    assert config.base_model == spec.base_model
    assert config.instance == spec.instance
    assert config.prior_preservation == spec.prior_preservation
    assert config.prior_preservation.class_prompt == "a photo of dog"
    assert (config.nodes, config.processes_per_node, config.gpus_per_node) == (2, 4, 4)
    assert config.output_uri == "s3://runs/dog"
    assert config.prior_cache_uri == "s3://runs/priors"  # default: beside the output
    # The spec's sections verbatim, effective values resolved (the default learning rate).
    assert config.training.learning_rate == 5e-6
    assert config.training.model_dump(exclude={"learning_rate"}) == spec.training.model_dump(
        exclude={"learning_rate"}
    )


def test_pods_meet_the_restricted_pod_security_standard():
    pod = builders.batch_job(JOB, names.PRIORS, 0, 0)["spec"]["template"]["spec"]
    security = pod["containers"][0]["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {
        "drop": ["ALL"]
    }
    assert security["runAsNonRoot"] and security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"]


def test_scheduling_fields_and_queue_labels_pass_through():
    job = builders.batch_job(JOB, names.PRIORS, 0, 0)
    pod = job["spec"]["template"]["spec"]
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["priorityClassName"] == "training"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu"
    assert "unrelated" not in job["metadata"]["labels"]


def test_priors_of_one_process_per_pod_run_without_torchrun():
    one = JOB.model_copy(deep=True)
    one.spec.resources.processes_per_node = 1
    container = builders.batch_job(one, names.PRIORS, 1, 0)["spec"]["template"]["spec"]
    container = container["containers"][0]
    assert container["command"] == ["dreambooth"]
    assert container["args"] == ["priors", "--config", "/etc/dreambooth/trainer.json"]
    # Its shard is NODE_RANK of NNODES (dreambooth_trainer.priors.shard_from_env, whose RANK
    # and WORLD_SIZE default to one process when no torchrun sets them).
    variables = {v["name"]: v.get("value") for v in container["env"]}
    assert (variables["NODE_RANK"], variables["NNODES"]) == ("1", "2")
    assert not {"RANK", "WORLD_SIZE"} & set(variables)


def test_priors_run_standalone_per_pod_and_export_needs_no_gpu():
    priors = builders.batch_job(JOB, names.PRIORS, 1, 0)["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert priors["args"][0] == "--standalone"
    assert priors["args"][-3:] == ["priors", "--config", "/etc/dreambooth/trainer.json"]
    export = builders.batch_job(JOB, names.EXPORT, 0, 0)
    assert export["metadata"]["name"] == "dog-export"
    container = export["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["dreambooth"] and "nvidia.com/gpu" not in str(
        container["resources"]
    )


def test_the_evaluation_is_one_pod_with_one_gpu_at_most_running_dreambooth_evaluate():
    (evaluate,) = builders.phase_jobs(JOB, names.EVALUATE, 0)
    assert evaluate["metadata"]["name"] == "dog-evaluate"
    pod = evaluate["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["dreambooth"]
    assert container["args"] == ["evaluate", "--config", "/etc/dreambooth/trainer.json"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"  # of the node's 4
    assert pod["serviceAccountName"] == "dog-trainer"  # may write status.evaluation
    cpu = copy.deepcopy(DOCUMENT)
    cpu["spec"]["resources"] |= {"gpusPerNode": 0, "processesPerNode": 1}
    cpu["spec"]["training"] = {"mixedPrecision": "no"}
    (on_cpu,) = builders.phase_jobs(parse_job(cpu), names.EVALUATE, 0)
    assert "nvidia.com/gpu" not in str(on_cpu["spec"]["template"]["spec"]["containers"][0])


def test_status_role_is_limited_to_this_jobs_status():
    role = builders.status_role(JOB)
    assert role["rules"] == [
        {
            "apiGroups": ["dreambooth.dev"],
            "resources": ["dreamboothjobs/status"],
            "resourceNames": ["dog"],
            "verbs": ["get", "patch"],
        }
    ]
    binding = builders.status_role_binding(JOB)
    assert binding["subjects"][0]["name"] == "dog-trainer"


def test_every_child_is_owned_by_the_job_and_builders_are_deterministic():
    objects = builders.shared_objects(JOB, "{}") + builders.phase_jobs(JOB, names.TRAIN, 0)
    for manifest in objects:
        owner = manifest["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "DreamBoothJob",
            "dog",
            "u-1",
            True,
        )
    assert objects == builders.shared_objects(JOB, "{}") + builders.phase_jobs(JOB, names.TRAIN, 0)


def test_every_scratch_volume_has_a_size_limit():
    """An emptyDir without sizeLimit lets one pod fill its node's disk (or, for /dev/shm, its
    memory); the cache's limit comes from the spec."""
    job = JOB.model_copy(deep=True)
    job.spec.resources.cache_size = "300Gi"
    pods = [builders.pod_template(job, names.TRAIN, 0, 0, gpus=1)["spec"]]
    pods.append(
        builders.inference_deployment(job, "s3://a/export", "sha256:x")["spec"]["template"]["spec"]
    )
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"] if "emptyDir" in v}
        assert volumes and all("sizeLimit" in v["emptyDir"] for v in volumes.values()), volumes
        assert volumes["cache"]["emptyDir"]["sizeLimit"] == "300Gi"


def test_the_export_setting_reaches_the_trainer_config():
    document = copy.deepcopy(DOCUMENT)
    document["spec"]["training"] = {"method": "lora"}
    document["spec"]["export"] = {"fuse": True}
    config_json, _cache = trainer_inputs(parse_job(document))
    config = TrainerConfig.model_validate_json(config_json)
    assert config.export.fuse is True
    assert TrainerConfig.model_validate_json(trainer_inputs(JOB)[0]).export.fuse is False


def serve_args(deployment) -> list[str]:
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


def test_a_pipeline_artifact_is_served_as_the_model():
    args = serve_args(builders.inference_deployment(JOB, "s3://runs/dog/export", "sha256:a"))
    assert args[:5] == ["serve", "--model", "s3://runs/dog/export", "--digest", "sha256:a"]
    assert "--adapter" not in args


def test_a_lora_artifact_is_served_as_an_adapter_on_its_base_model():
    deployment = builders.inference_deployment(
        JOB, "s3://runs/dog/export", "sha256:a", base_model="s3://models/sd15"
    )
    args = serve_args(deployment)
    assert args[:7] == [
        "serve",
        "--model",
        "s3://models/sd15",
        "--adapter",
        "s3://runs/dog/export",
        "--digest",
        "sha256:a",
    ]
    assert deployment["metadata"]["annotations"][f"{names.GROUP}/artifact-digest"] == "sha256:a"
    # Another base is another Deployment template: the pods roll.
    other = builders.inference_deployment(
        JOB, "s3://runs/dog/export", "sha256:a", base_model="s3://models/sd21"
    )
    hash_key = builders.ANNOTATION_TEMPLATE_HASH
    assert (
        other["metadata"]["annotations"][hash_key]
        != deployment["metadata"]["annotations"][hash_key]
    )


@pytest.mark.parametrize(
    ("inference", "device", "threads"),
    [
        ({"gpus": 0}, "cpu", None),
        ({"gpus": 0, "resources": {"limits": {"cpu": "1500m"}}}, "cpu", "1"),
        ({"gpus": 1}, None, None),
    ],
)
def test_a_server_without_gpus_runs_on_the_cpu_with_the_threads_it_may_use(
    inference, device, threads
):
    """A node's runtime may show every GPU to every container: --device auto would take one."""
    document = copy.deepcopy(DOCUMENT)
    document["spec"]["inference"] = {"enabled": True, **inference}
    args = serve_args(
        builders.inference_deployment(parse_job(document), "s3://x/export", "sha256:a")
    )

    def value(flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args else None

    assert (value("--device"), value("--cpu-threads")) == (device, threads)


def test_a_job_of_several_subjects_hands_the_trainers_every_subject_and_class():
    document = copy.deepcopy(DOCUMENT)
    spec = document["spec"]
    first = spec.pop("instance")
    spec["priorPreservation"].pop("classPrompt")
    spec["subjects"] = [
        {**first, "classPrompt": "a photo of dog"},
        {"imagesUri": "s3://data/cat/", "prompt": "a photo of zwx cat", "classPrompt": "a cat"},
    ]
    spec.setdefault("training", {})["batchSize"] = 2
    config_json, cache = trainer_inputs(parse_job(document))
    config = TrainerConfig.model_validate_json(config_json)
    assert [s.prompt for s in config.subjects] == [first["prompt"], "a photo of zwx cat"]
    classes = classes_of(config)
    assert [c.prompt for c in classes] == ["a photo of dog", "a cat"]
    assert len({c.key for c in classes}) == 2
    # status.priors names the first class's set (the priors pods generate every class's)
    assert cache.key == classes[0].key
