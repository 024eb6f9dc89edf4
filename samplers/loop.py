"""The denoising loop: one function, its state local to the call (STYLE rule 1).

Per step: ask the guidance which branches it needs, evaluate them in ONE batched forward, wrap
each branch in a :class:`Prediction`, let the guidance combine them, move ``x`` with a
guidance-aware solver step (or a diffusers scheduler's ``step``), check that ``x`` stayed finite,
report to the callback. Solver history, guidance state and NFE counts die with the call.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Protocol, Sequence

import torch
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from guidance_engine.guidance import Guidance, GuidedPrediction, StepInfo
from guidance_engine.prediction import PREDICTION_TYPES, Prediction

from .names import MIRRORS, SAMPLER_NAMES, SAMPLERS, SCHEDULER_SAMPLER, SamplerSpec  # noqa: F401 (re-exported)
from .schedule import (NoiseSchedule, all_levels, check_num_steps, fresh_scheduler, is_flow_scheduler,
                       schedule_from_scheduler)
from .steps import dpmpp_2m_step, first_order_step


logger = logging.get_logger(__name__)


class BranchModel(Protocol):
    """The network seen by the core: evaluates several branches on the same ``x`` in one forward.

    ``requests`` lists ``(branch, rows)`` pairs in forward order: the branch names a condition
    (``"cond"``, ``"uncond"``, ...), ``rows`` a LongTensor of the samples that need it (None: all).
    The result maps each branch to the raw network output for its rows only, so a batch really
    shrinks when some samples need fewer branches (Adaptive Guidance).
    """

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor,
                 requests: Sequence[tuple[str, torch.Tensor | None]]) -> Mapping[str, torch.Tensor]:
        ...


def normalize_requests(branches: Sequence[str] | Mapping[str, torch.Tensor | None]
                       ) -> list[tuple[str, torch.Tensor | None]]:
    """A method's ``branches()`` answer (names for all rows, or name -> rows) as (branch, rows) pairs."""
    if isinstance(branches, (tuple, list)):  # checked first: a Mapping check runs the abc machinery
        return [(name, None) for name in branches]
    if isinstance(branches, Mapping):
        return list(branches.items())
    return [(name, None) for name in branches]


class NonFiniteLatentsError(FloatingPointError):
    """The latents became NaN or infinite; the message names the step, method and sampler."""


@dataclass(frozen=True)
class StartImage:
    """Start from an existing image instead of pure noise (img2img, inpainting).

    ``latents`` are the image's clean (scaled) latents, one row per sample. ``strength`` in
    (0, 1] is the fraction of the schedule that is run, as in diffusers: of ``n`` steps the last
    ``int(n * strength)`` are, from the image noised to the first of their levels. ``mask`` (1:
    regenerate, 0: keep; broadcastable to the latents) makes it inpainting by replacement: after
    every step the kept region is reset to the image noised to the next level (the clean image
    after the last step), as the stock 4-channel inpainting pipelines do.
    ``pure_noise_at_full_strength``: at strength 1 start from pure noise instead of the image
    noised to the first level (the stock inpainting pipelines' rule; img2img always noises).
    ``step_rule``: how ``strength`` becomes a step count (:func:`start_index`): "run" (SD's) or
    "skip" (SD3's and Flux's). ``noised``: ``latents`` already are the start at the first step's
    level (the stock Flux img2img's ``latents=``); they are used as they are.
    """

    latents: torch.Tensor
    strength: float = 1.0
    mask: torch.Tensor | None = None
    pure_noise_at_full_strength: bool = False
    step_rule: str = "run"
    noised: bool = False

    def rows(self, keep: torch.Tensor) -> StartImage:
        """The rows ``keep`` (after particle resampling, or repeated for particles)."""
        mask = self.mask
        if mask is not None and mask.shape[0] > 1:
            mask = mask[keep]
        return dataclasses.replace(self, latents=self.latents[keep], mask=mask)


