"""Rectified-CFG++ (Saini, Gupta, Bovik, NeurIPS 2025, arXiv 2510.07631, Algorithm 1): a
predictor-corrector guidance step for flow-matching models.

    v_c  = v(x_t, t, y)                                   the conditional velocity (line 3)
    x~   = x_t + (dt / 2) v_c                             predictor: half a conditional Euler step (4)
    v~_c = v(x~, t - dt/2, y),  v~_u = v(x~, t - dt/2, 0) both branches at the predicted midpoint (6-7)
    v^   = v_c + alpha(t) (v~_c - v~_u),  alpha(t) = lambda_max (1 - t)^gamma     corrector (8)
    x_{t - dt} = ODEUpdate(x_t, v^, t)                    the solver's step with v^ (9)

Conventions: t is the flow time sigma_t of ``x_t = (1 - t) x0 + t eps`` (1: noise, 0: data) at the
step's start, t - dt the level the step moves to, so the midpoint is (sigma_t + sigma_t') / 2 in
the model's own (shifted) schedule; ``scale`` is lambda_max (the authors' ``true_cfg``), shaped by
the base ``schedule`` (neutral 0); were the midpoint x_t itself, v^ would be CFG at 1 + lambda_max.
``gamma`` is the exponent of (1 - t) as the algorithm box writes it (gamma > 0 weakens the
correction near noise, t = 1); the authors' blog speaks of a term that vanishes near the data end
instead, which the box's form does not give: gamma 0 avoids the question. The rule acts on the raw
velocities; ODEUpdate is the core's step (the stock ``FlowMatchEulerDiscreteScheduler.step`` by
default: x + (t' - t) v^, the paper's Euler update). Scale 0 (or outside the interval) is the
conditional velocity alone, one forward per step; a guided step costs 3 network evaluations per
sample (lines 3, 6, 7), the midpoint's two in one call. Defined on flow velocities only: other
models are refused before any model call (the paper gives no conversion).

The midpoint evaluation is a second network call inside the step, on an input the method builds
at another level: it goes through the sampler core's in-step evaluator (``step.evaluate(x,
branches, sigma)``, sigma the k-diffusion ratio of the level), which the core must provide;
without it the method refuses before any model call.

Defaults: lambda_max 4.5 (the authors' SD3 pipeline ``true_cfg`` and ``demo.py``), gamma 0 (their
pipeline keeps lambda constant: its schedule is commented out, "did not find much difference").
Deviations from the authors' pipeline (shreshthsaini/Rectified-CFGpp
``rect-cfg-SD3-pipeline/pipeline.py``), where we follow the paper's Algorithm 1: its predictor
takes the full step x_t + dt v_c, not half; its corrector is evaluated at ``t + dt`` with t in
timestep units (0-1000) and dt in sigma units, i.e. at about t, not t - dt/2; it also evaluates
the unconditional branch at x_t, unused (4 NFE a step). Line 5, the optional noise on the
predicted point (the pipeline's ``sigma_noise``, std 0.005 by default), is not offered: drawn
from a stream of the method's own, a sample's noise would depend on the other samples of its
batch (the caller's per-sample generators reach the solver only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register


def flow_time(ratio: float) -> float:
    """The flow time sigma_t of a k-diffusion ratio sigma_t / (1 - sigma_t) (inf: 1, pure noise)."""
    return 1.0 if math.isinf(ratio) else ratio / (1.0 + ratio)


def flow_ratio(t: float) -> float:
    """The k-diffusion ratio t / (1 - t) of a flow time (1: inf)."""
    return math.inf if t >= 1.0 else t / (1.0 - t)


def rectified_velocity(v_cond: torch.Tensor, v_cond_mid: torch.Tensor, v_uncond_mid: torch.Tensor,
                       alpha: float) -> torch.Tensor:
    """Algorithm 1, line 8: v_c + alpha (v~_c - v~_u)."""
    return v_cond + alpha * (v_cond_mid - v_uncond_mid)


@register
@dataclass(frozen=True, kw_only=True)
class RectifiedCFGPlusPlus(Guidance):
    """Rectified-CFG++: the conditional velocity, corrected by the guidance difference at a predicted midpoint."""

    name: ClassVar[str] = "rectified_cfgpp"
    paper: ClassVar[str] = "Saini, Gupta, Bovik, Rectified-CFG++ for Flow Based Models, NeurIPS 2025 (arXiv 2510.07631)"
    neutral_scale: ClassVar[float] = 0.0
    runs_on_row_subsets: ClassVar[bool] = False  # the midpoint is evaluated for every sample
    requires_flow: ClassVar[bool] = True
    evaluates_in_step: ClassVar[bool] = True

    scale: float = param(4.5, low=0.0, high=100.0, doc="lambda_max: the corrector's weight (0 = conditional only)")
    gamma: float = param(0.0, low=0.0, high=10.0, doc="alpha(t) = lambda_max (1 - t)^gamma (0 = constant)")

    def required_branches(self) -> set[str]:
        return {"cond"} if self.scale == 0 else {"cond", "uncond"}

    def alpha_at(self, step: StepInfo) -> float:
        """alpha(t) = lambda_max (1 - t)^gamma at the step's start (0 outside the interval)."""
        return self.scale_at(step) * (1.0 - flow_time(step.sigma)) ** self.gamma

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        evaluate = getattr(step, "evaluate", None)
        if self.scale != 0 and evaluate is None:
            raise ValueError("rectified_cfgpp: evaluates the network a second time inside each step (the corrector "
                             "at the predicted midpoint), which needs the sampler core's in-step evaluator "
                             "(StepInfo.evaluate); this core provides none")
        if evaluate is not None and evaluate.prediction_type != "flow":
            raise ValueError(f"rectified_cfgpp: is defined on the velocity of a flow-matching model; this model "
                             f"predicts {evaluate.prediction_type!r} (use cfgpp or cfg)")
        return ("cond",)  # the midpoint's branches are evaluated in combine

    @staticmethod
    def predictor(cond: Prediction, step: StepInfo) -> tuple[torch.Tensor, float]:
        """Line 4: x~ = x_t + (t_mid - t) v_c and the midpoint's flow time t_mid."""
        t, t_next = flow_time(step.sigma), flow_time(step.sigma_next)
        t_mid = 0.5 * (t + t_next)
        return cond.x + (t_mid - t) * cond.output, t_mid

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        alpha = self.alpha_at(step)
        if alpha == 0:
            return GuidedPrediction.single(cond)
        x_mid, t_mid = self.predictor(cond, step)
        mid = step.evaluate(x_mid, ("uncond", "cond"), sigma=flow_ratio(t_mid))
        v = rectified_velocity(cond.output, mid["cond"].output, mid["uncond"].output, alpha)
        return GuidedPrediction.single(cond.with_output(v))
