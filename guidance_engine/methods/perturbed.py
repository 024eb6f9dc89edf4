"""What the perturbation-guidance methods (PAG, SEG, SLG) share: the combination rule, the layer
spec and a base class. Each method is its own file; this one holds no registered method.

    g = u + s (c - u) + w (c - p)

u, c: unconditional and conditional predictions; p: the conditional prediction of the network
altered in some layers (identity attention, blurred queries, skipped blocks); s: the CFG scale
(s = 1: no unconditional branch), w: the perturbation scale (w = 0: CFG exactly, no extra rows).
The weights sum to one, so the rule is the same on eps, x0, v or flow outputs; it acts on the
raw output in the stock pipelines' operation order, so it reproduces them bit for bit.

Composition: ``base`` (a method: "apg", "cfgpp", "cfg_zero_star", "ag", ...) replaces the CFG
term ``u + s (c - u)``: the base method combines the conditional and unconditional predictions
(with its own state, solver split and, for AG, its per-sample switch) and ``w (c - p)`` is added
to the prediction it moves with. Its scale is set inside it (``base={"name": "apg", "scale": 7.5}``).

Windows: the base class interval (``sigma_min``..``sigma_max``, ``start``..``stop``) and
``schedule`` apply to the perturbation term; CFG at ``scale`` runs at every step, as in the stock
PAG and SD3 pipelines.

Rescale (``rescale`` phi in [0, 1], default 0 = off): Lin et al.'s std rescale of the guided
output g towards the conditional prediction c, after the perturbation term,

    g_r = g std(c) / std(g),   out = phi g_r + (1 - phi) g      (std per sample, :func:`.cfg.rescale`)

at every step where the output is guided (CFG alone outside the perturbation window included),
on the raw network output (eps, v or flow velocity) as diffusers' rescale. It is STG's
``do_rescaling`` (Hyung et al., arXiv 2411.18664; junhahyung/stguidance,
``diffusers/ltxvideo/pipeline_stg_ltx.py``, and diffusers' community ``pipeline_stg_ltx.py``:
``g = g (0.7 std(c) / std(g) + 0.3)`` after ``u + s (c - u) + w (c - p)``: their fixed
``rescaling_scale`` 0.7 is phi = 0.7) and, in the same place, diffusers' PAG pipelines'
``guidance_rescale`` (``rescale_noise_cfg`` on the PAG output; the pipelines' ``guidance_rescale``
argument sets ``rescale``). With ``base``, the rescale acts on the base method's moving
prediction plus ``w (c - p)`` (a split base renoises with its own, unrescaled, prediction).
Deviations: STG takes one std over the whole batch (every video of the call together), here per
video (the same for one video; STG's own runs are one video each); STG multiplies g by
``phi r + 1 - phi``, here ``phi (g r) + (1 - phi) g`` as diffusers (equal up to float rounding);
STG and diffusers rescale only with CFG on (s > 1), here also PAG / SEG / SLG / TPG alone (s = 1),
towards c alike; a sample whose guided output is constant is left as it is (:func:`.cfg.rescale`;
theirs divide by 0). SAG rescales its own combination (CFG plus its degraded-input term) the same way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from ..guidance import Branch, Guidance, GuidedPrediction, Perturbation, StepInfo, param
from ..prediction import Prediction
from ..registry import resolve_guidance
from .cfg import rescale as std_rescale

_LAYER_NAME = re.compile(r"^(mid|down|up|mid_block|down_blocks|up_blocks|transformer_blocks|single|double"
                         r"|single_transformer_blocks|refiner|layers|noise_refiner)(\.[A-Za-z0-9_]+)*$")
LAYERS_ACCEPTED = ("block names ('mid', 'down', 'up', 'down.<i>', 'up.<i>.attentions.<j>', a module path prefix) "
                   "or transformer block indices (7, 8, 9; 'single.<i>' for the single-stream blocks of Flux.1, "
                   "Chroma and Flux.2, 'refiner.<i>' for Z-Image's image refiner), as a list or a comma-separated "
                   "string; None: the model family's default")


def perturbed_guidance(cond: torch.Tensor, uncond: torch.Tensor | None, perturbed: torch.Tensor | None,
                       scale: float, perturb_scale: float) -> torch.Tensor:
    """``u + s (c - u) + w (c - p)`` on raw outputs (terms dropped when their branch is None),
    in the order of diffusers' PAG pipelines and the stock SD3 skip-layer guidance."""
    guided = cond if uncond is None else uncond + scale * (cond - uncond)
    if perturbed is not None:
        guided = guided + perturb_scale * (cond - perturbed)
    return guided


