"""The sampler core: CFG++ oracles, solver steps, per-run state, errors at the failing step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       FlowMatchEulerDiscreteScheduler, PNDMScheduler)

from guidance_engine import CFG, APG, CFGPlusPlus, StepInfo
from guidance_engine.samplers import NonFiniteLatentsError, sample, schedule_from_scheduler
from guidance_engine.samplers.loop import _SolverRun, SAMPLERS
from conftest import ToyModel, seeded

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                clip_sample=False, set_alpha_to_one=False)


@dataclass(frozen=True, kw_only=True)
class PerStepCFG(CFG):
    """CFG with an explicit weight per step (for the CFG++ equivalence oracle)."""

    weights: tuple[float, ...] = ()

    def scale_at(self, step: StepInfo) -> float:
        return self.weights[step.index]


def _run(guidance, scheduler, sampler, kind="epsilon", steps=8, batch=2, generator=None, model=None):
    noise = torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    return sample(model or ToyModel(kind), noise, guidance, scheduler=scheduler, num_steps=steps,
                  prediction_type=kind, sampler=sampler, generator=generator, progress=False)


def test_ddim_cfgpp_equals_ddim_cfg_with_per_step_weight() -> None:
    """Oracle: DDIM CFG++ at lambda == DDIM CFG with w_t = lambda sig_t / (sig_t - sig_{t-1})."""
    scheduler = DDIMScheduler(**SD_BETAS)
    lam = 0.6
    levels = schedule_from_scheduler(scheduler, 8)
    weights = tuple(lam * levels.ratio(i) / (levels.ratio(i) - levels.ratio_next(i)) for i in range(8))
    cfgpp = _run(CFGPlusPlus(scale=lam), scheduler, "ddim")
    cfg = _run(PerStepCFG(scale=2.0, weights=weights), scheduler, "ddim")
    torch.testing.assert_close(cfgpp.x, cfg.x, atol=1e-4, rtol=1e-4)
    plain = _run(CFG(scale=2.0), scheduler, "ddim")
    assert (plain.x - cfgpp.x).abs().max() > 1e-2  # the oracle is not trivially satisfied


def test_flow_cfgpp_equals_cfg_with_flow_weight() -> None:
    """Flow form: w = lambda s (1 - s_next) / (s - s_next)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    lam = 0.5
    levels = schedule_from_scheduler(scheduler, 6)
    s, s_next = levels.sigma_t.tolist(), levels.sigma_t_next.tolist()
    weights = tuple(lam * s[i] * (1 - s_next[i]) / (s[i] - s_next[i]) for i in range(6))
    cfgpp = _run(CFGPlusPlus(scale=lam), scheduler, "euler", kind="flow", steps=6)
    cfg = _run(PerStepCFG(scale=2.0, weights=weights), scheduler, "euler", kind="flow", steps=6)
    torch.testing.assert_close(cfgpp.x, cfg.x, atol=1e-4, rtol=1e-4)


def test_flow_solver_matches_the_flow_scheduler_path() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    own = _run(CFG(scale=4.0), scheduler, "euler", kind="flow", steps=6)
    stock = _run(CFG(scale=4.0), scheduler, "scheduler", kind="flow", steps=6)
    torch.testing.assert_close(own.x, stock.x, atol=1e-5, rtol=1e-5)
    dpm = _run(CFG(scale=4.0), scheduler, "dpmpp_2m", kind="flow", steps=6)
    assert torch.isfinite(dpm.x).all()


def test_nfe_counts_branches_and_intervals_skip_the_unconditional_forward() -> None:
    model = ToyModel()
    result = _run(CFG(scale=5.0, start=0.0, stop=0.5), DDIMScheduler(**SD_BETAS), "ddim", model=model)
    assert result.nfe == 4 * 2 + 4 * 1
    assert model.calls[:4] == [("uncond", "cond")] * 4 and model.calls[4:] == [("cond",)] * 4


def test_scheduler_given_to_the_core_is_never_modified() -> None:
    scheduler = DPMSolverMultistepScheduler(**{k: v for k, v in SD_BETAS.items() if k not in ("clip_sample", "set_alpha_to_one")})
    _run(CFG(scale=5.0), scheduler, "scheduler")
    _run(APG(scale=5.0), scheduler, "dpmpp_2m")
    assert scheduler.num_inference_steps is None and scheduler.step_index is None


