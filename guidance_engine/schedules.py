"""Guidance schedules: how a method's scale varies over the run.

A schedule maps a method's scale ``value`` (what the user set), its neutral value ``neutral``
(where the method adds no guidance: 1 for CFG, 0 for CFG++) and the step to the scale used at
that step. Every schedule can be written as a string, so that the CLI, dict configs, manifests
and PNG metadata carry it: a name (``"linear"``) or a name with keyword arguments
(``"beta(a=2, b=3)"``, ``"explicit(values=[7.5, 7, 6])"``). In Python a :class:`Schedule`
object, a list of per-step values or a callable of the progress are accepted too.

The shapes (p = i / n the fraction of the run done before step i of n):

- ``constant``: the value itself, exactly (CFG then matches the stock pipelines bit for bit);
- ``linear``, ``cosine``: neutral + (value - neutral) 2p, resp. (1 - cos(pi p)): the
  mean-preserving increasing forms of Wang et al. 2024 (arXiv 2404.13040), from the neutral
  value to 2 value - neutral;
- ``clamp_linear(floor=c)``, ``clamp_cosine(floor=c)``: max(c, linear / cosine) (Wang et al.'s
  clamped forms; their c is given in their w = s - 1 convention, here ``floor`` is in the
  parameter's own units: Wang et al.'s c = 4 on CFG is ``floor=5``);
- ``power_cosine(power=k)``: neutral + (value - neutral) (1 - cos(pi p^k)) / 2, the power-cosine
  schedule (PCS) of Wang et al.'s comparison, in sd-webui-incantations' form w0 (1 - cos(pi x^k)) / 2:
  it rises to ``value`` (its maximum, not its mean); k = 1 is half the cosine schedule's rise;
- ``beta(a=, b=, normalize=)``: neutral + (value - neutral) B(q; a, b), B the beta density at
  q = i / (n - 1) (the official beta-CFG code, Malarz et al. 2025, arXiv 2502.10574: q reaches 1
  at the last step), divided by its maximum when ``normalize``. The official code applies it
  to CFG's difference, u + s B(q) (c - u), i.e. around the unconditional prediction; here it is
  around the neutral value (the conditional prediction for CFG), as every other shape; the two
  agree for methods whose neutral value is 0 (CFG++, GFCG). Beta-CFG's second part, its
  gradient normalisation, is not a schedule and not here;
- ``explicit(values=[...], parameter=None)``: one value per step (diffusers issue #7756's list of
  guidance scales), for one parameter (default: the method's main scale; the others stay
  constant); its length must be the run's number of steps;
- ``phases(timesteps=[t1, ...], values=[v1, ...], parameter=None)``: the value while the step's
  timestep t >= t1, then v1 while t >= t2, ...: per-phase scales such as Wan 2.2's
  ``guidance_scale_2`` below its expert boundary (t on diffusers' 1000-step scale);
- a callable ``f(p) -> value`` (Python only; not serialisable): the value at progress p.

Outside a method's interval its guidance is off whatever the schedule (the neutral value).
Every schedule is checked, when the method is built (or, for a callable or an explicit list, when
the run's length is known, before the first model call), to keep each parameter it shapes inside
that parameter's accepted range at every step.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

if TYPE_CHECKING:
    from .guidance import StepInfo

__all__ = ["Beta", "ClampCosine", "ClampLinear", "Constant", "Cosine", "Custom", "Explicit", "Linear", "Phases",
           "PowerCosine", "Schedule", "SCHEDULE_NAMES", "as_schedule"]


@dataclass(frozen=True)
class Schedule:
    """Base class: subclasses define :meth:`factor` (the shape in [0, inf), 1 = the value) or
    override :meth:`value`, and :meth:`bounds`."""

    name: ClassVar[str] = ""
    #: True when the schedule gives the values of one parameter (the others stay constant)
    targets_one: ClassVar[bool] = False

    def factor(self, step: StepInfo) -> float:
        raise NotImplementedError

    def value(self, value: float, neutral: float, step: StepInfo) -> float:
        """The scale at ``step`` for a parameter set to ``value`` whose neutral value is ``neutral``."""
        return neutral + (value - neutral) * self.factor(step)

    def factor_range(self) -> tuple[float, float]:
        """(min, max) of :meth:`factor` over any run."""
        raise NotImplementedError

    def bounds(self, value: float, neutral: float) -> tuple[float, float] | None:
        """(min, max) of the scale over any run, or None when only the run can tell (explicit
        lists are checked directly, callables at the run's start)."""
        low, high = self.factor_range()
        ends = (neutral + (value - neutral) * low, neutral + (value - neutral) * high)
        return min(ends), max(ends)

    def check_steps(self, num_steps: int, owner: str) -> None:
        """ValueError if this schedule cannot serve a run of ``num_steps`` steps."""

    def why(self, value: float, neutral: float) -> str:
        """Where the extreme of :meth:`bounds` comes from, for the error message ("" if obvious)."""
        return ""

    def spec(self) -> str:
        """The string form (what :func:`as_schedule` reads back)."""
        args = ", ".join(f"{key}={value!r}" for key, value in self._args())
        return f"{self.name}({args})" if args else self.name

    def _args(self) -> list[tuple[str, Any]]:
        """The arguments that differ from their defaults (tuples written as lists)."""
        return [(f.name, list(value) if isinstance(value, tuple) else value) for f in dataclasses.fields(self)
                if (value := getattr(self, f.name)) != f.default]

    def __str__(self) -> str:
        return self.spec()


@dataclass(frozen=True)
class Constant(Schedule):
    name: ClassVar[str] = "constant"

    def value(self, value: float, neutral: float, step: StepInfo) -> float:
        return value  # exactly: the stock pipelines' arithmetic, bit for bit

    def factor_range(self) -> tuple[float, float]:
        return 1.0, 1.0


@dataclass(frozen=True)
class Linear(Schedule):
    name: ClassVar[str] = "linear"

    def why(self, value: float, neutral: float) -> str:
        return f" (twice its mean {value:g} minus {neutral:g})"

    def factor(self, step: StepInfo) -> float:
        return 2.0 * step.progress

    def factor_range(self) -> tuple[float, float]:
        return 0.0, 2.0


@dataclass(frozen=True)
class Cosine(Schedule):
    name: ClassVar[str] = "cosine"

    def why(self, value: float, neutral: float) -> str:
        return f" (twice its mean {value:g} minus {neutral:g})"

    def factor(self, step: StepInfo) -> float:
        return 1.0 - math.cos(math.pi * step.progress)

    def factor_range(self) -> tuple[float, float]:
        return 0.0, 2.0


def _number(owner: str, name: str, value: Any, low: float = -math.inf, low_open: bool = False) -> float:
    """A finite number >= ``low`` (> when ``low_open``), else the standard ValueError."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
        value < low or (low_open and value == low)
    if bad:
        left = "(" if low_open or math.isinf(low) else "["
        raise ValueError(f"schedule {owner!r}: parameter '{name}' must be a finite number in "
                         f"{left}{'-inf' if math.isinf(low) else f'{low:g}'}, inf), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ClampLinear(Schedule):
    """max(floor, linear): the linear schedule never below ``floor`` (in the parameter's units)."""

    name: ClassVar[str] = "clamp_linear"
    floor: float = 1.0
    _shape: ClassVar[type[Schedule]] = Linear

    def __post_init__(self) -> None:
        object.__setattr__(self, "floor", _number(self.name, "floor", self.floor))

    def value(self, value: float, neutral: float, step: StepInfo) -> float:
        return max(self.floor, self._shape().value(value, neutral, step))

    def bounds(self, value: float, neutral: float) -> tuple[float, float]:
        low, high = self._shape().bounds(value, neutral)
        return max(self.floor, low), max(self.floor, high)


@dataclass(frozen=True)
class ClampCosine(ClampLinear):
    """max(floor, cosine)."""

    name: ClassVar[str] = "clamp_cosine"
    _shape: ClassVar[type[Schedule]] = Cosine


@dataclass(frozen=True)
class PowerCosine(Schedule):
    """(1 - cos(pi p^power)) / 2 of the way from the neutral value to the value (MDT's PCS)."""

    name: ClassVar[str] = "power_cosine"
    power: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "power", _number(self.name, "power", self.power, low=0.0, low_open=True))

    def factor(self, step: StepInfo) -> float:
        return (1.0 - math.cos(math.pi * step.progress ** self.power)) / 2.0

    def factor_range(self) -> tuple[float, float]:
        return 0.0, 1.0


def beta_density(q: float, a: float, b: float) -> float:
    """The Beta(a, b) density at q in [0, 1] (a, b >= 1, so it is finite everywhere)."""
    if q <= 0.0 or q >= 1.0:
        edge_exponent = a - 1.0 if q <= 0.0 else b - 1.0
        if edge_exponent > 0:
            return 0.0
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    terms = 0.0
    if a != 1.0:
        terms += (a - 1.0) * math.log(q)
    if b != 1.0:
        terms += (b - 1.0) * math.log1p(-q)
    return math.exp(log_norm + terms)


@dataclass(frozen=True)
class Beta(Schedule):
    """The beta-CFG shape: the Beta(a, b) density at q = i / (n - 1) (a, b >= 1: finite at the ends)."""

    name: ClassVar[str] = "beta"
    a: float = 2.0
    b: float = 2.0
    normalize: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "a", _number(self.name, "a", self.a, low=1.0))
        object.__setattr__(self, "b", _number(self.name, "b", self.b, low=1.0))
        if not isinstance(self.normalize, bool):
            raise ValueError(f"schedule 'beta': parameter 'normalize' must be True or False, got {self.normalize!r}")

    def _peak(self) -> float:
        """The density's maximum: at its mode (a - 1) / (a + b - 2), or at an end when a or b is 1."""
        if self.a == 1.0 and self.b == 1.0:
            return 1.0
        mode = (self.a - 1.0) / (self.a + self.b - 2.0)
        return beta_density(mode, self.a, self.b)

    def factor(self, step: StepInfo) -> float:
        q = step.index / (step.num_steps - 1) if step.num_steps > 1 else 0.0
        density = beta_density(q, self.a, self.b)
        return density / self._peak() if self.normalize else density

    def factor_range(self) -> tuple[float, float]:
        # a, b >= 1 and not both 1: the density is 0 at the end whose exponent is positive
        low = 1.0 if self.a == 1.0 and self.b == 1.0 else 0.0
        return low, 1.0 if self.normalize else self._peak()


