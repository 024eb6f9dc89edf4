"""CFG-Zero* (Fan et al., arXiv 2503.18886; code WeichenFan/CFG-Zero-star), on flow velocities.

Per sample, with v_c, v_u the conditional and unconditional velocities (v = eps - x0):

    alpha* = <v_c, v_u> / (||v_u||^2 + 1e-8)            the optimised scale
    v      = alpha* v_u + s (v_c - alpha* v_u)
    zero-init: v = 0 on the first ``zero_steps`` steps

For flow-matching models v is the raw output; eps / v-prediction models are converted to the
same velocity first (v = eps - x0), and back with x0 = (x - sigma v) / (alpha + sigma). Our
``zero_steps`` counts zeroed steps: the official code's ``zero_steps=K`` zeroes K + 1 steps
(ours = K + 1), diffusers' ``zero_init_steps=K`` zeroes K (ours = K); ComfyUI's node applies the
scaling to x0 and has no zero-init. Both defaults zero exactly one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction, per_sample
from ..registry import register
from ..vectors import from_velocity, velocity


def optimized_scale(v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
    """alpha* per sample (shape [B]), in float32."""
    c, u = v_cond.flatten(1).float(), v_uncond.flatten(1).float()
    return (c * u).sum(1) / (u.pow(2).sum(1) + 1e-8)


@register
@dataclass(frozen=True, kw_only=True)
class CFGZeroStar(Guidance):
    """CFG-Zero*: CFG against the optimally scaled unconditional velocity, with zero-init."""

    name: ClassVar[str] = "cfg_zero_star"
    paper: ClassVar[str] = "Fan et al., CFG-Zero*, arXiv 2503.18886"
    #: the zero-init steps are part of the sampler's start, not guidance: the interval keeps them
    off_outside_interval: ClassVar[Mapping[str, Any]] = {"zero_steps": 0}

    scale: float = param(4.0, low=0.0, high=100.0, doc="guidance scale s (1 = conditional only)")
    zero_steps: int = param(1, low=0, high=1000, doc="steps whose velocity is zeroed at the start")

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        if step.index < self.zero_steps:
            return ("cond",)  # the output is zero whatever the branches say
        return super().branches(step, state)

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        if step.index < self.zero_steps:
            return GuidedPrediction.single(from_velocity(torch.zeros_like(cond.x0), cond))
        if "uncond" not in preds:
            return GuidedPrediction.single(cond)
        v_c, v_u = velocity(cond), velocity(preds["uncond"])
        alpha = per_sample(optimized_scale(v_c, v_u), v_c)
        scaled_u = alpha * v_u
        guided = scaled_u + self.scale_at(step) * (v_c - scaled_u)
        return GuidedPrediction.single(from_velocity(guided, cond))
