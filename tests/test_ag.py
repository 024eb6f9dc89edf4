"""Adaptive Guidance: the switch, the shrinking batch, composition, and its equality oracle."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from guidance_engine import APG, CFG, AdaptiveGuidance, CFGPlusPlus
from guidance_engine.samplers import sample
from conftest import PROMPT, ToyModel, seeded

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                clip_sample=False, set_alpha_to_one=False)


def _noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 6, 6, generator=torch.Generator().manual_seed(seed)) * \
        torch.linspace(0.3, 3.0, batch).view(-1, 1, 1, 1)


def _run(guidance, noise, sampler="ddim", model=None, steps=12):
    return sample(model or ToyModel(), noise, guidance, scheduler=DDIMScheduler(**SD_BETAS), num_steps=steps,
                  prediction_type="epsilon", sampler=sampler, progress=False)


def test_unreachable_threshold_is_cfg_exactly() -> None:
    noise = _noise(3)
    ag = _run(AdaptiveGuidance(inner=CFG(scale=5.0), threshold=1.5), noise)
    cfg = _run(CFG(scale=5.0), noise)
    assert torch.equal(ag.x, cfg.x) and ag.nfe_per_sample == [24, 24, 24]


def test_samples_switch_at_different_steps_and_each_equals_its_run_alone() -> None:
    noise = _noise(3)
    model = ToyModel()
    # 0.985 lies between the three samples' cosine curves under this toy model: they switch at
    # different steps (one never does)
    ag = AdaptiveGuidance(inner=APG(scale=5.0, momentum=-0.5), threshold=0.985)
    batch = _run(ag, noise, model=model)
    switched = batch.state.switched_at.tolist()
    assert len(set(switched)) > 1 and max(switched) >= 0, switched  # a real mix of switch steps
    # the batch shrank: the forward saw fewer rows than 2 x batch x steps
    assert model.rows == sum(batch.nfe_per_sample) < 2 * 3 * 12
    for i in range(3):
        alone = _run(ag, noise[i:i + 1])
        torch.testing.assert_close(batch.x[i:i + 1], alone.x, atol=1e-6, rtol=1e-6)
        assert alone.nfe_per_sample[0] == batch.nfe_per_sample[i]
        expected = 24 if switched[i] < 0 else 2 * (switched[i] + 1) + (12 - switched[i] - 1)
        assert batch.nfe_per_sample[i] == expected


def test_ag_composes_with_cfgpp_on_the_cores_solvers_only() -> None:
    noise = _noise(2)
    ag = AdaptiveGuidance(inner=CFGPlusPlus(scale=0.6), threshold=0.985)
    assert ag.renoise_split
    out = _run(ag, noise, sampler="ddim")
    assert torch.isfinite(out.x).all()
    with pytest.raises(ValueError, match="renoises"):
        _run(ag, noise, sampler="scheduler")
    never = _run(AdaptiveGuidance(inner=CFGPlusPlus(scale=0.6), threshold=2.0), noise)
    torch.testing.assert_close(never.x, _run(CFGPlusPlus(scale=0.6), noise).x, atol=0, rtol=0)


def test_config_validation_and_round_trip() -> None:
    ag = AdaptiveGuidance(inner={"name": "apg", "scale": 4.0}, threshold=0.99)
    from guidance_engine import resolve_guidance
    assert resolve_guidance(ag.to_dict()) == ag
    assert ag.new(scale=3.0).inner.scale == 3.0
    with pytest.raises(ValueError, match=r"ag: parameter 'threshold' must be \[0, 2\], got -1"):
        AdaptiveGuidance(threshold=-1)
    with pytest.raises(ValueError, match=r"\(not ag"):
        AdaptiveGuidance(inner=AdaptiveGuidance())
    with pytest.raises(ValueError, match="unknown method"):
        AdaptiveGuidance(inner="nope")


def test_pipeline_ag_unreachable_equals_stock_and_reports_nfe_per_image(sd_pair) -> None:
    stock, guided = sd_pair
    want = stock(PROMPT, num_inference_steps=6, generator=seeded(0), output_type="latent").images
    got = guided(PROMPT, num_inference_steps=6, generator=seeded(0), output_type="latent",
                 guidance=AdaptiveGuidance(threshold=1.5))
    assert torch.equal(got.images, want) and got.nfe == 12
    # a reachable threshold on two prompts: per-image NFEs, each image as if alone
    ag = AdaptiveGuidance(threshold=0.0)
    out = guided([PROMPT, "two blue squares"], num_inference_steps=6, guidance=ag, output_type="latent",
                 generator=[seeded(1), seeded(2)])
    assert out.nfe_per_image == [7, 7]
    alone = guided("two blue squares", num_inference_steps=6, guidance=ag, output_type="latent", generator=seeded(2))
    # (float32 rounding of the UNet differs with the batch size, hence a tolerance here)
    torch.testing.assert_close(out.images[1:], alone.images, atol=1e-4, rtol=1e-4)
