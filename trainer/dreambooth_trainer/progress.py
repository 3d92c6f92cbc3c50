"""How rank 0 tells the operator where training is: ``status.progress`` and ``status.checkpoint``;
and how it reads ``status.checkpoint`` back, the trust anchor of a resume (``anchor_from_env``).

The promise to users (``kubectl get dbj``) and the operator: rank 0 reports step, loss,
throughput and the latest committed checkpoint at least every 30 s. The trainer calls
``report()`` every optimizer step and ``report_checkpoint()`` after every commit; the reporter
sends at most every ``min_interval`` seconds, and always for a checkpoint and on ``close()``.
Reporting never raises into the training loop: failures are logged and training goes on.

``status.checkpoint`` carries the sha256 of the checkpoint's manifest (``manifestDigest``). Anyone
who may write the job's storage may also rewrite a checkpoint and its manifest consistently, but
not the job's status; so under the operator a resume trusts only the checkpoint recorded there,
and only while its manifest still has the recorded digest (checkpoint_manager.py). The Kubernetes
reporter therefore waits until a checkpoint's report has arrived (or was given up) before
training goes on: a checkpoint the status does not name is one no resume will use.

Field names come from the contract's API models (``Progress``, ``CheckpointStatus``), so the
trainer and the CRD cannot drift apart.

Environment (set by the operator on training pods; ``reporter_from_env`` reads it):

- ``DBJ_NAME``: the DreamBoothJob to patch; set means "report to Kubernetes".
- ``DBJ_NAMESPACE``: its namespace (default: the pod's service-account namespace).
- ``DBJ_PROGRESS_FILE``: without ``DBJ_NAME``, write the status as JSON to this file (local runs).
- ``DBJ_PROGRESS_INTERVAL``: seconds between progress reports (default 10, at most 30).
- ``KUBECONFIG``: used when not running in a pod with a service account (tests, local processes).

The Kubernetes reporter needs RBAC ``patch`` on ``dreamboothjobs/status`` for that one job, the
anchor ``get`` (both granted by the job's Role).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from dreambooth_contract.api import (
    GROUP,
    PLURAL,
    VERSION,
    ArtifactStatus,
    CheckpointStatus,
    EvaluationStatus,
    Progress,
)
from dreambooth_contract.env import JOB_NAME_ENV, JOB_NAMESPACE_ENV

from .checkpoint_files import CheckpointInfo
from .storage import LocalStore

log = logging.getLogger(__name__)

ENV_FILE = "DBJ_PROGRESS_FILE"
ENV_INTERVAL = "DBJ_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0
MAX_INTERVAL = 30.0  # the promise above
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
MERGE_PATCH = "application/merge-patch+json"
RETRY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
# The artifact report is the only way the operator learns what to serve: tried for about a
# minute (backoff 1 s, 2 s, ... 9 s), then the export fails and its pod is restarted.
MUST_DELIVER_RETRIES = 10

Patch = dict[str, Any]


LOSS_DIGITS = 4
# status.progress.activity, what `kubectl get dbj` shows a job doing. Before the first step a
# training pod loads the model and encodes the caches, which can take minutes at step 0.
LOADING_MODEL = "loading the base model"
PREPARING_DATA = "preparing the data"
TRAINING = "training"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def progress_model(
    step: int,
    total_steps: int,
    *,
    loss: float | None,
    images_per_second: float | None,
    steps_per_second: float | None,
    now: datetime,
) -> Progress:
    """The ``status.progress`` value; ETA from the measured step rate.

    The loss is kept to LOSS_DIGITS significant digits: `kubectl get` prints a number column
    as stored, and 1.6682686805725098 says no more than 1.668 does."""
    eta = None
    if steps_per_second and steps_per_second > 0:
        eta = int(max(0, total_steps - step) / steps_per_second)
    return Progress(
        step=step,
        total_steps=total_steps,
        loss=None if loss is None else float(f"{loss:.{LOSS_DIGITS}g}"),
        images_per_second=images_per_second,
        eta_seconds=eta,
        activity=TRAINING,
        summary=f"{step}/{total_steps}",
        updated_at=now,
    )


def checkpoint_model(info: CheckpointInfo) -> CheckpointStatus:
    """The ``status.checkpoint`` value of a committed checkpoint."""
    return CheckpointStatus(
        step=info.step, uri=info.uri, time=info.created, manifest_digest=info.manifest_digest
    )


def status_patch(
    progress: Progress | None = None,
    checkpoint: CheckpointStatus | None = None,
    artifact: ArtifactStatus | None = None,
    evaluation: EvaluationStatus | None = None,
) -> Patch:
    """A JSON merge patch ``{"status": {...}}`` in the CRD's camelCase wire format."""
    parts = {
        "progress": progress,
        "checkpoint": checkpoint,
        "artifact": artifact,
        "evaluation": evaluation,
    }
    status: Patch = {
        key: value.model_dump(mode="json", by_alias=True, exclude_none=True)
        for key, value in parts.items()
        if value is not None
    }
    return {"status": status}


