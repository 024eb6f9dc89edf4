"""Image-to-image and inpainting: equal to the stock diffusers pipelines, every method, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, StableDiffusionPipeline)
from PIL import Image

from guidance_engine.pipelines import GuidedStableDiffusionImg2ImgPipeline, GuidedStableDiffusionInpaintPipeline
from guidance_engine.pipelines.toy.tiny_models import TINY_IMAGE_SIZE, tiny_sd_components

from conftest import PROMPT, quiet, seeded

SIZE = TINY_IMAGE_SIZE


def _image(seed: int = 0, size: int = SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:] = rng.integers(0, 255, 3)
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def _mask(size: int = SIZE) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def components():
    return tiny_sd_components(0)


def _processors(unet):
    return {name: type(p) for name, p in unet.attn_processors.items()}


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_cfg_equals_stock(components, strength):
    stock = quiet(StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False))
    ours = quiet(GuidedStableDiffusionImg2ImgPipeline.from_pipe(stock))
    before = _processors(stock.unet)
    kwargs = dict(image=_image(), strength=strength, num_inference_steps=6, guidance_scale=5.0, output_type="np")
    want = stock(PROMPT, generator=seeded(3), **kwargs).images
    got = ours(PROMPT, generator=seeded(3), **kwargs)
    np.testing.assert_array_equal(got.images, want)
    assert got.nfe == 2 * int(6 * strength)
    # the stock pipeline is untouched: same processors, same output again
    assert _processors(stock.unet) == before
    np.testing.assert_array_equal(stock(PROMPT, generator=seeded(3), **kwargs).images, want)


def test_img2img_callback_sees_the_stock_step_numbers(components):
    stock = quiet(StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False))
    ours = quiet(GuidedStableDiffusionImg2ImgPipeline.from_pipe(stock))
    seen = {"stock": [], "ours": []}

    def record(key):
        def callback(pipe, i, t, kwargs):
            seen[key].append((i, int(t)))
            return {}
        return callback

    kwargs = dict(image=_image(), strength=0.5, num_inference_steps=6, output_type="np")
    stock(PROMPT, generator=seeded(0), callback_on_step_end=record("stock"), **kwargs)
    ours(PROMPT, generator=seeded(0), callback_on_step_end=record("ours"), **kwargs)
    assert seen["ours"] == seen["stock"] and seen["ours"][0][0] == 0 and len(seen["ours"]) == 3


def test_img2img_stochastic_scheduler_and_generator_list_equal_stock(components):
    stock = quiet(StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False))
    stock.scheduler = EulerAncestralDiscreteScheduler.from_config(stock.scheduler.config)
    ours = quiet(GuidedStableDiffusionImg2ImgPipeline.from_pipe(stock))
    kwargs = dict(image=_image(1), strength=0.7, num_inference_steps=5, guidance_scale=4.0, output_type="np",
                  num_images_per_prompt=2)
    want = stock([PROMPT], generator=[seeded(1), seeded(2)], **kwargs).images
    got = ours([PROMPT], generator=[seeded(1), seeded(2)], **kwargs).images
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpaint_cfg_equals_stock(components, strength):
    stock = quiet(StableDiffusionInpaintPipeline(**components, requires_safety_checker=False))
    ours = quiet(GuidedStableDiffusionInpaintPipeline.from_pipe(stock))
    kwargs = dict(image=_image(2), mask_image=_mask(), strength=strength, num_inference_steps=5, guidance_scale=6.0,
                  output_type="np")
    want = stock(PROMPT, generator=seeded(4), **kwargs).images
    got = ours(PROMPT, generator=seeded(4), **kwargs)
    np.testing.assert_array_equal(got.images, want)
    assert got.nfe == 2 * int(5 * strength)


def test_nine_channel_inpainting_unet_equals_stock(components):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    config = {**components["unet"].config, "in_channels": 9}
    unet9 = UNet2DConditionModel.from_config(config)
    stock = quiet(StableDiffusionInpaintPipeline(**{**components, "unet": unet9}, requires_safety_checker=False))
    ours = quiet(GuidedStableDiffusionInpaintPipeline.from_pipe(stock))
    for strength in (0.6, 1.0):
        kwargs = dict(image=_image(6), mask_image=_mask(), strength=strength, num_inference_steps=4,
                      guidance_scale=4.0, output_type="np")
        want = stock(PROMPT, generator=seeded(8), **kwargs).images
        np.testing.assert_array_equal(ours(PROMPT, generator=seeded(8), **kwargs).images, want)
    out = ours(PROMPT, image=_image(6), mask_image=_mask(), num_inference_steps=3, generator=seeded(0),
               guidance={"name": "icg", "scale": 2.0}, output_type="np")
    assert np.isfinite(out.images).all() and out.nfe == 6


def test_inpaint_keeps_the_unmasked_latents(components):
    """With the replacement rule the kept half of the final latents is the image's clean latents."""
    ours = quiet(GuidedStableDiffusionInpaintPipeline(**components, requires_safety_checker=False))
    image = _image(5)
    out = ours(PROMPT, image=image, mask_image=_mask(), num_inference_steps=4, guidance="cfgpp", sampler="ddim",
               generator=seeded(0), output_type="latent").images
    pixels = ours.image_processor.preprocess(image)
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    clean = retrieve_latents(ours.vae.encode(pixels), generator=seeded(0)) * ours.vae.config.scaling_factor
    half = out.shape[-1] // 2
    torch.testing.assert_close(out[..., :half], clean[..., :half])
    assert not torch.allclose(out[..., half:], clean[..., half:])


