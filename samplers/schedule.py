"""Noise schedules as the sampler core sees them: per step, (alpha, sigma) now and next.

The state ``x`` of the core's own solvers is always ``alpha * x0 + sigma * eps`` (the model's
input: VP for DDPM-trained models, ``alpha = 1 - sigma`` for flow matching). The discretisation,
which timesteps and noise levels a run visits, is read off a diffusers scheduler so that each
solver walks exactly the levels of the stock scheduler it mirrors.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from diffusers.utils import logging as diffusers_logging


@dataclass(frozen=True)
class NoiseSchedule:
    """Levels of a run of ``num_steps`` steps. Step i moves from (alpha_t[i], sigma_t[i]) to
    (alpha_t_next[i], sigma_t_next[i]), the coefficients of ``x = alpha_t x0 + sigma_t eps``, and
    feeds ``timesteps[i]`` to the network; :meth:`ratio` is k-diffusion's sigma = sigma_t / alpha_t
    (what :class:`~guidance_engine.guidance.StepInfo` calls ``sigma``).

    ``init_scale`` is the std of the initial state per unit of noise: the stock pipeline's
    ``init_noise_sigma`` times the scheduler's input scaling at the first step.
    """

    timesteps: torch.Tensor
    alpha_t: torch.Tensor
    sigma_t: torch.Tensor
    alpha_t_next: torch.Tensor
    sigma_t_next: torch.Tensor
    init_scale: float
    flow: bool

    def __post_init__(self) -> None:
        # The per-step scalars as Python floats, read off the tensors once per run: a step then
        # reads nothing from a device (each float(tensor[i]) would be a host sync on a GPU).
        for name in ("timesteps", "alpha_t", "sigma_t", "alpha_t_next", "sigma_t_next"):
            object.__setattr__(self, f"_{name}", tuple(map(float, getattr(self, name).tolist())))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def timestep(self, i: int) -> float:
        """Step i's timestep as a Python float."""
        return self._timesteps[i]

    def levels(self, i: int) -> tuple[float, float]:
        """(alpha_t, sigma_t) of step i, Python floats."""
        return self._alpha_t[i], self._sigma_t[i]

    def levels_next(self, i: int) -> tuple[float, float]:
        """(alpha_t, sigma_t) that step i moves to, Python floats."""
        return self._alpha_t_next[i], self._sigma_t_next[i]

    def ratio(self, i: int) -> float:
        """k-diffusion sigma (sigma / alpha) at step i; inf at the pure-noise end of a flow."""
        return _ratio(*self.levels(i))

    def ratio_next(self, i: int) -> float:
        return _ratio(*self.levels_next(i))

    def ratios(self) -> tuple[list[float], list[float]]:
        """:meth:`ratio` and :meth:`ratio_next` of every step, made at once (read at every step)."""
        return ([_ratio(a, s) for a, s in zip(self._alpha_t, self._sigma_t)],
                [_ratio(a, s) for a, s in zip(self._alpha_t_next, self._sigma_t_next)])


def _ratio(alpha: float, sigma: float) -> float:
    return math.inf if alpha == 0 else sigma / alpha


def is_flow_scheduler(scheduler) -> bool:
    """Flow-matching schedulers (x = (1 - s) x0 + s eps, a flow-velocity network) keep their levels
    in ``sigmas``: the FlowMatch family, and multistep schedulers configured with flow sigmas for a
    flow model (Wan's ``UniPCMultistepScheduler(use_flow_sigmas=True,
    prediction_type="flow_prediction")``; DPM-Solver takes the same flags). Flow sigmas for another
    prediction type are refused: the callers read "flow" as the network's prediction too."""
    if "FlowMatch" in type(scheduler).__name__:
        return True
    config = getattr(scheduler, "config", {})
    if not config.get("use_flow_sigmas", False):
        return False
    if config.get("prediction_type") != "flow_prediction":
        raise ValueError(f"scheduler: {type(scheduler).__name__} with use_flow_sigmas=True needs "
                         f"prediction_type='flow_prediction', got {config.get('prediction_type')!r}")
    return True


