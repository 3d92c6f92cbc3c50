"""The product's main job on the test cluster: the real operator, the real trainer in "pods".

etcd + kube-apiserver + kube-controller-manager, a test node that runs each pod's command as a
local process (their ports mapped to free ones: ``node.host_port``), moto's S3 server for the
subject photos, class images, checkpoints and export, and Prometheus scraping the operator and
the trainers. Where a test must act at a point of a training run (scrape it, kill a rank), the
trainers pause there (``pause_training``) instead of the test racing a machine-dependent clock.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import kubernetes
import numpy as np
import PIL.Image
import pytest

from dreambooth_contract import env, names
from dreambooth_contract.api import GROUP, PLURAL, VERSION
from dreambooth_contract.server_api import SERVER_PLURAL
from dreambooth_operator import builders
from dreambooth_trainer import digest
from dreambooth_trainer.callbacks import PAUSE_ENV
from dreambooth_trainer.models import random_models
from dreambooth_trainer.serve.cli import API_KEY_ENV
from tests.e2e.conftest import Jobs, wait_until
from tests.e2e.harness import SECRET, s3_job_document, stage_s3_inputs

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# Recognisable fake credentials (moto takes any): a test can look for them in everything the
# job's programs write or publish and find none (see assert_no_credentials).
ACCESS_KEY_ID = "AKIACANARYE2E0000042"
SECRET_ACCESS_KEY = "canary/e2e-secret-access-key+NeverLogged42"
API_KEY = "canary-e2e-inference-api-key-42"
PROMPT = "a photo of sks cube"
# The example's evaluation (random CLIP and DINO), on two prompts and 2 steps: every score,
# for the trained and the base model, at a fraction of the example's cost.
EVALUATION = {"enabled": True, "prompts": [PROMPT, f"{PROMPT} on the beach"], "steps": 2}
SCORES = {"dino", "clipI", "clipT", "pres", "div"}


@pytest.fixture
def s3_job(s3_server, s3_bucket, namespace, kube_api):
    """Builds DreamBoothJobs from the local example, moved to S3 (photos uploaded, Secret made)."""
    stage_s3_inputs(s3_server, s3_bucket, namespace, kube_api, ACCESS_KEY_ID, SECRET_ACCESS_KEY)

    def build(name: str, **spec_changes) -> dict:
        return s3_job_document(name, s3_server, s3_bucket, **spec_changes)

    return build


class StatusRecorder(threading.Thread):
    """Keeps every distinct status.progress and status.checkpoint seen while the job runs."""

    def __init__(self, jobs, name: str):
        super().__init__(daemon=True)
        self.jobs, self.name = jobs, name
        self.progress: list[dict] = []
        self.checkpoints: list[dict] = []
        self.phases: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            status = self.jobs.status(self.name)
            for key, seen in (("progress", self.progress), ("checkpoint", self.checkpoints)):
                if status.get(key) and status[key] not in seen:
                    seen.append(status[key])
            if status.get("phase") and (not self.phases or self.phases[-1] != status["phase"]):
                self.phases.append(status["phase"])
            time.sleep(0.3)


def _pod_logs(node, jobs, lines: int = 60) -> str:
    """The end of every pod's log, to explain a failed run."""
    out = []
    for pod in jobs.pods():
        try:
            text = node.logs(jobs.namespace, pod.metadata.name)
        except KeyError:
            continue
        out.append(f"--- {pod.metadata.name} ---\n" + "\n".join(text.splitlines()[-lines:]))
    return "\n".join(out)


def _finished(status: dict) -> bool:
    return status.get("phase") in ("Succeeded", "Failed", "Serving")


def _paused(node, jobs, batch_job: str, step: int) -> bool:
    """Whether the trainer of `batch_job`'s pod says it waits after `step` (pause_training)."""
    for pod in jobs.pods(f"job-name={batch_job}"):
        with contextlib.suppress(KeyError):  # not started on the node yet
            if f"paused after step {step} " in node.logs(jobs.namespace, pod.metadata.name):
                return True
    return False


def pause_training(node, directory: Path, step: int) -> Path:
    """Training pods started from now on wait after `step` (its checkpoint committed, status
    and metrics reported) while the returned file exists (the trainer's PauseAtStep)."""
    path = directory / f"pause-after-{step}"
    path.touch()
    node.extra_env[PAUSE_ENV] = f"{step}:{path}"
    return path