#: How an img2img ``strength`` becomes a step count, by rule (see :func:`start_index`).
STEP_RULES = ("run", "skip")


def start_index(num_steps: int, strength: float, order: int = 1, rule: str = "run") -> int:
    """Index of the first step an img2img run of ``num_steps`` steps takes, by diffusers' rules:
    "run" (SD, SDXL): the last ``int(n * strength)`` steps run; "skip" (SD3, Flux): the first
    ``int(n - n * strength)`` are skipped (the two differ where ``n * strength`` is not whole:
    n = 3, strength 0.6 runs 1 step by "run", 2 by "skip")."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength: must be in (0, 1], got {strength!r}")
    if rule not in STEP_RULES:
        raise ValueError(f"step_rule: must be one of {STEP_RULES}, got {rule!r}")
    if rule == "run":
        steps_run = min(int(num_steps * strength), num_steps)
    else:
        steps_run = num_steps - int(max(num_steps - min(num_steps * strength, num_steps), 0))
    if steps_run < 1:
        raise ValueError(f"strength: {strength} of {num_steps} steps runs no step; raise strength or "
                         f"num_inference_steps so that int(steps * strength) >= 1")
    return (num_steps - steps_run) * order


@dataclass(frozen=True)
class StepRecord:
    """What the callback sees after each step (one typed contract, STYLE rule 11)."""

    index: int
    num_steps: int
    timestep: torch.Tensor
    sigma: float
    sigma_next: float
    x: torch.Tensor
    denoised: torch.Tensor
    nfe: float
    first: int = 0  # the first step of the run (img2img starts mid-schedule); index - first counts steps taken


@dataclass
class SampleResult:
    """The final state, the last guided x0, and network evaluations (mean per image, and per
    image: methods such as Adaptive Guidance spend different amounts on different samples)."""

    x: torch.Tensor
    denoised: torch.Tensor
    nfe: float
    nfe_per_sample: list[int]
    state: Any = None  # the guidance's final per-run state (FKC log-weights, AG switch steps, ...)


def resolve_sampler(sampler: str | None, guidance: Guidance, scheduler) -> str:
    """The sampler to use: ``None`` means the pipeline's scheduler, or the core's solver mirroring
    it when the method renoises with another prediction (CFG++). Errors before any model call."""
    if sampler is not None and sampler not in SAMPLER_NAMES:
        raise ValueError(f"sampler: must be one of {', '.join(SAMPLER_NAMES)} or None, got {sampler!r}")
    if sampler is None:
        if not guidance.renoise_split:
            return SCHEDULER_SAMPLER
        mirror = MIRRORS.get(type(scheduler).__name__)
        if mirror is None:
            raise ValueError(f"sampler: method {guidance.name!r} renoises with another prediction than it "
                             f"denoises with, which {type(scheduler).__name__}.step() cannot do; pass "
                             f"sampler= one of {', '.join(SAMPLERS)}")
        return mirror
    if sampler == SCHEDULER_SAMPLER and guidance.renoise_split:
        raise ValueError(f"sampler: method {guidance.name!r} renoises with another prediction than it denoises "
                         f"with, which a diffusers scheduler's step() cannot do; pass sampler= one of "
                         f"{', '.join(SAMPLERS)}")
    return sampler


def check_run(guidance: Guidance, scheduler, *, num_steps: int, timesteps: Sequence[float] | None = None,
              sigmas: Sequence[float] | None = None, sampler: str | None = None, eta: float | None = None,
              image: StartImage | None = None, image_strength: float | None = None) -> str:
    """Every check of a run's settings that needs no tensor, so that a pipeline can make them
    before it encodes a prompt (``sample`` makes them again). Returns the resolved sampler.

    ``image_strength``: the strength of a run that will start from a noised image rather than pure
    noise (img2img; inpainting below strength 1), or ``image`` itself when it is known."""
    if timesteps is None and sigmas is None:
        check_num_steps(num_steps, scheduler)
    for name, values in (("timesteps", timesteps), ("sigmas", sigmas)):
        if values is not None and len(values) == 0:
            raise ValueError(f"{name}: must be a non-empty list, got {values!r}")
    if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0):
        raise ValueError(f"eta: must be in [0, 1], got {eta!r}")
    # the schedule's per-step values must fit the run (an explicit list's length, a callable's range)
    guidance.check_steps(len(sigmas) if sigmas is not None else len(timesteps) if timesteps is not None else num_steps)
    sampler = resolve_sampler(sampler, guidance, scheduler)
    if guidance.requires_flow and not is_flow_scheduler(scheduler):
        raise ValueError(f"guidance: method {guidance.name!r} is defined on the velocity of a flow-matching model; "
                         f"{type(scheduler).__name__} is not a flow schedule")
    if guidance.requires_stochastic_sampler and not _stochastic(sampler, eta, scheduler):
        raise ValueError(f"sampler: method {guidance.name!r} needs a stochastic sampler (euler_ancestral, or ddim "
                         f"with eta > 0), got sampler {sampler!r} with eta {eta!r}")
    if image is not None and not (image.strength == 1.0 and image.pure_noise_at_full_strength):
        image_strength = image.strength
    if image_strength is not None and guidance.requires_noise_start:
        raise ValueError(f"guidance: method {guidance.name!r} with these parameters weights its samples against "
                         f"the prior (pure noise), but this run starts from a noised image (img2img or "
                         f"inpainting, strength {image_strength}); use it for text-to-image only")
    return sampler


def _step_kwargs(scheduler, generator, eta: float | None) -> dict[str, Any]:
    """The optional arguments this scheduler's ``step`` accepts (as diffusers pipelines pass them)."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted and eta is not None:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def _stochastic(sampler: str, eta: float | None, scheduler) -> bool:
    """Whether the solver adds fresh noise at each step (particle methods need it, FKC)."""
    if sampler != SCHEDULER_SAMPLER:
        return SAMPLERS[sampler].update == "first_order" and (SAMPLERS[sampler].eta if eta is None else eta) > 0
    name = type(scheduler).__name__
    return ("Ancestral" in name or name == "DDPMScheduler" or (name == "DDIMScheduler" and bool(eta))
            or str(scheduler.config.get("algorithm_type", "")).startswith("sde"))


