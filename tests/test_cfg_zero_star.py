"""CFG-Zero*: against diffusers' guider, its identity case, zero-init, eps models."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.guiders import ClassifierFreeZeroStarGuidance

from guidance_engine import Prediction, StepInfo, resolve_guidance
from guidance_engine.methods.cfg_zero_star import CFGZeroStar
from guidance_engine.samplers import sample
from conftest import ToyModel


def _preds(kind: str, seed: int):
    torch.manual_seed(seed)
    x = torch.randn(3, 4, 5, 5)
    a = torch.tensor(0.6, dtype=torch.float64)
    s = torch.tensor(0.4 if kind == "flow" else 0.8, dtype=torch.float64)
    return {b: Prediction(torch.randn_like(x), x, a, s, kind) for b in ("cond", "uncond")}


def _step(i: int) -> StepInfo:
    return StepInfo(index=i, num_steps=4, sigma=1.0, sigma_next=0.5, timestep=500.0)


def test_matches_diffusers_guider_with_the_documented_mapping() -> None:
    ours = CFGZeroStar(scale=4.0, zero_steps=1)              # ours counts zeroed steps
    theirs = ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1)
    for i in range(3):
        preds = _preds("flow", i)
        theirs.set_state(step=i, num_inference_steps=4, timestep=torch.tensor(900 - i))
        want = theirs.forward(preds["cond"].output, preds["uncond"].output).pred
        got = ours.combine(preds, _step(i), None).denoise.output
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_identity_scale_one_is_the_conditional_prediction() -> None:
    preds = _preds("flow", 5)
    got = CFGZeroStar(scale=1.0, zero_steps=0).combine(preds, _step(1), None).denoise
    torch.testing.assert_close(got.output, preds["cond"].output, atol=1e-6, rtol=1e-6)
    assert CFGZeroStar(scale=1.0, zero_steps=0).branches(_step(1), None) == ("cond",)


def test_eps_models_are_guided_on_the_velocity() -> None:
    preds = _preds("epsilon", 7)
    c, u = preds["cond"], preds["uncond"]
    v_c, v_u = c.eps - c.x0, u.eps - u.x0
    alpha = ((v_c * v_u).flatten(1).sum(1) / (v_u.pow(2).flatten(1).sum(1) + 1e-8)).view(-1, 1, 1, 1)
    v = alpha * v_u + 3.0 * (v_c - alpha * v_u)
    got = CFGZeroStar(scale=3.0, zero_steps=0).combine(preds, _step(2), None).denoise
    torch.testing.assert_close(got.eps - got.x0, v, atol=1e-4, rtol=1e-4)


def test_zero_init_keeps_a_flow_state_still_and_costs_one_forward() -> None:
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    model = ToyModel("flow")
    seen = []
    out = sample(model, noise, resolve_guidance("cfg_zero_star", zero_steps=2), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                 num_steps=5, prediction_type="flow", sampler="euler", progress=False,
                 callback=lambda r: seen.append(r.x.clone()))
    torch.testing.assert_close(seen[0], noise, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen[1], noise, atol=1e-6, rtol=0)
    assert not torch.allclose(seen[2], noise) and out.nfe == 2 * 1 + 3 * 2