def diffusers_guider_window(start: float, stop: float, num_steps: int) -> tuple[float, float]:
    """Our (start, stop) for diffusers' guiders' perturbation window ``int(start n) < i < int(stop n)``
    (PerturbedAttentionGuidance, SmoothedEnergyGuidance, SkipLayerGuidance) at ``num_steps`` steps;
    ours is ``start <= i / n < stop``."""
    return (int(start * num_steps) + 1) / num_steps, int(stop * num_steps) / num_steps


def sd3_pipeline_window(start: float, stop: float, num_steps: int) -> tuple[float, float]:
    """Our (start, stop) for the stock SD3 pipeline's ``n start < i < n stop`` (its
    ``skip_layer_guidance_start/stop``) at ``num_steps`` steps."""
    return (math.floor(num_steps * start) + 1) / num_steps, math.ceil(num_steps * stop) / num_steps


def normalize_layers(value: Any, owner: str) -> tuple[str | int, ...] | None:
    """``layers`` as a tuple of block names and indices: a list, an int, or a string such as
    "mid", "7,8,9" or "down.1, up.0"; ValueError naming what is accepted otherwise."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    layers: list[str | int] = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
            if item.isdigit():
                item = int(item)
        ok = (isinstance(item, int) and not isinstance(item, bool) and item >= 0) or \
            (isinstance(item, str) and _LAYER_NAME.match(item) is not None)
        if not ok:
            raise ValueError(f"{owner}: parameter 'layers' must be {LAYERS_ACCEPTED}, got {value!r}")
        layers.append(item)
    if not layers:
        raise ValueError(f"{owner}: parameter 'layers' must be {LAYERS_ACCEPTED}, got {value!r}")
    return tuple(layers)


def layers_param(doc: str) -> Any:
    """The ``layers`` field: validated by :func:`normalize_layers` (not a numeric ``param``)."""
    return field(default=None, metadata={"doc": doc, "accepted": LAYERS_ACCEPTED})


@dataclass(frozen=True, kw_only=True)
class PerturbedGuidance(Guidance):
    """Base of PAG, SEG and SLG: CFG at ``scale`` plus ``w (c - p)`` from a perturbed branch."""

    #: the name of the perturbed branch (and of the method)
    branch_name: ClassVar[str] = ""
    #: the field holding the perturbation scale w
    perturb_field: ClassVar[str] = ""
    #: the interval bounds the perturbation term; CFG runs at every step (as diffusers' PAG)
    off_outside_interval: ClassVar[Mapping[str, Any]] = {"scale": 1.0}

    scale: float = param(1.0, low=0.0, high=100.0, doc="CFG scale s (1 = no unconditional branch)")
    layers: Any = layers_param("where to perturb; None = the family default (UNet 'mid', SD3 7,8,9)")
    sigma_min: float = param(0.0, low=0.0, doc="perturbation term only where sigma >= sigma_min (CFG always)")
    sigma_max: float = param(math.inf, low=0.0, doc="perturbation term only where sigma <= sigma_max (CFG always)")
    start: float = param(0.0, low=0.0, high=1.0, doc="perturbation term from this fraction of the steps")
    stop: float = param(1.0, low=0.0, high=1.0, doc="perturbation term before this fraction of the steps")
    base: Any = field(default=None, metadata={
        "doc": "a method combining cond and uncond instead of CFG at `scale` (apg, cfgpp, cfg_zero_star, ag, ...)"})
    rescale: float = param(0.0, low=0.0, high=1.0,
                           doc="std rescale phi of the guided output towards the conditional prediction, after the "
                               "perturbation term (STG's do_rescaling: 0.7; diffusers' PAG guidance_rescale); 0 = off")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", normalize_layers(self.layers, self.name))
        if self.base is None:
            return
        base = self.base if isinstance(self.base, Guidance) else resolve_guidance(self.base)
        if isinstance(base, PerturbedGuidance) or int(getattr(base, "particles", 1) or 1) > 1 \
                or not base.required_branches() <= {"cond", "uncond"}:
            raise ValueError(f"{self.name}: parameter 'base' must be a method that combines the conditional and "
                             f"unconditional predictions (cfg, apg, cfgpp, cfg_zero_star, tcfg, ag, ...), got "
                             f"{base.name!r}")
        if self.scale != type(self).__dataclass_fields__["scale"].default:
            raise ValueError(f"{self.name}: with 'base', set the scale inside it (base={{'name': {base.name!r}, "
                             f"'scale': ...}}), got scale={self.scale!r}")
        object.__setattr__(self, "base", base)

    @property
    def renoise_split(self) -> bool:  # type: ignore[override]
        return self.base is not None and self.base.renoise_split

    def to_dict(self) -> dict[str, Any]:
        config = super().to_dict()
        if self.base is not None:
            config["base"] = self.base.to_dict()
        return config

    def init_state(self, batch_size: int, device: torch.device) -> Any:
        return None if self.base is None else self.base.init_state(batch_size, device)

    def select_state(self, state: Any, index: torch.Tensor) -> Any:
        return state if self.base is None else self.base.select_state(state, index)

    def update_state_rows(self, state: Any, rows: torch.Tensor, sub: Any, batch_size: int) -> Any:
        return sub if self.base is None else self.base.update_state_rows(state, rows, sub, batch_size)

    @property
    def perturb_scale(self) -> float:
        return getattr(self, self.perturb_field)

    def perturbation(self) -> Perturbation:
        raise NotImplementedError

    def branch(self) -> Branch:
        return Branch(self.branch_name, base="cond", perturb=self.perturbation())

    def perturb_scale_at(self, step: StepInfo) -> float:
        """w at this step: shaped by ``schedule`` inside the interval, 0 outside."""
        return self.shaped(self.perturb_field, step, neutral=0.0)

    def schedule_targets(self) -> tuple[tuple[str, float], ...]:
        """The schedule shapes the perturbation term's w (from 0); CFG's scale stays constant."""
        return ((self.perturb_field, 0.0),)

    def required_branches(self) -> set[str]:
        if self.base is not None:
            return self.base.required_branches()
        return {"cond"} if self.scale == 1 else {"cond", "uncond"}

    def altered_branches(self) -> tuple[Branch, ...]:
        return (self.branch(),) if self.perturb_scale != 0 else ()

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...] | dict[str, torch.Tensor | None]:
        if self.base is not None:
            wanted = self.base.branches(step, state)
            if self.perturb_scale_at(step) == 0:
                return wanted
            if isinstance(wanted, Mapping):  # AG's shrinking batch: the perturbed rows for every sample
                return {**wanted, self.branch(): None}
            return (*wanted, self.branch())
        names: list[str] = ["uncond", "cond"] if self.scale != 1 else ["cond"]
        if self.perturb_scale_at(step) != 0:
            names.append(self.branch())  # the stock order: uncond, cond, perturbed
        return tuple(names)

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        guided = self.combine_terms(preds, step, state)
        if self.rescale == 0 or guided.denoise is preds["cond"]:  # off, or nothing guided at this step
            return guided
        denoise = guided.denoise.with_output(std_rescale(guided.denoise.output, preds["cond"].output, self.rescale))
        return GuidedPrediction(denoise, guided.renoise if guided.split else denoise)

    def combine_terms(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        """``u + s (c - u) + w (c - p)``, or the base method's prediction plus ``w (c - p)``
        (before the rescale)."""
        cond = preds["cond"]
        if self.base is not None:
            perturbed = preds.get(self.branch_name)
            guided = self.base.combine({k: v for k, v in preds.items() if k != self.branch_name}, step, state)
            if perturbed is None:
                return guided
            w = self.perturb_scale_at(step)
            denoise = guided.denoise.with_output(guided.denoise.output + w * (cond.output - perturbed.output))
            return GuidedPrediction(denoise, guided.renoise if guided.split else denoise)
        uncond, perturbed = preds.get("uncond"), preds.get(self.branch_name)
        out = perturbed_guidance(cond.output, None if uncond is None else uncond.output,
                                 None if perturbed is None else perturbed.output, self.scale,
                                 self.perturb_scale_at(step))
        if uncond is None and perturbed is None:
            return GuidedPrediction.single(cond)
        return GuidedPrediction.single(cond.with_output(out))
