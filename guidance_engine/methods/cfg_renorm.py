"""CFGRenorm: classifier-free guidance with every token's guided output rescaled to the norm of
the conditional output's token: the "true CFG" of the diffusers ``QwenImagePipeline``.

Per sample, with c and u the conditional and unconditional outputs and s the scale:

    g = u + s (c - u)                              CFG (s = 1: the conditional alone)
    g_k <- g_k ||c_k|| / ||g_k||   every token k   the guided direction, the conditional magnitude

A token is a p x p patch of latent pixels with all its channels (p = ``patch``): the C p^2
elements a Flux-like transformer sees as one packed token (p = 2, Qwen-Image's 2 x 2 packing);
p = 1 takes each latent pixel's channel vector. The norms are taken on the tokens packed as the
stock pipeline packs them (a token's elements in (channel, row, column) order, ``torch.norm`` over
the last dimension), so that each sum is rounded as the stock one: the result equals the stock
pipeline's bit for bit. A token whose guided vector is zero (||g_k|| = 0) is left as it is, zero
(the stock pipeline divides 0 by 0 there and writes NaN).

Space: the raw network output (the velocity of flow models; eps or v elsewhere), as the stock
pipeline rescales the transformer's output. The latents must be (B, C, H, W) with H and W
multiples of ``patch``.

Defaults: s = 4 (Qwen-Image's ``true_cfg_scale``), p = 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register


def patch_tokens(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) as (B, H/p * W/p, C p^2) tokens of p x p patches, each token's elements in
    (channel, row, column) order: Flux's and Qwen-Image's packing for p = 2."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def patch_image(tokens: torch.Tensor, shape: torch.Size, patch: int) -> torch.Tensor:
    """The inverse of :func:`patch_tokens`: tokens back to latents of ``shape`` (B, C, H, W)."""
    b, c, h, w = shape
    tokens = tokens.reshape(b, h // patch, w // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, c, h, w)


def renormed(guided: torch.Tensor, cond: torch.Tensor, patch: int) -> torch.Tensor:
    """``guided`` with each p x p token rescaled to the norm of ``cond``'s token; a token whose
    guided norm is 0 is kept (zero). Video latents (B, C, F, H, W): per frame, p x p tokens of each
    frame (Wan's patches are 1 x 2 x 2)."""
    if guided.ndim == 5:
        b, c, f, h, w = guided.shape
        frames = [t.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w) for t in (guided, cond)]
        return renormed(*frames, patch).reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)
    if guided.ndim != 4 or guided.shape[-2] % patch or guided.shape[-1] % patch:
        raise ValueError(f"cfg_renorm: parameter 'patch' ({patch}) must divide the height and width of (B, C, H, W) "
                         f"or (B, C, F, H, W) latents, got latents of shape {tuple(guided.shape)}")
    g, c = patch_tokens(guided, patch), patch_tokens(cond, patch)
    cond_norm = torch.norm(c, dim=-1, keepdim=True)
    guided_norm = torch.norm(g, dim=-1, keepdim=True)
    ratio = torch.where(guided_norm > 0, cond_norm / guided_norm, torch.ones_like(guided_norm))
    return patch_image(g * ratio, guided.shape, patch)


@register
@dataclass(frozen=True, kw_only=True)
class CFGRenorm(Guidance):
    """CFG with each token's guided output rescaled to the conditional token's norm (the true CFG
    of the diffusers QwenImagePipeline)."""

    name: ClassVar[str] = "cfg_renorm"
    paper: ClassVar[str] = "the diffusers QwenImagePipeline (true_cfg_scale with a negative prompt)"

    scale: float = param(4.0, low=0.0, high=100.0, doc="guidance scale s, u + s (c - u); 1 = conditional only")
    patch: int = param(2, low=1, high=64,
                       doc="token size p: norms over the channels of p x p latent patches (2 = Flux-like "
                           "packed tokens, 1 = each latent pixel)")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        guided = self.away_from(preds, "uncond", step)
        if "uncond" in preds:  # else the conditional alone (outside the interval), already its own norm
            guided = guided.with_output(renormed(guided.output, preds["cond"].output, self.patch))
        return GuidedPrediction.single(guided)
