"""Per-sample vector math the methods share: cosine similarity, projection onto a direction,
flow velocity. Every function treats each batch row as one vector over all its other dimensions."""

from __future__ import annotations

import torch

from .prediction import Prediction

__all__ = ["cosine", "from_velocity", "project", "velocity"]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity over all non-batch dimensions, in float32."""
    a, b = a.flatten(1).float(), b.flatten(1).float()
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)


def project(diff: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``diff`` into its components parallel and orthogonal to ``onto``, per sample, in float64."""
    dims = list(range(1, diff.ndim))
    d, v = diff.double(), onto.double()
    unit = v / torch.linalg.vector_norm(v, dim=dims, keepdim=True).clamp_min(1e-12)
    parallel = (d * unit).sum(dim=dims, keepdim=True) * unit
    return parallel.to(diff.dtype), (d - parallel).to(diff.dtype)


def velocity(pred: Prediction) -> torch.Tensor:
    """The flow velocity eps - x0 of any prediction (the raw output of a flow model)."""
    return pred.output.float() if pred.kind == "flow" else pred.eps - pred.x0


def from_velocity(v: torch.Tensor, like: Prediction) -> Prediction:
    """The prediction whose velocity is ``v`` on ``like``'s input and level."""
    if like.kind == "flow":
        return like.with_output(v.to(like.output.dtype))
    _, x, a, s = like.coefficients()
    return Prediction.from_x0((x - s * v) / (a + s), like=like)
