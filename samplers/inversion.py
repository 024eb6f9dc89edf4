"""DDIM inversion with any guidance method's (denoise, renoise) split: CFG, CFG++, ...

Sampling moves from level hi to level lo with ``x_lo = a_lo x0(denoise) + s_lo eps(renoise)``.
Inversion walks the same levels backwards, solving that step for the other end with the
prediction made at the start (the usual DDIM-inversion approximation: the network sees ``z_lo``
with the timestep of ``hi``)::

    x0   = (z_lo - s_lo eps_renoise) / a_lo
    z_hi = a_hi x0 + s_hi eps_denoise

For CFG both eps are the guided one (plain DDIM inversion); for CFG++ (SPEC-methods.md section
2, and ``InversionDDIMCFGpp.inversion`` in the official code) the roles of the two predictions
swap: x0 from the unconditional eps, renoise with the guided eps. With the levels of the DDIM
sampler, ``sample(..., sampler="ddim", eta=0)`` from the returned latents retraces the path.

Differences from the official code, on purpose: the official code prepends 1.0 to
``alphas_cumprod`` (its level of timestep t is the table's t - 1, in inversion and sampling
alike); we use the scheduler's own levels, the ones our DDIM sampler visits. Like it, the first
inversion step takes the clean latents as the state at the final level (alpha of
``final_alpha_cumprod``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from guidance_engine.guidance import Guidance, StepInfo
from guidance_engine.prediction import PREDICTION_TYPES

from .loop import BranchModel, NfeCounter, NonFiniteLatentsError, evaluate_branches
from .schedule import check_num_steps, fresh_scheduler, is_flow_scheduler, schedule_from_scheduler


@dataclass
class InversionResult:
    """``latents``: the noise to pass as ``latents=`` to a DDIM (eta 0) run of ``num_steps`` steps
    that retraces the inversion; ``nfe``: network evaluations per image."""

    latents: torch.Tensor
    nfe: float
    num_steps: int


def check_inversion(guidance: Guidance, scheduler, num_steps: int, prediction_type: str = "epsilon") -> None:
    """The checks of an inversion that need no tensor (a pipeline makes them before encoding)."""
    check_num_steps(num_steps, scheduler)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if guidance.requires_stochastic_sampler or guidance.group_size() > 1:
        raise ValueError(f"guidance: method {guidance.name!r} samples with particles and has no inversion; "
                         "use cfg or cfgpp")


def invert(model: BranchModel, clean: torch.Tensor, guidance: Guidance, *, scheduler, num_steps: int = 10,
           prediction_type: str = "epsilon", progress: bool | Mapping[str, Any] = True) -> InversionResult:
    """Invert clean (scaled) latents to the noise of a ``num_steps``-step DDIM run.

    Args:
        model: evaluates branches in one batched forward (:class:`~guidance_engine.samplers.BranchModel`).
        clean: the image's scaled latents.
        guidance: CFG, CFG++ or any single-sample method (its ``combine`` gives the split);
            particle methods (FKC) have no inversion and are refused.
        scheduler: the pipeline's scheduler; its config gives the DDIM levels (flow schedulers
            keep their own levels). Never modified.
        num_steps: inversion steps (the official CFG++ default is 10).
        prediction_type: what the network predicts ("epsilon", "v_prediction", "flow", "sample").
    """
    check_inversion(guidance, scheduler, num_steps, prediction_type)
    source = scheduler if is_flow_scheduler(scheduler) else fresh_scheduler(DDIMScheduler, scheduler.config)
    schedule = schedule_from_scheduler(source, num_steps, clean.device)
    n = schedule.num_steps
    state = guidance.init_state(clean.shape[0], clean.device)
    nfe = NfeCounter(clean.shape[0])
    z = clean
    bar_options = dict(progress) if isinstance(progress, Mapping) else {"disable": not progress}
    for i in tqdm(reversed(range(n)), total=n, desc="inversion", **bar_options):
        a_hi, s_hi = float(schedule.alpha_t[i]), float(schedule.sigma_t[i])
        a_lo, s_lo = float(schedule.alpha_t_next[i]), float(schedule.sigma_t_next[i])
        t = schedule.timesteps[i]
        step = StepInfo(index=i, num_steps=n, sigma=schedule.ratio(i), sigma_next=schedule.ratio_next(i),
                        timestep=float(t))
        # the network sees z_lo with the timestep (and level) of hi: the DDIM-inversion approximation
        preds = evaluate_branches(model, guidance, step, state, z, t, a_hi, s_hi, prediction_type, nfe)
        guided = guidance.combine(preds, step, state)
        x0 = (z.double() - s_lo * guided.renoise.eps.double()) / a_lo
        z = (a_hi * x0 + s_hi * guided.denoise.eps.double()).to(clean.dtype)
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteLatentsError(f"latents became NaN/inf at inversion step {n - i} of {n} with method "
                                        f"{guidance.name!r}; try a lower scale")
    return InversionResult(latents=z / schedule.init_scale, nfe=nfe.mean(), num_steps=n)
