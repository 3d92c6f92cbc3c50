"""Sampler names an inference server accepts, in a request and as a server's default.

Written once here: the server's request schema (trainer) and the DreamBoothServer spec
(operator, CRD) both take these values; the trainer maps each to a diffusers scheduler class.
Names follow the usual UI vocabulary (A1111, ComfyUI); LMS is left out because it needs scipy,
which the serving image does not ship.
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

SCHEDULER_NAMES: tuple[str, ...] = get_args(SchedulerName)

# A request's classifier-free guidance may not exceed this (the server's limit and the spec's).
MAX_GUIDANCE_SCALE = 30.0
