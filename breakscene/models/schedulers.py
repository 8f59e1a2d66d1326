"""Samplers by name: a small registry of diffusers schedulers.

A name maps to a diffusers scheduler class; every sampler is built ``from_config`` of the
base model's own scheduler config (its betas and timestep settings), as diffusers' docs
swap schedulers. Kept free of a diffusers import at module level so that configs can name
samplers cheaply.
"""
from __future__ import annotations

from typing import Literal, get_args

SamplerName = Literal["dpm++", "ddim", "ddpm", "euler", "euler-a", "pndm", "unipc"]

SCHEDULERS: dict[str, str] = {
    "dpm++": "DPMSolverMultistepScheduler",  # DPM-Solver++ (2M): 20 steps do what DDIM needs 50 for
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
assert tuple(SCHEDULERS) == get_args(SamplerName)


def make_scheduler(name: str, base_config):
    """A ``name`` scheduler configured from ``base_config`` (a scheduler's ``.config``)."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base_config)


def sampler_name(scheduler) -> str | None:
    """The registry name of a scheduler instance (None for a class outside the registry)."""
    return next((n for n, cls in SCHEDULERS.items() if type(scheduler).__name__ == cls), None)
