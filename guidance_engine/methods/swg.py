"""Sliding Window Guidance (Adaloglou, Kaiser, Iagudin, Kollmann, BMVC 2025, arXiv 2411.10257):
guiding a diffusion model with itself on sliding windows, masked (M-SWG) or not (SWG).

    r = stitch_j D(x[window_j]),  the N = n^2 windows of k x l latent pixels (n per dimension),
                                  each evaluated alone by the conditional network at this level,
                                  put back in place, overlaps averaged
    M = [pixel covered by more than one window]     (M = 1 everywhere without the mask)
    g = u + s (c - u) + w M (c - r)

c, u: the conditional and unconditional predictions on the whole latent; s: the CFG scale (1: no
unconditional branch); w: the SWG scale (0: CFG exactly). The windowed prediction sees no pixel
beyond its window: a weaker model with the same errors on short-range structure, so guiding away
from it upweights long-range dependencies (the paper's argument). The combination acts on the
raw outputs: averaging windows and the weights (1 + w M - w M = 1 per pixel) are affine on the
same input, so the result is the same in eps, x0, v or flow space (the authors combine EDM2's
denoised outputs and DiT's eps outputs). Written ``M r + (1 - M) c`` for the reference, the rule is
the perturbation rule :func:`~.perturbed.perturbed_guidance` with that reference.

Windows (the authors' ``swg_guidance`` / ``forward_with_crop``): size k = round(window * H) by
round(window * W); along each axis the n windows start at round(j (H - k) / (n - 1)), the first at
0 and the last ending at the edge; the authors' stride (H - k) // (n - 1) is the same whenever it
divides (their assertion allows n in {1, 2, 3, 5}; otherwise their last window stops short of the
edge and the uncovered pixels divide by zero). Identical windows (k = H) are evaluated once: a
window as large as the latent is the conditional prediction itself, so that SWG's term vanishes
and no window is evaluated. Each window is one network call on every sample's crop (not
rescaled), counted as one NFE per sample: N per guided step.

Defaults: the authors' code: M-SWG (``scale_window_guide=1``, "M-SWG default"), n = 2, window
5/8 of the latent (their crop 20 of DiT's 32, 40 of EDM2's 64), w = 0.5 (their DiT M-SWG script's
best-FID scale; EDM2-S: 0.2 for FID, 1.1 for FDD), no CFG (s = 1; with CFG they write
``c + g (c - u) + w M (c - r)``, our s = g + 1). The interval (``sigma_min``..``sigma_max``,
``start``..``stop``; theirs ``g_interval`` in steps) and ``schedule`` apply to the SWG term; CFG
at ``scale`` runs at every step. Peer deviation noted: pamparamm/sd-perturbed-attention tiles the
latent with a fixed overlap instead (768-pixel tiles, 256 overlap, scale 5, unmasked).

The windows are evaluated through the sampler core's in-step evaluator (``step.evaluate``:
the network on an input this method builds, at this step's level and conditioning), which the
core must provide; without it the method refuses before any model call. The family's branch
model must take latents of another size: UNets, SD3, Z-Image, HunyuanVideo 1.5 and DiT do; the
packed-token forwards of Flux.1/2, Chroma, Qwen-Image, Wan and LTX-Video, laid out for the whole
latent, do not (they must refuse SWG before any model call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register
from .perturbed import perturbed_guidance

#: A window: (top, left, height, width) in latent pixels.
Box = tuple[int, int, int, int]


def window_offsets(size: int, window: int, count: int) -> list[int]:
    """The start of each of ``count`` windows of ``window`` pixels along an axis of ``size``: from 0
    to ``size - window``, evenly spaced (rounded), duplicates dropped."""
    offsets = [round(j * (size - window) / (count - 1)) for j in range(count)]
    return sorted(set(offsets))


def window_boxes(height: int, width: int, window: float, count: int) -> list[Box]:
    """The distinct windows of a ``height`` x ``width`` latent, in the authors' order (left offset
    outer, top offset inner). ``window``: the fraction of each dimension a window spans."""
    kh, kw = (min(size, max(1, round(window * size))) for size in (height, width))
    tops, lefts = window_offsets(height, kh, count), window_offsets(width, kw, count)
    return [(top, left, kh, kw) for left in lefts for top in tops]


def stitch(outputs: Sequence[torch.Tensor], boxes: Sequence[Box], like: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows' ``outputs`` put back in place on a tensor shaped ``like`` (spatial last two
    dims), overlaps averaged (in float32 at least), and how many windows cover each pixel."""
    work = torch.promote_types(like.dtype, torch.float32)
    total = torch.zeros(like.shape, dtype=work, device=like.device)
    coverage = torch.zeros(like.shape[-2:], dtype=work, device=like.device)
    for out, (top, left, kh, kw) in zip(outputs, boxes):
        total[..., top:top + kh, left:left + kw] += out.to(work)
        coverage[top:top + kh, left:left + kw] += 1
    return (total / coverage).to(like.dtype), coverage


