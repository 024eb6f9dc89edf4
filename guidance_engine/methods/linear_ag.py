"""LinearAG (Castillo et al., AAAI 2025, arXiv 2312.12487, section on LinearAG): replace
unconditional network evaluations in the first part of the run by an affine combination of past
score estimates, fitted once by least squares on recorded CFG trajectories; then Adaptive Guidance.

At a predicted step i (in the first ``window`` of the run, every step whose index is not a
multiple of ``period``; period 0: only step 0 is real):

    eps_u_hat(i) = a_i eps_c(i) + b_i eps_c(i-1) + c_i eps_u(i-1) + d_i

with eps_u(i-1) real or itself predicted, and scalar coefficients (a, b, c, d)_i per step index
from ordinary least squares over every element of every recorded trajectory (the fit chains
predictions exactly as sampling does). Only the conditional forward runs there. The paper's
abstract (verified) says first-half NFEs can be replaced by affine transformations of past score
estimates at the cost of drifting from the baseline; window, features and period are our choices
(docs/adaptive.md). Fitted with the empty negative prompt: with a negative prompt, pipelines fall
back to Adaptive Guidance (:meth:`with_negative_prompt`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from .. import strict_json
from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register
from .ag import AdaptiveGuidance, AGState
from .cfg import CFG

COEFFICIENTS_FILE = "linear_ag.safetensors"
METADATA_FILE = "linear_ag.json"
FEATURES = ("eps_c", "eps_c_prev", "eps_u_prev", "one")


def predicted_steps(num_steps: int, window: float, period: int) -> list[int]:
    """Indices of the steps whose unconditional prediction is replaced by the regression."""
    last = int(window * num_steps)
    return [i for i in range(1, last) if period == 0 or i % period != 0]


def features(eps_c: torch.Tensor, eps_c_prev: torch.Tensor, eps_u_prev: torch.Tensor) -> torch.Tensor:
    """The regression's design: one row per element, columns :data:`FEATURES`."""
    flat = [eps_c.flatten(), eps_c_prev.flatten(), eps_u_prev.flatten()]
    return torch.stack([*flat, torch.ones_like(flat[0])], dim=1).double()


def predict(coefficients: torch.Tensor, eps_c: torch.Tensor, eps_c_prev: torch.Tensor,
            eps_u_prev: torch.Tensor) -> torch.Tensor:
    a, b, c, d = coefficients.tolist()
    return a * eps_c + b * eps_c_prev + c * eps_u_prev + d


def fit_coefficients(eps_c: torch.Tensor, eps_u: torch.Tensor, window: float, period: int
                     ) -> tuple[torch.Tensor, list[int], list[float]]:
    """Least-squares coefficients from CFG trajectories ``eps_c``, ``eps_u`` of shape
    [trajectories, steps, ...]; returns (coefficients [steps, 4], predicted steps, R^2 per step)."""
    steps = eps_c.shape[1]
    predicted = predicted_steps(steps, window, period)
    coefficients = torch.zeros(steps, len(FEATURES), dtype=torch.float64)
    r2 = [float("nan")] * steps
    estimate = eps_u[:, 0].double()  # the chain of unconditional estimates, as sampling sees it
    for i in range(1, steps):
        target = eps_u[:, i].double()
        if i in predicted:
            design = features(eps_c[:, i], eps_c[:, i - 1], estimate)
            solution = torch.linalg.lstsq(design, target.flatten().unsqueeze(1)).solution.flatten()
            coefficients[i] = solution
            estimate = predict(solution, eps_c[:, i].double(), eps_c[:, i - 1].double(), estimate)
            residual = (estimate - target).pow(2).sum()
            r2[i] = float(1 - residual / (target - target.mean()).pow(2).sum())
        else:
            estimate = target
    return coefficients, predicted, r2


