"""Guidance-distilled UNets (``time_cond_proj_dim``): equal to the stock pipelines, methods on top.

The stock SD / SDXL pipelines embed ``guidance_scale - 1`` as ``timestep_cond``, run the prompt's
rows alone and ignore the negative prompt; the engine's ``guidance=None`` must equal that bit for
bit, and NAG must make the negative prompt act (pipelines/distilled.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers.callbacks import SDCFGCutoffCallback
from PIL import Image

from guidance_engine.pipelines import (GuidedStableDiffusionImg2ImgPipeline, GuidedStableDiffusionPipeline,
                                       GuidedStableDiffusionXLPipeline)
from guidance_engine.pipelines.toy.tiny_models import TINY_IMAGE_SIZE, tiny_sd_components, tiny_sdxl_components
from guidance_engine.pipelines.toy.train_distilled import build_student, guided_target, scale_embedding

from conftest import PROMPT, quiet, seeded

STEPS = 3
EMBEDDING_DIM = 8


def distilled(components: dict) -> dict:
    """``components`` with a UNet of the same architecture taking a guidance-scale embedding (a
    random projection, so that the embedded scale changes the output)."""
    unet = components["unet"]
    torch.manual_seed(3)
    student = UNet2DConditionModel.from_config(unet.config, time_cond_proj_dim=EMBEDDING_DIM)
    student.load_state_dict(unet.state_dict(), strict=False)
    return {**components, "unet": student.eval()}


@pytest.fixture(scope="module")
def sd_distilled():
    stock = quiet(StableDiffusionPipeline(**distilled(tiny_sd_components(0)), requires_safety_checker=False))
    return stock, quiet(GuidedStableDiffusionPipeline.from_pipe(stock))


def latents_of(pipe, **kwargs) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=STEPS, generator=seeded(0), output_type="latent", **kwargs).images


@pytest.mark.parametrize("scale", [7.5, 3.0])
def test_sd_default_call_equals_stock_and_ignores_the_negative_prompt(sd_distilled, scale):
    stock, guided = sd_distilled
    kwargs = dict(guidance_scale=scale, negative_prompt="a blue square", num_images_per_prompt=2)
    expected = latents_of(stock, **kwargs)
    out = guided(PROMPT, num_inference_steps=STEPS, generator=seeded(0), output_type="latent", **kwargs)
    assert torch.equal(out.images, expected)
    assert out.nfe_per_image == [STEPS, STEPS]  # the prompt's rows alone: one forward per step
    del kwargs["negative_prompt"]
    assert torch.equal(latents_of(guided, **kwargs), expected)  # stock ignores it; so does the engine


def test_the_embedded_scale_reaches_the_network(sd_distilled):
    _, guided = sd_distilled
    assert not torch.equal(latents_of(guided, guidance_scale=7.5), latents_of(guided, guidance_scale=2.0))
    assert torch.equal(latents_of(guided), latents_of(guided, guidance_scale=7.5))  # stock's default


def test_sdxl_default_call_equals_stock():
    stock = quiet(StableDiffusionXLPipeline(**distilled(tiny_sdxl_components(0))))
    guided = quiet(GuidedStableDiffusionXLPipeline.from_pipe(stock))
    for scale in (5.0, 8.5):
        assert torch.equal(latents_of(guided, guidance_scale=scale), latents_of(stock, guidance_scale=scale))


def test_img2img_default_call_equals_stock():
    components = distilled(tiny_sd_components(0))
    stock = quiet(StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False))
    guided = quiet(GuidedStableDiffusionImg2ImgPipeline.from_pipe(stock))
    pixels = np.zeros((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), np.uint8)
    pixels[:, : TINY_IMAGE_SIZE // 2] = (200, 30, 30)
    image = Image.fromarray(pixels)
    kwargs = dict(image=image, strength=0.6, guidance_scale=6.0, num_inference_steps=4, output_type="latent")
    expected = stock(PROMPT, generator=seeded(1), **kwargs).images
    assert torch.equal(guided(PROMPT, generator=seeded(1), **kwargs).images, expected)


def test_a_cutoff_callback_changes_nothing_as_in_stock(sd_distilled):
    """Stock embeds the scale before its loop and never guides: SDCFGCutoffCallback's
    ``_guidance_scale = 0`` changes nothing, on either pipeline."""
    stock, guided = sd_distilled
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append((pipe.guidance_scale, pipe.do_classifier_free_guidance))
        return tensors

    plain = latents_of(stock, guidance_scale=6.0)
    cutoff = dict(guidance_scale=6.0, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.3))
    assert torch.equal(latents_of(stock, **cutoff), plain)
    assert torch.equal(latents_of(guided, **cutoff), plain)
    latents_of(guided, guidance_scale=6.0, callback_on_step_end=record)
    assert seen == [(6.0, False)] * STEPS  # the stock properties: the embedded value, no CFG


def test_nag_makes_the_negative_prompt_act(sd_distilled):
    _, guided = sd_distilled
    plain = latents_of(guided, negative_prompt="a blue square")
    identity = guided(PROMPT, num_inference_steps=STEPS, generator=seeded(0), output_type="latent",
                      negative_prompt="a blue square", guidance={"name": "nag", "nag_scale": 1.0})
    assert torch.equal(identity.images, plain)  # nag_scale 1: no NAG rows, the stock call
    nag = guided(PROMPT, num_inference_steps=STEPS, generator=seeded(0), output_type="latent",
                 negative_prompt="a blue square", guidance={"name": "nag", "nag_scale": 5.0})
    assert nag.nfe_per_image == [STEPS]  # one forward per step: NAG alters attention, CFG stays at 1
    assert torch.isfinite(nag.images).all() and not torch.equal(nag.images, plain)
    other = guided(PROMPT, num_inference_steps=STEPS, generator=seeded(0), output_type="latent",
                   negative_prompt="a red circle", guidance={"name": "nag", "nag_scale": 5.0})
    assert not torch.equal(other.images, nag.images)  # the negative prompt now matters


def test_a_method_keeps_its_own_scale_and_the_embedded_one(sd_distilled):
    """On a distilled UNet ``guidance_scale`` is embedded, never a method's scale: CFG on top runs
    at its own scale (two branches a step) and differs from the embedded-only call."""
    _, guided = sd_distilled
    method = guided(PROMPT, num_inference_steps=STEPS, generator=seeded(0), output_type="latent",
                    guidance={"name": "cfg", "scale": 2.0}, guidance_scale=4.0)
    assert method.nfe_per_image == [2 * STEPS] and method.guidance["scale"] == 2.0
    assert not torch.equal(method.images, latents_of(guided, guidance_scale=4.0))


@pytest.mark.parametrize("bad", [float("nan"), 101.0, -1.0, "7"])
def test_bad_embedded_scale_is_refused_before_any_model_call(sd_distilled, bad):
    _, guided = sd_distilled
    with pytest.raises(ValueError, match=r"guidance_scale: on a guidance-distilled UNet .*\[0, 100\]"):
        guided(PROMPT, num_inference_steps=STEPS, guidance_scale=bad)


def test_the_student_starts_as_the_teacher_and_learns_the_guided_target():
    teacher = tiny_sd_components(0)["unet"]
    student = build_student(teacher, EMBEDDING_DIM)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([100, 700])
    cond = torch.randn(2, 16, teacher.config.cross_attention_dim, generator=gen)
    uncond = torch.randn(1, 16, teacher.config.cross_attention_dim, generator=gen).expand_as(cond)
    scales = torch.tensor([1.0, 6.5])
    with torch.no_grad():
        teacher_cond = teacher(z, t, cond).sample
        student_out = student(z, t, cond, timestep_cond=scale_embedding(scales, EMBEDDING_DIM)).sample
        assert torch.equal(student_out, teacher_cond)  # the new projection is zero: + 0 exactly
        target = guided_target(teacher, z, t, cond, uncond, scales)
        eps_u, eps_c = teacher(z, t, uncond).sample, teacher(z, t, cond).sample  # separate forwards
    expected = eps_u + scales.view(-1, 1, 1, 1) * (eps_c - eps_u)
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)
    stock = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor(6.5 - 1).repeat(1), EMBEDDING_DIM)
    assert torch.equal(scale_embedding(torch.tensor([6.5]), EMBEDDING_DIM), stock)
