"""The one module that talks to the API server (kopf's watches aside).

Every call is idempotent: a create that finds the object (409) succeeds, a delete that finds
nothing (404) succeeds. Callers retry by reconciling again, never by looping here; a manifest
the API server refuses as invalid raises `Rejected`, which no retry would cure. Every call has a
connect and a read timeout: a half-open connection fails the pass instead of hanging it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from dreambooth_contract import api

log = logging.getLogger(__name__)

_FOREGROUND = client.V1DeleteOptions(propagation_policy="Foreground")
# (connect, read) seconds. The API server answers a healthy request in well under a second;
# the read timeout leaves room for a loaded one (urllib3 retries a timed-out GET 3 times).
TIMEOUT = (10.0, 30.0)


class Rejected(Exception):
    """The API server refused a manifest as invalid (400/422): retrying cannot help."""

    def __init__(self, manifest: dict[str, Any], error: ApiException):
        meta = manifest["metadata"]
        try:
            reason = json.loads(error.body)["message"]
        except (TypeError, ValueError, KeyError):
            reason = error.reason
        super().__init__(f"the API server refused {manifest['kind']} {meta['name']}: {reason}")


class OwnedByAnother(Exception):
    """The name is taken by an object another owner controls (typically a deleted job's child
    that the garbage collector has yet to remove): not ours to use; retry later."""


def _refusing_invalid(manifest: dict[str, Any], error: ApiException) -> None:
    if error.status in (400, 422):
        raise Rejected(manifest, error) from error


def load_config(kubeconfig: str | None = None) -> None:
    """In-cluster service account when running in a pod, else the kubeconfig."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig)


# The kinds the operator makes: the client's API class and the name its methods share
# (create_namespaced_job, read_namespaced_job, ...).
_KINDS = {
    "ConfigMap": (client.CoreV1Api, "namespaced_config_map"),
    "Service": (client.CoreV1Api, "namespaced_service"),
    "ServiceAccount": (client.CoreV1Api, "namespaced_service_account"),
    "Job": (client.BatchV1Api, "namespaced_job"),
    "Role": (client.RbacAuthorizationV1Api, "namespaced_role"),
    "RoleBinding": (client.RbacAuthorizationV1Api, "namespaced_role_binding"),
    "Deployment": (client.AppsV1Api, "namespaced_deployment"),
}


def _method(verb: str, kind: str) -> Callable[..., Any]:
    """The client's `verb` (create, read, replace, delete) for objects of `kind`."""
    api, name = _KINDS[kind]
    return getattr(api(), f"{verb}_{name}")


def _controller_uid(meta: dict[str, Any]) -> str | None:
    refs = meta.get("ownerReferences") or []
    return next((r.get("uid") for r in refs if r.get("controller")), None)


def _check_same_controller(manifest: dict[str, Any]) -> None:
    """After a 409: the existing object must have the controller the manifest names."""
    meta = manifest["metadata"]
    wanted = _controller_uid(meta)
    if wanted is None:
        return
    name, namespace = meta["name"], meta["namespace"]
    read = _method("read", manifest["kind"])
    # As JSON, so that its ownerReferences read exactly like the manifest's.
    raw = read(name, namespace, _preload_content=False, _request_timeout=TIMEOUT)
    found = _controller_uid(json.loads(raw.data)["metadata"])
    if found != wanted:
        raise OwnedByAnother(
            f"{manifest['kind']} {namespace}/{name} exists with controller "
            f"{found or 'none'}, not {wanted}"
        )


def create(manifest: dict[str, Any]) -> bool:
    """Create; False if it already existed, under the same controller (else OwnedByAnother)."""
    namespace = manifest["metadata"]["namespace"]
    try:
        _method("create", manifest["kind"])(namespace, manifest, _request_timeout=TIMEOUT)
    except ApiException as error:
        if error.status == 409:
            _check_same_controller(manifest)
            return False
        _refusing_invalid(manifest, error)
        raise
    log.info("created %s %s/%s", manifest["kind"], namespace, manifest["metadata"]["name"])
    return True


def delete(kind: str, namespace: str, name: str) -> bool:
    """Delete with foreground propagation (the object stays until its pods are gone)."""
    try:
        # The response is not needed, and not parsed: a Service's delete answers with a Status
        # that this client would try (and fail) to read as a Service.
        _method("delete", kind)(
            name, namespace, body=_FOREGROUND, _preload_content=False, _request_timeout=TIMEOUT
        )
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    log.info("deleting %s %s/%s", kind, namespace, name)
    return True


def replace(manifest: dict[str, Any]) -> None:
    """Make the existing object exactly the manifest (the operator replaces Deployments).

    A replace, not a strategic-merge patch: a patch keeps map keys it does not mention, so a
    limit taken out of the spec (inference.gpus 1 -> 0) would stay on the live object.
    """
    meta = manifest["metadata"]
    replace_object = _method("replace", manifest["kind"])
    try:
        replace_object(meta["name"], meta["namespace"], manifest, _request_timeout=TIMEOUT)
    except ApiException as error:
        _refusing_invalid(manifest, error)
        raise


def patch_job_status(
    namespace: str, name: str, status: dict[str, Any], plural: str = api.PLURAL
) -> None:
    """Merge-patch the status subresource of a DreamBoothJob (or, by `plural`, of a
    DreamBoothServer); 404 means it is already gone."""
    try:
        client.CustomObjectsApi().patch_namespaced_custom_object_status(
            api.GROUP,
            api.VERSION,
            namespace,
            plural,
            name,
            {"status": status},
            _request_timeout=TIMEOUT,
        )
    except ApiException as error:
        if error.status != 404:
            raise


def read_job(namespace: str, name: str, plural: str = api.PLURAL) -> dict[str, Any] | None:
    """The DreamBoothJob (or, by `plural`, DreamBoothServer) as the API server has it now;
    None if it is gone."""
    try:
        return client.CustomObjectsApi().get_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, plural, name, _request_timeout=TIMEOUT
        )
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def patch_job_annotations(namespace: str, name: str, annotations: dict[str, str]) -> None:
    client.CustomObjectsApi().patch_namespaced_custom_object(
        api.GROUP,
        api.VERSION,
        namespace,
        api.PLURAL,
        name,
        {"metadata": {"annotations": annotations}},
        _request_timeout=TIMEOUT,
    )


def delete_job(namespace: str, name: str) -> None:
    try:
        client.CustomObjectsApi().delete_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, _request_timeout=TIMEOUT
        )
    except ApiException as error:
        if error.status != 404:
            raise


def post_event(document: dict[str, Any], event_type: str, reason: str, message: str) -> None:
    """An event about the DreamBoothJob, posted by kopf's poster (batched, in the background)."""
    kopf.event(document, type=event_type, reason=reason, message=message)


def annotate_pods(namespace: str, selector: dict[str, str], annotations: dict[str, str]) -> int:
    """Merge `annotations` into every pod matching `selector`; how many were patched. A pod
    gone meanwhile (404) is skipped."""
    core = client.CoreV1Api()
    label_selector = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
    pods = core.list_namespaced_pod(
        namespace, label_selector=label_selector, _request_timeout=TIMEOUT
    ).items
    patched = 0
    for pod in pods:
        try:
            core.patch_namespaced_pod(
                pod.metadata.name,
                namespace,
                {"metadata": {"annotations": annotations}},
                _request_timeout=TIMEOUT,
            )
            patched += 1
        except ApiException as error:
            if error.status != 404:
                raise
    return patched
