"""Guidance-aware solver steps: pure functions of tensors (STYLE rule 2).

Every step moves the state ``x = alpha x0 + sigma eps`` from one level to the next, given the x0
to move with and the eps to renoise with, passed separately so that CFG++ is an argument, not a
new solver. With sigma_k = sigma / alpha (k-diffusion's sigma):

* :func:`first_order_step` is DDIM with eta, which is Euler for eta = 0 and Euler ancestral for
  eta = 1 (in k-diffusion coordinates the three updates coincide; the stock schedulers differ
  only in which levels they visit) and the flow-matching Euler step when alpha = 1 - sigma.
* :func:`dpmpp_2m_step` is DPM-Solver++(2M) (Lu et al. 2022; k-diffusion ``sample_dpmpp_2m``).
"""

from __future__ import annotations

import math

import torch


def _ratio_next(alpha: float, sigma: float, alpha_next: float, sigma_next: float) -> float:
    """sigma_k(next) / sigma_k(now) = exp(-h); 0 at a pure-noise flow start (alpha = 0)."""
    return (sigma_next * alpha) / (alpha_next * sigma)


def first_order_step(x0: torch.Tensor, eps: torch.Tensor, alpha: float, sigma: float,
                     alpha_next: float, sigma_next: float, eta: float = 0.0,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM(eta): ``alpha' x0 + sqrt(sigma'^2 - sd^2) eps + sd z``.

    sd = eta * sigma' * sqrt(1 - (sigma_k'/sigma_k)^2), DDIM's variance written for any
    (alpha, sigma); it equals Euler ancestral's sigma_up (times alpha') at eta = 1.
    """
    if eta == 0 or sigma_next == 0:
        return alpha_next * x0 + sigma_next * eps
    if noise is None:
        raise ValueError("first_order_step: eta > 0 needs noise")
    r = _ratio_next(alpha, sigma, alpha_next, sigma_next)
    sd = min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1.0 - r * r)))
    return alpha_next * x0 + math.sqrt(max(0.0, sigma_next**2 - sd**2)) * eps + sd * noise


def log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma); -inf at a pure-noise flow start, inf at sigma = 0."""
    if alpha == 0:
        return -math.inf
    if sigma == 0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def dpmpp_2m_step(x0: torch.Tensor, eps: torch.Tensor, alpha: float, sigma: float,
                  alpha_next: float, sigma_next: float,
                  previous: tuple[torch.Tensor, float] | None,
                  renoise_x0: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, float]]:
    """DPM-Solver++(2M) with a renoise split; returns (x_next, history for the next step).

    With D the x0 to move with, eps the one to renoise with and D_prev the previous step's
    renoise x0 (``renoise_x0``, which defaults to ``x0``):  x' = alpha' (D + (1 - e^-h) / (2 r) (D - D_prev)) + sigma' eps,
    h = lambda' - lambda, r = h_prev / h. First order on the first step and at sigma' = 0, as
    k-diffusion and diffusers (``final_sigmas_type="zero"``) do. For CFG (no split) this is the
    stock update; for CFG++ it is the form of SPEC-methods.md section 2.
    """
    lam, lam_next = log_snr(alpha, sigma), log_snr(alpha_next, sigma_next)
    x_next = alpha_next * x0 + sigma_next * eps
    if previous is not None and sigma_next > 0:
        x0_prev, lam_prev = previous
        h, h_prev = lam_next - lam, lam - lam_prev
        if math.isfinite(h_prev):  # the step after a flow's pure-noise start stays first order
            r = h_prev / h
            coefficient = alpha_next * (1.0 - _ratio_next(alpha, sigma, alpha_next, sigma_next)) / (2.0 * r)
            x_next = x_next + coefficient * (x0 - x0_prev)
    return x_next, (x0 if renoise_x0 is None else renoise_x0, lam)
