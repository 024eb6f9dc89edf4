"""RenormCFG: its identity case, the formula against an independent computation, the cap (it only
shrinks, per sample), and the truncation that skips the unconditional forward."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from guidance_engine import Prediction, StepInfo, resolve_guidance
from guidance_engine.methods.renorm_cfg import RenormCFG, truncated
from guidance_engine.samplers import sample
from conftest import ToyModel


def _preds(seed: int, rows: int = 4) -> dict[str, Prediction]:
    """Flow predictions whose samples differ in scale and in how far u lies from c (so that the
    cap binds on some samples only)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 6, 6, generator=generator)
    a, s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    scales = torch.linspace(0.2, 2.0, rows).view(-1, 1, 1, 1)
    spread = torch.linspace(0.02, 1.0, rows).view(-1, 1, 1, 1)
    cond = torch.randn(x.shape, generator=generator) * scales
    uncond = cond + spread * scales * torch.randn(x.shape, generator=generator)
    return {"cond": Prediction(cond, x, a, s, "flow"), "uncond": Prediction(uncond, x, a, s, "flow")}


def _step(timestep: float = 500.0) -> StepInfo:
    return StepInfo(index=1, num_steps=4, sigma=1.0, sigma_next=0.5, timestep=timestep)


def _guided(method: RenormCFG, preds: dict[str, Prediction]) -> torch.Tensor:
    return method.combine(preds, _step(), None).denoise.output


def test_registered_with_z_image_defaults_and_checked_ranges() -> None:
    method = resolve_guidance("renorm_cfg")
    assert isinstance(method, RenormCFG) and (method.scale, method.renorm, method.truncation) == (6.0, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"renorm_cfg: parameter 'renorm' must be \[0, inf\), got -1"):
        RenormCFG(renorm=-1.0)
    with pytest.raises(ValueError, match=r"renorm_cfg: parameter 'truncation' must be \[0, 1\], got 1.5"):
        RenormCFG(truncation=1.5)


def test_identity_scale_one_is_the_conditional_prediction() -> None:
    preds = _preds(0)
    method = RenormCFG(scale=1.0, renorm=0.5)
    assert method.branches(_step(), None) == ("cond",)  # no unconditional forward
    assert torch.equal(method.combine({"cond": preds["cond"]}, _step(), None).denoise.output, preds["cond"].output)
    assert torch.equal(_guided(RenormCFG(scale=1.0, renorm=0.0), preds), preds["cond"].output)


def test_formula_against_an_independent_computation() -> None:
    """u + w (c - u), each sample's norm capped at k ||c||, computed here in float64 on whole batches."""
    preds = _preds(1)
    c, u = preds["cond"].output.double(), preds["uncond"].output.double()
    for w, k in ((4.5, 0.0), (4.5, 1.0), (2.0, 1.3), (0.5, 0.9)):
        plain = u + w * (c - u)
        cap = k * c.flatten(1).norm(dim=1) / plain.flatten(1).norm(dim=1)
        factor = torch.ones_like(cap) if k == 0 else cap.clamp(max=1.0)
        want = plain * factor.view(-1, 1, 1, 1)
        torch.testing.assert_close(_guided(RenormCFG(scale=w, renorm=k), preds).double(), want,
                                   rtol=1e-5, atol=1e-6)


def test_the_cap_only_shrinks_and_acts_on_each_sample_alone() -> None:
    preds = _preds(2)
    c = preds["cond"].output
    plain = _guided(RenormCFG(scale=5.0, renorm=0.0), preds)
    capped = _guided(RenormCFG(scale=5.0, renorm=1.2), preds)
    norms_plain, norms_capped = plain.flatten(1).norm(dim=1), capped.flatten(1).norm(dim=1)
    limits = 1.2 * c.flatten(1).norm(dim=1)
    binds = norms_plain > limits
    assert binds.any() and (~binds).any()  # the batch mixes capped and uncapped samples
    assert torch.all(norms_capped <= norms_plain * (1 + 1e-6))
    assert torch.equal(capped[~binds], plain[~binds])  # untouched where the cap does not bind
    torch.testing.assert_close(norms_capped[binds], limits[binds], rtol=1e-5, atol=0.0)
    for row in range(c.shape[0]):  # a sample's result does not depend on the others
        alone = {name: pred.rows(slice(row, row + 1)) for name, pred in preds.items()}
        assert torch.equal(_guided(RenormCFG(scale=5.0, renorm=1.2), alone)[0], capped[row])


def test_truncation_rule_is_the_stock_float32_rule() -> None:
    """(1000 - t) / 1000 > truncation, as the stock pipeline precomputes it over its timesteps."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.1, 10).tolist())
    stock = ((1000 - scheduler.timesteps.float()) / 1000).tolist()
    for c in (0.0, 0.1, 0.25, 0.5, 0.9, 1.0):
        assert [truncated(float(t), c) for t in scheduler.timesteps] == [v > c for v in stock]
    assert not any(truncated(float(t), 1.0) for t in scheduler.timesteps)
    assert truncated(999.0, 0.0) and not truncated(1000.0, 0.0)  # only pure noise is guided at c = 0


@pytest.mark.parametrize("truncation, guided_steps", [(1.0, 6), (0.4, 3), (0.0, 1)])
def test_truncated_steps_skip_the_unconditional_branch(truncation, guided_steps) -> None:
    """NFE per sample: one per step plus one per guided step; the truncated steps request "cond" only."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    model = ToyModel("flow")
    method = RenormCFG(scale=4.0, renorm=1.0, truncation=truncation)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    result = sample(model, noise, method, scheduler=scheduler, num_steps=6, prediction_type="flow",
                    sigmas=torch.linspace(1.0, 1 / 6, 6).tolist(), progress=False)
    assert result.nfe_per_sample == [6 + guided_steps] * 2
    assert [len(call) for call in model.calls] == [2] * guided_steps + [1] * (6 - guided_steps)
    assert all(call == ("cond",) for call in model.calls[guided_steps:])
