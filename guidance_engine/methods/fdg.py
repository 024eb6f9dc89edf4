"""Frequency-Decoupled Guidance, FDG (Sadat et al., arXiv 2506.19713).

CFG applied separately to the bands of a Laplacian pyramid of the predictions, each band with
its own scale, and the bands summed back (the pyramid is linear and exactly invertible):

    L_k(.) : band k of the Laplacian pyramid (k = 0 finest, ..., K-1 the low-pass residual)
    g_k = L_k(u) + w_k (L_k(c) - L_k(u))
          w_k = w_high for the band-pass levels k < K-1, w_low for the low-pass level
    g   = sum_k up(g_k)                       the pyramid's reconstruction

Low frequencies carry structure and prompt alignment (a high scale there oversaturates and
costs diversity), high frequencies carry detail: the paper guides the low band weakly and the
high bands strongly (SDXL: w_low 5, w_high 10, its Table 8 per diffusers' docstring; default
here). w_low = w_high = w is CFG at w (up to float rounding). Optional per band, as diffusers
offers (its projection helper cites the paper's Algorithm 2): the update d_k = L_k(c) - L_k(u) is
split against L_k(c) into d_par + d_perp and rebuilt as d_perp + p d_par (``parallel_weight`` p;
1 = off), g_k = L_k(u) + w_k (d_perp + p d_par).

Pyramid (Burt & Adelson): blur with the 5 x 5 binomial kernel [1 4 6 4 1]^T [1 4 6 4 1] / 256
(reflect padding), bilinear resize by 1/2 (floor) down and back up to the finer level's size,
a few torch ops, no kornia. For even sizes this is kornia's ``build_laplacian_pyramid`` /
``pyrup``, which diffusers' ``FrequencyDecoupledGuidance`` needs (it refuses to run without
kornia). Deviation from kornia for other sizes: kornia pads to the next power of two when
neither side is one (and does not crop back) and fails on mixed odd sizes; ours upsamples to
the exact finer size, so any size reconstructs exactly.

Space: the linear rule is the same in eps, x0, v and flow space, so it acts on the raw output
(diffusers does too); with ``parallel_weight < 1`` the projection onto L_k(c) is nonlinear and
follows diffusers (raw output). Mapping: ours (scale w_high, scale_low w_low, levels K,
parallel_weight p) equals ``FrequencyDecoupledGuidance(guidance_scales=[w_high] * (K-1) +
[w_low], parallel_weights=p)``; with ``use_original_formulation=True`` (L_k(c) + w_k d_k) and
p = 1 each of its scales is ours minus one.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register
from ..vectors import project

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The 5 x 5 binomial blur of [N, C, H, W], reflect-padded, channel by channel (separable)."""
    n, ch, h, w = x.shape
    k = _BINOMIAL.to(device=x.device, dtype=x.dtype)
    flat = F.pad(x.reshape(n * ch, 1, h, w), (2, 2, 2, 2), mode="reflect")
    flat = F.conv2d(F.conv2d(flat, k.view(1, 1, 1, 5)), k.view(1, 1, 5, 1))
    return flat.reshape(n, ch, h, w)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """Blur, then halve each side (floor) bilinearly."""
    return F.interpolate(_blur(x), size=(x.shape[-2] // 2, x.shape[-1] // 2), mode="bilinear", align_corners=False)


def pyr_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample bilinearly to ``size`` (twice the side for even sizes), then blur."""
    return _blur(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[band 0 (finest), ..., band levels-2, low-pass residual] of a [N, C, H, W] tensor."""
    gaussian = [x]
    for _ in range(levels - 1):
        gaussian.append(pyr_down(gaussian[-1]))
    bands = [fine - pyr_up(coarse, fine.shape[-2:]) for fine, coarse in itertools.pairwise(gaussian)]
    return bands + [gaussian[-1]]


def reconstruct(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`laplacian_pyramid`."""
    x = pyramid[-1]
    for band in reversed(pyramid[:-1]):
        x = band + pyr_up(x, band.shape[-2:])
    return x


def check_levels(shape: torch.Size, levels: int) -> None:
    """ValueError unless a ``levels``-deep pyramid fits: every blurred level (all but the
    low-pass) needs sides of at least 3 for the reflect padding."""
    if len(shape) < 4:
        raise ValueError(f"fdg: needs spatial predictions [B, C, (F,) H, W], got shape {tuple(shape)}")
    if min(shape[-2:]) // 2 ** (levels - 2) < 3:
        raise ValueError(f"fdg: parameter 'levels' ({levels}) too deep for a prediction of shape {tuple(shape)}: "
                         "the level above the low-pass must be at least 3 x 3")


def fdg_update(cond: torch.Tensor, uncond: torch.Tensor, scales: list[float], parallel_weight: float) -> torch.Tensor:
    """One FDG combination of [B, ..., H, W] tensors; ``scales`` from the finest band to the low-pass."""
    shape = cond.shape
    flat = (shape[0], -1, *shape[-2:])  # video / extra axes become channels
    pyr_c = laplacian_pyramid(cond.reshape(flat), len(scales))
    pyr_u = laplacian_pyramid(uncond.reshape(flat), len(scales))
    guided = []
    for band_c, band_u, w in zip(pyr_c, pyr_u, scales):
        diff = band_c - band_u
        if parallel_weight != 1:
            parallel, orthogonal = project(diff, band_c)
            diff = orthogonal + parallel_weight * parallel
        guided.append(band_u + w * diff)
    return reconstruct(guided).reshape(shape)


@register
@dataclass(frozen=True, kw_only=True)
class FDG(Guidance):
    """Frequency-decoupled guidance: one CFG scale for the low-pass band, another for the details."""

    name: ClassVar[str] = "fdg"
    paper: ClassVar[str] = "Sadat et al., Guidance in the Frequency Domain Enables High-Fidelity Sampling at Low CFG Scales (arXiv 2506.19713)"
    shaped_scales: ClassVar[tuple[str, ...]] = ("scale", "scale_low")

    scale: float = param(10.0, low=0.0, high=100.0, doc="w_high: scale of the band-pass (detail) levels")
    scale_low: float = param(5.0, low=0.0, high=100.0, doc="w_low: scale of the low-pass level")
    levels: int = param(2, low=2, high=8, doc="Laplacian pyramid levels (the last is the low-pass)")
    parallel_weight: float = param(1.0, low=0.0, high=1.0,
                                   doc="weight of each band's update parallel to the cond band (1 = off)")

    def scales_at(self, step: StepInfo) -> tuple[float, float]:
        """(w_high, w_low) at this step, both shaped by the schedule and interval."""
        high = self.scale_at(step)
        if self.scale_low == self.scale:
            return high, high
        return high, self.shaped("scale_low", step)

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        if all(w == self.neutral_scale for w in self.scales_at(step)):
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        if "uncond" not in preds:
            return GuidedPrediction.single(cond)
        high, low = self.scales_at(step)
        c, u = cond.output.float(), preds["uncond"].output.float()
        check_levels(c.shape, self.levels)
        guided = fdg_update(c, u, [high] * (self.levels - 1) + [low], self.parallel_weight)
        return GuidedPrediction.single(cond.with_output(guided.to(cond.output.dtype)))

