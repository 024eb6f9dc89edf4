"""Ground truth for guidance methods: Gaussian-mixture data whose diffused scores are analytic.

Data x0 ~ sum_k w_k N(mu_k, v_k I) in D dimensions, each component labelled with a class. Under a
VP schedule x_t = a x0 + s eps, the noisy marginal is the mixture sum_k w_k N(a mu_k, (a^2 v_k + s^2) I),
so its score and the ideal eps-prediction eps = -s * score are exact at every level (SPEC-methods.md,
"Ground truth"). :class:`GMMBranchModel` answers the core's branch requests ("cond": the
class-conditional mixture, "uncond": the full mixture, "cond2": a second class) as an eps network,
mapping timesteps to (a, s) through a diffusers scheduler's ``alphas_cumprod``.

The target of CFG at weight b, p_c^b p_u^(1-b) at t = 0, has an exact sampler: p_u >= pi_c p_c
(pi_c the class's prior mass), so rejection from p_c with acceptance (pi_c p_c / p_u)^(b-1) (b >= 1;
from p_u with exponent b for b < 1) is exact. On a 2-D grid its density is normalised directly.
Distances: KL of a sample histogram to the target on a grid (2-D) and MMD with a Gaussian kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Isotropic Gaussian mixture: ``means`` (M, D), ``stds`` (M,), ``weights`` (M,), ``labels`` (M,)."""

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        m = self.means.shape[0]
        if self.means.ndim != 2 or any(t.shape != (m,) for t in (self.stds, self.weights, self.labels)):
            raise ValueError("GaussianMixture: means (M, D) and stds, weights, labels (M,) expected")
        if bool((self.stds <= 0).any()) or bool((self.weights < 0).any()):
            raise ValueError("GaussianMixture: stds must be > 0 and weights >= 0")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def restrict(self, label: int) -> GaussianMixture:
        """The class-conditional mixture p(x0 | label) (weights renormalised)."""
        keep = self.labels == label
        if not bool(keep.any()):
            raise ValueError(f"GaussianMixture: no component has label {label}")
        w = self.weights[keep]
        return GaussianMixture(self.means[keep], self.stds[keep], w / w.sum(), self.labels[keep])

    def class_mass(self, label: int) -> float:
        """pi_c: the prior mass of class ``label``."""
        return float(self.weights[self.labels == label].sum() / self.weights.sum())

    def diffuse(self, alpha: float, sigma: float) -> GaussianMixture:
        """The law of a x0 + s eps: means a mu_k, variances a^2 v_k + s^2."""
        stds = torch.sqrt(alpha**2 * self.stds**2 + sigma**2)
        return GaussianMixture(alpha * self.means, stds, self.weights, self.labels)

    def _component_log_probs(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double().flatten(1)
        var = self.stds.double() ** 2
        d2 = torch.cdist(x, self.means.double()).pow(2)
        return (torch.log(self.weights.double() / self.weights.sum()) - 0.5 * d2 / var
                - 0.5 * self.dim * torch.log(2 * math.pi * var))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per row (float64)."""
        return torch.logsumexp(self._component_log_probs(x), dim=1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """grad log p(x) per row (float64): sum_k r_k(x) (mu_k - x) / var_k."""
        xf = x.double().flatten(1)
        r = torch.softmax(self._component_log_probs(xf), dim=1)
        var = self.stds.double() ** 2
        return (r / var) @ self.means.double() - (r / var).sum(1, keepdim=True) * xf

    def eps(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """The ideal eps-prediction at level (alpha, sigma): -sigma * score of the noisy mixture."""
        return (-sigma * self.diffuse(alpha, sigma).score(x)).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws (float64)."""
        k = torch.multinomial(self.weights.double(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means.double()[k] + self.stds.double()[k, None] * z


def alpha_sigma(alphas_cumprod: torch.Tensor, timestep: float) -> tuple[float, float]:
    """(a, s) = (sqrt(abar), sqrt(1 - abar)) at a timestep; between integers the k-diffusion sigma
    sqrt((1 - abar) / abar) is interpolated linearly, as diffusers' Euler schedulers do."""
    t = float(timestep)
    lo = min(max(int(math.floor(t)), 0), len(alphas_cumprod) - 1)
    hi = min(lo + 1, len(alphas_cumprod) - 1)
    k_lo, k_hi = (math.sqrt((1 - float(alphas_cumprod[i])) / float(alphas_cumprod[i])) for i in (lo, hi))
    k = k_lo + (t - lo) * (k_hi - k_lo)
    a = 1.0 / math.sqrt(1.0 + k * k)
    return a, k * a


class GMMBranchModel:
    """The exact eps-network of a labelled mixture, as a :class:`~guidance_engine.samplers.BranchModel`.

    Branches: "cond" (class ``label``), "uncond" (all classes), "cond2" (class ``label2``). The input
    is the VP state x_t of shape (B, D) (or (B, ...) flattening to D); ``scheduler`` supplies
    ``alphas_cumprod``. Counts rows evaluated per branch in ``rows``.
    """

    def __init__(self, mixture: GaussianMixture, scheduler, label: int = 0, label2: int | None = None) -> None:
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        self.mixtures = {"cond": mixture.restrict(label), "uncond": mixture}
        if label2 is not None:
            self.mixtures["cond2"] = mixture.restrict(label2)
        self.rows: dict[str, int] = {name: 0 for name in self.mixtures}

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor,
                 requests: Sequence[tuple[str, torch.Tensor | None]]) -> Mapping[str, torch.Tensor]:
        a, s = alpha_sigma(self.alphas_cumprod, float(timestep))
        out = {}
        for name, rows in requests:
            if name not in self.mixtures:
                raise ValueError(f"GMMBranchModel: unknown branch {name!r}; known: {', '.join(self.mixtures)}")
            xr = x if rows is None else x[rows]
            self.rows[name] += xr.shape[0]
            out[name] = self.mixtures[name].eps(xr, a, s).to(x.dtype)
        return out


# -- the guided target p_c^b p_u^(1-b) at t = 0 ----------------------------------------------

def guided_log_density(x: torch.Tensor, mixture: GaussianMixture, label: int, b: float) -> torch.Tensor:
    """Unnormalised log of p_c^b p_u^(1-b) at x (float64)."""
    return b * mixture.restrict(label).log_prob(x) + (1.0 - b) * mixture.log_prob(x)


def sample_guided_target(n: int, mixture: GaussianMixture, label: int, b: float,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """n exact draws from p_c^b p_u^(1-b), b >= 0, by rejection (acceptance <= 1 since p_u >= pi_c p_c)."""
    if b < 0:
        raise ValueError(f"sample_guided_target: b must be >= 0, got {b}")
    cond, pi = mixture.restrict(label), mixture.class_mass(label)
    proposal, power = (cond, b - 1.0) if b >= 1 else (mixture, b)
    out, have = [], 0
    while have < n:
        x = proposal.sample(max(4 * (n - have), 1024), generator)
        log_ratio = math.log(pi) + cond.log_prob(x) - mixture.log_prob(x)  # <= 0
        u = torch.rand(x.shape[0], generator=generator, dtype=torch.float64)
        x = x[torch.log(u) < power * log_ratio.clamp_max(0.0)]
        out.append(x)
        have += x.shape[0]
    return torch.cat(out)[:n]


# -- distances ---------------------------------------------------------------------------------

def grid_probabilities(log_density: Callable[[torch.Tensor], torch.Tensor], limit: float,
                       bins: int) -> torch.Tensor:
    """A 2-D density's mass per cell of a bins x bins grid on [-limit, limit]^2 (midpoint rule, normalised)."""
    edges = torch.linspace(-limit, limit, bins + 1, dtype=torch.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    gx, gy = torch.meshgrid(centres, centres, indexing="ij")
    logp = log_density(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1))
    return torch.softmax(logp, 0).view(bins, bins)


def histogram2d(samples: torch.Tensor, limit: float, bins: int) -> torch.Tensor:
    """Fraction of 2-D ``samples`` per cell (samples outside the square are dropped, then renormalised)."""
    s = samples.double()
    idx = torch.floor((s + limit) / (2 * limit) * bins).long()
    inside = ((idx >= 0) & (idx < bins)).all(1)
    idx = idx[inside]
    counts = torch.zeros(bins * bins, dtype=torch.float64)
    counts.index_add_(0, idx[:, 0] * bins + idx[:, 1], torch.ones(idx.shape[0], dtype=torch.float64))
    return (counts / counts.sum().clamp_min(1)).view(bins, bins)


def grid_kl(samples: torch.Tensor, target: torch.Tensor, limit: float) -> float:
    """KL(histogram of samples || target) on the grid of ``target`` (from :func:`grid_probabilities`).

    Finite for any samples (the target is positive everywhere); with N exact samples of the
    target it is about (occupied cells - 1) / 2N, a floor to report next to any result."""
    q = histogram2d(samples, limit, target.shape[0])
    mask = q > 0
    return float((q[mask] * (torch.log(q[mask]) - torch.log(target[mask]))).sum())


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float = 1.0, chunk: int = 2048) -> float:
    """Unbiased squared MMD between samples x (N, D) and y (M, D), Gaussian kernel exp(-|a-b|^2 / 2h^2)."""
    x, y = x.double().flatten(1), y.double().flatten(1)

    def mean_kernel(a: torch.Tensor, c: torch.Tensor, same: bool) -> float:
        total = 0.0
        for i in range(0, a.shape[0], chunk):
            block = a[i:i + chunk]
            d2 = (block.pow(2).sum(1, keepdim=True) + c.pow(2).sum(1) - 2 * block @ c.T).clamp_min(0)
            k = torch.exp(-d2 / (2 * bandwidth**2))
            total += float(k.sum())
        if same:
            n = a.shape[0]
            return (total - n) / (n * (n - 1))
        return total / (a.shape[0] * c.shape[0])

    return mean_kernel(x, x, True) + mean_kernel(y, y, True) - 2 * mean_kernel(x, y, False)


def wasserstein1_1d(samples: torch.Tensor, log_density: Callable[[torch.Tensor], torch.Tensor], limit: float,
                    points: int = 24001, weights: torch.Tensor | None = None) -> float:
    """W1 distance between 1-D ``samples`` (optionally ``weights``, normalised here) and the density
    exp(log_density) normalised on [-limit, limit]: the integral of |F_samples - F_target| on a
    grid of ``points`` (samples beyond the grid count at its ends)."""
    grid = torch.linspace(-limit, limit, points, dtype=torch.float64)
    target_cdf = torch.softmax(log_density(grid[:, None]), 0).cumsum(0)
    x = samples.double().reshape(-1)
    w = torch.ones_like(x) if weights is None else weights.double().reshape(-1)
    order = x.argsort()
    cdf = (w[order] / w.sum()).cumsum(0)
    below = torch.searchsorted(x[order], grid, right=True)  # samples <= each grid point
    sample_cdf = torch.where(below > 0, cdf[(below - 1).clamp_min(0)], torch.zeros_like(grid))
    return float((sample_cdf - target_cdf).abs().sum() * (grid[1] - grid[0]))
