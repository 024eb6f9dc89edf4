"""DDIM inversion with CFG and CFG++: the official formulas, exact round trips, the pipeline method."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPT, ToyModel, quiet
from diffusers import DDIMScheduler

from guidance_engine.methods.cfg import CFG
from guidance_engine.methods.cfgpp import CFGPlusPlus
from guidance_engine.pipelines import GuidedStableDiffusionImg2ImgPipeline, GuidedStableDiffusionPipeline
from guidance_engine.pipelines.toy.tiny_models import TINY_IMAGE_SIZE, tiny_sd_components
from guidance_engine.samplers import sample
from guidance_engine.samplers.inversion import invert

SCHEDULER = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)


class ConstantModel:
    """Predictions that do not depend on x or t: DDIM inversion is then exact."""

    def __call__(self, x, timestep, requests):
        torch.manual_seed(0)
        base = {"cond": torch.randn(x.shape[1:]), "uncond": torch.randn(x.shape[1:])}
        return {name: base[name].expand_as(x if rows is None else x[rows]).clone() for name, rows in requests}


def _official_inversion(model, z0, scale, plus_plus, steps):
    """The official CFG++ code's loop (latent_diffusion.py, InversionDDIM[CFGpp].inversion), written
    out with the scheduler's levels (without its one-index shift of alphas_cumprod)."""
    sched = DDIMScheduler.from_config(SCHEDULER.config)
    sched.set_timesteps(steps)
    skip = sched.config.num_train_timesteps // steps

    def alpha(t):
        return sched.alphas_cumprod[t] if t >= 0 else sched.final_alpha_cumprod

    zt = z0.double()
    for t in reversed(sched.timesteps.tolist()):
        at, at_prev = alpha(t).double(), alpha(t - skip).double()
        out = model(zt.float(), torch.tensor(t), [("uncond", None), ("cond", None)])
        noise_uc, noise_c = out["uncond"].double(), out["cond"].double()
        noise_pred = noise_uc + scale * (noise_c - noise_uc)
        z0t = (zt - (1 - at_prev).sqrt() * (noise_uc if plus_plus else noise_pred)) / at_prev.sqrt()
        zt = at.sqrt() * z0t + (1 - at).sqrt() * noise_pred
    return zt.float()


@pytest.mark.parametrize("plus_plus", [False, True], ids=["cfg", "cfgpp"])
def test_inversion_follows_the_official_update(plus_plus):
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    guide = CFGPlusPlus(scale=0.6) if plus_plus else CFG(scale=3.0)
    got = invert(ToyModel(), z0, guide, scheduler=SCHEDULER, num_steps=10, progress=False)
    want = _official_inversion(ToyModel(), z0, guide.scale, plus_plus, 10)
    torch.testing.assert_close(got.latents, want, rtol=1e-5, atol=1e-5)
    assert got.nfe == 20 and got.num_steps == 10


@pytest.mark.parametrize("guide", [CFG(scale=7.5), CFGPlusPlus(scale=0.6)], ids=["cfg", "cfgpp"])
def test_round_trip_is_exact_when_predictions_do_not_depend_on_x(guide):
    """The inversion step is the exact inverse of the DDIM sampler's step (same split)."""
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    inverted = invert(ConstantModel(), z0, guide, scheduler=SCHEDULER, num_steps=6, progress=False)
    back = sample(ConstantModel(), inverted.latents, guide, scheduler=SCHEDULER, num_steps=6, prediction_type="epsilon",
                  sampler="ddim", progress=False)
    torch.testing.assert_close(back.x, z0, rtol=1e-5, atol=1e-5)


