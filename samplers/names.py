"""The core's solvers by name, importable without torch or diffusers (the CLI's ``--help`` and
its argument checks read them before any model stack loads)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["MIRRORS", "SAMPLERS", "SAMPLER_NAMES", "SCHEDULER_SAMPLER", "SamplerSpec"]


@dataclass(frozen=True)
class SamplerSpec:
    """A solver of the core: its update and the stock scheduler whose levels it visits (by its
    diffusers class name, imported when a run needs it)."""

    name: str
    scheduler_name: str | None
    update: str  # "first_order" or "dpmpp_2m"
    eta: float
    description: str

    def scheduler(self) -> type:
        """The diffusers scheduler class whose levels this solver visits."""
        return getattr(importlib.import_module("diffusers"), self.scheduler_name)


SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("ddim", "DDIMScheduler", "first_order", 0.0, "DDIM (eta selectable), levels of DDIMScheduler"),
    SamplerSpec("euler", "EulerDiscreteScheduler", "first_order", 0.0, "Euler, levels of EulerDiscreteScheduler"),
    SamplerSpec("euler_ancestral", "EulerAncestralDiscreteScheduler", "first_order", 1.0,
                "Euler ancestral, levels of EulerAncestralDiscreteScheduler"),
    SamplerSpec("dpmpp_2m", "DPMSolverMultistepScheduler", "dpmpp_2m", 0.0,
                "DPM-Solver++(2M), levels of DPMSolverMultistepScheduler"),
)}
SCHEDULER_SAMPLER = "scheduler"
SAMPLER_NAMES: tuple[str, ...] = (*SAMPLERS, SCHEDULER_SAMPLER)
# The core's own solver that mirrors each stock scheduler (used when a method needs a split).
MIRRORS = {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
            "EulerAncestralDiscreteScheduler": "euler_ancestral", "DPMSolverMultistepScheduler": "dpmpp_2m",
            "FlowMatchEulerDiscreteScheduler": "euler"}
