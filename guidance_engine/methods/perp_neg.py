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
equation could not be read here; the code above is the reference we verified. Several negatives
(the authors' sum over i; sd-webui-neutral-prompt's AND_PERP): the call's ``negative_prompt`` at
``neg_scale``, or, with ``negatives`` (a list of (prompt, weight) pairs, each its own branch), those;
a call's negative prompt then fills the unconditional branch as in plain CFG (u = eps of the
negative prompt), so the weighted perpendicular negatives compose with an ordinary one. The
projection is per sample
(the authors' 3D code; their 2D code runs one sample; ComfyUI pools the dot product over the
whole batch, which mixes samples). diffusers ships no Perp-Neg guider.

Space: the combination uses differences only, and a per-sample change of parametrisation scales
every difference by the same factor, so the result is the same in eps, x0, v and flow space; it
acts on the raw output (the noise prediction for SD, as the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register
from ..vectors import project


def perp_neg(cond: torch.Tensor, uncond: torch.Tensor, negative: torch.Tensor | Sequence[torch.Tensor],
             scale: float, neg_scale: float | Sequence[float]) -> torch.Tensor:
    """eps_u + w (d_c - sum_i w_i perp(d_n_i, d_c)), per sample (projections in float64); one
    negative and one weight, or sequences of both."""
    negatives = [negative] if isinstance(negative, torch.Tensor) else list(negative)
    weights = [neg_scale] if isinstance(neg_scale, (int, float)) else list(neg_scale)
    d_c = cond - uncond
    removed = torch.zeros_like(d_c)
    for eps_n, weight in zip(negatives, weights, strict=True):
        _, d_n_perp = project(eps_n - uncond, d_c)
        removed = removed + weight * d_n_perp
    return uncond + scale * (d_c - removed)


NEGATIVES_ACCEPTED = ("a list of (prompt, weight) pairs with weights in [0, 100], or a string "
                      "'prompt:weight | prompt:weight' (a weight left out is 1)")


def normalize_negatives(value: Any, owner: str) -> tuple[tuple[str, float], ...]:
    """``negatives`` as a tuple of (prompt, weight) pairs; ValueError naming the form otherwise."""
    if value is None or value == () or value == []:
        return ()
    if isinstance(value, str):
        pairs = []
        for item in value.split("|"):
            text, sep, weight = item.rpartition(":")
            try:
                pairs.append((text.strip(), float(weight)) if sep else (item.strip(), 1.0))
            except ValueError:
                pairs.append((item.strip(), 1.0))  # a colon inside the prompt, no weight
        value = pairs
    out = []
    for pair in value if isinstance(value, (list, tuple)) else [None]:
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str) and pair[0].strip() \
            and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool) and 0.0 <= pair[1] <= 100.0
        if not ok:
            raise ValueError(f"{owner}: parameter 'negatives' must be {NEGATIVES_ACCEPTED}, got {value!r}")
        out.append((pair[0].strip(), float(pair[1])))
    return tuple(out)


@register
@dataclass(frozen=True, kw_only=True)
class PerpNeg(Guidance):
    """Perp-Neg: CFG minus the negative prompt's direction perpendicular to the prompt's."""

    name: ClassVar[str] = "perp_neg"
    paper: ClassVar[str] = "Armandpour et al., Re-imagine the Negative Prompt Algorithm (Perp-Neg), arXiv 2304.04968"

    scale: float = param(7.5, low=0.0, high=100.0, doc="guidance scale w (CFG convention)")
    neg_scale: float = param(1.0, low=0.0, high=100.0,
                             doc="w_neg: weight of the negative prompt's perpendicular part (0 = CFG)")
    negatives: Any = field(default=(), metadata={
        "accepted": NEGATIVES_ACCEPTED,
        "doc": "several weighted negatives, each its own branch: " + NEGATIVES_ACCEPTED + "; the call's "
               "negative_prompt then is CFG's usual negative (empty: the empty prompt)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "negatives", normalize_negatives(self.negatives, self.name))

    def to_dict(self) -> dict[str, Any]:
        config = super().to_dict()
        config["negatives"] = [list(pair) for pair in self.negatives]  # JSON has no tuples
        return config

    def branch_prompts(self) -> dict[str, str]:
        """The branches this method fills with prompts of its own: ``negative_<k>`` per pair."""
        return {f"negative_{k}": text for k, (text, _) in enumerate(self.negatives, start=1)}

    def _negative_weights(self) -> dict[str, float]:
        """Each negative branch and its weight (w_i > 0 only: a zero weight costs no forward)."""
        if self.negatives:
            weights = {name: w for name, (_, w) in zip(self.branch_prompts(), self.negatives)}
        else:
            weights = {"negative": self.neg_scale}
        return {name: w for name, w in weights.items() if w > 0}

    def required_branches(self) -> set[str]:
        # Without `negatives` always "negative": a pipeline then routes the call's negative prompt
        # there (never to "uncond"), so that w_neg -> 0 tends to CFG with the empty prompt, and
        # w_neg = 0 is that CFG.
        if self.negatives:
            return {"cond", "uncond", *self.branch_prompts()}
        return {"cond", "uncond", "negative"}

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        if not self.active(step):
            return ("cond",)
        negatives = tuple(self._negative_weights())
        if not negatives:
            return super().branches(step, state)
        return ("uncond", *negatives, "cond")  # at w = 1 the negative terms still act

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        if "uncond" not in preds:
            return GuidedPrediction.single(cond)
        uncond = preds["uncond"]
        weights = {name: w for name, w in self._negative_weights().items() if name in preds}
        if not weights:
            return GuidedPrediction.single(uncond.lerp(cond, self.scale_at(step)))  # w_neg = 0: CFG
        guided = perp_neg(cond.output.float(), uncond.output.float(), [preds[n].output.float() for n in weights],
                          self.scale_at(step), list(weights.values()))
        return GuidedPrediction.single(cond.with_output(guided.to(cond.output.dtype)))
