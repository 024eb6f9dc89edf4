"""Adaptive Projected Guidance (Sadat et al., ICLR 2025, arXiv 2410.02416, Algorithm 1).

On denoised (x0) predictions, per sample:

    d = D_c - D_u
    M <- d + beta M;  d <- M                 momentum (beta < 0: reverse momentum), M = 0 at start
    d <- d * min(1, r / ||d||)               norm threshold r
    d_par = <d, D_c/||D_c||> D_c/||D_c||     in float64
    U = (d - d_par) + eta d_par
    D = D_c + (w - 1) U

eta = 1, r = inf, beta = 0 is CFG exactly. ``space="model"`` applies the same rule to the raw
network output (eps or v), the space of diffusers' ``AdaptiveProjectedGuidance``; with
``use_original_formulation=True`` that guider equals ours at ``guidance_scale = scale - 1``.
The momentum is per-run, per-sample state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register
from ..vectors import project


@dataclass
class APGState:
    """The momentum buffer M, one row per sample (None until the first guided step)."""

    momentum: torch.Tensor | None = None


def apg_update(cond: torch.Tensor, uncond: torch.Tensor, scale: float, eta: float, norm_threshold: float,
               momentum: float, running: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One APG combination; returns (guided, new running momentum)."""
    diff = cond - uncond
    running = diff if running is None else diff + momentum * running
    diff = running
    if math.isfinite(norm_threshold):
        norm = torch.linalg.vector_norm(diff, dim=list(range(1, diff.ndim)), keepdim=True)
        diff = diff * torch.clamp(norm_threshold / norm, max=1.0)
    parallel, orthogonal = project(diff, cond)
    update = orthogonal + eta * parallel
    return cond + (scale - 1) * update, running


@register
@dataclass(frozen=True, kw_only=True)
class APG(Guidance):
    """Adaptive projected guidance; paper defaults (SDXL, Table 10): eta 0, r 15, beta -0.5."""

    name: ClassVar[str] = "apg"
    paper: ClassVar[str] = "Sadat et al., Eliminating Oversaturation..., ICLR 2025 (arXiv 2410.02416)"

    scale: float = param(7.5, low=0.0, high=100.0, doc="guidance scale w (CFG convention; 1 = off)")
    eta: float = param(0.0, low=0.0, high=1.0, doc="weight of the parallel component (1 = keep it)")
    norm_threshold: float = param(15.0, low=0.0, low_open=True, doc="r: clip ||d|| to r (inf = off)")
    momentum: float = param(-0.5, low=-1.0, high=1.0, doc="beta: momentum of d (negative = reverse)")
    space: str = param("x0", choices=("x0", "model"), doc="x0 (the paper) or the raw model output")

    def init_state(self, batch_size: int, device: torch.device) -> APGState:
        return APGState()

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: APGState) -> GuidedPrediction:
        cond = preds["cond"]
        if "uncond" not in preds:
            return GuidedPrediction.single(cond)
        uncond = preds["uncond"]
        if self.space == "x0":
            c, u = cond.x0, uncond.x0
        else:
            c, u = cond.output.float(), uncond.output.float()
        guided, state.momentum = apg_update(c, u, self.scale_at(step), self.eta, self.norm_threshold,
                                            self.momentum, state.momentum)
        if self.space == "x0":
            return GuidedPrediction.single(Prediction.from_x0(guided, like=cond))
        return GuidedPrediction.single(cond.with_output(guided.to(cond.output.dtype)))
