"""Dynamic Thresholding ("CFG Scale Fix"): mcmonkey's extension for A1111, ComfyUI and SwarmUI
(github.com/mcmonkeyprojects/sd-dynamic-thresholding, dynthres_core.py ``DynThresh.dynthresh``).

CFG at a high scale s whose denoised prediction is renormalised to the spread of a CFG at a low
"mimic" scale s_m, on x0 (denoised) predictions, per sample b and channel k over the positions n
(the extension flattens every dimension after the channel one):

    d = D_c - D_u
    m = D_u + s_m d,   g = D_u + s d                   the mimic and the CFG targets
    m~ = m - mean_n(m),   g~ = g - mean_n(g)           centred per channel
    AD:  r_m = max_n |m~|,   r_g = quantile_p |g~|      (p = threshold_percentile)
    STD: r_m = std(m~),      r_g = std(g~)             (torch.std; its correction cancels in r_m / r_g)
         the spreads per channel (separate_feature_channels) or over all channels of the sample
    MEAN, AD:  L = max(r_m, r_g);  out = clamp(g~, -L, L) / L * r_m + mean_n(g)
    MEAN, STD: out = g~ / r_g * r_m + mean_n(g)
    ZERO:      out = g * r_m / r_g                     (no clamp; uncentred values, centred spreads)
    out <- phi out + (1 - phi) g                       (interpolate_phi < 1)

So with p = 1 (the default) the CFG target is shrunk, channel by channel around its mean, to
the mimic's peak deviation; p < 1 also clips its top 1 - p fraction of deviations first.

Scales: s and s_m in the engine's convention u + s (c - u) (the extension's too: A1111's and
ComfyUI's cfg). Each can follow one of the extension's mode schedules ("Constant", "Linear Down",
..., written here in lower case with underscores): s(f) = min + (s - min) shape(f), with f = i /
(n - 1) the fraction of the run at step i of n (A1111's step / (max_steps - 1)), ``sched_val``
the power of the power modes and the repeats of the repeating ones. The engine's own
``schedule`` shapes both s and s_m (``shaped_scales``); it and a non-constant mode are not
combined (refused).

Space: x0. A1111 replaces k-diffusion's ``combine_denoised`` (denoised predictions); ComfyUI's
``sampler_cfg_function`` receives x - (x - D) = D. The extension's UniPC variant (A1111 only),
which applies the same rule to eps, is not offered.

Identity: where the step's s_m equals s, or phi = 0, the result is CFG at s bit for bit (the
raw-output lerp of :class:`~guidance_engine.methods.cfg.CFG`), as the ComfyUI node returns plain
CFG when mimic == cfg (since commit 5d63447). Without that skip the arithmetic gives CFG up to
float32 rounding only: L = r_m when s_m = s (a quantile never exceeds the maximum), but the
centring, the division and the multiplication by r_m each round.

Imagen's dynamic thresholding (Saharia et al. 2022, arXiv 2205.11487: s = max(1, quantile_p |x0|)
per sample, x0 <- clamp(x0, -s, s) / s) is not a mode of this method: it bounds data of a known
range, [-1, 1] pixels, centred at zero with the floor max(1, .); the extension matches an
adaptive target (the mimic CFG's spread) per channel around the channel mean, as latents have no
fixed range. ZERO + AD rescales without clipping and MEAN + AD clips at max(r_m, r_g), so neither
reduces to Imagen's rule. Imagen's rule is diffusers' ``thresholding=True`` of its schedulers.

Defaults: the A1111 extension's (mimic 7, percentile 100 % = 1.0, constant modes with minimum 0,
sched_val 4, separate channels, MEAN, AD, phi 1; the ComfyUI node's are the same except sched_val
1); s = 15, the extension wiki's example (CFG 15 with mimic 7). Ranges: the ComfyUI node's.

Deviations from the extension: without separate channels its spreads are taken over the whole
batch tensor, here per sample (a sample equals itself alone in a batch); a zero spread (a constant
channel) leaves the values as they are where the extension divides 0 by 0; the mode fraction is
A1111's step fraction (ComfyUI's node uses (999 - t) / 998 of the model's timestep t); the
identity skip compares the step's scales (the node compares the unscheduled ones); no
experiment_mode and no prompt weights (A1111's AND composition).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register

#: The extension's mode shapes of a scale at run fraction f (``v``: sched_val), its constants
#: included (1.5707 and 6.28318 rather than pi / 2 and 2 pi), so that its schedules are reproduced.
MODE_SHAPES: dict[str, Callable[[float, float], float]] = {
    "constant": lambda f, v: 1.0,
    "linear_down": lambda f, v: 1.0 - f,
    "cosine_down": lambda f, v: math.cos(f * 1.5707),
    "half_cosine_down": lambda f, v: math.cos(f),
    "linear_up": lambda f, v: f,
    "cosine_up": lambda f, v: 1.0 - math.cos(f * 1.5707),
    "half_cosine_up": lambda f, v: 1.0 - math.cos(f),
    "power_up": lambda f, v: math.pow(f, v),
    "power_down": lambda f, v: 1.0 - math.pow(f, v),
    "linear_repeating": lambda f, v: abs((f * v) % 1.0 - 0.5) * 2.0,
    "cosine_repeating": lambda f, v: math.cos(f * 6.28318 * v) * 0.5 + 0.5,
    "sawtooth": lambda f, v: (f * v) % 1.0,
}
MODES: tuple[str, ...] = tuple(MODE_SHAPES)


def scheduled(scale: float, mode: str, minimum: float, fraction: float, sched_val: float) -> float:
    """The extension's ``interpret_scale``: ``minimum + (scale - minimum) shape(fraction)``;
    the scale itself, exactly, in mode "constant"."""
    if mode == "constant":
        return scale
    return minimum + (scale - minimum) * MODE_SHAPES[mode](fraction, sched_val)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 1 where the denominator is 0 (a constant channel keeps its values)."""
    return torch.where(denominator > 0, numerator / denominator, torch.ones_like(denominator))


