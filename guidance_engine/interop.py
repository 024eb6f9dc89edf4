"""diffusers' guider objects (``diffusers.guiders``, 0.42.1) as engine methods.

    from_diffusers_guider(ClassifierFreeGuidance(guidance_scale=5.0)) == CFG(scale=5.0)

Every guider class is mapped attribute by attribute to the engine method computing the same
rule; a setting without an exact counterpart is refused with a ValueError naming the guider, the
attribute and its value. The engine's methods as guiders for diffusers' modular pipelines are
the other direction: :mod:`guidance_engine.pipelines.modular`. docs/interop.md has the tables.

Conventions (read in the guiders' source; each checked in tests/test_interop.py by running the
guider's own ``forward`` on the same tensors):

* Scales. diffusers' default ("diffusers-native") formulation ``u + s (c - u)`` is ours at
  ``s``; ``use_original_formulation=True``, ``c + s (c - u)``, is ours at ``s + 1`` (the same
  rule; the float32 sums are rounded in another order, so equal within rounding, not bit for
  bit). Where a guider switches a term off because its scale ``math.isclose``-es the neutral
  value (1 native, 0 original; 0 for perturbation scales), ours gets the neutral value exactly.
* Space. Every guider combines the raw network output (eps, v or flow velocity): ours with
  ``space="model"`` where a method has that option (APG, APG-Mix, MAMBO-G). CFG-Zero* is the
  exception: ours works on the flow velocity, which is the raw output of flow-matching models
  only; on eps / v models diffusers' guider applies alpha* and the zero-init to the raw output.
* Windows. The guidance switches on for ``int(start n) <= i < int(stop n)``, the perturbation
  terms of PAG / SEG / SLG for ``int(start n) < i < int(stop n)`` (strict), at step i of n; ours
  is ``start <= i / n < stop``. The two agree for every n only for the whole run (0, 1)
  unstrict; any other window is converted exactly at each run's step count by
  :class:`DiffusersWindow` (``int(a n) / n`` etc., see :meth:`DiffusersWindow.resolved`).
* Layers. A ``LayerSkipConfig`` / ``SmoothedEnergyGuidanceConfig`` with ``fqn`` naming a block
  stack and ``indices`` maps to our layer names: ``transformer_blocks`` / ``layers`` / "auto" ->
  block indices (our main stack), ``single_transformer_blocks`` -> "single.<i>",
  ``noise_refiner`` -> "refiner.<i>", a UNet path ``<prefix>.transformer_blocks`` ->
  "<prefix>.transformer_blocks.<i>". Whole-block skips (``skip_attention`` and ``skip_ff``) are our
  "skip", ``skip_attention_scores`` our "identity" (PAG); diffusers' "auto" picks the first
  identifier of a *set* that the model has, so on a model with two stacks (Flux.1, Chroma) its
  choice changes with PYTHONHASHSEED: ours takes the main (double-stream) stack.

Deviations found in diffusers 0.42.1 (docs/interop.md): SmoothedEnergyGuidance never applies its
blur (its ``prepare_models`` does not count the prepared batches, so its hook condition is never
true: in a modular pipeline it is CFG plus an unused forward), and its blur threshold is the
hook's default 9999.9 whatever ``seg_blur_threshold_inf`` says; SkipLayerGuidance and
AutoGuidance built from ``*_layers=[...]`` give LayerSkipConfig an int ``indices`` and raise a
TypeError at their first hooked forward; MagnitudeAwareGuidance raises on 4-D (UNet) latents;
TangentialClassifierFreeGuidance's ``is_conditional`` reads an attribute that does not exist.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn

import torch

from .guidance import Guidance, GuidedPrediction, StepInfo, describe_range, param
from .methods import APG, CFG, FDG, MAMBOG, PAG, SEG, SLG, APGMix, AutoGuidance, CFGZeroStar, TCFG
from .prediction import Prediction

__all__ = ["DiffusersWindow", "from_diffusers_guider", "is_diffusers_guider"]

#: the blur threshold diffusers' SEG hook uses (its guider's ``seg_blur_threshold_inf`` is not passed on)
SEG_HOOK_THRESHOLD = 9999.9


def is_diffusers_guider(spec: Any) -> bool:
    """Whether ``spec`` is a diffusers guider object, decided without importing diffusers."""
    return any(klass.__module__.startswith("diffusers.guiders.") and klass.__name__ == "BaseGuidance"
               for klass in type(spec).__mro__)


@dataclass(frozen=True)
class _Mapped:
    """A guider's engine method, with the guider's step window for the method's interval
    (``strict``: the perturbation terms' ``int(a n) < i``)."""

    method: Guidance
    window: tuple[float, float] = (0.0, 1.0)
    strict: bool = False


def from_diffusers_guider(guider: Any, *, prediction_type: str | None = None) -> Guidance:
    """The engine method that computes what ``guider`` computes.

    Args:
        guider: an instance of one of diffusers' guider classes (exactly that class: a subclass
            may override its rule and is refused).
        prediction_type: the model's prediction ("epsilon", "v_prediction", "flow", "sample")
            when known; the mappings that hold for flow-matching models only (CFG-Zero*) are
            refused for any other. None: not checked.

    Returns the method itself, or a :class:`DiffusersWindow` around it when the guider's window
    depends on the step count. ValueError naming the guider, the attribute and its value for any
    setting without an exact mapping.
    """
    if not is_diffusers_guider(guider):
        raise ValueError(f"guidance: expected a diffusers guider, got {type(guider).__name__}")
    import diffusers.guiders as guiders

    name = type(guider).__name__
    if name not in _MAPPERS or type(guider) is not getattr(guiders, name, None):
        raise ValueError(f"{name}: no engine mapping for this guider class (mapped: {', '.join(sorted(_MAPPERS))})")
    if not guider._enabled:  # disabled: every step is the conditional prediction alone
        return CFG(scale=1.0)
    mapped = _MAPPERS[name](guider, prediction_type)
    if mapped.window == (0.0, 1.0) and not mapped.strict:
        return mapped.method
    return DiffusersWindow(inner=mapped.method, window_start=mapped.window[0], window_stop=mapped.window[1],
                           strict_start=mapped.strict)


# -- the window wrapper --------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class DiffusersWindow(Guidance):
    """``inner`` with its interval set, at every run, to a diffusers guider's step window:
    ``int(a n) <= i < int(b n)``, or ``int(a n) < i < int(b n)`` with ``strict_start``. Not a
    registered method: :func:`from_diffusers_guider` builds it; everything else is ``inner``'s."""

    name: ClassVar[str] = "diffusers_window"
    paper: ClassVar[str] = "diffusers' guiders (their start / stop step windows)"

    inner: Any = field(default=None, metadata={"doc": "the method whose interval the window sets"})
    window_start: float = param(0.0, low=0.0, high=1.0, doc="diffusers' start fraction a")
    window_stop: float = param(1.0, low=0.0, high=1.0, doc="diffusers' stop fraction b")
    strict_start: bool = param(False, choices=(False, True), doc="step int(a n) itself excluded (PAG / SEG / SLG)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.inner, Guidance) or isinstance(self.inner, DiffusersWindow) or \
                type(self.inner).after_step is not Guidance.after_step:  # no guider maps to one that resamples
            raise ValueError(f"{self.name}: parameter 'inner' must be an engine method that does not act after the "
                             f"solver step, got {self.inner!r}")
        if self.window_start > self.window_stop:
            raise ValueError(f"{self.name}: window_start ({self.window_start}) must not exceed window_stop "
                             f"({self.window_stop})")
        object.__setattr__(self, "scale", self.inner.scale)  # what a pipeline reports as its guidance scale

    def __getattr__(self, name: str) -> Any:
        """Anything the wrapper does not define is ``inner``'s (``rescale``, ``branch_prompts``, ...,
        as the pipelines read them)."""
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def resolved(self, num_steps: int) -> Guidance:
        """``inner`` with the window as our ``start <= i / n < stop`` at ``num_steps`` steps: the
        first and past-the-last step of the window over n (an empty window: start = stop)."""
        first = int(self.window_start * num_steps) + (1 if self.strict_start else 0)
        end = int(self.window_stop * num_steps)
        return self.inner.new(start=min(first, end) / num_steps, stop=end / num_steps)

    # -- delegated to the method resolved for the run's step count (or to inner: state, checks)
    @property
    def renoise_split(self) -> bool:  # type: ignore[override]
        return self.inner.renoise_split

    @property
    def requires_stochastic_sampler(self) -> bool:  # type: ignore[override]
        return self.inner.requires_stochastic_sampler

    @property
    def requires_noise_start(self) -> bool:
        return self.inner.requires_noise_start

    def check_steps(self, num_steps: int) -> None:
        self.resolved(num_steps).check_steps(num_steps)

    def to_dict(self) -> dict[str, Any]:
        config = super().to_dict()
        config["inner"] = self.inner.to_dict()
        return config

    def required_branches(self) -> set[str]:
        return self.inner.required_branches()

    def altered_branches(self) -> tuple:
        return self.inner.altered_branches()

    def init_state(self, batch_size: int, device: torch.device) -> Any:
        return self.inner.init_state(batch_size, device)

    def group_size(self) -> int:
        return self.inner.group_size()

    def output_rows(self, state: Any) -> torch.Tensor | None:
        return self.inner.output_rows(state)

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...] | dict[str, torch.Tensor | None]:
        return self.resolved(step.num_steps).branches(step, state)

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        return self.resolved(step.num_steps).combine(preds, step, state)

    def select_state(self, state: Any, index: torch.Tensor) -> Any:
        return self.inner.select_state(state, index)

    def update_state_rows(self, state: Any, rows: torch.Tensor, sub: Any, batch_size: int) -> Any:
        return self.inner.update_state_rows(state, rows, sub, batch_size)

    def with_negative_prompt(self) -> Guidance:
        return dataclasses.replace(self, inner=self.inner.with_negative_prompt())


# -- shared rules ---------------------------------------------------------------------------------

def _refuse(guider: Any, attribute: str, value: Any, why: str) -> NoReturn:
    raise ValueError(f"{type(guider).__name__}: {attribute}={value!r} has no exact mapping to the engine: {why}")


def _fit(guider: Any, attribute: str, value: Any, method: type[Guidance], parameter: str, mapped: Any) -> Any:
    """``mapped`` (what ``attribute`` = ``value`` becomes as ``method``'s ``parameter``) if it lies
    in that parameter's accepted range; ValueError naming the guider attribute otherwise."""
    meta = method.__dataclass_fields__[parameter].metadata
    low, high = meta.get("low"), meta.get("high")
    outside = (low is not None and (mapped < low or (meta.get("low_open") and mapped == low))) or \
        (high is not None and mapped > high)
    if outside:
        _refuse(guider, attribute, value, f"it maps to {method.name}'s '{parameter}' = {mapped!r}, which must be "
                                          f"{describe_range(meta)}")
    return mapped


def _scale(guider: Any, attribute: str, value: float, method: type[Guidance], parameter: str = "scale",
           original: bool = False) -> float:
    """Our CFG-convention scale for a guider scale: s (native) or s + 1 (original formulation);
    exactly 1 where diffusers' ``isclose`` switches the term off."""
    if math.isclose(value, 0.0 if original else 1.0):
        return 1.0
    return _fit(guider, attribute, value, method, parameter, value + 1.0 if original else value)


def _no_rescale(guider: Any, value: float, method: type[Guidance]) -> None:
    if value > 0.0:
        _refuse(guider, "guidance_rescale", value, f"{method.name} has no guidance rescale (only cfg has)")


def _window(guider: Any) -> tuple[float, float]:
    """The guider's (start, stop): the attributes its enabled-tests read (FDG: its levels' extremes)."""
    return float(guider._start), float(guider._stop)


def _original(guider: Any) -> bool:
    return bool(guider.use_original_formulation)


# -- classifier-free guidance and its variants ------------------------------------------------

def _cfg(guider: Any, prediction_type: str | None) -> _Mapped:
    original = _original(guider)
    scale = _scale(guider, "guidance_scale", guider.guidance_scale, CFG, original=original)
    rescale = _fit(guider, "guidance_rescale", guider.guidance_rescale, CFG, "rescale", guider.guidance_rescale)
    return _Mapped(CFG(scale=scale, rescale=rescale), _window(guider))


def _cfg_zero_star(guider: Any, prediction_type: str | None) -> _Mapped:
    if prediction_type not in (None, "flow"):
        _refuse(guider, "prediction_type", prediction_type, "the guider applies alpha* and the zero-init to the raw "
                "output, ours to the flow velocity: the same only on flow-matching models")
    _no_rescale(guider, guider.guidance_rescale, CFGZeroStar)
    scale = _scale(guider, "guidance_scale", guider.guidance_scale, CFGZeroStar, original=_original(guider))
    steps = _fit(guider, "zero_init_steps", guider.zero_init_steps, CFGZeroStar, "zero_steps",
                 max(int(guider.zero_init_steps), 0))
    return _Mapped(CFGZeroStar(scale=scale, zero_steps=steps), _window(guider))


def _tcfg(guider: Any, prediction_type: str | None) -> _Mapped:
    _no_rescale(guider, guider.guidance_rescale, TCFG)
    return _Mapped(TCFG(scale=_scale(guider, "guidance_scale", guider.guidance_scale, TCFG,
                                     original=_original(guider))), _window(guider))


def _mambo_g(guider: Any, prediction_type: str | None) -> _Mapped:
    _no_rescale(guider, guider.guidance_rescale, MAMBOG)
    scale = _scale(guider, "guidance_scale", guider.guidance_scale, MAMBOG, original=_original(guider))
    alpha = _fit(guider, "alpha", guider.alpha, MAMBOG, "alpha", float(guider.alpha))
    return _Mapped(MAMBOG(scale=scale, alpha=alpha, space="model"), _window(guider))


def _ltx2(guider: Any, prediction_type: str | None) -> _Mapped:
    """CFG in the delta form c + (s - 1)(c - u); its STG and modality-isolation passes are set
    through LTX-2's transformer, which the engine does not run."""
    for attribute, neutral in (("stg_scale", 0.0), ("modality_scale", 1.0)):
        value = getattr(guider, attribute)
        if not math.isclose(value, neutral):
            _refuse(guider, attribute, value, "LTX-2's STG / modality-isolation passes are arguments of "
                    "LTX2VideoTransformer3DModel's forward, a model family the engine does not run")
    scale = _scale(guider, "guidance_scale", guider.guidance_scale, CFG)
    rescale = _fit(guider, "guidance_rescale", guider.guidance_rescale, CFG, "rescale", guider.guidance_rescale)
    return _Mapped(CFG(scale=scale, rescale=rescale), _window(guider))


# -- APG and the APG / CFG mix --------------------------------------------------------------------

def _apg_options(guider: Any, method: type[Guidance], momentum: float | None, threshold: float) -> dict[str, Any]:
    """eta, r (diffusers' 0 or less: off, our inf) and beta (None: off, our 0) as ours."""
    eta = _fit(guider, "eta", guider.eta, method, "eta", float(guider.eta))
    beta = 0.0 if momentum is None else _fit(guider, "adaptive_projected_guidance_momentum", momentum, method,
                                             "momentum", float(momentum))
    r = math.inf if threshold <= 0 else float(threshold)
    return {"eta": eta, "momentum": beta, "norm_threshold": r, "space": "model"}


def _native_apg_is_cfg(guider: Any, momentum: float | None, threshold: float) -> None:
    """diffusers' native APG step is D_u + w U: the paper's D_c + (w - 1) U (ours) only when U is
    D_c - D_u itself (eta 1, no clipping, no momentum)."""
    if not (math.isclose(guider.eta, 1.0) and threshold <= 0 and momentum is None):
        _refuse(guider, "use_original_formulation", False, "its APG step D_u + w U is not the APG paper's "
                "D_c + (w - 1) U unless eta = 1 with no norm threshold and no momentum; use "
                "use_original_formulation=True (ours: the scale + 1)")


def _apg(guider: Any, prediction_type: str | None) -> _Mapped:
    _no_rescale(guider, guider.guidance_rescale, APG)
    if guider.adaptive_projected_guidance_norm_dim is not None:
        _refuse(guider, "adaptive_projected_guidance_norm_dim", guider.adaptive_projected_guidance_norm_dim,
                "ours takes norms and projections over every non-batch dimension")
    momentum, threshold = guider.adaptive_projected_guidance_momentum, guider.adaptive_projected_guidance_rescale
    original = _original(guider)
    if not original:
        _native_apg_is_cfg(guider, momentum, threshold)
    scale = _scale(guider, "guidance_scale", guider.guidance_scale, APG, original=original)
    return _Mapped(APG(scale=scale, **_apg_options(guider, APG, momentum, threshold)), _window(guider))


def _apg_mix(guider: Any, prediction_type: str | None) -> _Mapped:
    _no_rescale(guider, guider.guidance_rescale, APGMix)
    original = _original(guider)
    cfg_scale = _scale(guider, "guidance_scale", guider.guidance_scale, APGMix, original=original)
    if cfg_scale == 1.0:  # its APG phase needs the CFG phase on: nothing is guided
        return _Mapped(CFG(scale=1.0))
    apg_scale = _scale(guider, "adaptive_projected_guidance_scale", guider.adaptive_projected_guidance_scale,
                       APGMix, "apg_scale", original)
    if apg_scale == 1.0:  # a neutral APG scale leaves its CFG phase on at every step
        return _Mapped(CFG(scale=cfg_scale), _window(guider))
    momentum, threshold = guider.adaptive_projected_guidance_momentum, guider.adaptive_projected_guidance_rescale
    if not original:
        _native_apg_is_cfg(guider, momentum, threshold)
    start_step = guider.adaptive_projected_guidance_start_step  # APG where step > start_step
    cfg_steps = _fit(guider, "adaptive_projected_guidance_start_step", start_step, APGMix, "cfg_steps",
                     max(int(start_step) + 1, 0))
    method = APGMix(scale=cfg_scale, apg_scale=apg_scale, cfg_steps=cfg_steps,
                    **_apg_options(guider, APGMix, momentum, threshold))
    return _Mapped(method, _window(guider))


# -- frequency-decoupled guidance -------------------------------------------------------------------

def _all_equal(guider: Any, attribute: str, value: Any, values: list[float], why: str) -> float:
    """The one value of ``values`` (part of ``attribute`` = ``value``); refused if they differ."""
    if any(not math.isclose(v, values[0]) for v in values):
        _refuse(guider, attribute, value, why)
    return float(values[0])


def _fdg(guider: Any, prediction_type: str | None) -> _Mapped:
    scales = [float(s) for s in guider.guidance_scales]
    if len(scales) < 2:
        _refuse(guider, "guidance_scales", scales, "ours needs at least 2 pyramid levels (1 level is CFG: use "
                "ClassifierFreeGuidance)")
    if any(r > 0 for r in guider.guidance_rescale):
        _refuse(guider, "guidance_rescale", guider.guidance_rescale, "fdg has no guidance rescale")
    high = _all_equal(guider, "guidance_scales", scales, scales[:-1], "ours has one scale for every band-pass level")
    weights = [float(w) for w in guider.parallel_weights]
    p = _all_equal(guider, "parallel_weights", weights, weights,
                   "ours has one parallel weight for every level")
    p = 1.0 if math.isclose(p, 1.0) else _fit(guider, "parallel_weights", guider.parallel_weights, FDG,
                                              "parallel_weight", p)
    one_interval = "ours has one interval for every level"
    start = _all_equal(guider, "start", guider.guidance_start, list(guider.guidance_start), one_interval)
    stop = _all_equal(guider, "stop", guider.guidance_stop, list(guider.guidance_stop), one_interval)
    original = _original(guider)
    if original and p != 1.0:
        _refuse(guider, "use_original_formulation", True, "c + s d' equals ours at s + 1 only for the unprojected "
                "d' = c - u (parallel_weights 1)")
    method = FDG(scale=_scale(guider, "guidance_scales", high, FDG, original=original),
                 scale_low=_scale(guider, "guidance_scales", scales[-1], FDG, "scale_low", original),
                 levels=_fit(guider, "guidance_scales", scales, FDG, "levels", len(scales)), parallel_weight=p)
    return _Mapped(method, (start, stop))


# -- perturbation guiders (PAG, SEG, SLG) and autoguidance -----------------------------------------------

def _indices(config: Any) -> list[int]:
    return [config.indices] if isinstance(config.indices, int) else [int(i) for i in config.indices]


def _layer_names(guider: Any, attribute: str, configs: list[Any]) -> tuple[str | int, ...]:
    """Our layer names for a guider's block-stack configs (fqn and indices)."""
    names: list[str | int] = []
    for config in configs:
        fqn = config.fqn
        for i in _indices(config):
            if fqn in ("auto", "transformer_blocks", "layers"):
                names.append(i)
            elif fqn == "single_transformer_blocks":
                names.append(f"single.{i}")
            elif fqn == "noise_refiner":
                names.append(f"refiner.{i}")
            elif fqn.endswith(".transformer_blocks"):  # a UNet's attention block, e.g. mid_block.attentions.0
                names.append(f"{fqn}.{i}")
            else:
                _refuse(guider, attribute, configs, f"fqn {fqn!r} names no block stack the engine's layer names reach")
    return tuple(names)


def _skip_kind(guider: Any, attribute: str, configs: list[Any]) -> str:
    """Our perturbation kind for LayerSkipConfigs: whole blocks ("skip") or identity attention."""
    kinds = set()
    for config in configs:
        if not math.isclose(config.dropout, 1.0):
            _refuse(guider, attribute, configs, f"dropout {config.dropout} < 1 drops the skipped outputs at random "
                    "(F.dropout in train mode); ours skips them")
        if config.skip_attention_scores and not config.skip_attention and not config.skip_ff:
            kinds.add("identity")
        elif config.skip_attention and config.skip_ff and not config.skip_attention_scores:
            kinds.add("skip")
        else:
            _refuse(guider, attribute, configs, "ours skips whole blocks (skip_attention and skip_ff) or replaces "
                    "self-attention by the identity (skip_attention_scores alone), nothing else")
    if len(kinds) != 1:
        _refuse(guider, attribute, configs, "ours applies one kind of perturbation to all its layers")
    return kinds.pop()


def _perturbed(guider: Any, method: type[Guidance], scale_name: str, w: float, window: tuple[float, float],
               layers: tuple[str | int, ...], **options: Any) -> _Mapped:
    """u + s (c - u) + w (c - p) with CFG at every step. With CFG off diffusers' native rule is
    p + w (c - p), i.e. our perturbation scale w - 1."""
    if _window(guider) != (0.0, 1.0):
        _refuse(guider, "start, stop", _window(guider), "ours runs the CFG term of a perturbation method at every "
                "step (its interval bounds the perturbation term)")
    _no_rescale(guider, guider.guidance_rescale, method)
    original = _original(guider)
    scale = _scale(guider, "guidance_scale", guider.guidance_scale, method, original=original)
    if math.isclose(w, 0.0):  # the perturbation term is off: CFG
        return _Mapped(CFG(scale=scale))
    term = w if scale != 1.0 or original else w - 1.0
    term = _fit(guider, scale_name, w, method, method.perturb_field, term)
    method_object = method(scale=scale, layers=layers, start=0.0, stop=1.0, **{method.perturb_field: term}, **options)
    return _Mapped(method_object, window, strict=True)


def _pag(guider: Any, prediction_type: str | None) -> _Mapped:
    configs = list(guider.skip_layer_config)
    _skip_kind(guider, "perturbed_guidance_config", configs)  # forced to identity attention by the guider
    return _perturbed(guider, PAG, "perturbed_guidance_scale", guider.skip_layer_guidance_scale,
                      (guider.skip_layer_guidance_start, guider.skip_layer_guidance_stop),
                      _layer_names(guider, "perturbed_guidance_config", configs))


def _slg(guider: Any, prediction_type: str | None) -> _Mapped:
    configs = list(guider.skip_layer_config)
    method = PAG if _skip_kind(guider, "skip_layer_config", configs) == "identity" else SLG
    return _perturbed(guider, method, "skip_layer_guidance_scale", guider.skip_layer_guidance_scale,
                      (guider.skip_layer_guidance_start, guider.skip_layer_guidance_stop),
                      _layer_names(guider, "skip_layer_config", configs))


def _seg(guider: Any, prediction_type: str | None) -> _Mapped:
    configs = list(guider.seg_guidance_config)
    for config in configs:
        if config._query_proj_identifiers not in (None, ["to_q"]):
            _refuse(guider, "seg_guidance_config", configs, "ours blurs the query projection to_q only")
    sigma = float(guider.seg_blur_sigma)  # the hook's threshold decides, not seg_blur_threshold_inf
    blur = sigma if sigma > SEG_HOOK_THRESHOLD else math.inf
    return _perturbed(guider, SEG, "seg_guidance_scale", guider.seg_guidance_scale,
                      (guider.seg_guidance_start, guider.seg_guidance_stop),
                      _layer_names(guider, "seg_guidance_config", configs), blur_sigma=blur)


def _autoguidance(guider: Any, prediction_type: str | None) -> _Mapped:
    """CFG against the unconditional branch with blocks skipped: our autoguidance with
    reference="skip", reference_input="uncond"."""
    _no_rescale(guider, guider.guidance_rescale, AutoGuidance)
    configs = list(guider.auto_guidance_config)
    if _skip_kind(guider, "auto_guidance_config", configs) != "skip":
        _refuse(guider, "auto_guidance_config", configs, "ours skips whole blocks for its reference")
    scale = _scale(guider, "guidance_scale", guider.guidance_scale, AutoGuidance, original=_original(guider))
    method = AutoGuidance(scale=scale, reference="skip", reference_input="uncond",
                          layers=_layer_names(guider, "auto_guidance_config", configs))
    return _Mapped(method, _window(guider))


_MAPPERS: dict[str, Callable[[Any, str | None], _Mapped]] = {
    "ClassifierFreeGuidance": _cfg,
    "ClassifierFreeZeroStarGuidance": _cfg_zero_star,
    "TangentialClassifierFreeGuidance": _tcfg,
    "MagnitudeAwareGuidance": _mambo_g,
    "LTX2Guidance": _ltx2,
    "AdaptiveProjectedGuidance": _apg,
    "AdaptiveProjectedMixGuidance": _apg_mix,
    "FrequencyDecoupledGuidance": _fdg,
    "PerturbedAttentionGuidance": _pag,
    "SkipLayerGuidance": _slg,
    "SmoothedEnergyGuidance": _seg,
    "AutoGuidance": _autoguidance,
}
