"""CFG++ (Chung et al., ICLR 2025, arXiv 2406.08070): denoise guided, renoise unconditional.

    D_l = D_u + lambda (D_c - D_u)           lambda in [0, 1] (the README suggests 0.6)
    x_next = a_next D_l + s_next eps_u       (DDIM form; every solver of the core takes the split)

Only the renoising term differs from CFG, so the method is the pair (guided x0, unconditional eps)
and every guidance-aware solver of the sampler core serves it. A diffusers scheduler's ``step``
cannot (it renoises with the eps of the prediction it is given): the core refuses that path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register


@register
@dataclass(frozen=True, kw_only=True)
class CFGPlusPlus(Guidance):
    """CFG++: guided x0 with lambda, renoise with the unconditional eps."""

    name: ClassVar[str] = "cfgpp"
    paper: ClassVar[str] = "Chung et al., CFG++, ICLR 2025 (arXiv 2406.08070)"
    renoise_split: ClassVar[bool] = True
    neutral_scale: ClassVar[float] = 0.0

    scale: float = param(0.6, low=0.0, high=1.0, doc="lambda: 0 = unconditional, 1 = conditional x0")

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        if not self.active(step):
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        if "uncond" not in preds:
            return GuidedPrediction.single(cond)
        uncond = preds["uncond"]
        return GuidedPrediction(denoise=uncond.lerp(cond, self.scale_at(step)), renoise=uncond)
