"""APG-Mix: CFG for the first steps, then Adaptive Projected Guidance (the HunyuanImage 2.1
recipe; APG: Sadat et al., ICLR 2025, arXiv 2410.02416, Algorithm 1).

    steps i < K (``cfg_steps``):  D = D_u + s (D_c - D_u)                  CFG
                                  M <- (D_c - D_u) + beta M                 momentum still runs
    steps i >= K:                 D = APG(D_c, D_u; w, eta, r, beta, M)     as in apg.py

There is no paper for the mix itself: the rule is HunyuanImage 2.1's (its pipeline runs CFG while
``step <= apg_start_step`` and feeds its APG guider's momentum all the while), which diffusers'
``AdaptiveProjectedMixGuidance`` reproduces (APG once ``step > adaptive_projected_guidance_start_step``).
Our ``cfg_steps`` counts the CFG steps: ``cfg_steps = adaptive_projected_guidance_start_step + 1``;
the default 6 is their start step 5 (Hunyuan's "general" setting for 50 steps). Other defaults are
theirs: s 3.5, w 10, eta 0, r 10, beta -0.5. ``cfg_steps`` >= the number of steps is CFG exactly.

The APG part is apg.py's ``apg_update`` (paper form D_c + (w - 1) U, in x0 space by default; the
``space="model"`` option works on the raw output as diffusers and Hunyuan do). Mapping: ours with
``space="model"``, scale s, apg_scale w, eta, norm_threshold r, momentum beta equals
``AdaptiveProjectedMixGuidance(use_original_formulation=True, guidance_scale=s - 1,
adaptive_projected_guidance_scale=w - 1, eta=eta, adaptive_projected_guidance_rescale=r,
adaptive_projected_guidance_momentum=beta)`` (r = inf here is r = 0 there). Deviations of
diffusers' default formulation: its APG step is D_u + w U, which is not the paper's D_c + (w - 1) U
unless U = D_c - D_u (eta 1, no clipping, no momentum). Its APG phase also needs the CFG scale to
be non-neutral (guidance_scale 1 there disables APG too) and falls back to CFG when the APG scale
is neutral; ours treats the two phases independently (a neutral phase is the conditional alone).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register
from .apg import APGState, apg_update


@register
@dataclass(frozen=True, kw_only=True)
class APGMix(Guidance):
    """CFG for the first ``cfg_steps`` steps, APG after (momentum accumulated from the start)."""

    name: ClassVar[str] = "apg_mix"
    paper: ClassVar[str] = ("HunyuanImage 2.1 (Tencent 2025) mixed CFG/APG; APG: Sadat et al., "
                            "Eliminating Oversaturation..., ICLR 2025 (arXiv 2410.02416)")
    shaped_scales: ClassVar[tuple[str, ...]] = ("scale", "apg_scale")

    scale: float = param(3.5, low=0.0, high=100.0, doc="CFG scale s of the first steps (1 = conditional only)")
    apg_scale: float = param(10.0, low=0.0, high=100.0, doc="APG scale w after the switch (CFG convention)")
    cfg_steps: int = param(6, low=0, high=10000, doc="K: steps run with CFG before APG takes over")
    eta: float = param(0.0, low=0.0, high=1.0, doc="APG: weight of the parallel component (1 = keep it)")
    norm_threshold: float = param(10.0, low=0.0, low_open=True, doc="APG: r, clip ||d|| to r (inf = off)")
    momentum: float = param(-0.5, low=-1.0, high=1.0, doc="APG: beta, momentum of d (negative = reverse)")
    space: str = param("x0", choices=("x0", "model"), doc="x0 (the APG paper) or the raw model output")

    def phase_scale(self, step: StepInfo) -> tuple[str, float]:
        """("cfg" or "apg", that phase's scale at this step, shaped by the schedule and interval)."""
        if step.index < self.cfg_steps:
            return "cfg", self.scale_at(step)
        return "apg", self.shaped("apg_scale", step)

    def init_state(self, batch_size: int, device: torch.device) -> APGState:
        return APGState()

    def branches(self, step: StepInfo, state: APGState) -> tuple[str, ...]:
        if self.phase_scale(step)[1] == self.neutral_scale:
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: APGState) -> GuidedPrediction:
        cond = preds["cond"]
        if "uncond" not in preds:
            return GuidedPrediction.single(cond)
        uncond = preds["uncond"]
        phase, scale = self.phase_scale(step)
        if self.space == "x0":
            c, u = cond.x0, uncond.x0
        else:
            c, u = cond.output.float(), uncond.output.float()
        if phase == "cfg":
            diff = c - u
            state.momentum = diff if state.momentum is None else diff + self.momentum * state.momentum
            return GuidedPrediction.single(uncond.lerp(cond, scale))  # linear: CFG in any space
        guided, state.momentum = apg_update(c, u, scale, self.eta, self.norm_threshold, self.momentum,
                                            state.momentum)
        if self.space == "x0":
            return GuidedPrediction.single(Prediction.from_x0(guided, like=cond))
        return GuidedPrediction.single(cond.with_output(guided.to(cond.output.dtype)))

