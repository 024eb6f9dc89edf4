"""Feynman-Kac Correctors (Skreta et al., ICML 2025, arXiv 2503.02819; code martaskrt/fkc-diffusion).

Target prop. to prod_i q_i^{b_i} (Prop. 3.1-3.3). Simulate the reverse SDE with the summed score
S = sum_i b_i s_i, weight each particle by d log w = [(B - 1) div f + 1/2 g^2 (||S||^2 -
sum_i b_i ||s_i||^2)] dtau (B = sum_i b_i) and resample particles by weight (SMC). In k-diffusion
(VE) coordinates f = 0, g^2 dtau = 2 sig |dsig| and s_i = -eps_i / sig, so per step sig -> sig':

    dlogw = (||sum_i b_i eps_i||^2 - sum_i b_i ||eps_i||^2) (sig - sig') / sig
    cfg     (p_c^b p_u^(1-b), Prop. 3.1):   b (b - 1) ||eps_c - eps_u||^2 (1 - sig'/sig)
    anneal  (p_c^b, Prop. 3.2):             b (b - 1) ||eps_c||^2 (1 - sig'/sig)
    product ((p_c p_c2)^b, Prop. 3.3 at b=1): (b^2 ||eps_c + eps_c2||^2 - b ||eps_c||^2 - b ||eps_c2||^2) (1 - sig'/sig)

Verified: the cfg form equals the official EDM2 code's increment b (b - 1) ||D_c - D_u||^2 |dt| / t^3
(D = xs - sig eps, so ||D_c - D_u||^2 = sig^2 ||eps_c - eps_u||^2) and is checked against autograd
scores of an analytic Gaussian mixture in tests/test_fkc.py. The increment is evaluated at the
step's start (left point, as the official Euler-Maruyama sampler) and applied to the particles
after the step. It does not depend on the SDE's noise level: any DDIM(eta) step (drift
(1 + eta^2)/2 g^2 S) has the same weights, but with eta = 0 resampled copies never separate, so
FKC needs a stochastic sampler (``requires_stochastic_sampler``; the core refuses eta = 0).
The x-independent (B - 1) div f term cancels in the normalised weights; for B != 1 (anneal,
product) the prior mismatch N(0, I) vs N(0, I)^B is corrected at the first step by
-(B - 1) ||x_T||^2 / 2 (x_T the model input, unit variance at the start of VP and flow schedules;
never centred or clamped by the stabilisers below).

Resampling: within each group of ``particles`` consecutive rows, systematic (default) or
multinomial, with probabilities prop. to exp(accumulated log-weights); log-weights reset to 0 after
a resample. Weights accumulate only inside the active interval [resample_sigma_min,
resample_sigma_max] in sigma (paper: outside it no reweighting), never on the run's last step,
whatever level it ends at (the official code: every step but the last; a DDIM schedule with
``set_alpha_to_one=False`` ends at sigma 0.029, not 0). The prior correction of B != 1 targets is
the particles' initial weight: added at the run's first step whatever the interval, kept until
the first resample; such targets need a run from pure noise (``requires_noise_start``: img2img is
refused before any model call, its start is not the prior).

Trigger: every ``every`` steps (the paper: every step) or, with
``trigger="ess"``, a group is resampled when its ESS / K falls below ``ess_threshold``. The official
code's stabilisers (increments centred by the mean, then clamped to [-1, 1] Euler / [-2, 2] Heun)
are ``clamp=1`` / ``clamp=2`` (centred by the group mean); off by default, as in the paper.
Resampling randomness comes from a generator seeded with ``seed``, created per run in the state;
the output draw from a second stream derived from ``seed``.

Output (:meth:`FKC.output_rows`): one particle per group drawn by the final normalised weights,
with its own seeded uniform per group, so that the returned image is distributed like the
weighted population for either trigger and any interval (after a resample the weights are equal
and the draw is uniform; an argmax would always return row 0, the ancestor covering the first
1/K of the weights' CDF).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register

TARGETS: tuple[str, ...] = ("cfg", "anneal", "product")


# -- the math: pure functions -----------------------------------------------------------------

def _sq_norm(v: torch.Tensor) -> torch.Tensor:
    """||v||^2 per sample, over all non-batch dimensions, in float32 (float64 if v is)."""
    v = v.to(torch.promote_types(v.dtype, torch.float32))
    return v.flatten(1).pow(2).sum(1)


def step_fraction(sigma: float, sigma_next: float) -> float:
    """(sig - sig') / sig = |dsig| / sig of one step; 1 from a pure-noise flow start (sig = inf)."""
    if math.isinf(sigma):
        return 1.0
    return (sigma - sigma_next) / sigma


def cfg_increment(eps_c: torch.Tensor, eps_u: torch.Tensor, b: float, sigma: float,
                  sigma_next: float) -> torch.Tensor:
    """d log w of the CFG target p_c^b p_u^(1-b): b (b - 1) ||eps_c - eps_u||^2 (sig - sig') / sig."""
    return (b * (b - 1.0) * step_fraction(sigma, sigma_next)) * _sq_norm(eps_c - eps_u)


def product_increment(eps: list[torch.Tensor], b: list[float], sigma: float, sigma_next: float) -> torch.Tensor:
    """d log w of prod_i q_i^{b_i}: (||sum b_i eps_i||^2 - sum b_i ||eps_i||^2) (sig - sig') / sig."""
    total = sum(w * e.float() for w, e in zip(b, eps))
    inc = _sq_norm(total) - sum(w * _sq_norm(e) for w, e in zip(b, eps))
    return step_fraction(sigma, sigma_next) * inc


def _weight_cdf(log_weights: torch.Tensor) -> torch.Tensor:
    """The cumulative sum of each row's normalised weights softmax(log w), in float64 on the CPU,
    its last entry exactly 1 (so that every uniform in [0, 1) finds an index)."""
    cdf = torch.softmax(log_weights.double().cpu(), dim=1).cumsum(1)
    cdf[:, -1] = 1.0
    return cdf


def systematic_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestor indices (G, K), per row of ``log_weights`` (G, K): one uniform u per group, positions
    (u + k) / K on the weights' cumulative sum. Each particle is copied floor(K w) or ceil(K w) times."""
    groups, k = log_weights.shape
    u = torch.rand(groups, 1, generator=generator, dtype=torch.float64)
    positions = (u + torch.arange(k, dtype=torch.float64)) / k
    return torch.searchsorted(_weight_cdf(log_weights), positions, right=True).clamp_max(k - 1)


def multinomial_resample(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestor indices (G, K): K independent draws per group with probabilities softmax(log w)."""
    w = torch.softmax(log_weights.double().cpu(), dim=1)
    return torch.multinomial(w, log_weights.shape[1], replacement=True, generator=generator)


def draw_by_weight(log_weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``log_weights`` (G, K), drawn with probabilities softmax(log w) by
    inverse CDF with one uniform per row (equal weights: a uniform draw among the K)."""
    u = torch.rand(log_weights.shape[0], 1, generator=generator, dtype=torch.float64)
    return torch.searchsorted(_weight_cdf(log_weights), u, right=True).view(-1).clamp_max(log_weights.shape[1] - 1)


def output_seed(seed: int) -> int:
    """The seed of the output draw's stream: a fixed odd-multiplier hash of ``seed`` (mod 2^63), so
    that it is not the resampling stream's first uniforms."""
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS = 1 / sum w^2 of each row's normalised weights (K for equal weights, 1 for one particle)."""
    w = torch.softmax(log_weights.double(), dim=-1)
    return 1.0 / w.pow(2).sum(-1)


# -- per-run state ----------------------------------------------------------------------------

@dataclass
class FKCState:
    """Per-run particle state. ``log_weights`` (float32) and ``ancestors`` (the initial row each
    particle descends from) are per sample and move with resampling; the rest is per run."""

    log_weights: torch.Tensor
    ancestors: torch.Tensor
    generator: torch.Generator
    output_generator: torch.Generator
    particles: int
    since_resample: int = 0
    resamples: int = 0
    started: bool = False  # the first step (the prior correction) has been weighted


def drawn_rows(state: FKCState) -> torch.Tensor:
    """The row of each group to return: one particle drawn by the final normalised weights, from
    the state's output stream (consumed: draw once per run)."""
    k = state.particles
    groups = state.log_weights.shape[0] // k
    return torch.arange(groups) * k + draw_by_weight(state.log_weights.view(groups, k), state.output_generator)


def draw_particles(x: torch.Tensor, state: FKCState) -> torch.Tensor:
    """One particle per group, drawn by its final normalised weight: (B/K, ...) from ``x`` (B, ...)."""
    return x[drawn_rows(state).to(x.device)]


# -- the method -------------------------------------------------------------------------------

@register
@dataclass(frozen=True, kw_only=True)
class FKC(Guidance):
    """Feynman-Kac corrector: CFG's drift plus SMC reweighting towards p_c^b p_u^(1-b)."""

    name: ClassVar[str] = "fkc"
    paper: ClassVar[str] = "Skreta et al., Feynman-Kac Correctors in Diffusion, ICML 2025 (arXiv 2503.02819)"
    #: Resampled copies of a particle separate only with fresh noise at every step.
    requires_stochastic_sampler: ClassVar[bool] = True

    scale: float = param(1.4, low=0.0, high=100.0, doc="b: exponent of p_c (1 = no guidance); paper image preset 1.4")
    schedule: str = param("constant", choices=("constant",), doc="FKC's target needs a constant b")
    target: str = param("cfg", choices=TARGETS, doc="cfg: p_c^b p_u^(1-b); anneal: p_c^b; product: (p_c p_c2)^b")
    particles: int = param(8, low=1, high=4096, doc="K: particles per group (consecutive rows); paper best 8")
    resampling: str = param("systematic", choices=("systematic", "multinomial"), doc="resampling scheme")
    trigger: str = param("interval", choices=("interval", "ess"), doc="resample every `every` steps, or on low ESS")
    every: int = param(1, low=1, high=10000, doc="trigger='interval': resample every this many weighted steps")
    ess_threshold: float = param(0.5, low=0.0, high=1.0, doc="trigger='ess': resample a group when ESS/K < this")
    resample_sigma_min: float = param(0.0, low=0.0, doc="reweight only where sigma >= this")
    resample_sigma_max: float = param(math.inf, low=0.0, doc="reweight only where sigma <= this")
    clamp: float = param(math.inf, low=0.0, low_open=True, doc="centre increments by group mean, clamp to [-c, c]; inf = off (paper)")
    seed: int = param(0, low=0, high=2**63 - 1, doc="seed of the resampling generator")

    def __post_init__(self) -> None:
        super().__post_init__()  # ranges, integers (particles, every, seed) included
        if self.resample_sigma_min > self.resample_sigma_max:
            raise ValueError(f"{self.name}: resample_sigma_min ({self.resample_sigma_min}) must not exceed "
                             f"resample_sigma_max ({self.resample_sigma_max})")

    # -- weights of the target's factors ------------------------------------------------------
    def exponents(self, b: float) -> dict[str, float]:
        """The target as {branch: exponent}: prod over branches of q_branch^exponent."""
        if self.target == "cfg":
            return {"uncond": 1.0 - b, "cond": b}
        if self.target == "anneal":
            return {"cond": b}
        return {"cond": b, "cond2": b}

    def init_state(self, batch_size: int, device: torch.device) -> FKCState:
        if batch_size % self.particles:
            raise ValueError(f"{self.name}: the batch ({batch_size} rows) must be a multiple of parameter "
                             f"'particles' ({self.particles}); rows [g*K, (g+1)*K) form one group")
        return FKCState(log_weights=torch.zeros(batch_size, dtype=torch.float32, device=device),
                        ancestors=torch.arange(batch_size, device=device),
                        generator=torch.Generator("cpu").manual_seed(self.seed),
                        output_generator=torch.Generator("cpu").manual_seed(output_seed(self.seed)),
                        particles=self.particles)

    # -- particles and the output -----------------------------------------------------------------
    def group_size(self) -> int:
        return self.particles

    def total_exponent(self) -> float:
        """B = sum_i b_i of the target (1 for cfg; b for anneal; 2b for product)."""
        return sum(self.exponents(self.scale).values())

    @property
    def requires_noise_start(self) -> bool:
        """B != 1 targets correct the prior N(0, I) to N(0, I)^B: only a run from pure noise has it."""
        return self.total_exponent() != 1.0

    def output_rows(self, state: FKCState) -> torch.Tensor:
        return drawn_rows(state)

    def required_branches(self) -> set[str]:
        return {"cond", "cond2"} if self.target == "product" else ({"cond"} if self.target == "anneal"
                                                                     else {"cond", "uncond"})

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        if self.target == "product":
            return ("cond", "cond2")
        if self.target == "anneal" or self.scale_at(step) == self.neutral_scale:
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        b = self.scale_at(step)
        if self.target == "cfg":
            if "uncond" not in preds:
                return GuidedPrediction.single(cond)
            return GuidedPrediction.single(preds["uncond"].lerp(cond, b))  # CFG's drift, bit for bit
        weights = self.exponents(b)
        if weights == {"cond": 1.0}:
            return GuidedPrediction.single(cond)
        _, x, a, s = cond.coefficients()
        if bool((a == 0).any()):
            # Pure noise (flow start): the summed score has no finite x0; move with the factors' mean.
            mean = cond if len(weights) == 1 else cond.lerp(preds["cond2"], 0.5)
            return GuidedPrediction.single(mean)
        eps = sum(w * preds[name].eps for name, w in weights.items())  # drift: the summed score
        return GuidedPrediction.single(Prediction.from_x0((x - s * eps) / a, like=cond))

    # -- reweighting and resampling -------------------------------------------------------------
    def increment(self, preds: Mapping[str, Prediction], step: StepInfo) -> torch.Tensor | None:
        """This step's d log w per sample (float32), or None where the exponents make it zero."""
        b = self.scale_at(step)
        if self.target == "cfg":
            if "uncond" not in preds or b * (b - 1.0) == 0.0:
                return None
            return cfg_increment(preds["cond"].eps, preds["uncond"].eps, b, step.sigma, step.sigma_next)
        weights = self.exponents(b)
        if weights == {"cond": 1.0}:
            return None
        return product_increment([preds[n].eps for n in weights], list(weights.values()), step.sigma,
                                 step.sigma_next)

    def after_step(self, x: torch.Tensor, preds: Mapping[str, Prediction], guided: GuidedPrediction,
                   step: StepInfo, state: FKCState) -> torch.Tensor | None:
        k, rows = state.particles, x.shape[0]
        groups = rows // k
        if not state.started:
            state.started = True
            if self.requires_noise_start:  # the particles' initial weight: prior N(0, I) -> target N(0, I)^B;
                # whatever the interval (kept until the first resample), never centred or clamped
                prior = -0.5 * (self.total_exponent() - 1.0) * _sq_norm(preds["cond"].x)
                state.log_weights = state.log_weights + prior.float().to(state.log_weights.device)
        last = step.index == step.num_steps - 1
        inside = self.resample_sigma_min <= step.sigma <= self.resample_sigma_max and not last
        if not inside:
            return None
        inc = self.increment(preds, step)
        if inc is not None:
            inc = inc.float().to(state.log_weights.device)
            if math.isfinite(self.clamp):  # the official code's stabilisers (on increments, not the prior)
                inc = inc.view(groups, k)
                inc = (inc - inc.mean(1, keepdim=True)).clamp(-self.clamp, self.clamp).reshape(rows)
            state.log_weights = state.log_weights + inc
        state.since_resample += 1
        lw = state.log_weights.view(groups, k)
        uneven = (lw.max(1).values - lw.min(1).values) > 0  # equal weights: nothing to resample
        if self.trigger == "interval":
            if state.since_resample < self.every:
                return None
            chosen = uneven
        else:
            chosen = uneven & (effective_sample_size(lw) < self.ess_threshold * k).to(uneven.device)
        state.since_resample = 0
        if not bool(chosen.any()):
            return None
        draw = systematic_resample if self.resampling == "systematic" else multinomial_resample
        ancestors = draw(lw[chosen], state.generator).to(x.device)
        keep = torch.arange(rows, device=x.device).view(groups, k)
        offsets = (torch.nonzero(chosen).view(-1).to(x.device) * k).unsqueeze(1)
        keep[chosen.to(x.device)] = offsets + ancestors
        # Reset the weights of resampled groups; the core then moves them with the kept rows.
        state.log_weights = torch.where(chosen.repeat_interleave(k).to(lw.device), 0.0, state.log_weights)
        state.resamples += 1
        return keep.view(rows)
