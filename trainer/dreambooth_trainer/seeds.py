"""Reproducible seeds for independent random streams (data order, crops, noise, per rank)."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *purpose: object) -> int:
    """A 60-bit seed from the run's seed and what it is for: streams never share numbers."""
    text = "/".join(str(part) for part in (seed, *purpose))
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)
