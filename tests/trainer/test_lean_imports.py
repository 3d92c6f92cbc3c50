"""Each pod's process leaves out the imports no phase of ours uses (lean_imports)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.trainer

# A phase's process as the CLI starts it: logging configured, then the pipeline and a model load.
PHASE = """
import sys
from dreambooth_trainer.cli import configure_logging
configure_logging()
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
print(sorted(m for m in sys.modules if m.split(".")[0] == "bitsandbytes"))
"""


def test_a_phase_does_not_import_bitsandbytes():
    # In a fresh interpreter: this one may have imported it for other tests.
    out = subprocess.run(
        [sys.executable, "-c", PHASE], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def test_eight_bit_adam_still_gets_bitsandbytes():
    from dreambooth_trainer.lean_imports import skip_unused_imports
    from dreambooth_trainer.optim import adamw_8bit

    skip_unused_imports()
    assert adamw_8bit().__module__.startswith("bitsandbytes")
