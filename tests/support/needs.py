"""Test honesty: skip locally, fail in CI.

A test that needs something missing (binaries, a GPU, a package) calls ``require``: locally the
test is skipped with the reason; in CI (``CI=true``) it fails, so nothing passes silently.
"""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """True when the environment variable CI is set to a true value (CI=true, CI=1)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def require(condition: object, reason: str) -> None:
    """Skip the calling test (fail it when CI=true) unless ``condition`` is truthy."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_module(name: str, reason: str | None = None):
    """Import and return module ``name``, or skip/fail like ``require``."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        require(False, reason or f"python module {name!r} is not installed ({exc})")
        raise  # unreachable: require() raised