def assert_no_credentials(operator, node, jobs, s3_server, bucket: str) -> None:
    """None of the job's credentials anywhere its programs write or publish: the operator's
    log; every file of every pod the node ran (container logs, termination messages, each pod's
    /tmp and cache: the trainers' own log files); every object in the bucket (checkpoints,
    export, samples, TensorBoard logs); and the namespace's API objects but its Secrets
    (events, ConfigMaps, pods with their statuses, Jobs, Deployments, the job's status)."""
    api = jobs.core.api_client
    objects = {
        "events": jobs.core.list_namespaced_event(jobs.namespace),
        "configmaps": jobs.core.list_namespaced_config_map(jobs.namespace),
        "pods": jobs.core.list_namespaced_pod(jobs.namespace),
        "services": jobs.core.list_namespaced_service(jobs.namespace),
        "jobs": jobs.batch.list_namespaced_job(jobs.namespace),
        "deployments": kubernetes.client.AppsV1Api(api).list_namespaced_deployment(jobs.namespace),
        "dreamboothjobs": jobs.custom.list_namespaced_custom_object(
            GROUP, VERSION, jobs.namespace, PLURAL
        ),
    }
    places = {"operator log": operator.log().encode()}
    places |= {kind: json.dumps(api.sanitize_for_serialization(listed)).encode()
               for kind, listed in objects.items()}  # fmt: skip
    places |= {str(path): path.read_bytes() for path in node.workdir.rglob("*") if path.is_file()}
    client = s3_server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            places[f"s3://{bucket}/{item['Key']}"] = body
    assert len(places) > 20, sorted(places)  # it looked somewhere
    leaks = [
        f"{secret} in {where}"
        for where, data in places.items()
        for secret in (ACCESS_KEY_ID, SECRET_ACCESS_KEY, API_KEY)
        if secret.encode() in data
    ]
    assert not leaks, leaks


def test_local_example_trains_on_two_nodes_exports_evaluates_and_serves(
    operator_factory,
    kube_node,
    jobs,
    namespace,
    s3_job,
    prometheus,
    s3_server,
    s3_bucket,
    tmp_path,
    kubectl,
):
    operator = operator_factory(namespace)
    trainer_metrics = kube_node.host_port(namespace, env.TRAINER_METRICS_PORT)
    prom = prometheus(
        [f"127.0.0.1:{operator.metrics_port}", f"127.0.0.1:{trainer_metrics}"],
        scrape_interval="500ms",
    )
    # Rank 0's exporter lives as long as training (seconds with the tiny model): the trainers
    # wait after step 8 until Prometheus has scraped it there.
    pause = pause_training(kube_node, tmp_path, step=8)
    # The spec has no inference API key yet: every pod gets one in its environment (as an
    # admission webhook could give it), so the server requires it and no program may log it.
    kube_node.extra_env[API_KEY_ENV] = API_KEY
    inference = {"enabled": True, "gpus": 0, "replicas": 1}
    jobs.create(s3_job("toy", inference=inference, evaluation=EVALUATION))
    recorder = StatusRecorder(jobs, "toy")
    recorder.start()

    def paused_or_finished() -> str | None:
        if _finished(jobs.status("toy")):
            return "the job finished first"
        return "paused" if _paused(kube_node, jobs, "toy-train-0", step=8) else None

    outcome = wait_until("training paused after step 8", paused_or_finished, 600, operator.log)
    assert outcome == "paused", _pod_logs(kube_node, jobs)
    # Paused, rank 0 serves step 8 for as long as Prometheus takes (scraping every 0.5 s): the
    # timeout only bounds a broken exporter.
    prom.wait_for_value("dreambooth_trainer_step", lambda v: v == 8, timeout=60)
    pause.unlink()
    status = jobs.wait("toy", _finished, "Serving", 600, operator.log)
    recorder.stop.set()
    assert status["phase"] == "Serving", _pod_logs(kube_node, jobs)
    # Pending can pass before the recorder's first look (it lasts until a priors pod runs).
    assert recorder.phases[0] in ("Pending", "GeneratingPriors") and "Training" in recorder.phases
    assert {"GeneratingPriors", "Exporting"} <= set(recorder.phases), recorder.phases
    steps = [p["step"] for p in recorder.progress]
    assert steps and max(steps) >= 8 and recorder.progress[-1]["totalSteps"] == 24
    assert any(
        c["step"] >= 8 and c["uri"].startswith(f"s3://{s3_bucket}/") for c in recorder.checkpoints
    )
    assert status["artifact"]["digest"].startswith("sha256:")
    # The two priors pods split the class images between them.
    priors_logs = "".join(
        kube_node.logs(namespace, pod.metadata.name)
        for pod in jobs.pods("dreambooth.dev/component=priors")
    )
    assert "shard 0 of 2" in priors_logs and "shard 1 of 2" in priors_logs, priors_logs
    # Rank 0's exporter was scraped while it trained (it exits with the pod).
    assert 8 <= prom.value("max_over_time(dreambooth_trainer_step[10m])") <= 24
    prom.wait_for_value('dreambooth_operator_jobs{phase="Serving"}', lambda v: v == 1, timeout=30)
    # A request through the inference pod returns an image.
    inference = wait_until(
        "inference ready",
        lambda: (jobs.status("toy").get("inference") or {}).get("readyReplicas"),
        300,
        operator.log,
    )
    assert inference == 1
    image = _generate(kube_node.host_port(namespace, builders.INFERENCE_PORT))
    assert image[:8] == b"\x89PNG\r\n\x1a\n"
    # A deleted inference Service comes back.
    first = jobs.core.read_namespaced_service("toy-inference", namespace).metadata.uid
    jobs.core.delete_namespaced_service("toy-inference", namespace, _preload_content=False)

    def recreated():
        services = jobs.core.list_namespaced_service(namespace).items
        return any(s.metadata.name == "toy-inference" and s.metadata.uid != first for s in services)

    wait_until("inference Service recreated", recreated, 60, operator.log)
    _assert_evaluated(operator, kube_node, jobs, prom, kubectl, s3_server)
    assert_no_credentials(operator, kube_node, jobs, s3_server, s3_bucket)


