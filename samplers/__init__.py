"""The sampler core: one denoising loop, noise schedules and guidance-aware solver steps.

The names are imported on first use (the solver table, :mod:`.names`, needs neither torch nor
diffusers, so the CLI's help and argument checks load no model stack)."""

from __future__ import annotations

import importlib
from typing import Any

from .names import SAMPLER_NAMES, SAMPLERS

_EXPORTS = {
    "BranchModel": ".loop", "NonFiniteLatentsError": ".loop", "SampleResult": ".loop", "StartImage": ".loop",
    "StepRecord": ".loop", "resolve_sampler": ".loop", "sample": ".loop", "start_index": ".loop",
    "NoiseSchedule": ".schedule", "schedule_from_scheduler": ".schedule",
    "dpmpp_2m_step": ".steps", "first_order_step": ".steps",
}

__all__ = ["SAMPLERS", "SAMPLER_NAMES", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