def _nonfinite_error(sums: list[torch.Tensor], first: int, run, n: int, guidance: Guidance, sampler: str
                     ) -> NonFiniteLatentsError | None:
    """The error naming the first step whose latents became NaN/inf, or None. ``sums``: per
    step from ``first`` on, the latents' float64 sum after it, a 0-d tensor on the device (finite
    exactly when every entry is); read here, once."""
    if not sums:
        return None
    flags = torch.isfinite(torch.stack(sums))
    if bool(flags.all()):
        return None
    i = first + int(torch.argmin(flags.to(torch.uint8)))  # the first False
    return NonFiniteLatentsError(
        f"latents became NaN/inf at step {i + 1} of {n} (sigma {run.ratio(i):.4g}) with method "
        f"{guidance.name!r} and sampler {sampler!r}; try a lower scale or float32")


class NfeCounter:
    """Each sample's network evaluations in a run: an evaluation of every row is a Python count
    (no tensor operation per step), one of some rows adds to a per-sample tensor on the CPU."""

    def __init__(self, batch_size: int) -> None:
        self._rows = torch.zeros(batch_size, dtype=torch.long)
        self._all = 0

    def add(self, rows: torch.Tensor | None) -> None:
        """One evaluation of ``rows`` (None: every row)."""
        if rows is None:
            self._all += 1
        else:
            self._rows[rows.cpu()] += 1

    def per_sample(self) -> torch.Tensor:
        return self._rows + self._all

    def mean(self) -> float:
        return float(self.per_sample().float().mean())

    def select(self, keep: torch.Tensor) -> None:
        """Keep the counts of the samples ``keep`` (particle resampling)."""
        self._rows, self._all = self.per_sample()[keep.cpu()], 0