class ProgressReporter:
    """Rate limiting and payloads; subclasses deliver patches in ``_send``.

    ``clock`` (monotonic seconds) and ``wallclock`` (timestamps) are injectable for tests.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        min_interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = utcnow,
    ):
        self.total_steps = total_steps
        self.min_interval = min(min_interval, MAX_INTERVAL)
        self._clock = clock
        self._wallclock = wallclock
        self._last_sent: float | None = None
        self._announced = False  # an activity shown since the last progress sent
        self._first: tuple[float, int] | None = None  # (time, step) of the first report
        self._latest: Progress | None = None

    def report(
        self,
        step: int,
        *,
        loss: float | None = None,
        images_per_second: float | None = None,
        force: bool = False,
    ) -> bool:
        """Record progress at ``step``; send it if ``min_interval`` passed (or ``force``).

        Returns whether a patch was sent, so callers can log alongside.
        """
        now = self._clock()
        self._latest = progress_model(
            step,
            self.total_steps,
            loss=loss,
            images_per_second=images_per_second,
            steps_per_second=self._step_rate(now, step),
            now=self._wallclock(),
        )
        # After an announced activity the first report goes out at once: the activity turns to
        # training the moment the steps start, not up to min_interval later.
        due = self._last_sent is None or now - self._last_sent >= self.min_interval
        if not (force or due or self._announced):
            return False
        self._announced = False
        self._deliver(status_patch(self._latest), now)
        return True

    def announce(self, activity: str) -> None:
        """Say what the trainer is doing now, at once; the rest of status.progress (a resumed
        job's step) stays as it is: a merge patch of the one field."""
        self._announced = True
        self._deliver({"status": {"progress": {"activity": activity}}}, self._clock())

    def report_checkpoint(self, info: CheckpointInfo) -> bool:
        """Always sent at once, with the latest progress (the operator shows both together).

        Returns whether it arrived, as far as this reporter can tell (failures are logged).
        """
        return self._deliver(status_patch(self._latest, checkpoint_model(info)), self._clock())

    def report_artifact(self, artifact: ArtifactStatus) -> None:
        """The export (a pipeline, or a LoRA adapter and its base); the operator serves exactly
        this digest."""
        self._deliver(status_patch(artifact=artifact), self._clock())

    def report_evaluation(self, evaluation: EvaluationStatus) -> None:
        """The scores of the export and of the base model (status.evaluation)."""
        self._deliver(status_patch(evaluation=evaluation), self._clock())

    def close(self) -> None:
        """Send the final progress, whatever the rate limit, and release resources."""
        if self._latest is not None:
            self._deliver(status_patch(self._latest), self._clock())

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _step_rate(self, now: float, step: int) -> float | None:
        if self._first is None:
            self._first = (now, step)
            return None
        elapsed = now - self._first[0]
        return (step - self._first[1]) / elapsed if elapsed > 0 else None

    def _deliver(self, patch: Patch, now: float) -> bool:
        self._last_sent = now
        try:
            self._send(patch)
        except Exception:  # noqa: BLE001 - reporting must never stop training
            log.warning("progress report failed", exc_info=True)
            return False
        return True

    def _send(self, patch: Patch) -> None:
        raise NotImplementedError


class ReportNotDelivered(RuntimeError):
    """A report the run cannot succeed without (the exported artifact) did not reach the job."""


class NullReporter(ProgressReporter):
    """Ranks other than 0, and runs nobody watches."""

    def _send(self, patch: Patch) -> None:
        pass


class LocalReporter(ProgressReporter):
    """``dreambooth run``: the status as JSON in a file (replaced atomically) and a log line.

    Like the job's status, the file outlives a run: a restarted one merges its reports into
    what is there (the last checkpoint recorded stays until a newer one is)."""

    def __init__(self, total_steps: int, path: Path | str | None = None, **kwargs: Any):
        super().__init__(total_steps, **kwargs)
        self.path = Path(path) if path else None
        self._status: Patch = self._previous()

    def _previous(self) -> Patch:
        try:
            previous = json.loads(self.path.read_text()) if self.path else {}
        except (OSError, ValueError):
            return {}
        return previous if isinstance(previous, dict) else {}

    def _send(self, patch: Patch) -> None:
        # A JSON merge patch, as the API server applies it to the job's status.
        for key, value in patch["status"].items():
            previous = self._status.get(key)
            self._status[key] = {**previous, **value} if isinstance(previous, dict) else value
        progress = self._status.get("progress", {})
        log.info(
            "step %s loss %s images/s %s eta %ss",
            progress.get("summary"),
            progress.get("loss"),
            progress.get("imagesPerSecond"),
            progress.get("etaSeconds"),
        )
        if self.path is not None:
            store = LocalStore(self.path.parent)
            store.write_bytes(self.path.name, json.dumps(self._status, indent=1).encode())


class KubernetesReporter(ProgressReporter):
    """Merge-patches the DreamBoothJob's ``status`` subresource from a background thread.

    The training loop only hands over the newest patch; a daemon thread sends it, retrying on
    409/429/5xx, so a slow or unreachable API server costs the loop nothing. Pending patches
    merge (a checkpoint is not lost behind a newer progress report).
    """

    def __init__(
        self,
        total_steps: int,
        name: str,
        namespace: str,
        *,
        api: Any = None,
        retries: int = 3,
        backoff: float = 1.0,
        request_timeout: float = 10.0,
        **kwargs: Any,
    ):
        super().__init__(total_steps, **kwargs)
        self.name = name
        self.namespace = namespace
        self._api = api if api is not None else _custom_objects_api()
        self._retries = retries
        self._backoff = backoff
        self._timeout = request_timeout
        self._pending: Patch | None = None
        self._delivered = True  # the last patch sent arrived
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="progress-reporter", daemon=True)
        self._thread.start()

    def _send(self, patch: Patch) -> None:
        with self._cond:
            pending = self._pending["status"] if self._pending else {}
            self._pending = {"status": {**pending, **patch["status"]}}
            self._cond.notify()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every handed-over patch was sent (or given up); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout)

    def report_checkpoint(self, info: CheckpointInfo) -> bool:
        """Sent and confirmed before returning, unlike progress: a resume trusts only the
        checkpoint the status names (module docstring). One that cannot be recorded is logged,
        not raised: training goes on, and a resume falls back to the last one recorded."""
        super().report_checkpoint(info)
        delivered = self._confirm()
        if not delivered:
            log.warning(
                "checkpoint %s is not recorded in the status of %s %s/%s: a resume will not "
                "trust it, and takes the last recorded one",
                info.uri,
                PLURAL,
                self.namespace,
                self.name,
            )
        return delivered

    def report_artifact(self, artifact: ArtifactStatus) -> None:
        """Sent and confirmed before returning, unlike progress: the operator has no other way
        to learn what to serve, so an artifact that cannot be recorded fails the export (its pod
        is restarted) instead of leaving the job waiting for a patch that never came."""
        super().report_artifact(artifact)
        self._must_have_arrived("the artifact")

    def report_evaluation(self, evaluation: EvaluationStatus) -> None:
        """Sent and confirmed before returning, like the artifact: the evaluation pod's only
        result; one that cannot be recorded fails the pod, and the operator says so."""
        super().report_evaluation(evaluation)
        self._must_have_arrived("the evaluation")

    def _must_have_arrived(self, what: str) -> None:
        if not self._confirm():
            raise ReportNotDelivered(
                f"could not record {what} in the status of {PLURAL} "
                f"{self.namespace}/{self.name} (see the warning above)"
            )

    def _confirm(self) -> bool:
        """Whether everything handed over so far arrived."""
        # Longer than every try with its timeout and backoff could take.
        retrying = self._retries * (self._timeout + self._backoff * self._retries)
        return self.flush(retrying) and self._delivered

    def close(self, timeout: float = 30.0) -> None:
        super().close()
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=1)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                patch, self._pending, self._busy = self._pending, None, True
            delivered = False
            try:
                delivered = self._patch_with_retries(patch)
            finally:
                with self._cond:
                    self._busy, self._delivered = False, delivered
                    self._cond.notify_all()

    def _patch_with_retries(self, patch: Patch) -> bool:
        """Whether the patch arrived (failures are logged)."""
        for attempt in range(1, self._retries + 1):
            try:
                self._patch(patch)
                return True
            except Exception as exc:  # noqa: BLE001 - logged; training goes on
                status = getattr(exc, "status", None)  # None: no HTTP answer (network)
                retryable = status is None or status in RETRY_STATUSES
                if not retryable or attempt == self._retries:
                    log.warning(
                        "could not patch status of %s %s/%s (attempt %d): %s",
                        PLURAL,
                        self.namespace,
                        self.name,
                        attempt,
                        getattr(exc, "reason", None) or exc,
                    )
                    return False
                time.sleep(self._backoff * attempt)
        return False

    def _patch(self, patch: Patch) -> None:
        self._api.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            self.name,
            patch,
            _content_type=MERGE_PATCH,
            _request_timeout=self._timeout,
        )


