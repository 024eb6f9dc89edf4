"""The Prediction type: conversions between eps / v / flow / x0 outputs, and linear combinations."""

from __future__ import annotations

import pytest
import torch

from guidance_engine.prediction import Prediction


def _levels(kind: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    sigma = torch.linspace(0.2, 0.9, batch, dtype=torch.float64)
    alpha = 1 - sigma if kind == "flow" else torch.sqrt(1 - sigma**2)
    return alpha, sigma


def _output(kind: str, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return {"epsilon": eps, "v_prediction": a * eps - s * x0, "flow": eps - x0, "sample": x0}[kind]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow", "sample"])
def test_conversions_recover_x0_and_eps(kind: str) -> None:
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    alpha, sigma = _levels(kind, 3)
    a, s = alpha.view(3, 1, 1, 1).float(), sigma.view(3, 1, 1, 1).float()
    x = a * x0 + s * eps
    pred = Prediction(_output(kind, x0, eps, a, s), x, alpha, sigma, kind)
    torch.testing.assert_close(pred.x0, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.eps, eps, atol=1e-5, rtol=1e-5)
    again = Prediction.from_x0(pred.x0, like=pred)
    torch.testing.assert_close(again.output, pred.output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["v_prediction", "flow", "sample"])
def test_cfg_is_the_same_in_every_space(kind: str) -> None:
    """Oracle: CFG (weights summing to one) gives the same x0 in eps, x0, v and flow space."""
    torch.manual_seed(1)
    alpha, sigma = _levels(kind, 2)
    x = torch.randn(2, 4, 6, 6)
    eps_c, eps_u = torch.randn_like(x), torch.randn_like(x)
    scale = 6.5
    in_eps = Prediction(eps_u, x, alpha, sigma, "epsilon").lerp(Prediction(eps_c, x, alpha, sigma, "epsilon"), scale)
    # the same two predictions expressed as `kind` outputs
    c = Prediction.from_x0(Prediction(eps_c, x, alpha, sigma, "epsilon").x0, like=Prediction(x, x, alpha, sigma, kind))
    u = Prediction.from_x0(Prediction(eps_u, x, alpha, sigma, "epsilon").x0, like=Prediction(x, x, alpha, sigma, kind))
    in_kind = Prediction(u.output, x, alpha, sigma, kind).lerp(Prediction(c.output, x, alpha, sigma, kind), scale)
    torch.testing.assert_close(in_kind.x0, in_eps.x0, atol=2e-4, rtol=1e-4)
    in_x0 = in_eps.x0  # lerp on x0 directly
    direct = u.x0 + scale * (c.x0 - u.x0)
    torch.testing.assert_close(direct, in_x0, atol=2e-4, rtol=1e-4)


def test_flow_pure_noise_end_has_no_division_by_alpha() -> None:
    x = torch.randn(1, 2, 3, 3)
    v = torch.randn_like(x)
    pred = Prediction(v, x, torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), "flow")
    assert torch.isfinite(pred.x0).all() and torch.isfinite(pred.eps).all()
    torch.testing.assert_close(pred.eps, x)


def test_lerp_refuses_mismatched_predictions() -> None:
    x = torch.zeros(1, 1, 2, 2)
    a = Prediction(x, x, torch.tensor(1.0), torch.tensor(0.5), "epsilon")
    b = Prediction(x, x + 1, torch.tensor(1.0), torch.tensor(0.5), "epsilon")
    with pytest.raises(ValueError, match="same kind on the same input"):
        a.lerp(b, 2.0)
    with pytest.raises(ValueError, match="kind must be one of"):
        Prediction(x, x, torch.tensor(1.0), torch.tensor(0.5), "x0")