def _evaluated(status: dict) -> dict | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == "Evaluated"), None)


def _assert_evaluated(operator, node, jobs, prom, kubectl, s3_server) -> None:
    """The evaluation pod ran beside serving: every score of the trained and the base model in
    status.evaluation, the Evaluated condition, the report in S3 naming the artifact, the
    -o wide column, and the operator's gauges."""
    logs = lambda: _pod_logs(node, jobs) + operator.log()[-3000:]  # noqa: E731
    status = jobs.wait("toy", _evaluated, "Evaluated", 300, logs)
    condition = _evaluated(status)
    assert (condition["status"], condition["reason"]) == ("True", "Succeeded"), condition
    evaluation = status["evaluation"]
    for model in ("trained", "base"):
        assert set(evaluation[model]) == SCORES, evaluation
        assert all(-1 <= evaluation[model][k] <= 2 for k in SCORES), evaluation
    assert evaluation["images"] == 3 * 2  # two prompts and the class prompt, 2 images each
    assert f"DINO {evaluation['trained']['dino']:.3f}" in condition["message"]
    bucket, _, key = evaluation["reportUri"].removeprefix("s3://").partition("/")
    report = json.loads(s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    assert report["artifactDigest"] == status["artifact"]["digest"]
    table = kubectl("get", "dbj", "toy", "-n", jobs.namespace, "-o", "wide").stdout
    assert "EVALUATION" in table.split("\n")[0] and evaluation["summary"] in table, table
    dino = (
        'dreambooth_operator_evaluation_score{dreambooth_job="toy",model="trained",metric="dino"}'
    )
    prom.wait_for_value(dino, lambda v: round(v, 4) == evaluation["trained"]["dino"], 30)


def _running(jobs, job_name: str) -> str | None:
    """Name of the running pod of a batch Job, if any."""
    running = [p for p in jobs.pods(f"job-name={job_name}") if p.status.phase == "Running"]
    return running[0].metadata.name if running else None


def _generate(port: int, **request) -> bytes:
    """POST /v1/images/generations to the inference pod (its port on this machine), with the
    API key; without it the server refuses. `request` adds to or overrides the small default."""
    defaults = {"prompt": PROMPT, "size": "64x64", "response_format": "b64_json"}
    body = json.dumps({**defaults, "num_inference_steps": 4, **request}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/images/generations",
        body,
        {"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=120)
    assert refused.value.code == 401
    request.add_header("Authorization", f"Bearer {API_KEY}")
    with urllib.request.urlopen(request, timeout=120) as response:
        return base64.b64decode(json.loads(response.read())["data"][0]["b64_json"])


def test_killed_rank_restarts_the_gang_which_resumes_from_its_checkpoint(
    operator_factory, kube_node, jobs, namespace, s3_job, tmp_path
):
    operator = operator_factory(namespace)
    pause = pause_training(kube_node, tmp_path, step=8)
    jobs.create(s3_job("toy", training={"maxSteps": 16}))
    status = _kill_rank_1_at_checkpoint_8(operator, kube_node, jobs, "toy", pause)
    assert status["phase"] == "Succeeded", _pod_logs(kube_node, jobs)


def _kill_rank_1_at_checkpoint_8(operator, node, jobs, name: str, pause: Path) -> dict:
    """Kill rank 1 of job `name` (its trainers told to pause after step 8, `pause`), let the
    gang go on, and return the status the job finished with, having checked that the gang
    restarted once and its new rank 0 resumed from checkpoint 8 in S3."""
    # Both ranks wait after step 8 (checkpoint 8 committed and reported) until rank 1 is
    # killed: on any machine the kill lands between checkpoints 8 and 16.
    status = jobs.wait(
        name,
        lambda s: (s.get("checkpoint") or {}).get("step", 0) >= 8,
        "a checkpoint",
        600,
        operator.log,
    )
    assert status["checkpoint"]["step"] == 8
    rank1 = _running(jobs, f"{name}-train-1")
    assert rank1, "rank 1 is not running"
    node.kill(jobs.namespace, rank1, signal.SIGKILL)
    pause.unlink()  # rank 0 goes on, finds rank 1 gone and fails too
    status = jobs.wait(name, _finished, "finished", 600, operator.log)
    assert status.get("restarts") == 1, (status, _pod_logs(node, jobs))
    restarted = max(
        jobs.pods(f"job-name={name}-train-0"), key=lambda p: p.metadata.creation_timestamp
    )
    log = node.logs(jobs.namespace, restarted.metadata.name)
    resumed = re.search(r"resumed from (\S+) at step (\d+)", log)
    assert resumed, log[-3000:]
    assert int(resumed.group(2)) == 8 and resumed.group(1).startswith("s3://")
    return status


# What a user does with a LoRA job's export and diffusers alone (none of this project's code):
# the base model, each adapter loaded onto it in turn, one image each for a fixed seed; the
# base's own image first, which tells whether an adapter shows in the image at all.
PLAIN_DIFFUSERS = """
import sys
import torch
from diffusers import DiffusionPipeline

base, out, prompt, seed, side, steps, guidance, *adapters = sys.argv[1:]
# One thread, as the server's (--cpu-threads 1): the same summation order, the same pixels.
torch.set_num_threads(1)
pipeline = DiffusionPipeline.from_pretrained(base)  # SD or SDXL, as model_index.json says
pipeline.set_progress_bar_config(disable=True)

def image(name):
    generator = torch.Generator("cpu").manual_seed(int(seed))
    pipeline(prompt, width=int(side), height=int(side), num_inference_steps=int(steps),
             guidance_scale=float(guidance), generator=generator).images[0].save(f"{out}/{name}")

image("base.png")
for index, adapter in enumerate(adapters):
    pipeline.load_lora_weights(adapter)
    image(f"adapted-{index}.png")
    pipeline.unload_lora_weights()
assert not [m for m in sys.modules if m.startswith("dreambooth")]
"""


def plain_diffusers_images(
    tmp_path: Path,
    exports: list[Path],
    seed: int,
    side: int,
    steps: int,
    guidance: float,
    base_uri: str = "random://tiny-sd",
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the base's image, each adapter's image) as diffusers alone makes them."""
    # The server built the random base the same way in its own cache (a pure function of code).
    base = random_models.materialize(base_uri, tmp_path / "cache")
    images = tmp_path / "images"
    images.mkdir()
    arguments = [base, images, PROMPT, seed, side, steps, guidance, *exports]
    subprocess.run(
        # -I: no PYTHONPATH; the process checks that it imported none of this project's code.
        [sys.executable, "-I", "-c", PLAIN_DIFFUSERS, *map(str, arguments)],
        check=True,
        timeout=600,
    )
    adapted = [_pixels((images / f"adapted-{i}.png").read_bytes()) for i in range(len(exports))]
    return _pixels((images / "base.png").read_bytes()), adapted


def test_sdxl_lora_job_survives_a_killed_rank_and_serves_the_images_of_its_exported_adapter(
    operator_factory, kube_node, jobs, namespace, s3_job, s3_server, s3_bucket, tmp_path
):
    """A 2-node SDXL LoRA job with its checkpoints in S3 loses rank 1 mid-run, resumes from
    checkpoint 8, exports its adapter and serves it on the base; for a fixed seed the image the
    official openai client gets is, to the last 8-bit level, the one diffusers alone makes from
    the base and the exported adapter. (SD1.x LoRA jobs are served in the test below.)"""
    import openai

    operator = operator_factory(namespace)
    pause = pause_training(kube_node, tmp_path, step=8)
    kube_node.extra_env[API_KEY_ENV] = API_KEY  # as in the serving test above
    # Pods that ask for no GPU see none, as on a real node (here they would inherit the test's
    # devices): the server computes on the CPU in float32, as the plain process below.
    kube_node.extra_env["CUDA_VISIBLE_DEVICES"] = ""
    lora = {"method": "lora", "lora": {"rank": 4, "alpha": 8}, "trainTextEncoder": True}
    training = {**lora, "maxSteps": 16, "learningRate": 1e-3}
    # One CPU makes the server run one torch thread (--cpu-threads 1), as the plain process.
    inference = {"enabled": True, "gpus": 0, "resources": {"limits": {"cpu": "1"}}}
    # An evaluation model that cannot load fails the evaluation only: the job serves anyway.
    missing = "/models/no-such-clip"
    evaluation = {**EVALUATION, "clipUri": missing}
    skipped = {"priorPreservation": {"enabled": False}}
    sdxl = {"baseModel": {"uri": "random://tiny-sdxl"}}
    jobs.create(
        s3_job(
            "lora", training=training, inference=inference, evaluation=evaluation, **skipped, **sdxl
        )
    )
    status = _kill_rank_1_at_checkpoint_8(operator, kube_node, jobs, "lora", pause)
    assert status["phase"] == "Serving", _pod_logs(kube_node, jobs)
    artifact = status["artifact"]
    assert (artifact["kind"], artifact["baseModel"]) == ("lora", "random://tiny-sdxl"), artifact
    wait_until(
        "inference ready",
        lambda: (jobs.status("lora").get("inference") or {}).get("readyReplicas"),
        300,
        lambda: _pod_logs(kube_node, jobs),
    )
    seed, side, steps, guidance = 1234, 64, 4, 5.0
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{kube_node.host_port(namespace, builders.INFERENCE_PORT)}/v1",
        api_key=API_KEY,
        max_retries=0,
        timeout=300,
    )
    result = client.images.generate(
        prompt=PROMPT,
        size=f"{side}x{side}",
        response_format="b64_json",
        extra_body={"seed": seed, "num_inference_steps": steps, "guidance_scale": guidance},
    )
    served = base64.b64decode(result.data[0].b64_json)

    export = _download(s3_server.client(), artifact["uri"], tmp_path / "export")
    assert digest.verify(export) == artifact["digest"]
    base, (adapted,) = plain_diffusers_images(
        tmp_path, [export], seed, side, steps, guidance, sdxl["baseModel"]["uri"]
    )
    assert not np.array_equal(adapted, base)  # the adapter shows
    # The same float32 computation on the same CPU, one thread each: the same pixels exactly.
    np.testing.assert_array_equal(_pixels(served), adapted)
    evaluated = _evaluated(jobs.wait("lora", _evaluated, "Evaluated", 300, operator.log))
    assert (evaluated["status"], evaluated["reason"]) == ("False", "EvaluationFailed"), evaluated
    assert missing in evaluated["message"], evaluated
    warnings = [
        e for e in jobs.core.list_namespaced_event(namespace).items
        if e.reason == "EvaluationFailed" and e.involved_object.name == "lora"
    ]  # fmt: skip
    assert warnings and warnings[0].type == "Warning" and missing in warnings[0].message
    final = jobs.status("lora")
    assert final["phase"] == "Serving" and final["artifact"] == artifact
    assert "evaluation" not in final
    assert_no_credentials(operator, kube_node, jobs, s3_server, s3_bucket)


def _download(client, uri: str, target: Path) -> Path:
    """Every object under an s3:// prefix into `target`, by its key below the prefix."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            path = target / item["Key"].removeprefix(prefix)
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(path))
    return target


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"))


def test_suspended_while_training_keeps_checkpoints_and_resumes_from_the_newest(
    operator_factory, kube_node, jobs, namespace, s3_job, s3_server, s3_bucket, tmp_path
):
    """Suspended while its trainer runs on the node: the pod is deleted as a kubelet would stop
    it (SIGTERM, on which the trainer commits one more checkpoint), every checkpoint stays in
    storage, and the resumed trainer goes on from the newest one, not from step 0."""
    operator = operator_factory(namespace)
    # The trainer waits after step 4 (checkpoint 4 committed) while it is suspended: the
    # SIGTERM lands mid-run on any machine, and the trainer commits step 5 on its way out.
    pause = pause_training(kube_node, tmp_path, step=4)
    training = {"maxSteps": 8, "checkpointing": {"interval": 4, "keep": 2}}
    one_node = {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1}
    no_priors = {"enabled": False}  # a phase this test does not need
    jobs.create(s3_job("toy", training=training, resources=one_node, priorPreservation=no_priors))
    wait_until(
        "training paused after step 4",
        lambda: _paused(kube_node, jobs, "toy-train-0", step=4),
        600,
        operator.log,
    )
    trainer = _running(jobs, "toy-train-0")
    assert trainer and jobs.status("toy")["checkpoint"]["step"] == 4

    jobs.patch("toy", {"spec": {"runPolicy": {"suspend": True}}})
    jobs.wait("toy", lambda s: s.get("phase") == "Suspended", "Suspended", 60, operator.log)
    wait_until(
        "the trainer got SIGTERM",
        lambda: "SIGTERM: saving a checkpoint" in kube_node.logs(namespace, trainer),
        60,
        lambda: _pod_logs(kube_node, jobs),
    )
    pause.unlink()
    wait_until("training pod stopped", lambda: not jobs.pods("job-name=toy-train-0"), 120)
    assert "interrupted: stopped at step 5" in kube_node.logs(namespace, trainer)
    checkpoints = sorted(
        item["Key"].rsplit("/", 2)[-2]
        for item in s3_server.client()
        .list_objects_v2(Bucket=s3_bucket, Prefix="runs/toy/checkpoints/")
        .get("Contents", [])
        if item["Key"].endswith("/manifest.json")
    )
    assert len(checkpoints) == 2 and checkpoints[-1].endswith("5"), checkpoints
    suspended = jobs.status("toy")
    assert suspended["phase"] == "Suspended" and suspended["checkpoint"]["step"] == 5, suspended
    newest = suspended["checkpoint"]["uri"]
    assert newest == f"s3://{s3_bucket}/runs/toy/checkpoints/{checkpoints[-1]}"

    jobs.patch("toy", {"spec": {"runPolicy": {"suspend": False}}})
    status = jobs.wait("toy", _finished, "finished", 600, operator.log)
    assert status["phase"] == "Succeeded", _pod_logs(kube_node, jobs)
    assert status["checkpoint"]["step"] == 8 and status.get("restarts", 0) == 0, status
    (resumed_pod,) = jobs.pods("job-name=toy-train-0")
    log = kube_node.logs(namespace, resumed_pod.metadata.name)
    assert f"resumed from {newest} at step 5" in log, log[-3000:]
    assert_no_credentials(operator, kube_node, jobs, s3_server, s3_bucket)


def test_a_job_recreated_with_another_spec_never_gets_the_old_weights(
    operator_factory, kube_node, jobs, namespace, s3_job
):
    """Deleted and created again under the same name and outputUri (what users do to change a
    fixed field), with another learning rate: the old checkpoints are another spec's, so the
    job fails naming storage.outputUri instead of resuming or exporting them."""
    operator = operator_factory(namespace)
    training = {"maxSteps": 8, "checkpointing": {"interval": 8, "keep": 2}}
    jobs.create(s3_job("toy", training=training))
    status = jobs.wait("toy", _finished, "finished", 600, operator.log)
    assert status["phase"] == "Succeeded" and status["checkpoint"]["step"] == 8, status
    jobs.delete("toy")
    wait_until("toy deleted", lambda: not jobs.custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL)["items"], 120, operator.log)  # fmt: skip

    jobs.create(s3_job("toy", training={**training, "learningRate": 2.5e-4}))
    status = jobs.wait("toy", _finished, "finished", 600, operator.log)
    assert status["phase"] == "Failed", status
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidConfig", (failed, _pod_logs(kube_node, jobs))
    assert f"{env.BAD_INPUT_PREFIX}storage.outputUri: " in failed["message"], failed
    assert "another training than this run's" in failed["message"]
    assert "artifact" not in status and status.get("restarts", 0) == 0
    assert not jobs.batch_jobs("dreambooth.dev/job=toy,dreambooth.dev/component=export")


def test_bad_input_under_torchrun_fails_at_once_naming_the_field(
    operator_factory, kube_node, jobs, namespace, s3_job, s3_bucket
):
    """torchrun exits 1 when a worker exits 2; the trainer's termination message still tells
    the operator that restarting cannot help."""
    operator = operator_factory(namespace)
    spec = {"imagesUri": f"s3://{s3_bucket}/no-such-photos"}
    jobs.create(s3_job("empty", instance=spec, priorPreservation={"enabled": False}))
    status = jobs.wait("empty", lambda s: s.get("phase") == "Failed", "Failed", 300, operator.log)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidConfig", (failed, _pod_logs(kube_node, jobs))
    assert "instance.imagesUri: no images" in failed["message"]
    assert status.get("restarts", 0) == 0


def test_second_job_with_the_same_class_generates_no_class_images(
    operator_factory, kube_node, jobs, namespace, s3_job
):
    """The cache is checked in storage by the second job's own priors pods (no job's status is
    trusted for it): they find the set complete and generate nothing."""
    operator = operator_factory(namespace)
    jobs.create(s3_job("first", training={"maxSteps": 4}))
    jobs.wait("first", _finished, "first finished", 600, operator.log)
    jobs.create(s3_job("second", training={"maxSteps": 4}))
    status = jobs.wait("second", _finished, "second finished", 600, operator.log)
    assert status["phase"] == "Succeeded", _pod_logs(kube_node, jobs)
    pods = jobs.pods("dreambooth.dev/job=second,dreambooth.dev/component=priors")
    assert pods, "the second job ran no priors pods"
    for pod in pods:
        log = kube_node.logs(namespace, pod.metadata.name)
        assert "already complete" in log, log
        assert " of 2" not in log, log  # no shard generated anything


SERVER = "shared"


def _server_document(s3_server, **spec) -> dict:
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "DreamBoothServer",
        "metadata": {"name": SERVER},
        "spec": {
            "baseModel": {"uri": "random://tiny-sd"},
            # One CPU: one torch thread (--cpu-threads 1), as the plain process below.
            "gpus": 0,
            "resources": {"limits": {"cpu": "1"}},
            "s3": {
                "endpoint": s3_server.endpoint_url,
                "region": s3_server.region,
                "credentialsSecret": {"name": SECRET},
            },
            **spec,
        },
    }


