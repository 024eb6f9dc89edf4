"""Perturbation guidance composed with APG / CFG++ (``base=``) and with the AG switch (``inner=``)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPT, seeded
from diffusers import DDIMScheduler

from guidance_engine import APG, CFG, AdaptiveGuidance, CFGPlusPlus
from guidance_engine.methods.pag import PAG
from guidance_engine.registry import resolve_guidance
from guidance_engine.samplers import sample

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                clip_sample=False, set_alpha_to_one=False)


class PerturbedToy:
    """Closed-form branches: cond, uncond, and a perturbed branch (any Branch with a perturbation)."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, x, timestep, requests):
        t = float(timestep) / 1000.0
        out = {}
        for name, rows in requests:
            xr = x if rows is None else x[rows]
            self.rows += xr.shape[0]
            key = "perturbed" if getattr(name, "perturb", None) is not None else str(name)
            shift = {"cond": 0.7, "uncond": -0.4, "perturbed": 0.3}[key]
            out[name] = 0.5 * xr + shift * torch.sin(xr + 3 * t) + 0.1 * (1 + t) * (key == "perturbed")
        return out


def _noise(batch: int) -> torch.Tensor:
    return torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * \
        torch.linspace(0.3, 3.0, batch).view(-1, 1, 1, 1)


def _run(guidance, noise, model=None, sampler="ddim"):
    return sample(model or PerturbedToy(), noise, guidance, scheduler=DDIMScheduler(**SD_BETAS), num_steps=12,
                  prediction_type="epsilon", sampler=sampler, progress=False)


@pytest.mark.parametrize("base", [APG(scale=5.0, momentum=-0.5), CFGPlusPlus(scale=0.6), CFG(scale=3.0)],
                         ids=["apg", "cfgpp", "cfg"])
def test_perturbation_scale_zero_with_a_base_is_the_base_exactly(base):
    noise = _noise(2)
    torch.testing.assert_close(_run(PAG(base=base, pag_scale=0.0), noise).x, _run(base, noise).x, atol=0, rtol=0)


def test_base_combination_adds_the_perturbation_term_to_the_base_prediction():
    """PAG(base=APG) moves with APG's guided prediction plus w (c - p) on the raw output."""
    from guidance_engine.guidance import StepInfo
    from guidance_engine.prediction import Prediction

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 6, generator=gen)
    a, s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    cond, uncond, perturbed = (Prediction(torch.randn(2, 4, 6, 6, generator=gen), x, a, s, "epsilon")
                               for _ in range(3))
    apg = APG(scale=5.0, momentum=-0.5)
    pag = PAG(base=apg, pag_scale=2.0)
    step = StepInfo(index=0, num_steps=10, sigma=s.item() / a.item(), sigma_next=1.0, timestep=999.0)
    got = pag.combine({"uncond": uncond, "cond": cond, "pag": perturbed}, step, pag.init_state(2, x.device))
    want = apg.combine({"uncond": uncond, "cond": cond}, step, apg.init_state(2, x.device))
    torch.testing.assert_close(got.denoise.output, want.denoise.output + 2.0 * (cond.output - perturbed.output))
    assert not got.split


def test_ag_switch_around_pag_each_sample_equals_its_run_alone():
    noise = _noise(3)
    inner = PAG(base=APG(scale=5.0, momentum=-0.5), pag_scale=1.5)
    never = _run(AdaptiveGuidance(inner=inner, threshold=2.0), noise)
    torch.testing.assert_close(never.x, _run(inner, noise).x, atol=0, rtol=0)
    assert never.nfe_per_sample == [36, 36, 36]
    ag = AdaptiveGuidance(inner=inner, threshold=0.985)
    model = PerturbedToy()
    batch = _run(ag, noise, model=model)
    switched = batch.state.switched_at.tolist()
    assert len(set(switched)) > 1 and max(switched) >= 0, switched
    for i in range(3):
        alone = _run(ag, noise[i:i + 1])
        torch.testing.assert_close(batch.x[i:i + 1], alone.x, atol=1e-6, rtol=1e-6)
        # switched samples drop the unconditional AND the perturbed rows
        expected = 36 if switched[i] < 0 else 3 * (switched[i] + 1) + (12 - switched[i] - 1)
        assert batch.nfe_per_sample[i] == alone.nfe_per_sample[0] == expected
    assert model.rows == sum(batch.nfe_per_sample)


def test_base_validation_and_round_trip():
    with pytest.raises(ValueError, match="set the scale inside it"):
        resolve_guidance({"name": "pag", "base": "apg", "scale": 3.0})
    with pytest.raises(ValueError, match="parameter 'base' must be"):
        resolve_guidance({"name": "seg", "base": "pag"})
    with pytest.raises(ValueError, match="sag: parameter 'base' is not supported"):
        resolve_guidance({"name": "sag", "base": "apg"})
    with pytest.raises(ValueError, match="a method that can guide some samples only .* got 'sag'"):
        resolve_guidance({"name": "ag", "inner": "sag"})
    config = resolve_guidance({"name": "slg", "base": {"name": "cfgpp", "scale": 0.5}}).to_dict()
    again = resolve_guidance(config)
    assert again.base == CFGPlusPlus(scale=0.5) and again.renoise_split


def test_composition_through_the_pipeline(sd_pair):
    _, pipe = sd_pair
    kwargs = dict(num_inference_steps=4, generator=seeded(0), output_type="np")
    out = pipe(PROMPT, guidance={"name": "pag", "base": {"name": "cfgpp", "scale": 0.6}}, **kwargs)
    assert out.nfe == 12 and torch.isfinite(torch.as_tensor(out.images)).all()
    out = pipe(PROMPT, guidance={"name": "ag", "threshold": 0.0, "inner": {"name": "pag"}}, **kwargs)
    assert out.nfe == 3 + 3  # one guided step (uncond, cond, pag rows), then the conditional alone
