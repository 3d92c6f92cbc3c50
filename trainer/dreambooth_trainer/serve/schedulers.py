"""Sampler names a request may pick, and the diffusers scheduler class behind each.

Torch-free (class names, not classes) so that the request schema can list the choices without
importing diffusers. Names follow the usual UI vocabulary (A1111, ComfyUI); LMS is left out
because it needs scipy, which the serving image does not ship.
"""

from __future__ import annotations

from typing import Literal, get_args

SchedulerName = Literal[
    "pndm",
    "ddim",
    "ddpm",
    "euler",
    "euler_ancestral",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
    "deis",
]

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

assert set(SCHEDULERS) == set(get_args(SchedulerName)), "keep the Literal and the table in sync"