def evaluate_branches(model: BranchModel, guidance: Guidance, step: StepInfo, state: Any, x_in: torch.Tensor,
                      timestep: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor,
                      prediction_type: str, nfe: NfeCounter) -> dict[str, Prediction]:
    """The branches the method asks for at ``step``, in one call of ``model``, as Predictions
    (each on its rows of ``x_in``, at the level (alpha, sigma): floats, or float64 0-d tensors
    made once per run); counts the NFEs per sample."""
    requests = normalize_requests(guidance.branches(step, state))
    outputs = model(x_in, timestep, requests)
    a = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha, dtype=torch.float64, device=x_in.device)
    s = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(sigma, dtype=torch.float64, device=x_in.device)
    preds = {}
    for branch, rows in requests:
        nfe.add(rows)
        preds[branch] = Prediction(outputs[branch], x_in if rows is None else x_in[rows], a, s, prediction_type)
    return preds


@dataclass(frozen=True)
class StepEvaluator:
    """A method's extra network evaluation inside a step (``StepInfo.evaluate``): ``branches`` on
    ``x`` (model-input coordinates, every row) at this step's level, or at the level ``sigma``
    (k-diffusion ratio) of a flow schedule, whose timestep is sigma_t * ``train_timesteps`` (the
    flow schedulers' own rule). Each branch and row counts one NFE of the run."""

    model: BranchModel
    prediction_type: str
    nfe: NfeCounter
    timestep: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    train_timesteps: float | None  # None: not a flow schedule (other levels are refused)

    def __call__(self, x: torch.Tensor, branches: Sequence[str] | Mapping[str, torch.Tensor | None],
                 sigma: float | None = None) -> dict[str, Prediction]:
        t, a, s = self.timestep, self.alpha, self.sigma
        if sigma is not None:
            if self.train_timesteps is None:
                raise ValueError("step.evaluate: a level other than the step's own needs a flow schedule")
            level = 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)
            t = torch.tensor(level * self.train_timesteps, dtype=self.timestep.dtype, device=self.timestep.device)
            a, s = (torch.tensor(v, dtype=torch.float64, device=x.device) for v in (1.0 - level, level))
        requests = normalize_requests(branches)
        outputs = self.model(x, t, requests)
        preds = {}
        for branch, rows in requests:
            self.nfe.add(rows)
            preds[branch] = Prediction(outputs[branch], x if rows is None else x[rows], a, s, self.prediction_type)
        return preds


