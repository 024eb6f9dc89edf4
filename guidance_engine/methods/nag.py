"""Normalized Attention Guidance, NAG (Chen et al., NeurIPS 2025, arXiv 2505.21179).

In every cross-attention layer of the conditional branch, with Z+ the attention output under the
prompt and Z- under the negative prompt (the same queries; the authors' code, per token, over the
channels, before the output projection):

    Z~ = s Z+ - (s - 1) Z-                       extrapolate away from the negative context
    r  = |Z~|_p / |Z+|_p                         norms over channels, per token (p = 1; Flux.1: 2)
    Zn = Z~ min(r, tau) / r                      shrink where the extrapolation grew past tau
    Z  = alpha Zn + (1 - alpha) Z+               blend back towards the positive output

The paper writes Z~ = Z+ + phi (Z+ - Z-): ``nag_scale`` s here is phi + 1, the authors' code's
``nag_scale`` (s = 1: no guidance). Defaults: the authors' pipelines, s 5 (their Flux and SD 3.5
examples; SDXL-DMD2 uses 3), tau 2.5, alpha by attention kind (:data:`DEFAULT_ALPHA`: 0.5 on UNet
cross-attention, their SDXL pipeline; 0.25 Wan and Flux.1; 0.125 SD3 / SD 3.5). Their Flux
pipeline's ``nag_end`` (NAG runs while t / 1000 >= 1 - nag_end, t the flow timestep) is
``sigma_min = (1 - nag_end) / nag_end`` in the engine's sigma; their SD3 pipeline has none.

Joint attention (SD3 and the flow transformers: text and image tokens in one attention): the
authors carry the negative prompt's text stream through every block, each block updating it as it
updates the prompt's (their extra batch rows of the text stream; :mod:`pipelines.joint_context_attention`
is the engine's form), and extrapolate the image tokens' attention output; single-stream layers
(Flux's) give the negative rows the guided image output too. Their SD3 processor uses L1 norms,
their Flux.1 processor L2 (:data:`NORM_ORDER`); for Chroma, Flux.2, Qwen-Image and Z-Image, which
they have no diffusers pipeline for, the paper's L1 with alpha 0.25 (their ComfyUI nodes' default).

The negative context is the unconditional branch's conditioning: the negative prompt when one is
given, else the empty prompt (their default ``nag_negative_prompt``). NAG runs alone (``scale``
1: one forward per step, for distilled models at CFG 1, where a negative prompt otherwise does
nothing) or under CFG at ``scale`` (the authors' batch: the unconditional rows plain, the
conditional rows guided), or under any method combining cond and uncond (``base``: APG, CFG-Zero*,
CFG++, AG, ...): NAG alters the conditional branch those methods read. ``nag_scale`` 1 and
``alpha`` 0 leave the conditional branch as it is, so no NAG rows run (the authors' processors
compute Z- and then drop it).

Peers: diffusers 0.42.1 has no NAG; ComfyUI has an experimental node. Deviations from the authors'
code, all ours on purpose: the extrapolation and the norms are computed in float32 whatever the
network's dtype (theirs in the network dtype, so an fp16 L1 norm over 1280 channels can overflow);
a token where Z+ and Z- are both 0 stays 0 (theirs computes 0 / 0 there: NaN); their SD3
processor's 1e-7 added to |Z+| and to r is left out (a relative change below 1e-7 where r is of
order 1); their ComfyUI nodes use L1 on Flux.1 too, and clamp both norms at 1e-6.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..guidance import Branch, ContextExtrapolation, Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register, resolve_guidance
from .perturbed import layers_param, normalize_layers

#: The authors' alpha by attention kind ("cross": a UNet's cross-attention, their SDXL pipeline;
#: "video_cross": Wan's text cross-attention, their Wan processor's default; "joint": SD3's MMDiT
#: joint attention, their SD3 processor and pipeline; "flux": Flux.1's double- and single-stream
#: attention, their Flux processor and pipeline; "flow": the other flow transformers' joint
#: attention (Chroma, Flux.2, Qwen-Image, Z-Image), their ComfyUI nodes' default).
DEFAULT_ALPHA: dict[str, float] = {"cross": 0.5, "video_cross": 0.25, "joint": 0.125, "flux": 0.25, "flow": 0.25}
#: The norm p of the ratio r by attention kind: 1 (the paper) except Flux.1, whose processor in the
#: authors' Flux pipeline takes L2 norms.
NORM_ORDER: dict[str, int] = {"flux": 2}


def _norm(z: torch.Tensor, order: int) -> torch.Tensor:
    """|z|_p over the channels, per token (p = 1 as a sum of magnitudes, the form the UNet tests pin)."""
    if order == 1:
        return z.abs().sum(-1, keepdim=True)
    return torch.linalg.vector_norm(z, ord=order, dim=-1, keepdim=True)


def normalized_attention_guidance(positive: torch.Tensor, negative: torch.Tensor, scale: float, tau: float,
                                  alpha: float, order: int = 1) -> torch.Tensor:
    """NAG's rule on attention outputs (..., tokens, channels), per token, in float32; ``order``: the
    norm p of the ratio (1 or 2)."""
    z_pos, z_neg = positive.float(), negative.float()
    extrapolated = scale * z_pos - (scale - 1.0) * z_neg
    ratio = _norm(extrapolated, order) / _norm(z_pos, order)
    # shrink by min(r, tau) / r where r > tau: a zero positive token (r = inf) gets the cap's limit,
    # 0, as the authors' code; r = 0 / 0 (Z+ and Z- both zero) leaves the zero token (theirs: NaN)
    shrink = torch.where(ratio > tau, tau / ratio, torch.ones_like(ratio))
    normalized = extrapolated * shrink
    return alpha * normalized + (1.0 - alpha) * z_pos


@dataclass(frozen=True)
class NAGAttention(ContextExtrapolation):
    """NAG's alteration of the chosen cross-attention layers (one step's strength)."""

    scale: float = 5.0
    tau: float = 2.5
    alpha: float | None = None

    def extrapolate(self, positive: torch.Tensor, negative: torch.Tensor, attention: str) -> torch.Tensor:
        alpha = DEFAULT_ALPHA[attention] if self.alpha is None else self.alpha
        return normalized_attention_guidance(positive, negative, self.scale, self.tau, alpha,
                                             NORM_ORDER.get(attention, 1))


@register
@dataclass(frozen=True, kw_only=True)
class NAG(Guidance):
    """Normalized attention guidance: a negative prompt acting inside cross-attention."""

    name: ClassVar[str] = "nag"
    paper: ClassVar[str] = ("Chen et al., Normalized Attention Guidance: Universal Negative Guidance for Diffusion "
                            "Models (NeurIPS 2025, arXiv 2505.21179)")
    #: ``schedule`` shapes NAG's strength (CFG at ``scale`` stays constant, as PAG's); both stay in range
    shaped_scales: ClassVar[tuple[str, ...]] = ("scale", "nag_scale")
    #: the interval bounds NAG's alteration; CFG at ``scale`` runs at every step
    off_outside_interval: ClassVar[Mapping[str, Any]] = {"scale": 1.0}

    scale: float = param(1.0, low=0.0, high=100.0,
                         doc="CFG scale on top (1 = NAG alone: one forward per step, for distilled models)")
    nag_scale: float = param(5.0, low=1.0, high=100.0,
                             doc="extrapolation s: Z~ = s Z+ - (s - 1) Z- (the paper's phi + 1; 1 = no NAG)")
    tau: float = param(2.5, low=1.0, high=100.0, doc="cap on |Z~|_1 / |Z+|_1 per token (the normalisation)")
    alpha: float | None = param(None, low=0.0, high=1.0, optional=True,
                                doc="blend of the normalised output with Z+ (None = the authors' value for the "
                                    "attention: 0.5 UNets, 0.25 Wan and Flux, 0.125 SD3; 0 = no NAG)")
    layers: Any = layers_param("layers to guide: UNet cross-attention ('down', 'mid', 'up', 'down.1', a module "
                               "path prefix) or transformer blocks (7, 'single.3'); None = every one, as the "
                               "authors")
    base: Any = field(default=None, metadata={
        "doc": "a method combining cond and uncond instead of CFG at `scale` (apg, cfgpp, cfg_zero_star, ag, ...)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", normalize_layers(self.layers, self.name))
        if self.base is None:
            return
        base = self.base if isinstance(self.base, Guidance) else resolve_guidance(self.base)
        if isinstance(base, NAG) or base.altered_branches() or int(getattr(base, "particles", 1) or 1) > 1 \
                or not base.required_branches() <= {"cond", "uncond"}:
            raise ValueError(f"{self.name}: parameter 'base' must be a method that combines the conditional and "
                             f"unconditional predictions, altering no layer and without particles (cfg, apg, cfgpp, cfg_zero_star, "
                             f"tcfg, ag, ...), got {base.name!r}")
        if self.scale != 1.0:
            raise ValueError(f"{self.name}: with 'base', set the scale inside it (base={{'name': {base.name!r}, "
                             f"'scale': ...}}), got scale={self.scale!r}")
        object.__setattr__(self, "base", base)

    @property
    def renoise_split(self) -> bool:  # type: ignore[override]
        return self.base is not None and self.base.renoise_split

    def to_dict(self) -> dict[str, Any]:
        config = super().to_dict()
        if self.base is not None:
            config["base"] = self.base.to_dict()
        return config

    # -- per-run state: the base method's -------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device) -> Any:
        return None if self.base is None else self.base.init_state(batch_size, device)

    def select_state(self, state: Any, index: torch.Tensor) -> Any:
        return state if self.base is None else self.base.select_state(state, index)

    def update_state_rows(self, state: Any, rows: torch.Tensor, sub: Any, batch_size: int) -> Any:
        return sub if self.base is None else self.base.update_state_rows(state, rows, sub, batch_size)

    # -- the branches ------------------------------------------------------------------------------
    def nag_scale_at(self, step: StepInfo) -> float:
        """s at this step: shaped by ``schedule`` inside the interval, 1 (off) outside."""
        return self.shaped("nag_scale", step, neutral=1.0)

    def conditional(self, nag_scale: float) -> Branch:
        """The conditional branch with its cross-attention guided away from the negative context."""
        return Branch("cond", base="cond", perturb=NAGAttention(layers=self.layers, context="uncond",
                                                                scale=nag_scale, tau=self.tau, alpha=self.alpha))

    def required_branches(self) -> set[str]:
        # "uncond" always: its conditioning is the negative context, even when its rows never run
        return (self.base.required_branches() if self.base is not None else set()) | {"cond", "uncond"}

    def alters(self, nag_scale: float) -> bool:
        """Whether NAG changes the conditional branch at strength ``nag_scale`` (not at s = 1 nor
        alpha = 0: Z = Z+ there, so the branch runs unaltered)."""
        return nag_scale != 1 and self.alpha != 0

    def altered_branches(self) -> tuple[Branch, ...]:
        return (self.conditional(self.nag_scale),) if self.alters(self.nag_scale) else ()

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...] | dict[str, torch.Tensor | None]:
        if self.base is not None:
            wanted = self.base.branches(step, state)
        else:
            wanted = ("uncond", "cond") if self.scale != 1 else ("cond",)
        nag_scale = self.nag_scale_at(step)
        if not self.alters(nag_scale):
            return wanted
        guided = self.conditional(nag_scale)
        if isinstance(wanted, Mapping):  # AG's shrinking batch: the same rows, guided
            return {guided if name == "cond" else name: rows for name, rows in wanted.items()}
        return tuple(guided if name == "cond" else name for name in wanted)

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        if self.base is not None:
            return self.base.combine(preds, step, state)
        cond = preds["cond"]
        if "uncond" not in preds:
            return GuidedPrediction.single(cond)
        return GuidedPrediction.single(preds["uncond"].lerp(cond, self.scale))