def all_levels(scheduler, timesteps: list[float], offset: int = 0) -> list[tuple[float, float]]:
    """(alpha, sigma) of a configured diffusers scheduler at its steps ``offset + i`` (timesteps
    ``timesteps[i]``, Python numbers), its tables read once (not once per step).

    Flow schedulers: s = sigmas[index], alpha = 1 - s. Schedulers that keep k-diffusion sigmas
    (Euler, DPM-Solver, Heun, LMS): alpha = 1 / sqrt(1 + sigma^2). Others (DDIM, PNDM, DDPM):
    ``alphas_cumprod`` at the timestep.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    indices = range(offset, offset + len(timesteps))
    if is_flow_scheduler(scheduler):
        table = sigmas.tolist()
        return [(1.0 - table[i], table[i]) for i in indices]
    if isinstance(sigmas, torch.Tensor) and len(sigmas) >= offset + len(timesteps):
        table = sigmas.tolist()
        alphas = [1.0 / math.sqrt(1.0 + table[i] * table[i]) for i in indices]
        return [(a, table[i] * a) for a, i in zip(alphas, indices)]
    abar = scheduler.alphas_cumprod.tolist()
    return [(math.sqrt(abar[int(t)]), math.sqrt(1.0 - abar[int(t)])) for t in timesteps]


def fresh_scheduler(scheduler_class, config):
    """A new scheduler of ``scheduler_class`` from another scheduler's config, quietly."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # cross-class from_config lists ignored keys
    try:
        return scheduler_class.from_config(config)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def schedule_from_scheduler(scheduler, num_steps: int, device: torch.device | str | None = None,
                            timesteps: list[int] | None = None, sigmas: list[float] | None = None,
                            **set_timesteps_kwargs) -> NoiseSchedule:
    """The levels a stock run of ``scheduler`` with ``num_steps`` steps visits.

    ``scheduler`` is not modified: a copy is configured and read.
    """
    sched = copy.deepcopy(scheduler)
    if timesteps is not None:
        sched.set_timesteps(timesteps=timesteps, device=device, **set_timesteps_kwargs)
    elif sigmas is not None:
        sched.set_timesteps(sigmas=sigmas, device=device, **set_timesteps_kwargs)
    else:
        sched.set_timesteps(num_steps, device=device, **set_timesteps_kwargs)
    ts = sched.timesteps
    n = len(ts)
    if getattr(sched, "order", 1) != 1:
        raise ValueError(f"sampler: cannot read levels off a scheduler of order {sched.order} "
                         f"({type(sched).__name__}); use sampler='scheduler' for it")
    ts_values = ts.tolist()
    cur = all_levels(sched, ts_values)
    if hasattr(sched, "sigmas") and isinstance(sched.sigmas, torch.Tensor) and len(sched.sigmas) > n:
        nxt = all_levels(sched, ts_values, offset=1)
    else:  # DDIM's rule: prev_t = t - T // n, with the final alpha beyond the start of training
        ratio = sched.config.num_train_timesteps // sched.num_inference_steps
        table, final = sched.alphas_cumprod.tolist(), float(sched.final_alpha_cumprod)
        nxt = []
        for t in ts_values:
            prev = int(t) - ratio
            abar = table[prev] if prev >= 0 else final
            nxt.append((math.sqrt(abar), math.sqrt(1.0 - abar)))
    input_scale = 1.0
    if hasattr(sched, "scale_model_input"):  # flow schedulers have none (their input is x)
        input_scale = float(sched.scale_model_input(torch.ones(1, device=ts.device), ts[0])[0])
    init_scale = float(getattr(sched, "init_noise_sigma", 1.0)) * input_scale
    f64 = dict(dtype=torch.float64)
    return NoiseSchedule(
        timesteps=ts,
        alpha_t=torch.tensor([a for a, _ in cur], **f64), sigma_t=torch.tensor([s for _, s in cur], **f64),
        alpha_t_next=torch.tensor([a for a, _ in nxt], **f64), sigma_t_next=torch.tensor([s for _, s in nxt], **f64),
        init_scale=init_scale, flow=is_flow_scheduler(sched),
    )


def check_num_steps(num_steps: int, scheduler) -> None:
    """``num_steps`` an integer >= 1 and, on a discrete-time scheduler, at most its training steps
    (a flow schedule has no such bound). ValueError naming ``num_inference_steps`` otherwise."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_inference_steps: must be an integer >= 1, got {num_steps!r}")
    train_steps = scheduler.config.get("num_train_timesteps")
    if not is_flow_scheduler(scheduler) and train_steps and num_steps > train_steps:
        raise ValueError(f"num_inference_steps: must be in [1, {train_steps}] (the scheduler's training steps), "
                         f"got {num_steps}")
