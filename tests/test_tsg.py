"""TSG: the perturbation reaches only its rows, is redrawn every step, and leaves the model intact (one\ninert dispatcher on the time embedding, installed once)."""

from __future__ import annotations

import pytest
import torch

from guidance_engine import CFG
from guidance_engine.methods.tsg import TSG
from guidance_engine.pipelines import row_plan
from guidance_engine.pipelines.row_plan import current
from conftest import PROMPT, seeded


def _only_the_dispatcher(module) -> bool:
    return not module._forward_hooks and isinstance(vars(module).get("forward"), row_plan.PlanTimeForward)


def _spy_time_embedding(pipe):
    seen = []
    handle = pipe.unet.time_embedding.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    return seen, handle


def test_zero_noise_is_the_conditional_prediction(sd_pair) -> None:
    _, guided = sd_pair
    tsg = guided(PROMPT, num_inference_steps=4, guidance=TSG(noise_scale=0.0, t_min=0.0), generator=seeded(0),
                 output_type="latent")
    cond = guided(PROMPT, num_inference_steps=4, guidance=CFG(scale=1.0), generator=seeded(0), output_type="latent")
    # D(t~) == D(t) row for row, so w (D(t) - D(t~)) vanishes (the batch of 2 rounds like a batch of 1 here)
    torch.testing.assert_close(tsg.images, cond.images, atol=1e-5, rtol=1e-5)
    assert tsg.nfe == 8


def test_only_the_tsg_rows_are_perturbed_and_noise_is_fresh_each_step(sd_pair) -> None:
    _, guided = sd_pair
    outputs = []
    real_forward = guided.unet.time_embedding.forward
    seen, spy = _spy_time_embedding(guided)
    from guidance_engine.pipelines import branches
    original = branches.active

    def recording(plan):  # the row plan of each forward: which rows get time noise
        if plan.time:
            outputs.append([(a, b, float(branch.time_noise)) for a, b, branch in plan.time])
        return original(plan)

    branches.active = recording
    try:
        out = guided(PROMPT, num_inference_steps=4, guidance=TSG(t_min=0.0), generator=seeded(0), output_type="latent")
    finally:
        branches.active = original
        spy.remove()
    assert out.nfe == 8 and len(outputs) == 4 and len(seen) == 4
    assert all(spans == [(0, 1, spans[0][2])] for spans in outputs)  # rows [0, 1): the tsg branch only
    strengths = [spans[0][2] for spans in outputs]
    assert strengths == sorted(strengths, reverse=True) and strengths[0] <= 3.0  # s * t^alpha, t falling
    assert _only_the_dispatcher(guided.unet.time_embedding)  # installed once, inert without a plan
    assert guided.unet.time_embedding.forward.forward == real_forward  # the dispatcher wraps the module's own


def test_window_and_reproducibility(sd_pair) -> None:
    _, guided = sd_pair
    out = guided(PROMPT, num_inference_steps=4, guidance=TSG(t_min=400.0), generator=seeded(0), output_type="latent")
    assert out.nfe_per_image == [2 + 2 + 1 + 1]  # timesteps 751, 501 in the window; 251, 1 outside
    again = guided(PROMPT, num_inference_steps=4, guidance=TSG(t_min=400.0), generator=seeded(0), output_type="latent")
    assert torch.equal(out.images, again.images)
    other = guided(PROMPT, num_inference_steps=4, guidance=TSG(t_min=400.0, seed=1), generator=seeded(0),
                   output_type="latent")
    assert not torch.equal(out.images, other.images)


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match=r"tsg: parameter 'noise_scale' must be \[0, 100\], got -1"):
        TSG(noise_scale=-1)
    with pytest.raises(ValueError, match=r"t_min \(900.0\) must not exceed t_max \(100.0\)"):
        TSG(t_min=900.0, t_max=100.0)


def test_exception_inside_the_forward_leaves_no_hook(sd_pair) -> None:
    _, guided = sd_pair

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    guided.unet.down_blocks[0].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        guided(PROMPT, num_inference_steps=2, guidance=TSG(t_min=0.0))
    assert _only_the_dispatcher(guided.unet.time_embedding) and current() is None
