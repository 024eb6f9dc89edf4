"""FreSca: CFG with its guidance difference scaled in frequency space (Huang et al. 2025,
"FreSca: Scaling in Frequency Space Enhances Diffusion Models", arXiv 2504.02154; official code
WikiChao/FreSca core/fresca.py; ComfyUI core comfy_extras/nodes_fresca.py).

Per sample and channel, with F the 2-D DFT over the last two (spatial) dimensions:

    d   = c - u
    d'  = Re F^-1( M . F d )                 M = scale_low in the low box, scale_high elsewhere
    out = u + s d'                           CFG with the filtered difference

The low box, on the centred spectrum (fftshift, zero frequency at index H // 2, W // 2), is the
index range [H//2 - r, H//2 + r) x [W//2 - r, W//2 + r), r = min(freq_cutoff, H // 2, W // 2)
(the official code's bound): frequencies -r .. r - 1 on each axis. That box is not symmetric
(-r is in it, +r is not) and the real part of the inverse transform averages M(k) and M(-k), so
the rows and columns at |k| = r get (scale_low + scale_high) / 2: the peers' arithmetic, kept.
The transform runs in float32 (float64 if the outputs are) and the result is cast back.

Space: d is linear in each branch and the filter is linear (a real mask, then the real part), and
x0 differences are the raw outputs' differences times a per-sample scalar (-sigma/alpha for eps,
-sigma for v and flow), so the rule gives the same guided x0 on the raw output (the official code:
the noise prediction) as on x0 (ComfyUI: ``conds_out``, denoised); it acts on the raw output.

Identity: with scale_low = scale_high = m the mask is constant and F^-1(m F d) = m d, so the
transform is skipped: scale_low = scale_high = 1 is CFG at s bit for bit (for float32 outputs).
Through the transform the same case differs from d by the FFT round trip's rounding only: at
most eps log2(H W) max |d| (eps = float32's, the usual FFT round-off bound; measured 0.12-0.16 of
it on 8 x 8 to 128 x 96 grids). Note that at s = 1 FreSca is not the conditional alone unless
scale_low = scale_high = 1: u + d' still re-weights the bands of c - u.

Defaults: ComfyUI's node (scale_low 1, scale_high 1.25, freq_cutoff 20; ranges [0, 10], [0, 10],
integers [1, 100]); the official code's functions default to scale_high 1.5. s = 7.5, the official
code's example guidance scale.

Deviations: ComfyUI slices the box with freq_cutoff unbounded, so past H // 2 a negative start
wraps around (e.g. H = 32, freq_cutoff 20: rows 28..31 only); here the official bound (the whole
spectrum is low). The peers cast to float32 (a float64 input too); here float64 stays float64.
Latents with more leading dimensions (video: [B, C, F, H, W]) are filtered frame by frame over
(H, W) (the peers take [B, C, H, W] only). The official code's energy-based adaptive cutoff (its
newer ``frequency_filter``, pooled over the batch) is not offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register


def frequency_mask(size: tuple[int, int], scale_low: float, scale_high: float, freq_cutoff: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """M on the unshifted spectrum (torch.fft's order): the centred box of half-width r =
    min(freq_cutoff, H // 2, W // 2) at scale_low, the rest at scale_high."""
    h, w = size
    r = min(freq_cutoff, h // 2, w // 2)
    centred = torch.full((h, w), scale_high, dtype=dtype, device=device)
    centred[h // 2 - r:h // 2 + r, w // 2 - r:w // 2 + r] = scale_low
    # Masking the shifted spectrum and shifting back equals masking with the unshifted mask.
    return torch.fft.ifftshift(centred)


def frequency_scaled(x: torch.Tensor, scale_low: float, scale_high: float, freq_cutoff: int) -> torch.Tensor:
    """Re F^-1(M . F x) over the last two dimensions, in float32 at least."""
    work = torch.promote_types(x.dtype, torch.float32)
    spectrum = torch.fft.fft2(x.to(work))
    mask = frequency_mask(x.shape[-2:], scale_low, scale_high, freq_cutoff, work, x.device)
    return torch.fft.ifft2(spectrum * mask).real


def fresca_update(cond: torch.Tensor, uncond: torch.Tensor, scale: float, scale_low: float, scale_high: float,
                  freq_cutoff: int) -> torch.Tensor:
    """``u + s d'``, d' the frequency-scaled c - u (a constant mask is a plain multiple of d)."""
    work = torch.promote_types(cond.dtype, torch.float32)
    c, u = cond.to(work), uncond.to(work)
    diff = c - u
    if scale_low == scale_high:
        diff = diff * scale_low
    else:
        diff = frequency_scaled(diff, scale_low, scale_high, freq_cutoff)
    return u + scale * diff


@register
@dataclass(frozen=True, kw_only=True)
class FreSca(Guidance):
    """CFG with the guidance difference's low and high spatial frequencies scaled apart."""

    name: ClassVar[str] = "fresca"
    paper: ClassVar[str] = ("Huang et al., FreSca: Scaling in Frequency Space Enhances Diffusion Models (arXiv "
                            "2504.02154; code WikiChao/FreSca); ComfyUI's FreSca node (comfy_extras/nodes_fresca.py)")

    scale: float = param(7.5, low=0.0, high=100.0, doc="CFG scale s, u + s d' with d' the filtered c - u")
    scale_low: float = param(1.0, low=0.0, high=10.0, doc="factor of the difference's low frequencies")
    scale_high: float = param(1.25, low=0.0, high=10.0, doc="factor of the difference's high frequencies")
    freq_cutoff: int = param(20, low=1, high=100,
                             doc="r: half-width, in frequency indices, of the centred low-frequency box")

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        identity = self.scale_low == self.scale_high == 1.0
        if not self.active(step) or (identity and self.scale_at(step) == self.neutral_scale):
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        if "uncond" not in preds:  # outside the interval, or the conditional alone
            return GuidedPrediction.single(cond)
        if cond.output.ndim < 4:
            raise ValueError(f"{self.name}: needs spatial predictions [B, C, (F,) H, W], got shape "
                             f"{tuple(cond.output.shape)}")
        guided = fresca_update(cond.output, preds["uncond"].output, self.scale_at(step), self.scale_low,
                               self.scale_high, self.freq_cutoff)
        return GuidedPrediction.single(cond.with_output(guided.to(cond.output.dtype)))