@dataclass(frozen=True)
class Explicit(Schedule):
    """One value per step for ``parameter`` (None: the method's main scale)."""

    name: ClassVar[str] = "explicit"
    targets_one: ClassVar[bool] = True
    values: tuple[float, ...] = ()
    parameter: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.values, (str, bytes)) or not isinstance(self.values, Sequence) or not self.values:
            raise ValueError(f"schedule 'explicit': parameter 'values' must be a non-empty list of numbers (one "
                             f"per step), got {self.values!r}")
        object.__setattr__(self, "values", tuple(_number(self.name, "values", v) for v in self.values))

    def value(self, value: float, neutral: float, step: StepInfo) -> float:
        return self.values[step.index]

    def bounds(self, value: float, neutral: float) -> tuple[float, float]:
        return min(self.values), max(self.values)

    def check_steps(self, num_steps: int, owner: str) -> None:
        if len(self.values) != num_steps:
            raise ValueError(f"{owner}: schedule 'explicit' has {len(self.values)} value(s), one per step, but the "
                             f"run has {num_steps} step(s)")


@dataclass(frozen=True)
class Phases(Schedule):
    """The value while t >= timesteps[0], then values[k] while t >= timesteps[k + 1] (or to the end)."""

    name: ClassVar[str] = "phases"
    targets_one: ClassVar[bool] = True
    timesteps: tuple[float, ...] = ()
    values: tuple[float, ...] = ()
    parameter: str | None = None

    def __post_init__(self) -> None:
        timesteps = tuple(_number(self.name, "timesteps", t) for t in self.timesteps)
        values = tuple(_number(self.name, "values", v) for v in self.values)
        if not timesteps or len(timesteps) != len(values) or list(timesteps) != sorted(timesteps, reverse=True):
            raise ValueError(f"schedule 'phases': parameters 'timesteps' (decreasing) and 'values' must be "
                             f"non-empty lists of the same length, got {self.timesteps!r} and {self.values!r}")
        object.__setattr__(self, "timesteps", timesteps)
        object.__setattr__(self, "values", values)

    def value(self, value: float, neutral: float, step: StepInfo) -> float:
        for boundary, later in zip(reversed(self.timesteps), reversed(self.values)):
            if step.timestep < boundary:
                return later
        return value

    def bounds(self, value: float, neutral: float) -> tuple[float, float]:
        return min(value, *self.values), max(value, *self.values)


