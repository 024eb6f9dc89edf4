"""Classifier-free guidance (Ho & Salimans 2022) with guidance rescale (Lin et al. 2024, Alg. 2).

    g = u + s (c - u)                        s = 1: the conditional prediction alone
    g_r = g * std(c) / std(g)                per sample, over all non-batch dimensions
    out = phi g_r + (1 - phi) g

The lerp acts on the raw network output (linear, so the same in eps, x0, v and flow space) and
reproduces the stock diffusers pipelines bit for bit. Rescale is nonlinear; like diffusers'
``guidance_rescale`` it acts on the raw output (eps or v), which is what its paper used on
v-prediction models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register


def rescale(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al.'s std rescale of ``guided`` towards the std of ``cond`` by the fraction ``phi``.

    A sample whose guided output is constant (std 0) has no spread to rescale: it is left as it is
    (diffusers divides by the 0 and returns inf/NaN)."""
    dims = list(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    ratio = torch.where(std_guided > 0, std_cond / std_guided, torch.ones_like(std_guided))
    rescaled = guided * ratio
    return phi * rescaled + (1 - phi) * guided


@register
@dataclass(frozen=True, kw_only=True)
class CFG(Guidance):
    """Classifier-free guidance, diffusers convention: ``u + scale (c - u)``, optional rescale."""

    name: ClassVar[str] = "cfg"
    paper: ClassVar[str] = "Ho & Salimans 2022 (arXiv 2207.12598); rescale: Lin et al. 2024 (arXiv 2305.08891)"

    scale: float = param(7.5, low=0.0, high=100.0, doc="guidance scale s; 1 = conditional only")
    rescale: float = param(0.0, low=0.0, high=1.0, doc="guidance rescale phi (0.7 typical); 0 = off")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        guided = self.away_from(preds, "uncond", step)
        if self.rescale > 0 and "uncond" in preds:
            guided = guided.with_output(rescale(guided.output, preds["cond"].output, self.rescale))
        return GuidedPrediction.single(guided)