def test_fkc_has_no_inversion():
    from guidance_engine.registry import resolve_guidance

    with pytest.raises(ValueError, match="has no inversion"):
        invert(ToyModel(), torch.zeros(1, 4, 8, 8), resolve_guidance({"name": "fkc", "particles": 2}),
               scheduler=SCHEDULER, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return quiet(GuidedStableDiffusionPipeline(**tiny_sd_components(0), requires_safety_checker=False))


def _image():
    rng = np.random.default_rng(0)
    pixels = np.broadcast_to(rng.integers(0, 255, 3).astype(np.uint8), (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)).copy()
    pixels[8:24, 8:24] = rng.integers(0, 255, 3)
    return pixels


@pytest.fixture(scope="module")
def default_pipe():
    from guidance_engine.pipelines import default_model_path

    return quiet(GuidedStableDiffusionPipeline.from_pretrained(str(default_model_path())))


@pytest.mark.parametrize("method", ["cfg", "cfgpp"])
def test_invert_then_regenerate_reconstructs_on_the_default_model(default_pipe, method):
    from guidance_engine.pipelines.toy import shapes

    prompt = "a large red circle on a blue background, center"
    image = shapes.render({"shape": "circle", "color": "red", "background": "blue", "size": "large",
                           "position": "center", "count": "one"})
    scale = 0.6 if method == "cfgpp" else 2.0
    inv = default_pipe.invert(image, prompt, guidance=method, guidance_scale=scale, num_inference_steps=10)
    assert inv.latents.shape == inv.image_latents.shape and inv.nfe == 20
    back = default_pipe(prompt, latents=inv.latents, guidance=method, guidance_scale=scale, sampler="ddim",
                        num_inference_steps=10, output_type="np").images[0]
    other = default_pipe(prompt, latents=torch.randn_like(inv.latents), guidance=method, guidance_scale=scale,
                         sampler="ddim", num_inference_steps=10, output_type="np").images[0]
    target = image / 255.0
    error, baseline = np.mean((back - target) ** 2), np.mean((other - target) ** 2)
    assert error < 0.5 * baseline, (error, baseline)


def test_invert_on_the_img2img_pipeline_and_bad_inputs(pipe, tmp_path):
    img2img = GuidedStableDiffusionImg2ImgPipeline.from_pipe(pipe)
    inv = img2img.invert(_image(), [PROMPT, "a blue square"], num_inference_steps=3)
    assert inv.latents.shape[0] == 2 and inv.guidance["name"] == "cfgpp"
    with pytest.raises(ValueError, match="image: cannot read"):
        pipe.invert(tmp_path / "nope.png", PROMPT)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe.invert(np.zeros((31, 31, 3), np.uint8), PROMPT)
    with pytest.raises(ValueError, match="lambda|scale"):
        pipe.invert(_image(), PROMPT, guidance="cfgpp", guidance_scale=3.0)


def test_sdxl_invert_is_the_core_inversion_of_its_conditions_and_regenerates(tmp_path):
    """SDXL: the branches are the stock encodings (both encoders, pooled embeddings, time ids at the
    image's size, the pipeline's own null condition), the image is the posterior mean encoded as
    the inverse of the pipeline's decoding; regenerate is the DDIM text-to-image call from there."""
    from guidance_engine.pipelines import GuidedStableDiffusionXLImg2ImgPipeline, GuidedStableDiffusionXLPipeline
    from guidance_engine.pipelines.branches import NetworkBranches
    from guidance_engine.pipelines.toy.tiny_models import tiny_sdxl_components

    xl = quiet(GuidedStableDiffusionXLPipeline(**tiny_sdxl_components(0)))
    image, second = _image(), "a blue square"
    inv = xl.invert(image, PROMPT, prompt_2=second, num_inference_steps=3)
    assert inv.nfe == 6 and inv.guidance["name"] == "cfgpp"

    size = (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    cond, uncond, pooled, uncond_pooled = xl.encode_prompt(PROMPT, prompt_2=second, device="cpu",
                                                           num_images_per_prompt=1, do_classifier_free_guidance=True)
    time_ids = xl._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype,
                                    text_encoder_projection_dim=xl.text_encoder_2.config.projection_dim)
    branches = NetworkBranches(xl.unet, {
        "cond": {"encoder_hidden_states": cond, "text_embeds": pooled, "time_ids": time_ids},
        "uncond": {"encoder_hidden_states": uncond, "text_embeds": uncond_pooled, "time_ids": time_ids}})
    pixels = xl.image_processor.preprocess(image[None].astype(np.float32) / 255.0)
    clean = xl.vae.encode(pixels).latent_dist.mean * xl.vae.config.scaling_factor  # no latents_mean/std here
    assert getattr(xl.vae.config, "latents_mean", None) is None
    torch.testing.assert_close(inv.image_latents, clean)
    want = invert(branches, clean, CFGPlusPlus(scale=0.6), scheduler=xl.scheduler, num_steps=3, progress=False)
    torch.testing.assert_close(inv.latents, want.latents)

    again = xl.regenerate(PROMPT, inv, prompt_2=second, output_type="latent").images
    direct = xl(PROMPT, prompt_2=second, latents=inv.latents, num_inference_steps=3, guidance="cfgpp",
                guidance_scale=0.6, sampler="ddim", eta=0.0, output_type="latent").images
    torch.testing.assert_close(again, direct, rtol=0, atol=0)
    img2img = GuidedStableDiffusionXLImg2ImgPipeline.from_pipe(xl)  # subclasses invert the same way
    torch.testing.assert_close(img2img.invert(image, PROMPT, prompt_2=second, num_inference_steps=3).latents,
                               inv.latents)
    with pytest.raises(ValueError, match=r"invert: unexpected argument\(s\) \['prompt_2'\]"):
        quiet(GuidedStableDiffusionPipeline(**tiny_sd_components(0), requires_safety_checker=False)).invert(
            image, PROMPT, prompt_2=second)