def sample(model: BranchModel, noise: torch.Tensor, guidance: Guidance, *, scheduler, num_steps: int,
           prediction_type: str, sampler: str | None = None, eta: float | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None,
           timesteps: list[int] | None = None, sigmas: list[float] | None = None,
           set_timesteps_kwargs: Mapping[str, Any] | None = None,
           callback: Callable[[StepRecord], torch.Tensor | None] | None = None,
           progress: bool | Mapping[str, Any] = True, image: StartImage | None = None) -> SampleResult:
    """Denoise unit Gaussian ``noise`` with ``guidance``; returns the final latents.

    Args:
        model: evaluates branches in one batched forward (see :class:`BranchModel`).
        noise: unit Gaussian noise of the latent shape; the initial state is ``noise`` times the
            stock scheduler's initial scale, as in diffusers' ``prepare_latents``.
        guidance: the method; its per-run state is created here.
        scheduler: a diffusers scheduler; never modified (runs use a configured copy).
        num_steps: number of denoising steps (>= 1).
        prediction_type: what the network predicts: "epsilon", "v_prediction", "flow", "sample".
        sampler: one of :data:`SAMPLER_NAMES`, or None (see :func:`resolve_sampler`).
        eta: DDIM's eta in [0, 1] for "ddim" and for a DDIM scheduler (default: the sampler's own).
        generator: torch generator(s) for stochastic steps, one per sample or one for all.
        callback: called after each step with a :class:`StepRecord`; a returned tensor replaces x.
        progress: show a tqdm bar (a mapping is passed to tqdm as options).
        image: start from an image's latents noised with ``noise`` at ``image.strength``
            (img2img), optionally keeping a masked region (inpainting); see :class:`StartImage`.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    sampler = check_run(guidance, scheduler, num_steps=num_steps, timesteps=timesteps, sigmas=sigmas,
                        sampler=sampler, eta=eta, image=image)
    if not bool(torch.isfinite(noise).all()):
        raise NonFiniteLatentsError("the initial latents contain NaN/inf (check `latents=`)")
    set_kwargs = dict(set_timesteps_kwargs or {})
    bar_options = dict(progress) if isinstance(progress, Mapping) else {"disable": not progress}
    state = guidance.init_state(noise.shape[0], noise.device)
    if sampler == SCHEDULER_SAMPLER:
        run = _SchedulerRun(scheduler, num_steps, noise.device, timesteps, sigmas, set_kwargs, generator, eta)
    else:
        run = _SolverRun(SAMPLERS[sampler], scheduler, num_steps, noise.device, timesteps, sigmas, set_kwargs,
                         generator, eta)
    n = run.num_steps
    guidance.check_steps(n)
    first = 0
    if image is None:
        x = noise * run.init_scale
    else:
        if image.latents.shape != noise.shape:
            raise ValueError(f"image: latents of shape {tuple(image.latents.shape)} do not match the noise "
                             f"{tuple(noise.shape)}")
        first = start_index(n, image.strength, run.order, image.step_rule)
        run.begin_at(first)
        if image.noised:
            x = image.latents
        elif image.strength == 1.0 and image.pure_noise_at_full_strength:
            x = noise * run.init_scale
        else:
            x = run.noised(image.latents, noise, first)
    nfe = NfeCounter(noise.shape[0])
    denoised = x
    # NaN/inf latents are noted on the device and read once, after the loop (or when a later
    # step fails on them): a per-step check would be a host sync per step on a GPU. What is noted
    # is the latents' sum in float64, one reduction: it is NaN/inf exactly when an entry is (no
    # sum of float32 or narrower entries overflows float64), where isfinite().all() takes five ops.
    sums: list[torch.Tensor] = []
    levels = run.level_tensors(x.device)
    try:
        with tqdm(total=n - first, **bar_options) as bar:
            for i in range(first, n):
                t = run.timesteps[i]
                x_in = run.model_input(x, i, t)
                step = StepInfo(index=i, num_steps=n, sigma=run.ratio(i), sigma_next=run.ratio_next(i),
                                timestep=run.timestep_values[i],
                                evaluate=StepEvaluator(model, prediction_type, nfe, t, *levels[i], run.train_timesteps))
                preds = evaluate_branches(model, guidance, step, state, x_in, t, *levels[i], prediction_type, nfe)
                guided = guidance.combine(preds, step, state)
                x = run.step(x, guided, i, t)
                if image is not None and image.mask is not None:
                    # Inpainting by replacement: outside the mask the image itself, at the next level.
                    x = image.mask * x + (1 - image.mask) * run.noised(image.latents, noise, i + 1)
                sums.append(x.sum(dtype=torch.float64))
                # the guided x0 is computed where it is read (a callback, kept particles, the
                # result): most steps of most runs never read it
                denoised = guided.denoise
            # After the step a method may reweight and resample its particles (FKC): every
            # per-sample quantity follows the kept rows.
                keep = guidance.after_step(x, preds, guided, step, state)
                if keep is not None:
                    x, denoised = x[keep], denoised.x0[keep]
                    nfe.select(keep)
                    if image is not None:
                        image, noise = image.rows(keep), noise[keep]
                    state = guidance.select_state(state, keep)
                    run.select(keep)
                if callback is not None:
                    denoised = _x0(denoised)
                    replaced = callback(StepRecord(i, n, t, step.sigma, step.sigma_next, x, denoised,
                                                   nfe.mean(), first))
                    if replaced is not None:
                        x = replaced
                bar.update()
    except Exception as error:  # a later step failing on NaN latents: name where they began
        cause = _nonfinite_error(sums, first, run, n, guidance, sampler)
        if cause is not None:
            raise cause from error
        raise
    cause = _nonfinite_error(sums, first, run, n, guidance, sampler)
    if cause is not None:
        raise cause
    return SampleResult(x=x, denoised=_x0(denoised), nfe=nfe.mean(), nfe_per_sample=nfe.per_sample().tolist(),
                        state=state)


def _x0(denoised: Prediction | torch.Tensor) -> torch.Tensor:
    """The denoised estimate: a step's guided prediction's x0, or the tensor already computed."""
    return denoised.x0 if isinstance(denoised, Prediction) else denoised


def _level_tensors(levels: Sequence[tuple[float, float]], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step, (alpha_t, sigma_t) as float64 0-d tensors: one transfer per run, then views."""
    table = torch.tensor(levels, dtype=torch.float64, device=device).reshape(-1, 2)
    return [tuple(row.unbind()) for row in table.unbind()]  # views: n + 1 ops per run


