"""Keep the libraries from importing what no phase of ours uses (seconds in every pod).

diffusers imports bitsandbytes whenever it is installed, for loading models quantized with it
(``BitsAndBytesConfig``), which we never do; importing it costs 2-3 s of CPU on every pod start
(its CPU kernels pull in torch._inductor). Our one use of it, training.use8bitAdam, imports it
itself (optim.py), unaffected by what diffusers believes.
"""

from __future__ import annotations


def skip_unused_imports() -> None:
    """Call before anything imports diffusers' models (diffusers.models, the pipelines)."""
    from diffusers.utils import import_utils

    if not hasattr(import_utils, "_bitsandbytes_available"):
        raise RuntimeError("diffusers.utils.import_utils has no _bitsandbytes_available")
    import_utils._bitsandbytes_available = False