def test_per_sample_generators_make_images_independent_of_the_batch() -> None:
    scheduler = EulerAncestralDiscreteScheduler(**{k: v for k, v in SD_BETAS.items() if k not in ("clip_sample", "set_alpha_to_one")})
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(5))
    both = sample(ToyModel(), noise, CFG(scale=3.0), scheduler=scheduler, num_steps=5, prediction_type="epsilon",
                  sampler="euler_ancestral", generator=[seeded(10), seeded(11)], progress=False).x
    alone = sample(ToyModel(), noise[1:], CFG(scale=3.0), scheduler=scheduler, num_steps=5,
                   prediction_type="epsilon", sampler="euler_ancestral", generator=[seeded(11)], progress=False).x
    torch.testing.assert_close(both[1:], alone, atol=1e-6, rtol=1e-6)


def test_euler_ancestral_is_ddim_with_eta_one_on_the_same_levels() -> None:
    """The first-order step: DDIM(eta=1) and Euler ancestral are one update (k-diffusion coords)."""
    scheduler = EulerAncestralDiscreteScheduler(**{k: v for k, v in SD_BETAS.items() if k not in ("clip_sample", "set_alpha_to_one")})
    a = sample(ToyModel(), torch.ones(1, 4, 6, 6), CFG(scale=3.0), scheduler=scheduler, num_steps=4,
               prediction_type="epsilon", sampler="euler_ancestral", generator=seeded(1), progress=False).x
    b = sample(ToyModel(), torch.ones(1, 4, 6, 6), CFG(scale=3.0), scheduler=scheduler, num_steps=4,
               prediction_type="epsilon", sampler="euler", eta=1.0, generator=seeded(1), progress=False).x
    assert torch.equal(a, b)


class NaNAtStep(ToyModel):
    """NaN outputs at call ``bad_call``; with ``entries``, only those entries of row 0 get those
    values (the rest stay finite)."""

    def __init__(self, bad_call: int, entries: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.bad_call = bad_call
        self.entries = entries

    def __call__(self, x, timestep, requests):
        out = super().__call__(x, timestep, requests)
        if len(self.calls) == self.bad_call:
            if self.entries:
                out["cond"] = out["cond"].clone()
                out["cond"].view(-1)[:len(self.entries)] = torch.tensor(self.entries)
            else:
                out["cond"] = out["cond"] * float("nan")
        return out


def test_non_finite_latents_stop_the_run_at_the_failing_step() -> None:
    with pytest.raises(NonFiniteLatentsError, match=r"step 3 of 8 .* method 'apg' and sampler 'ddim'"):
        _run(APG(scale=5.0), DDIMScheduler(**SD_BETAS), "ddim", model=NaNAtStep(bad_call=3))
    # one entry infinite, or +inf and -inf (whose sum is NaN), the rest finite: still that step
    for entries in ((float("inf"),), (float("inf"), float("-inf")), (float("nan"),)):
        with pytest.raises(NonFiniteLatentsError, match=r"step 2 of 8 .* sampler 'euler'"):
            _run(CFG(scale=3.0), DDIMScheduler(**SD_BETAS), "euler", model=NaNAtStep(bad_call=2, entries=entries))
    with pytest.raises(NonFiniteLatentsError, match="initial latents"):
        sample(ToyModel(), torch.full((1, 4, 2, 2), float("nan")), CFG(), scheduler=DDIMScheduler(**SD_BETAS),
               num_steps=2, prediction_type="epsilon", progress=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance=CFGPlusPlus(), sampler="scheduler"), r"sampler: method 'cfgpp' renoises .* one of ddim"),
    (dict(guidance=CFGPlusPlus(), sampler=None, scheduler=PNDMScheduler(**{k: v for k, v in SD_BETAS.items() if k in ("beta_start", "beta_end", "beta_schedule", "steps_offset")})),
     r"PNDMScheduler.step\(\) cannot do"),
    (dict(sampler="heun"), r"sampler: must be one of ddim, euler, euler_ancestral, dpmpp_2m, scheduler"),
    (dict(eta=1.5), r"eta: must be in \[0, 1\], got 1.5"),
    (dict(num_steps=0), r"num_inference_steps: must be an integer >= 1, got 0"),
    (dict(prediction_type="x0"), r"prediction_type: must be one of"),
])
def test_bad_input_is_refused_before_any_model_call(kwargs, message) -> None:
    model = ToyModel()
    args = dict(guidance=CFG(), scheduler=DDIMScheduler(**SD_BETAS), num_steps=3, prediction_type="epsilon",
                sampler="ddim")
    args.update(kwargs)
    guidance = args.pop("guidance")
    with pytest.raises(ValueError, match=message):
        sample(model, torch.zeros(1, 4, 2, 2), guidance, progress=False, **args)
    assert model.calls == []


