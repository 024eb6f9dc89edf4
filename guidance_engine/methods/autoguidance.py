"""Autoguidance (Karras et al., NeurIPS 2024, arXiv 2406.02507).

    D = D_0(x | c) + w (D_1(x | c) - D_0(x | c))

D_1: the main model; D_0: a weaker version of it (smaller and/or less trained), evaluated on the
SAME conditional input. One lerp, as CFG's (EDM2 ``ref_Dx.lerp(Dx, guidance)``), so the same in
any parametrisation; w = 1 is the main model alone. Default w = 2.1: the EDM2 preset
``edm2-img512-s-autog-fid`` (S model guided by an XS model trained 1/16 as long; FID 1.34).

``reference="network"`` (the paper): the reference is another network given to the pipeline
(``reference_unet=``, a UNet of the same family taking the same text embeddings); its rows are a
separate network call, as different weights cannot share one batched forward.
``reference="skip"``: the reference is the main network with ``layers`` skipped, rows of the one
forward. ``reference_input="uncond"`` feeds the reference the negative/empty prompt instead:
``reference="skip", reference_input="uncond"`` is diffusers' ``AutoGuidance`` guider
(``auto_guidance_layers=L, dropout=1.0`` -> ``layers=L``; ``guidance_scale`` -> ``scale``), which
thus degrades CFG's unconditional branch rather than following the paper. Its ``dropout < 1``
(random dropout of the skipped blocks' outputs, drawn in train mode) is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..guidance import Branch, Guidance, GuidedPrediction, Perturbation, StepInfo, param
from ..prediction import Prediction
from ..registry import register
from .perturbed import layers_param, normalize_layers

REFERENCES = ("network", "skip")
REFERENCE_INPUTS = ("cond", "uncond")


@register
@dataclass(frozen=True, kw_only=True)
class AutoGuidance(Guidance):
    """Autoguidance: guide the model away from a weaker version of itself on the same input."""

    name: ClassVar[str] = "autoguidance"
    paper: ClassVar[str] = "Karras et al., Guiding a Diffusion Model with a Bad Version of Itself (arXiv 2406.02507)"

    scale: float = param(2.1, low=0.0, high=100.0, doc="guidance weight w (1 = the main model alone)")
    reference: str = param("network", choices=REFERENCES,
                           doc="the weak model: a reference network (reference_unet=) or skipped layers")
    reference_input: str = param("cond", choices=REFERENCE_INPUTS,
                                 doc="the condition the reference sees: cond (paper) or uncond (diffusers)")
    layers: Any = layers_param("blocks skipped with reference='skip'; None = the family default")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", normalize_layers(self.layers, self.name))

    @property
    def reference_branch(self) -> Branch:
        if self.reference == "network":
            return Branch("autoguidance_ref", base=self.reference_input, network="reference")
        return Branch("autoguidance_ref", base=self.reference_input, perturb=Perturbation("skip", self.layers))

    def required_branches(self) -> set[str]:
        return {"cond", self.reference_input}

    def altered_branches(self) -> tuple[Branch, ...]:
        return (self.reference_branch,)

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        if self.scale_at(step) == self.neutral_scale:
            return ("cond",)
        return (self.reference_branch, "cond")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        return GuidedPrediction.single(self.away_from(preds, "autoguidance_ref", step))