# -- the trust anchor: status.checkpoint, read back --------------------------------------------


class AnchorUnavailable(RuntimeError):
    """The job's recorded checkpoint could not be read, so nothing in storage can be trusted yet
    (a restart tries again)."""


class CheckpointAnchor(Protocol):
    """Where the checkpoint a job committed last is recorded, out of reach of storage writers."""

    def recorded_checkpoint(self, attempts: int | None = None) -> CheckpointStatus | None:
        """The recorded checkpoint, None if none is; AnchorUnavailable if it cannot be read."""
        ...

    def describe(self) -> str:
        """Where it is recorded, for messages."""
        ...


class JobStatusAnchor:
    """``status.checkpoint`` of the DreamBoothJob, read from the API server (RBAC ``get`` on the
    job's status). Only the trainer's own pods, and those granted the status subresource, may
    write it; holding the storage credentials is not enough."""

    def __init__(
        self,
        name: str,
        namespace: str | None,
        *,
        api: Any = None,
        retries: int = MUST_DELIVER_RETRIES,
        backoff: float = 1.0,
        request_timeout: float = 10.0,
    ):
        self.name = name
        self.namespace = namespace
        self._api = api
        self._retries = retries
        self._backoff = backoff
        self._timeout = request_timeout

    def describe(self) -> str:
        return f"the status of {PLURAL} {self.namespace}/{self.name}"

    def recorded_checkpoint(self, attempts: int | None = None) -> CheckpointStatus | None:
        status = self._read(attempts or self._retries).get("status") or {}
        value = status.get("checkpoint")
        if not value:
            return None
        try:
            return CheckpointStatus.model_validate(value)
        except ValidationError as exc:
            raise AnchorUnavailable(f"{self.describe()}: invalid checkpoint {value!r}") from exc

    def _read(self, attempts: int) -> dict[str, Any]:
        """The job, from its status subresource; retried like the reporter's patches."""
        if not self.namespace:
            raise AnchorUnavailable(f"{JOB_NAMESPACE_ENV} unset and no service-account namespace")
        try:
            if self._api is None:
                self._api = _custom_objects_api()
        except Exception as exc:  # noqa: BLE001 - any setup failure means: cannot verify
            raise AnchorUnavailable(f"cannot read {self.describe()}: {exc}") from exc
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._api.get_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    self.name,
                    _request_timeout=self._timeout,
                )
            except Exception as exc:  # noqa: BLE001 - retried, then raised as unavailable
                status = getattr(exc, "status", None)  # None: no HTTP answer (network)
                retryable = status is None or status in RETRY_STATUSES
                if not retryable or attempt >= attempts:
                    reason = getattr(exc, "reason", None) or exc
                    raise AnchorUnavailable(
                        f"cannot read {self.describe()} (attempt {attempt}): {reason}"
                    ) from exc
                time.sleep(self._backoff * attempt)