@dataclass(frozen=True)
class Custom(Schedule):
    """A callable of the progress p = i / n giving the value (Python only: it has no string form)."""

    name: ClassVar[str] = "custom"
    targets_one: ClassVar[bool] = True
    function: Callable[[float], float] | None = None
    parameter: str | None = None

    def value(self, value: float, neutral: float, step: StepInfo) -> float:
        result = self.function(step.progress)
        return _number(self.name, "function(p)", result)

    def bounds(self, value: float, neutral: float) -> None:
        return None  # known only once the run's steps are

    def spec(self) -> str:
        raise ValueError("schedule: a callable schedule cannot be written down (a manifest, PNG metadata, the CLI); "
                         "pass schedule='explicit(values=[...])' with its per-step values instead")


_BY_NAME: dict[str, type[Schedule]] = {cls.name: cls for cls in (
    Constant, Linear, Cosine, ClampLinear, ClampCosine, PowerCosine, Beta, Explicit, Phases)}
#: every schedule a string can name
SCHEDULE_NAMES: tuple[str, ...] = tuple(_BY_NAME)
ACCEPTED = ("a schedule name (" + ", ".join(SCHEDULE_NAMES) + "), optionally with keyword arguments such as "
            "'beta(a=2, b=3)' or 'explicit(values=[7.5, 7, 6])', a Schedule object, a list of per-step values or "
            "a callable of the progress")


