"""Inference schedulers by name: one table for training sample grids, generation, evaluation and the app."""

from __future__ import annotations

from typing import Any

DEFAULT_SCHEDULER = "dpmsolver++"

# name -> (diffusers scheduler class name, extra from_config arguments)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


def make_scheduler(name: str, config: dict):
    """A scheduler of the named kind built from a pipeline's (or the training) scheduler config."""
    import diffusers

    key = str(name).lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    class_name, extra = SCHEDULERS[key]
    return getattr(diffusers, class_name).from_config(config, **extra)


__all__ = ["DEFAULT_SCHEDULER", "SCHEDULERS", "make_scheduler"]
