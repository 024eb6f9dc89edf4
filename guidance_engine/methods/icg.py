"""Independent Condition Guidance (Sadat et al., ICLR 2025, arXiv 2407.02687, section 4).

    D = D(x, y_hat) + w (D(x, y) - D(x, y_hat))      y_hat independent of x_t, redrawn every step

CFG without a model trained for the null condition: the reference branch sees a condition drawn
independently of the sample. For text models y_hat is the text encoding of uniformly random token
ids over the full maximum length, with no attention mask ("random_tokens", the paper's choice);
"noise" is zero-mean Gaussian noise scaled by the global std of the real condition tensor (the
paper's alternative for any model); "null" is the ordinary unconditional branch, which makes ICG
CFG exactly (the equality oracle). Linear, so the same in any parametrisation. Default scale 3.0:
the paper's Table 10 value for Stable Diffusion with random text (DiT 1.4, EDM2 1.25).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register

CONDITIONS = ("random_tokens", "noise", "null")


@register
@dataclass(frozen=True, kw_only=True)
class ICG(Guidance):
    """Independent condition guidance: CFG against a condition drawn independently every step."""

    name: ClassVar[str] = "icg"
    paper: ClassVar[str] = "Sadat et al., No Training, No Problem, ICLR 2025 (arXiv 2407.02687)"

    scale: float = param(3.0, low=0.0, high=100.0, doc="guidance scale w (1 = conditional only)")
    condition: str = param("random_tokens", choices=CONDITIONS,
                           doc="y_hat: random token ids, scaled Gaussian noise, or the null condition (= CFG)")

    @property
    def reference(self) -> str:
        """The branch that carries y_hat (pipelines provide ``icg_random_tokens`` / ``icg_noise``)."""
        return "uncond" if self.condition == "null" else f"icg_{self.condition}"

    def required_branches(self) -> set[str]:
        return {"cond", self.reference}

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        if self.scale_at(step) == self.neutral_scale:
            return ("cond",)
        return (self.reference, "cond")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        return GuidedPrediction.single(self.away_from(preds, self.reference, step))