METHODS = [
    {"name": "cfg", "scale": 5.0}, {"name": "cfgpp", "scale": 0.6}, {"name": "apg", "scale": 5.0},
    {"name": "ag", "threshold": 0.9}, {"name": "cfg_zero_star", "scale": 5.0}, {"name": "icg", "scale": 3.0},
    {"name": "tsg"}, {"name": "fkc", "particles": 2},
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m["name"])
def test_every_method_runs_in_img2img_and_inpainting(components, method):
    img2img = quiet(GuidedStableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False))
    inpaint = quiet(GuidedStableDiffusionInpaintPipeline.from_pipe(img2img))
    sampler = "euler_ancestral" if method["name"] == "fkc" else None
    for pipe, extra in ((img2img, {}), (inpaint, {"mask_image": _mask()})):
        out = pipe(PROMPT, image=_image(), strength=0.75, num_inference_steps=4, guidance=method, sampler=sampler,
                   generator=seeded(0), output_type="np", **extra)
        assert out.images.shape == (1, SIZE, SIZE, 3) and np.isfinite(out.images).all()
        assert 0 < out.nfe <= 3 * 2 * max(1, method.get("particles", 1))


def test_strength_one_img2img_differs_from_text_to_image_only_by_the_image(components):
    """At strength 1 the image still enters (noised to the first level): output depends on it."""
    pipe = quiet(GuidedStableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False))
    a = pipe(PROMPT, image=_image(0), strength=1.0, num_inference_steps=3, generator=seeded(0), output_type="np").images
    b = pipe(PROMPT, image=_image(7), strength=1.0, num_inference_steps=3, generator=seeded(0), output_type="np").images
    assert not np.array_equal(a, b)


def test_from_pipe_from_text_to_image_pipelines(components):
    stock = StableDiffusionPipeline(**components, requires_safety_checker=False)
    img2img = GuidedStableDiffusionImg2ImgPipeline.from_pipe(stock)
    inpaint = GuidedStableDiffusionInpaintPipeline.from_pipe(img2img)
    assert img2img.unet is stock.unet and inpaint.vae is stock.vae


def test_bad_inputs_fail_before_any_model_call(components, tmp_path):
    pipe = quiet(GuidedStableDiffusionInpaintPipeline(**components, requires_safety_checker=False))
    img2img = quiet(GuidedStableDiffusionImg2ImgPipeline.from_pipe(pipe))
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="image: cannot read"):
            img2img(PROMPT, image=tmp_path / "missing.png")
        (tmp_path / "junk.png").write_bytes(b"not an image")
        with pytest.raises(ValueError, match="image: cannot read"):
            img2img(PROMPT, image=str(tmp_path / "junk.png"))
        with pytest.raises(ValueError, match="image: an input image is required"):
            img2img(PROMPT)
        with pytest.raises(ValueError, match=r"multiples of 2 .* got 31 x 31"):
            img2img(PROMPT, image=_image(size=31))
        for bad in (0.0, -0.1, 1.5):
            with pytest.raises(ValueError, match=r"strength: must be in \(0, 1\]"):
                img2img(PROMPT, image=_image(), strength=bad)
        with pytest.raises(ValueError, match="runs no step"):
            img2img(PROMPT, image=_image(), strength=0.1, num_inference_steps=5)
        with pytest.raises(ValueError, match="mask_image: its size 16 x 16 must match"):
            pipe(PROMPT, image=_image(), mask_image=_mask(16))
        with pytest.raises(ValueError, match="mask_image: inpainting needs a mask"):
            pipe(PROMPT, image=_image())
    finally:
        handle.remove()
    assert calls == []


# ----------------------------------------------------------------------------- SDXL pair

@pytest.fixture(scope="module")
def xl_components():
    from guidance_engine.pipelines.toy.tiny_models import tiny_sdxl_components

    return tiny_sdxl_components(0)


def test_sdxl_img2img_and_inpaint_cfg_equal_stock(xl_components):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    from guidance_engine.pipelines import GuidedStableDiffusionXLImg2ImgPipeline, GuidedStableDiffusionXLInpaintPipeline

    stock = quiet(StableDiffusionXLImg2ImgPipeline(**xl_components, requires_aesthetics_score=False))
    ours = quiet(GuidedStableDiffusionXLImg2ImgPipeline.from_pipe(stock))
    size = ours.default_sample_size * ours.vae_scale_factor
    kwargs = dict(image=_image(3, size), strength=0.6, num_inference_steps=5, guidance_scale=5.0, output_type="np")
    want = stock(PROMPT, generator=seeded(2), **kwargs).images
    got = ours(PROMPT, generator=seeded(2), **kwargs)
    np.testing.assert_array_equal(got.images, want)
    assert got.nfe == 2 * 3

    stock_inpaint = quiet(StableDiffusionXLInpaintPipeline(**xl_components, requires_aesthetics_score=False))
    ours_inpaint = quiet(GuidedStableDiffusionXLInpaintPipeline.from_pipe(stock_inpaint))
    for strength in (0.6, 1.0):
        kwargs = dict(image=_image(4, size), mask_image=_mask(size), strength=strength, num_inference_steps=5,
                      guidance_scale=5.0, output_type="np")
        want = stock_inpaint(PROMPT, generator=seeded(5), **kwargs).images
        got = ours_inpaint(PROMPT, generator=seeded(5), **kwargs).images
        np.testing.assert_array_equal(got, want)
    out = ours_inpaint(PROMPT, image=_image(4, size), mask_image=_mask(size), num_inference_steps=3,
                       guidance={"name": "cfgpp", "scale": 0.6}, generator=seeded(0), output_type="np")
    assert np.isfinite(out.images).all()
