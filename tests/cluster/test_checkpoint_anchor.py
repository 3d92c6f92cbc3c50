"""The trust anchor of a resume on the real API server: a trainer pod's identity (the job's own
ServiceAccount and Role) records each checkpoint's manifest digest in the job's status, the CRD
keeps it (an unknown status field would be pruned), and a resume reads it back: the genuine
checkpoint resumes, one replaced consistently in storage is refused before anything is loaded."""

from __future__ import annotations

import kubernetes
import pytest

from dreambooth_contract.api import GROUP, PLURAL, VERSION
from dreambooth_contract.trainer_config import ConfigError
from dreambooth_contract.validation import parse_job
from dreambooth_operator import builders, kube
from dreambooth_trainer import progress
from dreambooth_trainer.checkpoint_manager import CheckpointManager
from dreambooth_trainer.storage import LocalStore
from tests.e2e.harness import job_document
from tests.storage.test_checkpoint_anchor import StubTrainer, plant

pytestmark = pytest.mark.cluster


class Report:
    """StatusReport's part, through the real Kubernetes reporter."""

    def __init__(self, reporter: progress.KubernetesReporter):
        self.reporter = reporter
        self.delivered: list[bool] = []

    def announce(self, info, seconds) -> None:
        """What the manager calls on each commit (the loop's `announce_checkpoint`)."""
        self.delivered.append(self.reporter.report_checkpoint(info))


def test_the_jobs_status_anchors_resume(
    dreambooth_crd, control_plane, kubeconfig, kube_api, namespace, tmp_path
):
    document = job_document("dog")
    document["metadata"]["namespace"] = namespace
    admin = kubernetes.client.CustomObjectsApi(kube_api)
    job = parse_job(
        admin.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, document)
    )
    kube.load_config(str(kubeconfig))
    for manifest in builders.shared_objects(job, "{}"):
        kube.create(manifest)
    # What the trainer's pods authenticate as: the job's ServiceAccount, bound to its Role.
    token = control_plane.service_account_token(namespace, builders.pod_service_account(job))
    as_trainer = kubernetes.client.CustomObjectsApi(control_plane.client_for_token(token))

    store = LocalStore(tmp_path / "output")
    anchor = progress.JobStatusAnchor("dog", namespace, api=as_trainer)

    def checkpoint_manager() -> CheckpointManager:
        return CheckpointManager(store, tmp_path / "staging", interval=2, keep=2, anchor=anchor)

    reporter = progress.KubernetesReporter(100, "dog", namespace, api=as_trainer)
    report = Report(reporter)
    ckpt = checkpoint_manager()
    trainer = StubTrainer()
    for step in (2, 4):
        trainer.step = step
        ckpt.save(trainer, report.announce)
    reporter.close()
    assert report.delivered == [True, True]

    recorded = admin.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "dog")
    digest = recorded["status"]["checkpoint"]["manifestDigest"]  # kept by the CRD's schema
    assert digest.startswith("sha256:") and recorded["status"]["checkpoint"]["step"] == 4

    genuine = StubTrainer()
    checkpoint_manager().resume(genuine)
    assert (genuine.step, genuine.loaded) == (4, [4])

    marker = tmp_path / "attacker-code-ran"
    plant(store, tmp_path, 4, marker)
    refused = StubTrainer()
    with pytest.raises(
        ConfigError, match=f"recorded in the status of dreamboothjobs {namespace}/dog"
    ):
        checkpoint_manager().resume(refused)
    assert (refused.step, refused.loaded) == (0, [])
    assert not marker.exists()