def anchor_from_env() -> CheckpointAnchor | None:
    """The job's status under the operator (``DBJ_NAME`` set); None for local runs, whose
    storage is the user's own disk or bucket and trusted as it is."""
    name = os.environ.get(JOB_NAME_ENV)
    return JobStatusAnchor(name, _namespace_from_env()) if name else None


def _custom_objects_api() -> Any:
    """CustomObjectsApi with the pod's service account, else KUBECONFIG (local "pods")."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    return client.CustomObjectsApi(client.ApiClient(configuration))


def _namespace_from_env() -> str | None:
    if os.environ.get(JOB_NAMESPACE_ENV):
        return os.environ[JOB_NAMESPACE_ENV]
    try:
        return SA_NAMESPACE_FILE.read_text().strip() or None
    except OSError:
        return None


def reporter_from_env(
    total_steps: int, rank: int = 0, *, must_deliver: bool = False, **kwargs: Any
) -> ProgressReporter:
    """The reporter this process should use: see the module docstring for the variables.

    Any rank but 0 gets a NullReporter; so does a Kubernetes reporter that cannot be set up
    (logged): a missing reporter must not fail the training run. With `must_deliver` (the
    export, whose artifact report the job cannot do without) it raises instead, and the
    Kubernetes reporter retries for longer.
    """
    if rank != 0:
        return NullReporter(total_steps)
    kwargs.setdefault("min_interval", float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL)))
    name = os.environ.get(JOB_NAME_ENV)
    if name:
        namespace = _namespace_from_env()
        try:
            if not namespace:
                raise RuntimeError(f"{JOB_NAMESPACE_ENV} unset and no service-account namespace")
            if must_deliver:
                kwargs.setdefault("retries", MUST_DELIVER_RETRIES)
            return KubernetesReporter(total_steps, name, namespace, **kwargs)
        except Exception as exc:  # noqa: BLE001 - training runs on without status updates
            if must_deliver:
                raise
            log.warning("progress reporting to Kubernetes disabled: %s", exc)
            return NullReporter(total_steps, **kwargs)
    if os.environ.get(ENV_FILE):
        return LocalReporter(total_steps, os.environ[ENV_FILE], **kwargs)
    return NullReporter(total_steps, **kwargs)