def save_calibration(directory: str | Path, coefficients: torch.Tensor, metadata: dict[str, Any]) -> None:
    """Write ``linear_ag.safetensors`` and ``linear_ag.json`` (temporary names, then renamed)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (COEFFICIENTS_FILE + ".tmp")
    save_file({"coefficients": coefficients.contiguous()}, str(tmp))
    tmp.replace(directory / COEFFICIENTS_FILE)
    tmp_json = directory / (METADATA_FILE + ".tmp")
    tmp_json.write_text(strict_json.dumps(metadata, indent=2))
    tmp_json.replace(directory / METADATA_FILE)


def load_calibration(directory: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / COEFFICIENTS_FILE).is_file() or not (directory / METADATA_FILE).is_file():
        raise ValueError(f"linear_ag: parameter 'calibration' must be a directory holding {COEFFICIENTS_FILE} and "
                         f"{METADATA_FILE} (run `guidance-engine calibrate-linear-ag`), got {str(directory)!r}")
    return load_file(str(directory / COEFFICIENTS_FILE))["coefficients"], json.loads((directory / METADATA_FILE).read_text())


@dataclass
class LinearAGState:
    coefficients: torch.Tensor
    predicted: frozenset[int]
    num_steps: int
    after: AdaptiveGuidance  # Adaptive Guidance from the end of the window on
    ag: AGState
    eps_c_prev: torch.Tensor | None = None
    eps_u_prev: torch.Tensor | None = None


@register
@dataclass(frozen=True, kw_only=True)
class LinearAG(Guidance):
    """LinearAG: regressed unconditional predictions early in the run, Adaptive Guidance later."""

    name: ClassVar[str] = "linear_ag"
    paper: ClassVar[str] = "Castillo et al., Adaptive Guidance, AAAI 2025 (arXiv 2312.12487)"

    calibration: str = field(default="", metadata={
        "doc": "directory with linear_ag.safetensors/.json (from `guidance-engine calibrate-linear-ag`)"})
    scale: float = param(7.5, low=0.0, high=100.0, doc="CFG scale s")
    threshold: float = param(0.995, low=0.0, high=2.0, doc="Adaptive Guidance's gamma_bar after the window")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.calibration, str) or not self.calibration:
            raise ValueError("linear_ag: parameter 'calibration' must name a calibration directory, got "
                             f"{self.calibration!r}")
        load_calibration(self.calibration)  # fail at construction, before any model call
        interval = {"sigma_min": 0.0, "sigma_max": math.inf, "start": 0.0, "stop": 1.0}
        changed = sorted(name for name, default in interval.items() if getattr(self, name) != default)
        if changed:  # the calibration fixes the predicted steps and AG's window: an interval would be ignored
            raise ValueError(f"linear_ag: parameter(s) {', '.join(changed)} do not apply (the calibration fixes the "
                             "predicted steps, Adaptive Guidance the rest); leave them at their defaults")

    def with_negative_prompt(self) -> Guidance:
        return AdaptiveGuidance(inner=CFG(scale=self.scale), threshold=self.threshold)

    def init_state(self, batch_size: int, device: torch.device) -> LinearAGState:
        coefficients, meta = load_calibration(self.calibration)
        after = AdaptiveGuidance(inner=CFG(scale=self.scale), threshold=self.threshold, start=float(meta["window"]))
        return LinearAGState(coefficients=coefficients, predicted=frozenset(meta["predicted_steps"]),
                             num_steps=int(meta["num_steps"]), after=after, ag=after.init_state(batch_size, device))

    def branches(self, step: StepInfo, state: LinearAGState):
        if step.num_steps != state.num_steps:
            raise ValueError(f"linear_ag: calibrated for num_inference_steps={state.num_steps}, got "
                             f"{step.num_steps}; calibrate again for this step count")
        if step.index in state.predicted:
            return ("cond",)
        return state.after.branches(step, state.ag)

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: LinearAGState) -> GuidedPrediction:
        cond = preds["cond"]
        if step.index in state.predicted:
            eps_u = predict(state.coefficients[step.index], cond.eps, state.eps_c_prev, state.eps_u_prev)
            _, x, a, s = cond.coefficients()
            uncond = Prediction.from_x0((x - s * eps_u) / a, like=cond)
            state.eps_c_prev, state.eps_u_prev = cond.eps, eps_u
            return GuidedPrediction.single(uncond.lerp(cond, self.scale))
        guided = state.after.combine(preds, step, state.ag)
        if "uncond" in preds and preds["uncond"].output.shape[0] == cond.output.shape[0]:
            state.eps_c_prev, state.eps_u_prev = cond.eps, preds["uncond"].eps
        return guided

    def select_state(self, state: LinearAGState, index: torch.Tensor) -> LinearAGState:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]
        return LinearAGState(state.coefficients, state.predicted, state.num_steps, state.after,
                             state.after.select_state(state.ag, index), pick(state.eps_c_prev), pick(state.eps_u_prev))