def _spread(centred: torch.Tensor, measure: str, percentile: float) -> torch.Tensor:
    """The spread of (B, K, N) centred values over N: the std, or the ``percentile`` quantile of
    the absolute deviations (1: their maximum)."""
    if measure == "std":
        return centred.std(dim=2, keepdim=True)
    deviations = centred.abs()
    if percentile == 1.0:
        return deviations.amax(dim=2, keepdim=True)
    return torch.quantile(deviations, percentile, dim=2, keepdim=True)


def dynamic_threshold(cond: torch.Tensor, uncond: torch.Tensor, scale: float, mimic_scale: float, *,
                      percentile: float, separate_channels: bool, startpoint: str, measure: str,
                      phi: float) -> torch.Tensor:
    """The extension's renormalised CFG of x0 tensors (B, C, ...), per sample (see the module)."""
    diff = cond - uncond
    mimic = uncond + diff * mimic_scale
    guided = uncond + diff * scale
    b, c = guided.shape[:2]
    mimic_flat, guided_flat = mimic.reshape(b, c, -1), guided.reshape(b, c, -1)
    guided_mean = guided_flat.mean(dim=2, keepdim=True)
    mimic_centred = mimic_flat - mimic_flat.mean(dim=2, keepdim=True)
    guided_centred = guided_flat - guided_mean
    pooled = (b, c, -1) if separate_channels else (b, 1, -1)  # spreads per channel or per sample
    mimic_ref = _spread(mimic_centred.reshape(pooled), measure, 1.0)
    guided_ref = _spread(guided_centred.reshape(pooled), measure, percentile)
    if startpoint == "zero":
        result = guided_flat * _ratio(mimic_ref, guided_ref)
    elif measure == "std":
        result = guided_centred * _ratio(mimic_ref, guided_ref) + guided_mean
    else:  # MEAN, AD: clip the deviations at the larger spread, then scale it to the mimic's
        limit = torch.maximum(mimic_ref, guided_ref)
        result = torch.clamp(guided_centred, -limit, limit) * _ratio(mimic_ref, limit) + guided_mean
    result = result.reshape(guided.shape)
    if phi != 1.0:
        result = result * phi + guided * (1.0 - phi)
    return result


