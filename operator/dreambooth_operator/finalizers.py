"""The operator's finalizer, and releasing it when no operator will run: `release-finalizers`.

kopf puts ``dreambooth.dev/finalizer`` on every DreamBoothJob and DreamBoothServer it watches
(`release-finalizers` releases both). Its per-object daemon needs it: a deleted job stays (with
a deletionTimestamp) until kopf has stopped the job's daemon and removed the finalizer. Nothing
else hangs on it: a job's pods, Jobs, Services and inference Deployment are owner-referenced, so
the garbage collector deletes them with the job (a server's children likewise).

With no operator running (the chart uninstalled, 0 replicas, a namespace no longer watched),
nobody removes the finalizer and ``kubectl delete dbj`` waits forever. `release_until_settled`
removes it from every DreamBoothJob of the given namespaces; the chart runs it as a post-delete
hook (``dreambooth release-finalizers``). An operator that starts again puts it back.

Only the finalizer is touched (other finalizers, the spec, the status and kopf's annotations
stay), under optimistic concurrency (the patch carries the resourceVersion it read), and every
API call has a connect and a read timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

from dreambooth_contract.api import GROUP, PLURAL, VERSION
from dreambooth_contract.server_api import SERVER_PLURAL

from .kube import TIMEOUT

# The name kopf stores its finalizer under: handlers.configure sets
# settings.persistence.finalizer to it (tests/unit/test_release_finalizers.py checks they agree).
FINALIZER = f"{GROUP}/finalizer"
PAGE_SIZE = 250
CONFLICT_RETRIES = 5
# After a pass that released something, wait this long and look again: an operator still
# running (its pod terminating, say) puts the finalizer straight back.
SETTLE_SECONDS = 2.0


class FinalizerKeptComingBack(Exception):
    """Another pass still found the finalizer on jobs: an operator still watches them."""


def _key(job: dict[str, Any], plural: str = PLURAL) -> str:
    """namespace/name of a job; dreamboothservers/namespace/name of a server."""
    meta = job["metadata"]
    key = f"{meta['namespace']}/{meta['name']}"
    return key if plural == PLURAL else f"{plural}/{key}"


def list_jobs(
    custom: Any, namespaces: Iterable[str] | None, plural: str = PLURAL
) -> Iterator[dict[str, Any]]:
    """Every DreamBoothJob (or, by `plural`, DreamBoothServer) of ``namespaces`` (all
    namespaces when None), page by page.

    No CRD (404) means no jobs.
    """
    scopes: Iterable[str | None] = [None] if namespaces is None else namespaces
    for namespace in scopes:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": PAGE_SIZE, "_request_timeout": TIMEOUT}
            if token:
                kwargs["_continue"] = token
            try:
                if namespace is None:
                    page = custom.list_cluster_custom_object(GROUP, VERSION, plural, **kwargs)
                else:
                    page = custom.list_namespaced_custom_object(
                        GROUP, VERSION, namespace, plural, **kwargs
                    )
            except ApiException as error:
                if error.status == 404:
                    return
                raise
            yield from page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break


def release_one(
    custom: Any, job: dict[str, Any], *, dry_run: bool = False, plural: str = PLURAL
) -> bool:
    """Remove the finalizer from one job (as read in ``job``); True if it was there.

    A conflict (the job changed since it was read) reads it again and retries; a job that is
    gone (404) needs nothing.
    """
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    for _ in range(CONFLICT_RETRIES):
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers:
            return False
        if dry_run:
            return True
        rest = [f for f in finalizers if f != FINALIZER]
        patch = {
            "metadata": {"finalizers": rest or None, "resourceVersion": meta["resourceVersion"]}
        }
        try:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, patch, _request_timeout=TIMEOUT
            )
            return True
        except ApiException as error:
            if error.status == 404:
                return False
            if error.status != 409:
                raise
        try:
            meta = custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, _request_timeout=TIMEOUT
            )["metadata"]
        except ApiException as error:
            if error.status == 404:
                return False
            raise
    raise RuntimeError(f"{namespace}/{name}: still conflicting after {CONFLICT_RETRIES} tries")


def release_pass(
    custom: Any, namespaces: Iterable[str] | None, *, dry_run: bool = False
) -> list[str]:
    """One pass over every job and server: the key (`_key`) of each released one."""
    return [
        _key(item, plural)
        for plural in (PLURAL, SERVER_PLURAL)
        for item in list_jobs(custom, namespaces, plural)
        if release_one(custom, item, dry_run=dry_run, plural=plural)
    ]


def release_until_settled(
    custom: Any,
    namespaces: Iterable[str] | None,
    *,
    timeout: float = 120.0,
    dry_run: bool = False,
    settle: float | None = None,
    report: Callable[[str], None] = lambda key: None,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> list[str]:
    """Release the finalizer everywhere, then look again until a pass finds none.

    A pass that released nothing ends it; one that did is followed, ``settle`` seconds later,
    by another, so a finalizer put back by an operator still shutting down is released again.
    Raises `FinalizerKeptComingBack` once ``timeout`` seconds pass with it still coming back.
    Returns every ``namespace/name`` released (once each), calling ``report`` as it goes.
    """
    settle = SETTLE_SECONDS if settle is None else settle
    clock, sleep = clock or time.monotonic, sleep or time.sleep
    namespaces = None if namespaces is None else list(namespaces)
    deadline = clock() + timeout
    released: list[str] = []
    while True:
        found = release_pass(custom, namespaces, dry_run=dry_run)
        for key in found:
            report(key)
            if key not in released:
                released.append(key)
        if not found or dry_run:
            return released
        if clock() + settle > deadline:
            raise FinalizerKeptComingBack(
                f"{FINALIZER} was put back on {', '.join(found)} within {settle:g}s, for "
                f"{timeout:g}s: an operator still runs and watches these jobs. Stop it first "
                "(scale its Deployment to 0), then run this again."
            )
        sleep(settle)
