"""Time-step Guidance (Sadat et al., ICLR 2025, arXiv 2407.02687, section 5).

    D = D(x, t_tilde) + w (D(x, t) - D(x, t_tilde)),   same condition in both branches
    emb(t_tilde) = emb(t) + s * t^alpha * std(emb(t)) * n,   n ~ N(0, I) redrawn every step

on the time-step embedding after its MLP (class or text-time embeddings are added to it
afterwards), only for t in [t_min, t_max] (0-1000 units). The unit of t in t^alpha is not stated
in the paper: we use t / 1000 in [0, 1]. Defaults: Table 11, Stable Diffusion conditional
("power" schedule): w 4.0, window [400, 1000], s 3.0, alpha 0.25; alpha 0 is the "constant"
schedule. The perturbed branch is rows of the one batched forward: a dispatcher on the time
embedding (installed once, inert without a TSG plan) alters those rows only. Works without a
condition too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..guidance import Branch, Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register


@dataclass
class TSGState:
    """The run's private noise stream for the embedding perturbation."""

    generator: torch.Generator


@register
@dataclass(frozen=True, kw_only=True)
class TSG(Guidance):
    """Time-step guidance: guide away from a prediction at a noisily perturbed time embedding."""

    name: ClassVar[str] = "tsg"
    paper: ClassVar[str] = "Sadat et al., No Training, No Problem, ICLR 2025 (arXiv 2407.02687)"

    scale: float = param(4.0, low=0.0, high=100.0, doc="guidance scale w (1 = off)")
    noise_scale: float = param(3.0, low=0.0, high=100.0, doc="s: perturbation strength")
    noise_power: float = param(0.25, low=0.0, high=10.0, doc="alpha: s * t^alpha (t in [0, 1]); 0 = constant")
    t_min: float = param(400.0, low=0.0, high=1000.0, doc="perturb only for timesteps >= t_min")
    t_max: float = param(1000.0, low=0.0, high=1000.0, doc="perturb only for timesteps <= t_max")
    seed: int = param(0, low=0, high=2**63 - 1, doc="seed of the perturbation noise stream")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.t_min > self.t_max:
            raise ValueError(f"tsg: t_min ({self.t_min}) must not exceed t_max ({self.t_max})")

    def required_branches(self) -> set[str]:
        return {"cond"}

    def altered_branches(self) -> tuple[Branch, ...]:
        """The perturbed branch at its strongest (t = 1000), so that a pipeline checks before the
        first model call that it can perturb this network's time embedding."""
        if self.noise_scale == 0:
            return ()
        return (Branch("tsg", base="cond", time_noise=self.noise_scale),)

    def init_state(self, batch_size: int, device: torch.device) -> TSGState:
        return TSGState(generator=torch.Generator().manual_seed(int(self.seed)))

    def _on(self, step: StepInfo) -> bool:
        return self.t_min <= step.timestep <= self.t_max and self.scale_at(step) != self.neutral_scale

    def branches(self, step: StepInfo, state: TSGState) -> tuple[str, ...]:
        if not self._on(step):
            return ("cond",)
        strength = self.noise_scale * (step.timestep / 1000.0) ** self.noise_power
        return (Branch("tsg", base="cond", time_noise=strength, generator=state.generator), "cond")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        return GuidedPrediction.single(self.away_from(preds, "tsg", step))