@register
@dataclass(frozen=True, kw_only=True)
class DynamicThresholding(Guidance):
    """CFG at a high scale renormalised, per channel, to the spread of CFG at a low mimic scale
    (mcmonkey's Dynamic Thresholding extension)."""

    name: ClassVar[str] = "dynamic_thresholding"
    paper: ClassVar[str] = ("mcmonkey's Dynamic Thresholding (CFG Scale Fix) extension, github.com/mcmonkeyprojects/"
                            "sd-dynamic-thresholding (dynthres_core.py); after Imagen's dynamic thresholding (Saharia "
                            "et al. 2022, arXiv 2205.11487)")
    #: the engine's schedule shapes both scales alike (at a linear schedule's first step both are 1)
    shaped_scales: ClassVar[tuple[str, ...]] = ("scale", "mimic_scale")

    scale: float = param(15.0, low=0.0, high=100.0, doc="CFG scale s, u + s (c - u); 1 = conditional only")
    mimic_scale: float = param(7.0, low=0.0, high=100.0,
                               doc="s_m: the CFG scale whose spread the result mimics (= scale: plain CFG)")
    threshold_percentile: float = param(1.0, low=0.0, high=1.0,
                                        doc="p: quantile of the CFG target's deviations taken as its spread "
                                            "(1 = the maximum; < 1 clips the top 1 - p first); AD only")
    mimic_mode: str = param("constant", choices=MODES, doc="the extension's schedule of the mimic scale")
    mimic_scale_min: float = param(0.0, low=0.0, high=100.0, doc="the mimic scale's schedule minimum")
    cfg_mode: str = param("constant", choices=MODES, doc="the extension's schedule of the CFG scale")
    cfg_scale_min: float = param(0.0, low=0.0, high=100.0, doc="the CFG scale's schedule minimum")
    sched_val: float = param(4.0, low=0.0, high=100.0,
                             doc="power of the power modes, repeats of the repeating modes and sawtooth")
    separate_feature_channels: bool = param(True, choices=(True, False),
                                            doc="spreads per channel (True) or over all channels of a sample")
    scaling_startpoint: str = param("mean", choices=("mean", "zero"),
                                    doc="rescale around each channel's mean or around zero (no clamp)")
    variability_measure: str = param("ad", choices=("ad", "std"),
                                     doc="spread: absolute deviation (max / percentile) or standard deviation")
    interpolate_phi: float = param(1.0, low=0.0, high=1.0,
                                   doc="phi: blend of the result with the plain CFG target (0 = plain CFG)")

    def __post_init__(self) -> None:
        super().__post_init__()
        modes = {mode for mode in (self.cfg_mode, self.mimic_mode) if mode != "constant"}
        if self.shape.name != "constant" and modes:
            raise ValueError(f"{self.name}: schedule {self.schedule!r} and mode(s) {', '.join(sorted(modes))} would "
                             "both shape the scales; use schedule 'constant' with the modes, or constant modes")

    def scales_at(self, step: StepInfo) -> tuple[float, float]:
        """(s, s_m) at this step: the engine's schedule and interval, then the extension's modes;
        both neutral outside the interval."""
        if not self.active(step):
            return self.neutral_scale, self.neutral_scale
        cfg = self.scale_at(step)
        mimic = cfg if self.mimic_scale == self.scale else self.shaped("mimic_scale", step)
        fraction = step.index / (step.num_steps - 1) if step.num_steps > 1 else 0.0
        return (scheduled(cfg, self.cfg_mode, self.cfg_scale_min, fraction, self.sched_val),
                scheduled(mimic, self.mimic_mode, self.mimic_scale_min, fraction, self.sched_val))

    def _plain_cfg(self, cfg: float, mimic: float) -> bool:
        """Whether the step is CFG at ``cfg``: nothing to mimic, or a blend that keeps CFG alone."""
        return mimic == cfg or self.interpolate_phi == 0.0

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        cfg, mimic = self.scales_at(step)
        if cfg == self.neutral_scale and self._plain_cfg(cfg, mimic):
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        if "uncond" not in preds:  # outside the interval, or CFG at scale 1
            return GuidedPrediction.single(cond)
        uncond = preds["uncond"]
        cfg, mimic = self.scales_at(step)
        if self._plain_cfg(cfg, mimic):
            return GuidedPrediction.single(uncond.lerp(cond, cfg))  # CFG's own arithmetic, bit for bit
        if cond.x0.ndim < 3:
            raise ValueError(f"{self.name}: needs predictions with a channel dimension and positions "
                             f"[B, C, ...], got shape {tuple(cond.x0.shape)}")
        x0 = dynamic_threshold(cond.x0, uncond.x0, cfg, mimic, percentile=self.threshold_percentile,
                               separate_channels=self.separate_feature_channels,
                               startpoint=self.scaling_startpoint, measure=self.variability_measure,
                               phi=self.interpolate_phi)
        return GuidedPrediction.single(Prediction.from_x0(x0, like=cond))