def test_solver_runs_visit_the_stock_levels() -> None:
    """Each solver reads its levels off the stock scheduler it mirrors, configured like the pipeline's."""
    scheduler = DDIMScheduler(**SD_BETAS)
    run = _SolverRun(SAMPLERS["dpmpp_2m"], scheduler, 10, "cpu", None, None, {}, None, None)
    stock = DPMSolverMultistepScheduler.from_config(scheduler.config)
    stock.set_timesteps(10)
    assert torch.equal(run.timesteps, stock.timesteps)
    ratios = [run.ratio(i) for i in range(10)] + [run.ratio_next(9)]
    torch.testing.assert_close(torch.tensor(ratios, dtype=torch.float64), stock.sigmas.double(), atol=1e-5, rtol=1e-5)


@dataclass(frozen=True, kw_only=True)
class FirstRowGuided(CFG):
    """Test method: CFG for sample 0 only; the other samples run conditional-only (fewer rows)."""

    def branches(self, step, state):
        return {"uncond": torch.tensor([0]), "cond": None}

    def combine(self, preds, step, state):
        cond = preds["cond"]
        guided0 = preds["uncond"].lerp(cond.rows(slice(0, 1)), self.scale)
        out = cond.output.clone()
        out[:1] = guided0.output
        from guidance_engine import GuidedPrediction
        return GuidedPrediction.single(cond.with_output(out))


def test_per_row_branches_shrink_the_batch_and_keep_samples_independent() -> None:
    model = ToyModel()
    scheduler = DDIMScheduler(**SD_BETAS)
    mixed = _run(FirstRowGuided(scale=4.0), scheduler, "ddim", model=model, steps=5)
    assert model.rows == 5 * (1 + 2) and mixed.nfe_per_sample == [10, 5] and mixed.nfe == 7.5
    alone_cfg = _run(CFG(scale=4.0), scheduler, "ddim", steps=5)
    alone_cond = _run(CFG(scale=1.0), scheduler, "ddim", steps=5)
    torch.testing.assert_close(mixed.x[0], alone_cfg.x[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mixed.x[1], alone_cond.x[1], atol=1e-6, rtol=1e-6)


@dataclass(frozen=True, kw_only=True)
class SwapAtStep(APG):
    """Test method: APG whose after-step hook swaps the two samples once (a 'resampling')."""

    at: int = 2

    def after_step(self, x, preds, guided, step, state):
        return torch.tensor([1, 0]) if step.index == self.at else None


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "scheduler"])
def test_resampling_moves_latents_solver_history_and_method_state_together(sampler) -> None:
    """Swapping rows mid-run must give the swapped result of the unswapped run: the multistep
    history (DPM++ 2M) and APG's momentum follow their sample."""
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    plain = _run(APG(scale=4.0, momentum=-0.5), scheduler, sampler, steps=6)
    swapped = _run(SwapAtStep(scale=4.0, momentum=-0.5), scheduler, sampler, steps=6)
    torch.testing.assert_close(swapped.x, plain.x.flip(0), atol=1e-6, rtol=1e-6)


def test_the_schedule_ratios_made_at_once_equal_the_per_step_ones() -> None:
    """``NoiseSchedule.ratios()`` (what the core's solvers read at each step) == ``ratio(i)`` and
    ``ratio_next(i)``, the pure-noise start of a flow schedule (inf) included."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    for scheduler in (DDIMScheduler(**SD_BETAS), FlowMatchEulerDiscreteScheduler(shift=3.0)):
        schedule = schedule_from_scheduler(scheduler, 7)
        ratios, ratios_next = schedule.ratios()
        assert ratios == [schedule.ratio(i) for i in range(7)]
        assert ratios_next == [schedule.ratio_next(i) for i in range(7)]
    assert math.isinf(schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(), 4).ratios()[0][0])