def _parse(text: str) -> Schedule:
    """``name`` or ``name(key=literal, ...)`` -> a Schedule (literals only: nothing is evaluated)."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        tree = None
    if isinstance(tree, ast.Name):
        name, kwargs = tree.id, {}
    elif isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and not tree.args:
        name = tree.func.id
        try:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords if kw.arg is not None}
        except ValueError:
            kwargs = None
        if kwargs is None or len(kwargs) != len(tree.keywords):
            raise ValueError(f"parameter 'schedule' must be {ACCEPTED} (arguments as literals), got {text!r}")
    else:
        raise ValueError(f"parameter 'schedule' must be {ACCEPTED}, got {text!r}")
    if name not in _BY_NAME:
        raise ValueError(f"parameter 'schedule' must be {ACCEPTED}, got {text!r}")
    cls = _BY_NAME[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"schedule {name!r}: no parameter(s) {', '.join(unknown)}; its parameters are "
                         f"{', '.join(sorted(fields)) or 'none'}")
    return cls(**kwargs)


_PARSED: dict[str, Schedule] = {}


def as_schedule(spec: Any) -> Schedule:
    """A Schedule from a string, a Schedule, a list of per-step values or a callable."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        if spec not in _PARSED:
            _PARSED[spec] = _parse(spec)
        return _PARSED[spec]
    if isinstance(spec, (list, tuple)):
        return Explicit(values=tuple(spec))
    if callable(spec):
        return Custom(function=spec)
    raise ValueError(f"parameter 'schedule' must be {ACCEPTED}, got {spec!r}")