class _SolverRun:
    """Per-call state of the core's own solvers: the levels and the multistep history."""

    def __init__(self, spec: SamplerSpec, scheduler, num_steps, device, timesteps, sigmas, set_kwargs,
                 generator, eta) -> None:
        # Flow models keep their own (flow) schedule whatever the solver; others visit the levels
        # of the stock scheduler the solver mirrors, configured like the pipeline's.
        source = scheduler if is_flow_scheduler(scheduler) or spec.scheduler_name is None else \
            fresh_scheduler(spec.scheduler(), scheduler.config)
        if source.config.get("clip_sample") or source.config.get("thresholding"):
            logger.warning("sampler %r: the scheduler config asks for clip_sample/thresholding of x0, which "
                           "the core's solvers do not apply (SD configs set clip_sample=False)", spec.name)
        self.spec = spec
        self.schedule: NoiseSchedule = schedule_from_scheduler(source, num_steps, device, timesteps, sigmas,
                                                               **set_kwargs)
        self.timesteps = self.schedule.timesteps
        self.timestep_values = [self.schedule.timestep(i) for i in range(self.schedule.num_steps)]
        self.num_steps = self.schedule.num_steps
        self.init_scale = self.schedule.init_scale
        self.eta = spec.eta if eta is None else eta
        self.generator = generator
        self.history: tuple[torch.Tensor, float] | None = None
        self.order = 1
        self.train_timesteps = source.config.get("num_train_timesteps") if self.schedule.flow else None
        # k-diffusion sigmas of every step and of the level it moves to, read at every step
        self._ratios, self._ratios_next = self.schedule.ratios()

    def begin_at(self, index: int) -> None:
        """Start at step ``index`` (img2img): nothing to set for the core's solvers."""

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """``clean`` latents at the level of step ``index`` (the clean latents at ``index == n``)."""
        if index >= self.num_steps:
            return clean
        a, s = self.schedule.levels(index)
        return (a * clean.double() + s * noise.double()).to(clean.dtype)

    def ratio(self, i: int) -> float:
        return self._ratios[i]

    def ratio_next(self, i: int) -> float:
        return self._ratios_next[i]

    def level_tensors(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(alpha_t, sigma_t) of every step as float64 0-d tensors on ``device``, made at once."""
        return _level_tensors([self.schedule.levels(i) for i in range(self.num_steps)], device)

    def model_input(self, x: torch.Tensor, i: int, t: torch.Tensor) -> torch.Tensor:
        return x

    def select(self, keep: torch.Tensor) -> None:
        """Keep the multistep history of the rows ``keep`` (after particle resampling)."""
        if self.history is not None:
            self.history = (self.history[0][keep], self.history[1])

    def step(self, x: torch.Tensor, guided: GuidedPrediction, i: int, t: torch.Tensor) -> torch.Tensor:
        sch = self.schedule
        (a, s), (a_next, s_next) = sch.levels(i), sch.levels_next(i)
        x0, eps = guided.denoise.x0, guided.renoise.eps
        if self.spec.update == "dpmpp_2m":
            x_next, self.history = dpmpp_2m_step(x0, eps, a, s, a_next, s_next, self.history,
                                                 renoise_x0=guided.renoise.x0)
        else:
            noise = None
            if self.eta > 0 and s_next > 0:
                noise = randn_tensor(x.shape, generator=self.generator, device=x.device, dtype=x.dtype).to(x0.dtype)
            x_next = first_order_step(x0, eps, a, s, a_next, s_next, self.eta, noise)
        return x_next.to(x.dtype)


class _SchedulerRun:
    """Per-call state of the path through a diffusers scheduler's ``step`` (a private copy)."""

    def __init__(self, scheduler, num_steps, device, timesteps, sigmas, set_kwargs, generator, eta) -> None:
        self.scheduler = copy.deepcopy(scheduler)
        if timesteps is not None:
            self.scheduler.set_timesteps(timesteps=timesteps, device=device, **set_kwargs)
        elif sigmas is not None:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device, **set_kwargs)
        else:
            self.scheduler.set_timesteps(num_steps, device=device, **set_kwargs)
        self.begin_at(0)  # as the stock SDXL pipeline does
        self.order = int(getattr(self.scheduler, "order", 1))
        self.timesteps = self.scheduler.timesteps
        self.timestep_values = [float(t) for t in self.timesteps.tolist()]  # one host read per run
        self.num_steps = len(self.timesteps)
        self.init_scale = getattr(self.scheduler, "init_noise_sigma", 1.0)
        self.kwargs = _step_kwargs(self.scheduler, generator, eta)
        self._levels = all_levels(self.scheduler, self.timestep_values)
        self.train_timesteps = (self.scheduler.config.get("num_train_timesteps")
                                if is_flow_scheduler(self.scheduler) else None)

    def begin_at(self, index: int) -> None:
        """Start at step ``index``, as the stock img2img pipelines tell their scheduler."""
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(index)

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """``clean`` noised to step ``index``'s timestep with the scheduler's own rule (clean at the end)."""
        if index >= self.num_steps:
            return clean
        timestep = self.timesteps[index:index + 1]
        if hasattr(self.scheduler, "add_noise"):
            return self.scheduler.add_noise(clean, noise, timestep)
        return self.scheduler.scale_noise(clean, timestep, noise)  # flow matching

    def ratio(self, i: int) -> float:
        a, s = self._levels[i]
        return float("inf") if a == 0 else s / a

    def ratio_next(self, i: int) -> float:
        return self.ratio(i + 1) if i + 1 < self.num_steps else 0.0

    def level_tensors(self, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(alpha_t, sigma_t) of every step as float64 0-d tensors on ``device``, made at once."""
        return _level_tensors(self._levels, device)

    def model_input(self, x: torch.Tensor, i: int, t: torch.Tensor) -> torch.Tensor:
        if hasattr(self.scheduler, "scale_model_input"):
            x = self.scheduler.scale_model_input(x, t)
        return x

    def select(self, keep: torch.Tensor) -> None:
        """Keep the rows ``keep`` of a multistep scheduler's stored outputs (DPM-Solver's)."""
        outputs = getattr(self.scheduler, "model_outputs", None)
        if isinstance(outputs, list):
            self.scheduler.model_outputs = [o[keep] if isinstance(o, torch.Tensor) else o for o in outputs]

    def step(self, x: torch.Tensor, guided: GuidedPrediction, i: int, t: torch.Tensor) -> torch.Tensor:
        # resolve_sampler refused split methods on this path before the first model call.
        return self.scheduler.step(guided.denoise.output, t, x, **self.kwargs,
                                   return_dict=False)[0]