def swg_reference(cond: Prediction, evaluate: Callable[..., Mapping[str, Prediction]], window: float, count: int,
                  masked: bool) -> torch.Tensor | None:
    """The reference ``M r + (1 - M) c`` on raw outputs (None when the only window is the whole
    latent: the reference is then the conditional prediction itself)."""
    boxes = window_boxes(*cond.x.shape[-2:], window, count)
    if len(boxes) == 1:
        return None
    outputs = [evaluate(cond.x[..., top:top + kh, left:left + kw], ("cond",))["cond"].output
               for top, left, kh, kw in boxes]
    stitched, coverage = stitch(outputs, boxes, cond.output)
    if not masked:
        return stitched
    return torch.where(coverage > 1, stitched, cond.output)  # M = 0: the term c - c vanishes exactly


@register
@dataclass(frozen=True, kw_only=True)
class SWG(Guidance):
    """Sliding window guidance: guide away from the network's prediction stitched from windows of the latent."""

    name: ClassVar[str] = "swg"
    paper: ClassVar[str] = ("Adaloglou et al., Guiding a diffusion model with itself using sliding windows, "
                            "BMVC 2025 (arXiv 2411.10257)")
    off_outside_interval: ClassVar[Mapping[str, Any]] = {"scale": 1.0}
    runs_on_row_subsets: ClassVar[bool] = False  # each window is evaluated for every sample's crop
    evaluates_crops: ClassVar[bool] = True  # the branch model must take latents of the windows' size
    evaluates_in_step: ClassVar[bool] = True

    scale: float = param(1.0, low=0.0, high=100.0, doc="CFG scale s (1 = SWG alone, the authors' M-SWG setting)")
    swg_scale: float = param(0.5, low=0.0, high=100.0, doc="SWG scale w (0 = CFG exactly)")
    window: float = param(0.625, low=0.0, low_open=True, high=1.0,
                          doc="window size as a fraction of the latent's height and width (1 = the whole latent)")
    windows: int = param(2, low=2, high=16, doc="windows per dimension n (n^2 windows, evenly spaced, edge to edge)")
    mask: bool = param(True, choices=(True, False), doc="M-SWG: guide only pixels covered by more than one window")
    sigma_min: float = param(0.0, low=0.0, doc="SWG term only where sigma >= sigma_min (CFG always)")
    sigma_max: float = param(math.inf, low=0.0, doc="SWG term only where sigma <= sigma_max (CFG always)")
    start: float = param(0.0, low=0.0, high=1.0, doc="SWG term from this fraction of the steps")
    stop: float = param(1.0, low=0.0, high=1.0, doc="SWG term before this fraction of the steps")

    def schedule_targets(self) -> tuple[tuple[str, float], ...]:
        """The schedule shapes the SWG term's w (from 0); CFG's scale stays constant."""
        return (("swg_scale", 0.0),)

    def swg_scale_at(self, step: StepInfo) -> float:
        """w at this step: shaped by ``schedule`` inside the interval, 0 outside."""
        return self.shaped("swg_scale", step, neutral=0.0)

    def required_branches(self) -> set[str]:
        return {"cond"} if self.scale == 1 else {"cond", "uncond"}

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        if self.window < 1 and self.swg_scale != 0 and getattr(step, "evaluate", None) is None:
            raise ValueError("swg: evaluates the network on windows of the latent inside a step, which needs the "
                             "sampler core's in-step evaluator (StepInfo.evaluate); this core provides none")
        return ("uncond", "cond") if self.scale != 1 else ("cond",)

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond, uncond = preds["cond"], preds.get("uncond")
        w = self.swg_scale_at(step)
        reference = swg_reference(cond, step.evaluate, self.window, self.windows, self.mask) if w != 0 else None
        if uncond is None and reference is None:
            return GuidedPrediction.single(cond)
        out = perturbed_guidance(cond.output, None if uncond is None else uncond.output, reference, self.scale, w)
        return GuidedPrediction.single(cond.with_output(out))
