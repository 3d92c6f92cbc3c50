"""The diffusers scheduler class behind each sampler name (contract sampling.py).

Torch-free (class names, not classes) so that the request schema can list the choices without
importing diffusers.
"""

from __future__ import annotations

from dreambooth_contract.sampling import SCHEDULER_NAMES, SchedulerName

__all__ = ["SCHEDULERS", "SchedulerName"]

# name -> (diffusers class name, config overrides applied on top of the model's own schedule).
SCHEDULERS: dict[str, tuple[str, dict[str, object]]] = {
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}

assert set(SCHEDULERS) == set(SCHEDULER_NAMES), "a class for every sampler name, no other"
