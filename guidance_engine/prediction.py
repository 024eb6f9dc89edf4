"""One coordinate system for every network output.

A diffusion network sees the noisy sample ``x = alpha * x0 + sigma * eps`` and predicts one of
eps ("epsilon"), v ("v_prediction", VP schedules only), the flow velocity ``eps - x0`` ("flow",
where alpha = 1 - sigma) or x0 itself ("sample"). Guidance methods are defined on x0 or eps, so
every branch is wrapped once in a :class:`Prediction`, which converts on demand (SPEC-methods.md
section 0). Linear combinations whose weights sum to one act on the raw output, so that CFG stays
bit-identical to the stock diffusers pipelines, and give the same x0 and eps as combining those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "flow", "sample"]


class computed_once:  # noqa: N801 (used as a decorator, like functools.cached_property)
    """A property computed on first read and kept in the instance's ``__dict__`` (later reads
    find it there, without this descriptor). ``functools.cached_property`` without the lock it
    takes on each first read before Python 3.12: a prediction is made and read within one step of
    one run, and these reads are on every step's path."""

    def __init__(self, function: Callable[[Any], Any]) -> None:
        self.function = function
        self.name = function.__name__
        self.__doc__ = function.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = self.function(instance)
        instance.__dict__[self.name] = value  # a frozen dataclass: its __dict__, not setattr
        return value
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "flow", "sample")


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample vector (or scalar) so that it broadcasts against ``like``."""
    values = torch.as_tensor(values, device=like.device)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


@dataclass(frozen=True, eq=False)
class Prediction:
    """A network output ``output`` of type ``kind`` at noise level (alpha_t, sigma_t) on input ``x``.

    ``alpha_t`` and ``sigma_t`` are the coefficients of ``x = alpha_t x0 + sigma_t eps`` (float64
    scalars or per-sample vectors), not k-diffusion's ``sigma = sigma_t / alpha_t`` that
    :class:`~guidance_engine.guidance.StepInfo` and the methods' ``sigma_min`` / ``sigma_max``
    use. ``x0`` and ``eps`` are computed once, in float32 (float64 if the input is), whatever
    dtype the network ran in.
    """

    output: torch.Tensor
    x: torch.Tensor
    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    kind: PredictionType

    def __post_init__(self) -> None:
        if self.kind not in PREDICTION_TYPES:
            raise ValueError(f"kind must be one of {PREDICTION_TYPES}, got {self.kind!r}")

    # -- conversions -------------------------------------------------------------------------
    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output, x, alpha, sigma) in a working dtype of at least float32, alpha and sigma
        broadcastable per sample: what every conversion between kinds is computed from (made
        once: x0 and eps, which a solver step reads both of, share them)."""
        return self._coefficients

    @computed_once
    def _coefficients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        work = torch.promote_types(self.output.dtype, torch.float32)
        out = self.output.to(work)
        x = self.x.to(work)
        a = per_sample(self.alpha_t, out).to(work)
        s = per_sample(self.sigma_t, out).to(work)
        return out, x, a, s

    @computed_once
    def x0(self) -> torch.Tensor:
        """The denoised estimate (what k-diffusion calls ``denoised``)."""
        m, x, a, s = self.coefficients()
        if self.kind == "epsilon":
            return (x - s * m) / a
        if self.kind == "v_prediction":
            return a * x - s * m
        if self.kind == "flow":
            return x - s * m
        return m

    @computed_once
    def eps(self) -> torch.Tensor:
        """The noise estimate, as used to renoise."""
        m, x, a, s = self.coefficients()
        if self.kind == "epsilon":
            return m
        if self.kind == "v_prediction":
            return a * m + s * x
        if self.kind == "flow":
            return x + (1 - s) * m
        return (x - a * m) / s

    @classmethod
    def from_x0(cls, x0: torch.Tensor, like: Prediction) -> Prediction:
        """The prediction of kind ``like.kind`` whose x0 is ``x0``, on the same input and level."""
        _, x, a, s = like.coefficients()
        x0 = x0.to(x.dtype)
        eps = (x - a * x0) / s
        if like.kind == "epsilon":
            out = eps
        elif like.kind == "v_prediction":
            out = a * eps - s * x0
        elif like.kind == "flow":
            out = eps - x0
        else:
            out = x0
        made = cls(out.to(like.output.dtype), like.x, like.alpha_t, like.sigma_t, like.kind)
        # Keep the exact float32 values rather than recomputing them from a cast output.
        made.__dict__["x0"] = x0
        made.__dict__["eps"] = eps
        return made

    # -- combinations ------------------------------------------------------------------------
    def lerp(self, other: Prediction, weight: float | torch.Tensor) -> Prediction:
        """``self + weight * (other - self)`` on the raw output (CFG's ``u + s (c - u)``).

        The weights sum to one, so x0 and eps follow the same rule in any parametrisation.
        ``weight`` is a number or a per-sample vector.
        """
        if other.kind != self.kind or other.x is not self.x and not torch.equal(other.x, self.x):
            raise ValueError("lerp needs two predictions of the same kind on the same input")
        w = weight if isinstance(weight, (int, float)) else per_sample(weight, self.output).to(self.output.dtype)
        out = self.output + w * (other.output - self.output)
        return Prediction(out, self.x, self.alpha_t, self.sigma_t, self.kind)

    def with_output(self, output: torch.Tensor) -> Prediction:
        """The same input and level with another raw output."""
        return Prediction(output, self.x, self.alpha_t, self.sigma_t, self.kind)

    def rows(self, index: torch.Tensor | slice) -> Prediction:
        """The prediction restricted to the samples ``index``."""
        def pick(v: torch.Tensor) -> torch.Tensor:
            return v if v.ndim == 0 else v[index]
        return Prediction(self.output[index], self.x[index], pick(self.alpha_t), pick(self.sigma_t), self.kind)
