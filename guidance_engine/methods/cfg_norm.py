"""CFGNorm: CFG whose denoised prediction is capped, at every position, at the norm of the
conditional one (ComfyUI core, comfy_extras/nodes_cfg.py, class ``CFGNorm``: a post-CFG function).

On x0 (denoised) predictions, with D the CFG result and D_c the conditional x0, at every position
(every element of the dimensions after the channel one) over the channels:

    D   = D_u + s (D_c - D_u)                                   CFG (s = 1: the conditional alone)
    k   = clamp(||D_c||_ch / (||D||_ch + 1e-8), 0, 1)           ||.||_ch: 2-norm over dim 1
    out = D k strength

The cap only shrinks (k <= 1); ``strength`` then multiplies the whole prediction, capped or not
(< 1 darkens every step, > 1 amplifies it). The norms are ``torch.norm(., dim=1)`` as the node
takes them, in float32 (x0 is float32 whatever the network's dtype); 1e-8 is the node's guard.

Conventions: s is the engine's (and ComfyUI's) CFG scale, u + s (c - u). Space: x0, the node's
(its ``cond_denoised`` and ``denoised`` arguments). Where k strength = 1 exactly (the cap does not
bind and strength = 1) the result is CFG's own prediction, bit for bit: a cap that never binds is
CFG, position by position.

How it differs from the engine's two other norm caps: RenormCFG (renorm_cfg.py, Z-Image /
Lumina 2) caps each sample's whole raw output (the velocity) at k ||c|| over every dimension, with
no strength; CFGRenorm (cfg_renorm.py, Qwen-Image's true CFG) rescales each p x p token of the
raw output to the conditional token's norm, up as well as down. CFGNorm acts on x0, per latent
position over the channels (like CFGRenorm with p = 1, but only shrinking), and multiplies by
``strength``.

Defaults: s = 7.5 (the engine's CFG default; the node takes the sampler's cfg), strength 1 in
[0, 100] (the node's default and range).

Deviations from the node: at s = 1, and outside the interval, the result is the conditional
prediction alone (the node, run after ComfyUI's cfg-1 shortcut, still multiplies the conditional
x0 by strength and by ||D_c|| / (||D_c|| + 1e-8)); no non-finite check per step (the newest node
raises when strength > 1 has overflowed; the engine checks the latents once, at the end of a run);
the newer node's ``pre_cfg`` variant (rescaling the combined noise without the clamp) is not
offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register

#: The node's guard against a zero guided norm.
NORM_EPSILON = 1e-8


def norm_factor(guided: torch.Tensor, cond: torch.Tensor, strength: float) -> torch.Tensor:
    """``clamp(||cond|| / (||guided|| + 1e-8), 0, 1) * strength`` at every position, the norms over
    the channel dimension (dim 1, kept, so the factor broadcasts over the channels)."""
    cond_norm = torch.linalg.vector_norm(cond, dim=1, keepdim=True)
    guided_norm = torch.linalg.vector_norm(guided, dim=1, keepdim=True)
    return (cond_norm / (guided_norm + NORM_EPSILON)).clamp(min=0.0, max=1.0) * strength


@register
@dataclass(frozen=True, kw_only=True)
class CFGNorm(Guidance):
    """CFG with the denoised prediction capped, position by position, at the conditional one's
    norm over the channels, then times strength (ComfyUI's CFGNorm node)."""

    name: ClassVar[str] = "cfg_norm"
    paper: ClassVar[str] = "ComfyUI's CFGNorm node (comfy_extras/nodes_cfg.py), a post-CFG function"

    scale: float = param(7.5, low=0.0, high=100.0, doc="CFG scale s, u + s (c - u); 1 = conditional only")
    strength: float = param(1.0, low=0.0, high=100.0,
                            doc="multiplies the capped x0 everywhere (1 = the cap alone; > 1 amplifies)")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        if "uncond" not in preds:  # outside the interval, or s = 1
            return GuidedPrediction.single(cond)
        guided = self.away_from(preds, "uncond", step)
        factor = norm_factor(guided.x0, cond.x0, self.strength)
        capped = Prediction.from_x0(guided.x0 * factor, like=cond)
        # Where the factor is 1 the capped x0 is CFG's: keep CFG's own output there, bit for bit.
        return GuidedPrediction.single(cond.with_output(torch.where(factor == 1.0, guided.output, capped.output)))