def _published_models(client) -> set[str]:
    import openai

    try:
        return {model.id for model in client.models.list()}
    except openai.APIConnectionError:  # the server pod not up yet
        return set()


class ModelWatcher(threading.Thread):
    """When each model first appeared in the server's GET /v1/models (wall-clock time, like
    the API server's condition times)."""

    def __init__(self, client):
        super().__init__(daemon=True)
        self.client = client
        self.first_seen: dict[str, datetime.datetime] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            for model in _published_models(self.client):
                self.first_seen.setdefault(model, datetime.datetime.now(datetime.timezone.utc))


def _inference_ready(status: dict) -> bool:
    conditions = status.get("conditions") or []
    return any(c["type"] == "InferenceReady" and c["status"] == "True" for c in conditions)


def _exported_at(status: dict) -> datetime.datetime:
    """When the job's export succeeded: the pass that set Exported moved it to Serving."""
    exported = next(c for c in status["conditions"] if c["type"] == "Exported")
    return datetime.datetime.fromisoformat(exported["lastTransitionTime"].replace("Z", "+00:00"))


def test_one_server_serves_three_lora_jobs_and_unpublishes_a_deleted_one(
    operator_factory, kube_node, jobs, namespace, s3_job, s3_server, s3_bucket, kube_api, tmp_path
):
    """Three LoRA jobs publish to one DreamBoothServer holding at most two adapters: each is
    served by the official openai client within 30 s of its job reaching Serving, each image is
    (to the last 8-bit level) its adapter's image in plain diffusers, and a deleted job's model
    is gone (404) within 30 s."""
    import openai

    operator = operator_factory(namespace)
    kube_node.extra_env[API_KEY_ENV] = API_KEY
    kube_node.extra_env["CUDA_VISIBLE_DEVICES"] = ""  # as on a node: no GPU asked, none seen
    # As slow as a kubelet's own resync (about a minute): within 30 s, only the operator's
    # annotation of the server's pods can bring them a new publication index.
    kube_node.volume_sync_seconds = 120
    servers = Jobs(kube_api, namespace, SERVER_PLURAL)
    servers.create(_server_document(s3_server, maxLoadedAdapters=2))
    names_ = ["rex", "tom", "kit"]
    skipped = {"priorPreservation": {"enabled": False}, "evaluation": {"enabled": False}}
    port = lambda: kube_node.host_port(namespace, builders.INFERENCE_PORT)  # noqa: E731
    logs = lambda: _pod_logs(kube_node, jobs) + operator.log()[-3000:]  # noqa: E731
    servers.wait(SERVER, lambda s: s.get("readyReplicas"), "a ready replica", 600, logs)
    server_pods = [p.metadata.uid for p in jobs.pods(f"{names.LABEL_SERVER}={SERVER}")]
    assert len(server_pods) == 1
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port()}/v1", api_key=API_KEY, max_retries=0, timeout=300
    )
    seed, side, steps, guidance = 77, 64, 4, 5.0
    served = {}
    watcher = ModelWatcher(client)
    watcher.start()
    for training_seed, name in enumerate(names_):
        # One after another: the test node maps a namespace's container ports to one host
        # port each, so two jobs' trainers in one namespace would collide there.
        training = {"method": "lora", "lora": {"rank": 4, "alpha": 8}, "maxSteps": 4}
        training |= {"learningRate": 1e-2, "seed": training_seed}
        document = s3_job(
            name, training=training, resources={"nodes": 1}, inference={"server": SERVER}, **skipped
        )
        jobs.create(document)
        status = jobs.wait(
            name, lambda s: s.get("phase") in ("Serving", "Failed"), "Serving", 900, logs
        )
        assert status["phase"] == "Serving", status
        model = f"{namespace}/{name}"
        assert status["inference"]["model"] == model
        wait_until(f"{model} listed", lambda model=model: model in watcher.first_seen, 60, logs)
        # Condition times have whole seconds: one more for the rounding.
        delay = (watcher.first_seen[model] - _exported_at(status)).total_seconds()
        assert delay <= 31, f"{model} served {delay:.1f} s after its job reached Serving"
        result = client.images.generate(
            model=model,
            prompt=PROMPT,
            size=f"{side}x{side}",
            response_format="b64_json",
            extra_body={"seed": seed, "num_inference_steps": steps, "guidance_scale": guidance},
        )
        served[name] = _pixels(base64.b64decode(result.data[0].b64_json))
        ready = jobs.wait(name, _inference_ready, "InferenceReady", 60, logs)
        assert ready["inference"]["endpoint"] == f"http://{SERVER}-server.{namespace}.svc"
        served_models = servers.status(SERVER)["models"]
        assert {"name": model, "digest": ready["artifact"]["digest"]} in served_models
    # Three adapters, two kept loaded: the first was evicted and comes back from storage.
    again = client.images.generate(
        model=f"{namespace}/{names_[0]}",
        prompt=PROMPT,
        size=f"{side}x{side}",
        response_format="b64_json",
        extra_body={"seed": seed, "num_inference_steps": steps, "guidance_scale": guidance},
    )
    np.testing.assert_array_equal(_pixels(base64.b64decode(again.data[0].b64_json)), served["rex"])

    exports = [
        _download(s3_server.client(), jobs.status(n)["artifact"]["uri"], tmp_path / "export" / n)
        for n in names_
    ]
    base, adapted = plain_diffusers_images(tmp_path, exports, seed, side, steps, guidance)
    for name, image in zip(names_, adapted, strict=True):
        assert not np.array_equal(image, base), name  # the adapter shows
        np.testing.assert_array_equal(served[name], image, err_msg=name)
    assert len({served[n].tobytes() for n in names_}) == 3  # three subjects, three images

    jobs.delete(names_[0])

    def gone() -> bool:
        try:
            client.images.generate(model=f"{namespace}/{names_[0]}", prompt=PROMPT, size="64x64")
        except openai.NotFoundError as error:
            return error.body is not None
        return False

    watcher.stop.set()
    wait_until("the deleted job's model answers 404", gone, 30, logs)
    # Publishing and unpublishing never restarted the server: its pod re-read the index.
    assert [p.metadata.uid for p in jobs.pods(f"{names.LABEL_SERVER}={SERVER}")] == server_pods
    assert f"{namespace}/{names_[1]}" in _published_models(client)
    assert_no_credentials(operator, kube_node, jobs, s3_server, s3_bucket)
