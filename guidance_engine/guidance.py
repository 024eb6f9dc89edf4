"""The guidance contract: what a method tells the sampler core, and what it gets back.

Per step the core asks a method which branches it needs (:meth:`Guidance.branches`), evaluates
them in one batched forward, wraps each in a :class:`~guidance_engine.prediction.Prediction` and
asks the method to :meth:`~Guidance.combine` them into a :class:`GuidedPrediction`: the x0 to move
with and the eps to renoise with (one and the same for CFG; the unconditional eps for CFG++).

A method object is immutable, validated config (STYLE rule 5). Everything that changes during a
run (APG's momentum, per-sample switches) lives in the state object that
:meth:`~Guidance.init_state` creates for each call and the core passes back at every step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from .prediction import Prediction
from .schedules import SCHEDULE_NAMES, Constant, Custom, Schedule, as_schedule

#: the schedules a string can name (each may take keyword arguments: see :mod:`.schedules`)
SCHEDULES: tuple[str, ...] = SCHEDULE_NAMES


def schedule_param(default: Any = "constant") -> Any:
    """The ``schedule`` field: a name such as "linear" or "beta(a=2, b=3)", a Schedule, a list of
    per-step values or a callable (validated by :func:`~.schedules.as_schedule`, not a ``param``)."""
    return field(default=default, metadata={
        "doc": "how the strength varies over the run: " + ", ".join(SCHEDULE_NAMES) + " (with arguments, e.g. "
               "'clamp_linear(floor=5)', 'power_cosine(power=2)', 'beta(a=2, b=3)', 'explicit(values=[7.5, 7])', "
               "'phases(timesteps=[875], values=[3])'), a list of per-step values or a callable of the progress",
        "schedule": True})


def param(default: Any, *, low: float | None = None, high: float | None = None,
          choices: tuple[Any, ...] | None = None, doc: str = "", low_open: bool = False,
          optional: bool = False) -> Any:
    """A method parameter: its default, accepted range (closed unless ``low_open``; None allowed
    when ``optional``) and meaning."""
    return field(default=default, metadata={"low": low, "high": high, "choices": choices,
                                            "doc": doc, "low_open": low_open, "optional": optional})


def describe_range(meta: Mapping[str, Any]) -> str:
    """The accepted values of a parameter, as the error messages and ``methods`` print them."""
    if meta.get("choices") is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    low, high = meta.get("low"), meta.get("high")
    left = "(" if meta.get("low_open") or low is None else "["
    def number(value: float) -> str:  # integers exactly (a seed bound of 2^63 - 1 is no 9.22337e+18)
        return str(value) if isinstance(value, int) else f"{value:g}"

    lo = "-inf" if low is None else number(low)
    hi = "inf" if high is None or math.isinf(high) else number(high)
    right = ")" if high is None or math.isinf(high) else "]"
    return f"{left}{lo}, {hi}{right}"


PERTURBATION_KINDS: tuple[str, ...] = ("identity", "blur", "skip", "extrapolate", "shuffle")


@dataclass(frozen=True)
class Perturbation:
    """How the network is altered for a branch's rows (perturbation guidance).

    ``kind``: "identity" replaces self-attention by the identity map (its output is the value
    projection: PAG), "blur" blurs the queries with a Gaussian of std ``sigma`` tokens over the
    image grid (``inf``: their mean; SEG), "skip" skips whole transformer blocks (SLG/STG),
    "extrapolate" moves cross-attention outputs away from another condition's context
    (:class:`ContextExtrapolation`, NAG), "shuffle" permutes the tokens entering whole
    transformer blocks (TPG's :class:`~guidance_engine.methods.tpg.TokenShuffle`).
    ``layers``: where, as block names ("mid", "down.1", "up.0.attentions.1") or transformer block
    indices (7, 8, 9); None is the model family's default. The pipeline resolves the names against
    its network (ValueError before any model call when they select nothing).
    """

    kind: str
    layers: tuple[str | int, ...] | None = None
    sigma: float = math.inf

    def __post_init__(self) -> None:
        if self.kind not in PERTURBATION_KINDS:
            raise ValueError(f"perturbation: kind must be one of {', '.join(map(repr, PERTURBATION_KINDS))}, "
                             f"got {self.kind!r}")
        if not self.sigma > 0:
            raise ValueError(f"perturbation: sigma must be > 0 (inf: the mean of the queries), got {self.sigma!r}")


@dataclass(frozen=True)
class ContextExtrapolation(Perturbation):
    """An alteration of cross-attention by a second context: in each chosen layer the branch's
    queries attend to their own context (``positive``) and to the context of branch ``context``
    (``negative``, e.g. the negative prompt's), and :meth:`extrapolate` (the method's formula,
    NAG's) makes the layer's output from the two, before its output projection. ``layers`` None:
    every cross-attention layer."""

    kind: str = "extrapolate"
    context: str = "uncond"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "extrapolate":
            raise ValueError(f"perturbation: a ContextExtrapolation has kind 'extrapolate', got {self.kind!r}")

    def extrapolate(self, positive: torch.Tensor, negative: torch.Tensor, attention: str) -> torch.Tensor:
        """The layer's attention output (tokens x channels per row, before the output projection)
        from the outputs under the branch's own context and under ``context``'s. ``attention``: the
        kind of layer ("cross": a UNet's cross-attention), for defaults that depend on it."""
        raise NotImplementedError


class Branch(str):
    """A branch name that also says how the network is altered for its rows (a ``str``, so it
    keys prediction dicts like a plain name). ``base`` names the branch whose conditioning it
    reuses; ``time_noise`` > 0 adds ``time_noise * std(emb) * n`` (n ~ N(0, I) from
    ``generator``) to the time-step embedding of its rows only (TSG); ``perturb`` alters attention
    layers or blocks for its rows only (PAG, SEG, SLG); ``network`` names another network that
    evaluates its rows (an autoguidance reference model; a separate call, since different
    weights cannot share one batched forward). ``probe`` makes the branch's input depend on the
    forward itself (SAG): the branch model records, on the rows of ``base`` in that forward,
    the self-attention map of ``probe.layers`` into the probe, and gives it ``evaluate(x)``,
    which the method calls in ``combine`` on the input it builds (the second network call,
    counted as this branch's evaluation)."""

    base: str
    time_noise: float
    generator: torch.Generator | None
    perturb: Perturbation | None
    network: str | None
    probe: Any

    def __new__(cls, name: str, *, base: str, time_noise: float = 0.0,
                generator: torch.Generator | None = None, perturb: Perturbation | None = None,
                network: str | None = None, probe: Any = None) -> Branch:
        branch = super().__new__(cls, name)
        branch.base, branch.time_noise, branch.generator = base, time_noise, generator
        branch.perturb, branch.network, branch.probe = perturb, network, probe
        return branch


@dataclass(frozen=True)
class StepInfo:
    """Where the sampler is: step ``index`` of ``num_steps``, moving from ``sigma`` to ``sigma_next``.

    ``sigma`` is the noise-to-signal ratio sigma_t / alpha_t (k-diffusion's sigma; ``inf`` at the
    pure-noise end of a flow schedule), so intervals in sigma mean the same for every model family.
    """

    index: int
    num_steps: int
    sigma: float
    sigma_next: float
    timestep: float
    #: The core's in-step evaluator (:class:`~guidance_engine.samplers.loop.StepEvaluator`):
    #: ``evaluate(x, branches, sigma=None)``, the network on an input a method builds, at this
    #: step's level or another level of a flow schedule, counted as NFEs (Rectified-CFG++'s
    #: midpoint, SWG's windows). None outside the core's loop.
    evaluate: Any = field(default=None, compare=False, repr=False)

    @property
    def progress(self) -> float:
        """Fraction of the run already done, in [0, 1)."""
        return self.index / self.num_steps


@dataclass(frozen=True, eq=False)
class GuidedPrediction:
    """The outcome of a guidance step: move with ``denoise.x0``, renoise with ``renoise.eps``."""

    denoise: Prediction
    renoise: Prediction

    @classmethod
    def single(cls, prediction: Prediction) -> GuidedPrediction:
        """A guided prediction that moves and renoises with the same prediction (CFG and kin)."""
        return cls(prediction, prediction)

    @property
    def split(self) -> bool:
        """True when renoising uses another prediction than denoising (CFG++)."""
        return self.renoise is not self.denoise


@dataclass(frozen=True, kw_only=True)
class Guidance:
    """Base class of every guidance method. Subclasses are frozen keyword-only dataclasses.

    Common parameters: a guidance ``interval`` in noise level (``sigma_min``..``sigma_max``, as in
    EDM's S_min/S_max) and in step fractions (``start``..``stop``, a convenience); outside it the
    method falls back to the conditional prediction alone and skips the unconditional forward.
    ``schedule`` shapes the strength over the run (:mod:`guidance_engine.schedules`: constant,
    the mean-preserving linear and cosine increases of Wang et al. 2024, arXiv 2404.13040, their
    clamped forms, power-cosine, beta-CFG's beta density, explicit per-step values, phases).
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: True when the method renoises with another prediction than it denoises with (CFG++):
    #: the core must then use its own steps, not a diffusers scheduler's ``step``.
    renoise_split: ClassVar[bool] = False
    #: The scale at which the method adds no guidance of its own: where ``schedule`` starts, and
    #: what :meth:`scale_at` returns outside the interval. 1 for CFG-like methods (the conditional
    #: prediction alone); 0 for CFG++ (lambda = 0: denoise and renoise with the *unconditional*
    #: prediction) and for GFCG (its own weight off: CFG at ``cfg_scale``). Outside the interval
    #: a method's guidance is off whatever this value (what stays on: ``off_outside_interval``).
    neutral_scale: ClassVar[float] = 1.0
    #: True when the method needs fresh noise at every step (resampled particles must separate):
    #: the core refuses deterministic solvers before the first model call.
    requires_stochastic_sampler: ClassVar[bool] = False
    #: True when the method is defined on a flow-matching velocity only (Rectified-CFG++): the core
    #: refuses other schedules before the first model call.
    requires_flow: ClassVar[bool] = False
    #: True when the method evaluates the network on crops of the latent (SWG's windows): a
    #: pipeline whose forward is laid out for the whole latent refuses it before any model call.
    evaluates_crops: ClassVar[bool] = False
    #: True when ``combine`` evaluates the network again inside the step (``StepInfo.evaluate``:
    #: Rectified-CFG++'s midpoint, SWG's windows): a loop without the core's evaluator (a diffusers
    #: modular pipeline's) cannot run it.
    evaluates_in_step: ClassVar[bool] = False
    #: The parameters that ``schedule`` shapes (each checked to stay in its range at every step).
    shaped_scales: ClassVar[tuple[str, ...]] = ("scale",)
    #: What the interval does not switch off: the overrides that, with an empty interval, leave
    #: the conditional prediction alone (PAG/SEG/SLG/SAG: {"scale": 1}, their CFG part runs at
    #: every step as in diffusers; CFG-Zero*: {"zero_steps": 0}, its zero-init is no guidance).
    off_outside_interval: ClassVar[Mapping[str, Any]] = {}
    #: False when ``combine`` needs every sample of the batch (SAG's second forward reads the
    #: whole batch's attention): such a method cannot guide some rows only (AG's inner method).
    runs_on_row_subsets: ClassVar[bool] = True

    scale: float = 1.0
    schedule: Any = schedule_param()
    sigma_min: float = param(0.0, low=0.0, doc="guide only where sigma >= sigma_min")
    sigma_max: float = param(math.inf, low=0.0, doc="guide only where sigma <= sigma_max")
    start: float = param(0.0, low=0.0, high=1.0, doc="guide only from this fraction of the steps")
    stop: float = param(1.0, low=0.0, high=1.0, doc="guide only before this fraction of the steps")

    # -- validation and config ---------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            self._check(f.name, getattr(self, f.name), f.metadata, integer=f.type in ("int", int))
        if self.sigma_min > self.sigma_max:
            raise ValueError(f"{self.name}: sigma_min ({self.sigma_min}) must not exceed sigma_max ({self.sigma_max})")
        if self.start > self.stop:
            raise ValueError(f"{self.name}: start ({self.start}) must not exceed stop ({self.stop})")
        self._check_schedule()

    def schedule_targets(self) -> tuple[tuple[str, float], ...]:
        """(parameter, neutral value) of every scale the schedule shapes: ``shaped_scales`` around
        ``neutral_scale`` (subclasses whose schedule shapes another term override this)."""
        return tuple((name, self.neutral_scale) for name in self.shaped_scales)

    @property
    def shape(self) -> Schedule:
        """The schedule as an object (the field keeps what was given: a name stays a name).
        Resolved once per method object (read at every step), again if the field was replaced."""
        known = self.__dict__.get("_shape")
        if known is None or known[0] is not self.schedule:
            known = (self.schedule, as_schedule(self.schedule))
            object.__setattr__(self, "_shape", known)  # a memo of a pure function, not run state
        return known[1]

    def _check_schedule(self) -> None:
        """The schedule is one :mod:`.schedules` accepts, its target parameter is one it shapes,
        and both ends of every scale it shapes lie in that scale's accepted range, so that no step
        leaves it (explicit lists: every value; callables: at the run's start, :meth:`check_steps`)."""
        meta = self.__dataclass_fields__["schedule"].metadata
        if not meta.get("schedule"):  # a subclass narrowed the field to fixed choices (FKC)
            return
        try:
            shape = self.shape
        except ValueError as error:
            raise ValueError(f"{self.name}: {error}") from None
        if not isinstance(self.schedule, (str, Schedule)):
            object.__setattr__(self, "schedule", shape)  # a list or a callable: kept as its object
        targets = self.schedule_targets()
        if getattr(shape, "targets_one", False):
            names = [name for name, _ in targets]
            if shape.parameter is not None and shape.parameter not in names:
                raise ValueError(f"{self.name}: schedule {shape.name!r} sets parameter {shape.parameter!r}, which "
                                 f"{self.name} does not schedule (it schedules {', '.join(map(repr, names))})")
        if isinstance(shape, Constant):
            return  # every value stays the parameter's own, already checked
        metadata = {f.name: f.metadata for f in dataclasses.fields(self)}
        for name, neutral in targets:
            if not self._shapes(name) or getattr(self, name) is None:  # None: an optional scale left unset
                continue
            bounds = shape.bounds(getattr(self, name), neutral)
            if bounds is not None:
                self._check_scheduled_range(name, neutral, bounds, metadata.get(name, {}))

    def _shapes(self, name: str, shape: Schedule | None = None) -> bool:
        """Whether the schedule (``shape``, if already resolved) shapes parameter ``name``
        (one-parameter schedules: only theirs)."""
        shape = self.shape if shape is None else shape
        if not getattr(shape, "targets_one", False):
            return True
        return name == (shape.parameter or self.schedule_targets()[0][0])

    def _check_scheduled_range(self, name: str, neutral: float, bounds: tuple[float, float],
                               meta: Mapping[str, Any]) -> None:
        low, high = meta.get("low"), meta.get("high")
        lo, hi = min(bounds[0], neutral), max(bounds[1], neutral)
        if (low is not None and lo < low) or (high is not None and hi > high):
            raise ValueError(
                f"{self.name}: schedule {self._schedule_label()} "
                f"runs parameter '{name}' from {lo:g} to {hi:g}{self.shape.why(getattr(self, name), neutral)}, "
                f"outside the accepted {describe_range(meta)}; "
                f"lower '{name}' or use schedule 'constant'")

    def _schedule_label(self) -> str:
        """The schedule as an error message names it."""
        if isinstance(self.schedule, str):
            return repr(self.schedule)
        return "(a callable)" if isinstance(self.shape, Custom) else repr(self.shape.spec())

    def check_steps(self, num_steps: int) -> None:
        """ValueError before the first model call if the schedule cannot serve a run of
        ``num_steps`` steps (an explicit list of another length; a callable leaving a range)."""
        meta = self.__dataclass_fields__["schedule"].metadata
        if not meta.get("schedule"):
            return
        shape = self.shape
        shape.check_steps(num_steps, self.name)
        if shape.bounds(0.0, 0.0) is None:  # a callable: its values at this run's steps
            metadata = {f.name: f.metadata for f in dataclasses.fields(self)}
            for name, neutral in self.schedule_targets():
                if self._shapes(name):
                    values = [shape.value(getattr(self, name), neutral,
                                          StepInfo(index=i, num_steps=num_steps, sigma=1.0, sigma_next=1.0,
                                                   timestep=0.0)) for i in range(num_steps)]
                    self._check_scheduled_range(name, neutral, (min(values), max(values)), metadata.get(name, {}))

    def _check(self, name: str, value: Any, meta: Mapping[str, Any], integer: bool = False) -> None:
        """``value`` of parameter ``name`` in its declared range (an integer where the field is
        annotated ``int``: 1.5 steps or a seed of 1.5 are refused, not truncated)."""
        if "low" not in meta or (value is None and meta.get("optional")):
            return  # not a param(): nested config, validated by its owner
        where = f"{self.name}: parameter '{name}' must be {'an integer in ' if integer else ''}{describe_range(meta)}"
        if integer and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where}, got {value!r}")
        choices = meta.get("choices")
        if choices is not None:
            if value not in choices:
                raise ValueError(f"{where}, got {value!r}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{where}, got {value!r}")
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (value < low or (meta.get("low_open") and value == low)):
            raise ValueError(f"{where}, got {value!r}")
        if high is not None and value > high:
            raise ValueError(f"{where}, got {value!r}")

    def new(self, **overrides: Any) -> Guidance:
        """A copy with some parameters changed (validated again)."""
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Serialisable config: ``{"name": ..., **parameters}``; :func:`resolve_guidance` reads it."""
        config = {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        schedule = config.get("schedule")
        if isinstance(schedule, Schedule):  # its string form; a callable has none and stays a callable
            config["schedule"] = schedule.function if isinstance(schedule, Custom) else schedule.spec()
        return config

    @classmethod
    def parameters(cls) -> list[dataclasses.Field]:
        """The method's parameters, with defaults, ranges and meaning in each field's metadata."""
        return list(dataclasses.fields(cls))

    # -- the per-step contract ---------------------------------------------------------------
    def active(self, step: StepInfo) -> bool:
        """Whether guidance is on at this step (interval in sigma and in step fraction)."""
        return self.sigma_min <= step.sigma <= self.sigma_max and self.start <= step.progress < self.stop

    def scale_at(self, step: StepInfo) -> float:
        """The scale at this step: ``scale`` shaped by ``schedule``; neutral outside the interval."""
        return self.shaped("scale", step)

    def shaped(self, name: str, step: StepInfo, neutral: float | None = None) -> float:
        """Parameter ``name`` at this step, shaped by ``schedule`` around ``neutral`` (default
        ``neutral_scale``); the neutral value outside the interval."""
        neutral = self.neutral_scale if neutral is None else neutral
        if not self.active(step):
            return neutral
        value = getattr(self, name)
        if not self.__dataclass_fields__["schedule"].metadata.get("schedule"):
            return value
        shape = self.shape
        if isinstance(shape, Constant) or not self._shapes(name, shape):  # Constant: the value, exactly
            return value
        return shape.value(value, neutral, step)

    def required_branches(self) -> set[str]:
        """Every branch the method may request; a pipeline checks it can provide them all."""
        return {"cond", "uncond"}

    def altered_branches(self) -> tuple[Branch, ...]:
        """Every :class:`Branch` with a perturbation or another network that the method may
        request, so that a pipeline can check it can evaluate them (layers exist, the network is
        loaded) before the first model call."""
        return ()

    def init_state(self, batch_size: int, device: torch.device) -> Any:
        """Per-run state (None for stateless methods); created by the core for every call."""
        return None

    # -- particles (SMC methods) --------------------------------------------------------------
    def group_size(self) -> int:
        """Rows per output image: a particle method (FKC) runs every image as a group of this many
        consecutive rows that it reweights and resamples together; 1 for every other method."""
        return 1

    @property
    def requires_noise_start(self) -> bool:
        """True when the method's weights assume the run starts from the prior (pure noise), so
        that img2img and inpainting, which start from a noised image, must be refused."""
        return False

    def output_rows(self, state: Any) -> torch.Tensor | None:
        """The row of each group returned as the group's image (None: every row is an image).
        Called once at the end of a run with the method's final state."""
        return None

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...] | dict[str, torch.Tensor | None]:
        """The branches this step needs, in forward order (unconditional first, as diffusers).

        Either names, each evaluated for every sample, or a dict from name to the LongTensor of
        samples that need it (None: all); then ``combine`` receives predictions of those rows only.
        """
        if self.scale_at(step) == self.neutral_scale:
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        """Combine the branch predictions into a guided prediction."""
        raise NotImplementedError

    def away_from(self, preds: Mapping[str, Prediction], reference: str, step: StepInfo) -> Prediction:
        """``reference + w (cond - reference)`` with ``w = scale_at(step)``: the rule CFG, ICG,
        TSG and autoguidance share (each with its own reference branch: the unconditional, an
        independent condition, a perturbed time, a weaker network), one lerp as EDM2 writes it; the
        conditional prediction alone when the reference was not evaluated (outside the interval)."""
        cond = preds["cond"]
        if reference not in preds:
            return cond
        return preds[reference].lerp(cond, self.scale_at(step))

    def after_step(self, x: torch.Tensor, preds: Mapping[str, Prediction], guided: GuidedPrediction,
                   step: StepInfo, state: Any) -> torch.Tensor | None:
        """Called after each solver step. A method that reweights particles (FKC) returns the
        LongTensor of rows to keep (resampling), and the core moves every per-sample quantity
        (latents, this state through :meth:`select_state`, solver history) accordingly."""
        return None

    def select_state(self, state: Any, index: torch.Tensor) -> Any:
        """The state of the samples ``index`` (particle resampling, per-sample runs)."""
        if state is None:
            return None
        if isinstance(state, torch.Tensor):
            return state[index]
        if dataclasses.is_dataclass(state):
            return dataclasses.replace(state, **{
                f.name: getattr(state, f.name)[index] for f in dataclasses.fields(state)
                if isinstance(getattr(state, f.name), torch.Tensor)})
        raise TypeError(f"{self.name}: cannot select rows of a state of type {type(state).__name__}")

    def update_state_rows(self, state: Any, rows: torch.Tensor, sub: Any, batch_size: int) -> Any:
        """Write the state ``sub`` of the samples ``rows`` back into the full-batch ``state``
        (a wrapper that ran this method on some rows only, e.g. Adaptive Guidance)."""
        if state is None or sub is None:
            return state
        if not dataclasses.is_dataclass(state):
            raise TypeError(f"{self.name}: cannot update rows of a state of type {type(state).__name__}")
        for f in dataclasses.fields(state):
            value = getattr(sub, f.name)
            if not isinstance(value, torch.Tensor):
                continue
            full = getattr(state, f.name)
            if full is None:
                full = value.new_zeros((batch_size, *value.shape[1:]))
            full = full.clone()
            full[rows] = value
            setattr(state, f.name, full)
        return state

    def with_negative_prompt(self) -> Guidance:
        """The method to use when the user gives a negative prompt (self; LinearAG, fitted on the
        empty prompt, falls back to AG)."""
        return self
