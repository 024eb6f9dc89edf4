"""Self-Attention Guidance (Hong et al., ICCV 2023, arXiv 2210.00939).

    x0_hat = G(x0) * M + x0 * (1 - M),   x_hat = alpha x0_hat + sigma eps     (same noise level)
    g = [u + s (c - u)] + w (b - D(x_hat))

b: the prediction of the source branch (the conditional one without CFG, the unconditional one
with CFG, as diffusers' ``StableDiffusionSAGPipeline`` reads the paper's eq. 25), x0 and eps its
estimates; G: a Gaussian blur (kernel 9, sigma 1, reflect padding); M: where the source branch's
self-attention concentrates: tokens whose received attention (softmax(Q K^T) averaged over heads,
summed over queries; 1 on average) exceeds ``threshold``, nearest-upsampled to the latent.
D(x_hat): the same network on the degraded input with the source branch's condition, a second
network call after the first forward (its input depends on that forward), counted as one NFE.

Defaults: the deprecated diffusers pipeline's (0.75 SAG, 7.5 CFG, mid block, threshold 1.0).
Equal to ``StableDiffusionSAGPipeline`` on a tiny model (tests; it records its map with the
classic attention, ours the model's own processor, so they agree to float rounding). The
difference ``b - D(x_hat)`` is taken on raw eps outputs for eps models (as diffusers); for v or
flow models in eps space (inputs differ, so raw v or flow differences would not be eps ones).
The base class interval and schedule apply to the SAG term; CFG runs at every step. ``rescale``
(the base class's Lin et al. std rescale towards c, STG's rescaling) acts on the whole guided output,
CFG and SAG terms together, on the raw network output as for the other perturbation methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F

from ..guidance import Branch, GuidedPrediction, StepInfo, param
from ..prediction import Prediction, per_sample
from ..registry import register
from .perturbed import PerturbedGuidance, perturbed_guidance

SOURCES = ("auto", "cond", "uncond")


@dataclass
class AttentionProbe:
    """Filled by the branch model during a forward: the received-attention mass [rows, tokens]
    of one self-attention layer on the base branch's rows, its token grid, and ``evaluate(x)``,
    the network on another input with the base branch's condition."""

    layers: tuple[str | int, ...] | None
    mass: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    evaluate: Callable[[torch.Tensor], torch.Tensor] | None = None

    def record(self, mass: torch.Tensor, grid: tuple[int, int]) -> None:
        self.mass, self.grid = mass, grid


def blur_2d(x: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur of [B, C, H, W] channel by channel (reflect padding), SAG's degradation."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x)
    kernel = (k[:, None] * k[None, :]).expand(x.shape[1], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=x.shape[1])


def degraded_input(source: Prediction, mass: torch.Tensor, grid: tuple[int, int], threshold: float,
                   kernel_size: int, sigma: float) -> torch.Tensor:
    """x_hat = alpha (G(x0) M + x0 (1 - M)) + sigma eps at the source's noise level."""
    x0, eps = source.x0, source.eps
    mask = (mass > threshold).to(x0.dtype).reshape(mass.shape[0], 1, *grid)
    mask = F.interpolate(mask, size=x0.shape[-2:]).expand_as(x0)
    x0_hat = blur_2d(x0, kernel_size, sigma) * mask + x0 * (1 - mask)
    a, s = per_sample(source.alpha_t, x0).to(x0.dtype), per_sample(source.sigma_t, x0).to(x0.dtype)
    return (a * x0_hat + s * eps).to(source.x.dtype)


@register
@dataclass(frozen=True, kw_only=True)
class SAG(PerturbedGuidance):
    """Self-attention guidance: guide away from the prediction on a sample blurred where attention concentrates."""

    name: ClassVar[str] = "sag"
    paper: ClassVar[str] = ("Hong et al., Improving Sample Quality of Diffusion Models Using Self-Attention Guidance "
                            "(arXiv 2210.00939)")
    branch_name: ClassVar[str] = "sag"
    perturb_field: ClassVar[str] = "sag_scale"
    runs_on_row_subsets: ClassVar[bool] = False  # the degraded forward reads the source rows' whole-batch map

    scale: float = param(7.5, low=0.0, high=100.0, doc="CFG scale s (1 = SAG alone)")
    sag_scale: float = param(0.75, low=0.0, high=100.0, doc="SAG scale w (0 = CFG exactly)")
    blur_sigma: float = param(1.0, low=0.0, low_open=True, high=100.0, doc="std of the blur, in latent pixels")
    kernel_size: int = param(9, low=1, high=99, doc="blur kernel size (odd)")
    threshold: float = param(1.0, low=0.0, high=math.inf, doc="mask: received attention above this (1 = mean)")
    source: str = param("auto", choices=SOURCES,
                        doc="branch whose attention and prediction are degraded; auto: uncond with CFG, else cond")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base is not None:  # its degraded forward reads the source branch's whole-batch attention
            raise ValueError("sag: parameter 'base' is not supported (SAG combines with CFG at `scale` only)")
        if not isinstance(self.kernel_size, int) or self.kernel_size % 2 == 0:
            raise ValueError(f"sag: parameter 'kernel_size' must be an odd integer in [1, 99], "
                             f"got {self.kernel_size!r}")

    @property
    def source_branch(self) -> str:
        if self.source != "auto":
            return self.source
        return "uncond" if self.scale != 1 else "cond"

    def required_branches(self) -> set[str]:
        return super().required_branches() | {self.source_branch}

    def branch(self) -> Branch:
        return Branch(self.branch_name, base=self.source_branch, probe=AttentionProbe(self.layers))

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        names = list(super().branches(step, state))
        if self.source_branch not in names:  # SAG alone on the unconditional branch: it is needed
            names.insert(0, self.source_branch)
        return tuple(names)

    def combine_terms(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        """``[u + s (c - u)] + w (b - D(x_hat))`` (before the base class's ``rescale``)."""
        cond, uncond = preds["cond"], preds.get("uncond") if self.scale != 1 else None
        guided = cond if uncond is None else cond.with_output(
            perturbed_guidance(cond.output, uncond.output, None, self.scale, 0.0))
        probe_branch = next((name for name in preds if getattr(name, "probe", None) is not None), None)
        w = self.perturb_scale_at(step)
        if probe_branch is None or w == 0:
            return GuidedPrediction.single(guided)
        probe, source = probe_branch.probe, preds[self.source_branch]
        x_hat = degraded_input(source, probe.mass, probe.grid, self.threshold, self.kernel_size, self.blur_sigma)
        degraded = Prediction(probe.evaluate(x_hat), x_hat, source.alpha_t, source.sigma_t, source.kind)
        if source.kind == "epsilon":  # raw eps, as diffusers
            return GuidedPrediction.single(guided.with_output(guided.output + w * (source.output - degraded.output)))
        eps = guided.eps + w * (source.eps - degraded.eps)
        a, s = per_sample(guided.alpha_t, eps).to(eps.dtype), per_sample(guided.sigma_t, eps).to(eps.dtype)
        return GuidedPrediction.single(Prediction.from_x0((guided.x.to(eps.dtype) - s * eps) / a, guided))
