"""Perp-Neg, perpendicular negative prompts (Armandpour et al., arXiv 2304.04968; code
Perp-Neg/Perp-Neg-stablediffusion).

Three branches: eps_u (the empty prompt), eps_c (the prompt), eps_n (the negative prompt). Per
sample, with the denoising components taken relative to the unconditional prediction:

    d_c = eps_c - eps_u,   d_n = eps_n - eps_u
    d_n_perp = d_n - (<d_n, d_c> / ||d_c||^2) d_c          the part of d_n orthogonal to d_c
    eps = eps_u + w (d_c - w_neg d_n_perp)

Only the component of the negative prompt's direction perpendicular to the prompt's is removed,
so a negative prompt that overlaps the prompt ("a lion" vs "a lion, side view") cannot erase the
prompt's own content, unlike the usual negative prompt (which replaces eps_u by eps_n). w_neg = 0
is CFG at w exactly (and skips the negative branch).

Sign and scaling: as in the authors' code (``weighted_prependicualr_aggricator``: eps_u + w *
(d_c - sum_i w_neg_i perp(d_n_i, d_c))) and ComfyUI's PerpNeg: the negative term is inside the
guidance scale, so the effective weight of d_n_perp is w * w_neg. A form with the negative term
outside (eps_u + w d_c - lambda d_n_perp) is ours with w_neg = lambda / w. The paper's own
equation could not be read here; the code above is the reference we verified. One negative
prompt (the paper allows several, summed with their own weights). The projection is per sample
(the authors' 3D code; their 2D code runs one sample; ComfyUI pools the dot product over the
whole batch, which mixes samples). diffusers ships no Perp-Neg guider.

Space: the combination uses differences only, and a per-sample change of parametrisation scales
every difference by the same factor, so the result is the same in eps, x0, v and flow space; it
acts on the raw output (the noise prediction for SD, as the paper).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register
from ..vectors import project


def perp_neg(cond: torch.Tensor, uncond: torch.Tensor, negative: torch.Tensor, scale: float,
             neg_scale: float) -> torch.Tensor:
    """eps_u + w (d_c - w_neg perp(d_n, d_c)), per sample (projection in float64)."""
    d_c, d_n = cond - uncond, negative - uncond
    _, d_n_perp = project(d_n, d_c)
    return uncond + scale * (d_c - neg_scale * d_n_perp)


@register
@dataclass(frozen=True, kw_only=True)
class PerpNeg(Guidance):
    """Perp-Neg: CFG minus the negative prompt's direction perpendicular to the prompt's."""

    name: ClassVar[str] = "perp_neg"
    paper: ClassVar[str] = "Armandpour et al., Re-imagine the Negative Prompt Algorithm (Perp-Neg), arXiv 2304.04968"

    scale: float = param(7.5, low=0.0, high=100.0, doc="guidance scale w (CFG convention)")
    neg_scale: float = param(1.0, low=0.0, high=100.0,
                             doc="w_neg: weight of the negative prompt's perpendicular part (0 = CFG)")

    def required_branches(self) -> set[str]:
        # Always: a pipeline then routes the negative prompt to "negative" (never to "uncond"),
        # so that w_neg -> 0 tends to CFG with the empty prompt, and w_neg = 0 is that CFG.
        return {"cond", "uncond", "negative"}

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        if not self.active(step):
            return ("cond",)
        if self.neg_scale == 0:
            return super().branches(step, state)
        return ("uncond", "negative", "cond")  # at w = 1 the negative term still acts

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        if "uncond" not in preds:
            return GuidedPrediction.single(cond)
        uncond = preds["uncond"]
        if "negative" not in preds:
            return GuidedPrediction.single(uncond.lerp(cond, self.scale_at(step)))  # w_neg = 0: CFG
        guided = perp_neg(cond.output.float(), uncond.output.float(), preds["negative"].output.float(),
                          self.scale_at(step), self.neg_scale)
        return GuidedPrediction.single(cond.with_output(guided.to(cond.output.dtype)))
