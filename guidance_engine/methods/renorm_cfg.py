"""RenormCFG: CFG with a norm cap and a truncation step, the recipe of the diffusers
``ZImagePipeline`` (its ``cfg_normalization`` and ``cfg_truncation``) and of Lumina 2 (ComfyUI's
``RenormCFG`` node, comfy_extras/nodes_lumina2.py).

Per sample, with c and u the conditional and unconditional outputs and w the scale in the
engine's convention (u + w (c - u); w = 1 is the conditional alone):

    g = c + (w - 1) (c - u)                            CFG, written as the stock pipeline writes it
    g <- g k ||c|| / ||g||    where ||g|| > k ||c||     the cap (k = ``renorm`` > 0; 0 = off)
    g = c, u not evaluated    where (1000 - t) / 1000 > ``truncation``

Norms run over the whole sample (every non-batch dimension), one sample at a time as the stock
loop computes them; the cap only ever shrinks g. t is the step's timestep on diffusers' 1000-step
scale (t = 1000 sigma for flow schedules: (1000 - t) / 1000 = 1 - sigma, the way travelled towards
the data), the rule computed in float32 as the stock pipeline computes it; ``truncation`` = 1
never truncates. Truncated steps are outside the method's interval (:meth:`active`), so they cost
one network evaluation, as in the stock pipeline.

Conventions: Z-Image's ``guidance_scale`` s is w - 1 (stock: pos + s (pos - neg), s = 0 the
conditional alone). ``GuidedZImagePipeline`` passes w = s + 1 and this method multiplies by w - 1,
which is the stock arithmetic bit for bit whenever float32(w - 1) == float32(s) (every s with up
to three decimals in [0, 20], for one: torch rounds the scalar to float32). ComfyUI's node takes
cfg = w, caps at equality too (>=) and truncates on ComfyUI's own timestep (t < cfg_trunc); here
the diffusers rules. Space: the raw output (the velocity for flow models; a norm ratio is the same
for Z-Image's negated output, which the stock pipeline caps before negating).

Defaults: w = 6 (Z-Image's guidance_scale 5), k = 1 (ComfyUI's node), no truncation (the default of
both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register

#: The timestep scale of the truncation rule (diffusers' ``num_train_timesteps`` of flow schedules).
TRAIN_TIMESTEPS = 1000


def renorm_cfg(cond: torch.Tensor, uncond: torch.Tensor, excess: float, renorm: float) -> torch.Tensor:
    """``c + excess (c - u)`` for each sample, its norm capped at ``renorm ||c||`` when ``renorm``
    > 0. ``excess`` is w - 1 (the stock pipeline's s)."""
    guided = []
    for c, u in zip(cond, uncond):  # one sample at a time: the norms reduce as the stock loop's do
        g = c + excess * (c - u)
        if renorm > 0:
            limit = torch.linalg.vector_norm(c) * renorm
            norm = torch.linalg.vector_norm(g)
            if norm > limit:
                g = g * (limit / norm)
        guided.append(g)
    return torch.stack(guided)


def truncated(timestep: float, truncation: float) -> bool:
    """Whether the step at ``timestep`` is past ``truncation``: (1000 - t) / 1000 > truncation, in
    float32 as the stock pipeline computes it."""
    t = torch.tensor(timestep, dtype=torch.float32)
    return float((TRAIN_TIMESTEPS - t) / TRAIN_TIMESTEPS) > truncation


@register
@dataclass(frozen=True, kw_only=True)
class RenormCFG(Guidance):
    """RenormCFG: CFG with each sample's guided norm capped at renorm times the conditional's, off
    after the truncation point (Z-Image's and Lumina 2's recipe)."""

    name: ClassVar[str] = "renorm_cfg"
    paper: ClassVar[str] = ("the diffusers ZImagePipeline (cfg_normalization, cfg_truncation); ComfyUI's RenormCFG "
                            "node (Lumina 2)")

    scale: float = param(6.0, low=0.0, high=100.0,
                         doc="guidance scale w, u + w (c - u); 1 = conditional only (Z-Image's guidance_scale + 1)")
    renorm: float = param(1.0, low=0.0, doc="k: cap ||g|| at k ||c|| per sample; 0 = off")
    truncation: float = param(1.0, low=0.0, high=1.0,
                              doc="guide only at steps with (1000 - t) / 1000 <= truncation; 1 = every step")

    def active(self, step: StepInfo) -> bool:
        """The interval, and not past the truncation point (then no unconditional forward)."""
        return super().active(step) and not truncated(step.timestep, self.truncation)

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        if "uncond" not in preds:  # outside the interval or truncated
            return GuidedPrediction.single(cond)
        guided = renorm_cfg(cond.output, preds["uncond"].output, self.scale_at(step) - 1.0, self.renorm)
        return GuidedPrediction.single(cond.with_output(guided))
