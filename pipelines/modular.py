"""The engine's methods as diffusers guiders, for diffusers' modular pipelines.

    pipe = StableDiffusionXLAutoBlocks().init_pipeline()      # diffusers' modular SDXL
    pipe.update_components(**components, guider=EngineGuider("ag", scheduler=components["scheduler"]))

The guider contract (diffusers 0.42.1, ``guiders/guider_utils.py``, read): per step the
denoising loop calls ``set_state(step, num_inference_steps, timestep)``, then
``prepare_inputs(data)``, which splits each ``(conditional, unconditional)`` tuple of model
inputs into one batch per branch (the batches carry an identifier, "pred_cond" /
"pred_uncond"); for each batch ``prepare_models(denoiser)``, one network forward on all rows,
``cleanup_models(denoiser)``; finally the guider is called on the batches, which now hold
``noise_pred``, and returns the guided raw output. Before the first step the encoders read
``num_conditions > 1`` to decide whether to encode the negative prompt.

What an engine method needs beyond that contract, and how :class:`EngineGuider` gets it:

* x and the noise level, to read the raw outputs as :class:`~guidance_engine.prediction.Prediction`
  (x0, eps): the network's input is recorded by a forward pre-hook that ``prepare_models``
  installs and ``cleanup_models`` removes (it reads, never alters); (alpha, sigma) and the step's
  sigma come from the scheduler it is given, by the same rule as the engine's own sampler core
  (``samplers.schedule.all_levels``), so the combination sees what the engine's pipelines see.
* per-run state (APG's momentum, AG's switches): created at the first ``prepare_inputs`` of a
  run (step 0, or a step index not after the previous one), as diffusers' APG resets its buffer.
  Like every diffusers guider it is therefore not reentrant: one run at a time per guider.
* per-sample branches (AG): the loop evaluates every branch on every row, so a branch the method
  needs for some samples only is evaluated for all while any sample needs it (no NFE saved until
  all have switched), and the method's combine receives the rows it asked for.

Methods that fit: those whose branches are the conditional and unconditional ones only, that
move and renoise with one prediction (the loop's ``scheduler.step`` takes one), and that need no
hook after the solver step. :func:`fits_modular` says why another does not (docs/interop.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers.guiders import BaseGuidance
from diffusers.guiders.guider_utils import GuiderOutput

from guidance_engine.guidance import Guidance, StepInfo
from guidance_engine.prediction import PREDICTION_TYPES, Prediction
from guidance_engine.registry import resolve_guidance
from guidance_engine.samplers.schedule import all_levels, is_flow_scheduler

__all__ = ["EngineGuider", "fits_modular"]

#: our branch -> (index in the loop's (conditional, unconditional) input tuples, diffusers' identifier)
BRANCHES = {"cond": (0, "pred_cond"), "uncond": (1, "pred_uncond")}


def fits_modular(method: Guidance) -> str | None:
    """None if ``method`` can run as a guider of a modular pipeline, else why not."""
    extra = sorted(set(method.required_branches()) - set(BRANCHES))
    if extra:
        return (f"needs branch(es) {extra} besides the conditional and unconditional ones, which the modular "
                "loop's (conditional, unconditional) input tuples cannot provide")
    if method.altered_branches():
        return ("evaluates an altered network (perturbed layers, another network, a probe or time noise), which "
                "the modular loop's one plain forward per branch cannot make")
    if method.renoise_split:
        return "renoises with another prediction than it moves with; the loop's scheduler.step takes one"
    if method.evaluates_in_step:
        return ("evaluates the network again inside the step (a midpoint, crops), which the modular loop's one "
                "forward per branch cannot make")
    if type(method).after_step is not Guidance.after_step or method.group_size() != 1:
        return "acts after each solver step (reweighting, resampling), which the modular loop never calls back"
    return None


class EngineGuider(BaseGuidance):
    """An engine method as a diffusers guider.

    Args:
        guidance: the method: a Guidance object, a method name or a dict config (as
            ``guidance=`` of the engine's pipelines). Its own interval and schedule apply
            (``start <= i / n < stop``; no diffusers window of its own).
        scheduler: the pipeline's scheduler (the object the modular pipeline steps with), read at
            every step for the noise level; not part of the saved config (``new()`` keeps it).
        enabled: False: the conditional prediction alone (as every diffusers guider).
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    def __init__(self, guidance: Guidance | str | Mapping[str, Any], scheduler: Any = None,
                 enabled: bool = True) -> None:
        super().__init__(0.0, 1.0, enabled)
        method = resolve_guidance(guidance)
        why = fits_modular(method)
        if why is not None:
            raise ValueError(f"EngineGuider: parameter 'guidance' must be a method that fits a modular pipeline; "
                             f"{method.name!r} {why}")
        self.engine_method = method
        self.scheduler = scheduler
        self.register_to_config(guidance=method.to_dict(), enabled=enabled)
        self._state: Any = None
        self._plan: list[tuple[str, torch.Tensor | None]] | None = None
        self._last_step: int | None = None
        self._x: torch.Tensor | None = None
        self._hook: Any = None

    def new(self, **kwargs: Any) -> EngineGuider:
        """A copy with some config changed and a fresh run state (the scheduler carried over)."""
        config = {"guidance": self.engine_method, "enabled": self._enabled, **kwargs}
        return EngineGuider(config.pop("guidance"), scheduler=config.pop("scheduler", self.scheduler), **config)

    # -- the per-run state -------------------------------------------------------------------
    @property
    def run_state(self) -> Any:
        """The method's state of the current (or last) run: AG's switch steps, APG's momentum."""
        return self._state

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        if step == 0 or self._last_step is None or step <= self._last_step:
            self._state = None  # a new run: the method's state is created at its first step
        self._last_step = step
        self._plan = None
        super().set_state(step, num_inference_steps, timestep)

    def _step_info(self) -> tuple[StepInfo, float, float]:
        """(StepInfo, alpha_t, sigma_t) of the current step, as the engine's core computes them."""
        scheduler = self.scheduler
        if scheduler is None:
            raise ValueError("EngineGuider: parameter 'scheduler' must be the pipeline's scheduler (the noise level "
                             "of each step is read from it), got None")
        timesteps = [float(t) for t in scheduler.timesteps.tolist()]
        index = self._step + (getattr(scheduler, "begin_index", None) or 0)
        if index >= len(timesteps) or timesteps[index] != float(self._timestep):
            raise ValueError(f"EngineGuider: step {self._step} (timestep {float(self._timestep)}) is not step {index} "
                             f"of the scheduler's timesteps: pass the scheduler the pipeline steps with")

        def level(i: int) -> tuple[float, float]:
            return all_levels(scheduler, timesteps[i:i + 1], offset=i)[0]

        def ratio(a: float, s: float) -> float:
            return float("inf") if a == 0 else s / a

        alpha, sigma = level(index)
        sigma_next = ratio(*level(index + 1)) if index + 1 < len(timesteps) else 0.0
        step = StepInfo(index=index, num_steps=len(timesteps), sigma=ratio(alpha, sigma), sigma_next=sigma_next,
                        timestep=timesteps[index])
        return step, alpha, sigma

    def _prediction_type(self) -> str:
        kind = "flow" if is_flow_scheduler(self.scheduler) else self.scheduler.config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"EngineGuider: the scheduler's prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {kind!r}")
        return kind

    def _branch_plan(self, batch: int, device: torch.device) -> list[tuple[str, torch.Tensor | None]]:
        """The method's branches at this step as (name, rows) pairs, conditional first."""
        if not self._enabled:
            return [("cond", None)]
        if self._state is None:
            self._state = self.engine_method.init_state(batch, device)
        wanted = self.engine_method.branches(self._step_info()[0], self._state)
        pairs = list(wanted.items()) if isinstance(wanted, Mapping) else [(name, None) for name in wanted]
        unknown = [str(name) for name, _ in pairs if name not in BRANCHES]
        if unknown:
            raise ValueError(f"EngineGuider: method {self.engine_method.name!r} asked for branch(es) {unknown}")
        return sorted(pairs, key=lambda pair: BRANCHES[pair[0]][0])

    # -- the guider contract -----------------------------------------------------------------
    @property
    def num_conditions(self) -> int:
        """The batches of this step once ``prepare_inputs`` has planned it; before (the encoders'
        question, before a run): 2 if the method may ever need the unconditional branch."""
        if not self._enabled:
            return 1
        if self._plan is not None:
            return len(self._plan)
        return 2 if "uncond" in self.engine_method.required_branches() else 1

    @property
    def is_conditional(self) -> bool:
        return self._count_prepared == 1  # the conditional batch comes first

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        batch, device = _batch_of(data.values())
        self._plan = self._branch_plan(batch, device)
        return [self._prepare_batch(data, BRANCHES[name][0], BRANCHES[name][1]) for name, _ in self._plan]

    def prepare_inputs_from_block_state(self, data: Any, input_fields: dict[str, str | tuple[str, str]]) -> list:
        values = [getattr(data, field[0] if isinstance(field, tuple) else field, None)
                  for field in input_fields.values()]
        batch, device = _batch_of(values)
        self._plan = self._branch_plan(batch, device)
        return [self._prepare_batch_from_block_state(input_fields, data, BRANCHES[name][0], BRANCHES[name][1])
                for name, _ in self._plan]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        self._remove_hook()
        self._hook = denoiser.register_forward_pre_hook(self._record_input, with_kwargs=True)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record_input(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """The network's input x (its first argument: ``sample`` or ``hidden_states``)."""
        self._x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        plan, self._plan = self._plan, None
        if plan is None:
            raise ValueError("EngineGuider: forward before prepare_inputs at this step")
        if not self._enabled:
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        step, alpha, sigma = self._step_info()
        kind, x = self._prediction_type(), self._x
        if x is None:
            raise ValueError("EngineGuider: the network's input was not recorded (prepare_models must run before "
                             "each forward, as the modular loops do)")
        if x.shape != pred_cond.shape:  # e.g. a 9-channel inpainting UNet: its input is not the latent alone
            raise ValueError(f"EngineGuider: the network's input {tuple(x.shape)} is not the latent its prediction "
                             f"{tuple(pred_cond.shape)} is read against")
        a, s = (torch.tensor(v, dtype=torch.float64, device=x.device) for v in (alpha, sigma))
        outputs = {"cond": pred_cond, "uncond": pred_uncond}
        preds = {name: Prediction(outputs[name] if rows is None else outputs[name][rows],
                                  x if rows is None else x[rows], a, s, kind) for name, rows in plan}
        guided = self.engine_method.combine(preds, step, self._state)
        return GuiderOutput(pred=guided.denoise.output, pred_cond=pred_cond, pred_uncond=pred_uncond)


def _batch_of(values: Any) -> tuple[int, torch.device]:
    """(rows, device) of the first tensor among the loop's model inputs (tuples: the conditional one)."""
    for value in values:
        tensor = value[0] if isinstance(value, tuple) else value
        if isinstance(tensor, torch.Tensor):
            return tensor.shape[0], tensor.device
    raise ValueError("EngineGuider: the denoiser's inputs hold no tensor to read the batch size from")
