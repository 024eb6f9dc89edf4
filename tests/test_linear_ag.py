"""LinearAG: the least-squares fit, its calibration command, its oracle and its fallbacks."""

from __future__ import annotations

import json

import pytest
import torch

from guidance_engine import CFG, LinearAG
from guidance_engine.methods.linear_ag import fit_coefficients, predicted_steps, save_calibration
from guidance_engine.pipelines.toy.calibration import calibrate_linear_ag
from conftest import PROMPT, seeded


def test_predicted_steps() -> None:
    assert predicted_steps(20, 0.5, 0) == list(range(1, 10))
    assert predicted_steps(20, 0.5, 2) == [1, 3, 5, 7, 9]
    assert predicted_steps(10, 0.0, 0) == []


def test_fit_recovers_an_exact_affine_relation() -> None:
    torch.manual_seed(0)
    eps_c = torch.randn(6, 5, 2, 3, 3)
    eps_u = torch.randn(6, 5, 2, 3, 3)
    true = torch.tensor([0.5, 0.2, 0.3, 0.1], dtype=torch.float64)
    for i in (1, 2):  # predicted steps, chained through the previous estimate
        eps_u[:, i] = (true[0] * eps_c[:, i] + true[1] * eps_c[:, i - 1] + true[2] * eps_u[:, i - 1] + true[3]).float()
    coefficients, predicted, r2 = fit_coefficients(eps_c, eps_u, window=0.6, period=0)
    assert predicted == [1, 2]
    torch.testing.assert_close(coefficients[1], true, atol=1e-5, rtol=0)
    torch.testing.assert_close(coefficients[2], true, atol=1e-5, rtol=0)
    assert r2[1] > 0.999999 and r2[2] > 0.999999


def _calibration(tmp_path, predicted):
    save_calibration(tmp_path, torch.zeros(4, 4), {"num_steps": 4, "window": 0.5, "period": 0,
                                                   "predicted_steps": predicted})
    return str(tmp_path)


def test_no_predicted_step_and_no_switch_is_cfg_exactly(sd_pair, tmp_path) -> None:
    _, guided = sd_pair
    linear = LinearAG(calibration=_calibration(tmp_path, []), scale=6.0, threshold=2.0)
    got = guided(PROMPT, num_inference_steps=4, guidance=linear, generator=seeded(0), output_type="latent")
    want = guided(PROMPT, num_inference_steps=4, guidance=CFG(scale=6.0), generator=seeded(0), output_type="latent")
    assert torch.equal(got.images, want.images) and got.nfe == 8


def test_calibrate_then_sample_saves_nfes(sd_pair, tmp_path) -> None:
    _, guided = sd_pair
    meta = calibrate_linear_ag(guided, [PROMPT, "two blue squares", "a green triangle"], tmp_path, steps=6,
                               scale=5.0, window=0.5, period=0, batch_size=2)
    assert meta["predicted_steps"] == [1, 2] and json.loads((tmp_path / "linear_ag.json").read_text())["num_steps"] == 6
    out = guided(PROMPT, num_inference_steps=6, guidance=LinearAG(calibration=str(tmp_path), scale=5.0, threshold=2.0),
                 generator=seeded(0), output_type="np")
    assert out.nfe == 2 + 1 + 1 + 3 * 2 and torch.isfinite(torch.as_tensor(out.images)).all()
    # a negative prompt: the fit does not serve it, so the pipeline falls back to AG
    neg = guided(PROMPT, negative_prompt="red", num_inference_steps=6, generator=seeded(0), output_type="latent",
                 guidance=LinearAG(calibration=str(tmp_path), scale=5.0, threshold=2.0))
    assert neg.guidance["name"] == "ag" and neg.nfe == 12


def test_bad_calibration_and_step_count_fail_before_the_model(sd_pair, tmp_path) -> None:
    _, guided = sd_pair
    with pytest.raises(ValueError, match="linear_ag: parameter 'calibration' must be a directory"):
        LinearAG(calibration=str(tmp_path / "missing"))
    calls = []
    guided.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match="calibrated for num_inference_steps=4, got 5"):
        guided(PROMPT, num_inference_steps=5, guidance=LinearAG(calibration=_calibration(tmp_path, [1])))
    assert calls == []
