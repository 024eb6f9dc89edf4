"""The guided pipelines against the stock diffusers pipelines on tiny models built in code."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionPipeline)

from guidance_engine import APG, CFG
from guidance_engine.pipelines import GuidedStableDiffusionPipeline
from guidance_engine.pipelines.toy.tiny_models import save_tiny_sd, tiny_sd_components
from guidance_engine.samplers import NonFiniteLatentsError
from conftest import PROMPT, quiet, seeded

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
              "euler_ancestral": EulerAncestralDiscreteScheduler}


def _set_scheduler(stock, guided, cls):
    # clip_sample=False as in real SD/SDXL configs (the tiny SDXL config comes from an Euler
    # scheduler and lacks the key; the core's solvers never clip x0)
    stock.scheduler = cls.from_config(stock.scheduler.config, clip_sample=False)
    guided.scheduler = stock.scheduler


def _latents(pipe, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("generator", seeded(0))
    return pipe(PROMPT, output_type="latent", **kwargs).images


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_sd_cfg_reproduces_the_stock_pipeline_bit_for_bit(sd_pair, name) -> None:
    stock, guided = sd_pair
    _set_scheduler(stock, guided, SCHEDULERS[name])
    before = copy.deepcopy(stock.scheduler.__dict__.get("_internal_dict"))
    want = _latents(stock, guidance_scale=6.0, negative_prompt="green")
    got = _latents(guided, guidance_scale=6.0, negative_prompt="green")
    assert torch.equal(got, want)
    # the engine's own solver mirroring this scheduler agrees to float tolerance
    own = _latents(guided, guidance_scale=6.0, negative_prompt="green", sampler=name)
    torch.testing.assert_close(own, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)
    # and the stock pipeline is untouched: same config, same result again
    assert stock.scheduler.__dict__.get("_internal_dict") == before
    assert torch.equal(_latents(stock, guidance_scale=6.0, negative_prompt="green"), want)


def test_sd_images_batches_rescale_and_scale_one_match_stock(sd_pair) -> None:
    stock, guided = sd_pair
    def kwargs():
        return dict(num_inference_steps=3, num_images_per_prompt=2, generator=[seeded(i) for i in range(4)],
                    output_type="np")

    for extra in ({"guidance_scale": 7.5, "guidance_rescale": 0.7}, {"guidance_scale": 1.0}):
        want = stock([PROMPT, "two blue squares"], **kwargs(), **extra).images
        got = guided([PROMPT, "two blue squares"], **kwargs(), **extra).images
        assert np.array_equal(got, want)
    out = guided(PROMPT, num_inference_steps=3, guidance_scale=1.0)
    assert out.nfe == 3 and out.images[0].size == (32, 32)  # scale 1: conditional forward only
    assert guided(PROMPT, num_inference_steps=3).nfe == 6


def test_sd_v_prediction_matches_stock() -> None:
    stock = quiet(StableDiffusionPipeline(**tiny_sd_components(0, prediction_type="v_prediction"),
                                          requires_safety_checker=False))
    guided = quiet(GuidedStableDiffusionPipeline.from_pipe(stock))
    want = _latents(stock)
    assert torch.equal(_latents(guided), want)
    torch.testing.assert_close(_latents(guided, sampler="ddim"), want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m"])
def test_sdxl_cfg_reproduces_the_stock_pipeline(sdxl_pair, name) -> None:
    stock, guided = sdxl_pair
    _set_scheduler(stock, guided, SCHEDULERS[name])
    want = _latents(stock, guidance_scale=5.0, negative_prompt="blue")
    assert torch.equal(_latents(guided, guidance_scale=5.0, negative_prompt="blue"), want)
    own = _latents(guided, guidance_scale=5.0, negative_prompt="blue", sampler=name)
    torch.testing.assert_close(own, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


def test_sdxl_images_match_stock(sdxl_pair) -> None:
    stock, guided = sdxl_pair
    want = stock(PROMPT, num_inference_steps=3, generator=seeded(4), output_type="np").images
    got = guided(PROMPT, num_inference_steps=3, generator=seeded(4), output_type="np")
    assert np.array_equal(got.images, want) and got.nfe == 6


def test_from_pretrained_and_from_pipe(tmp_path) -> None:
    path = save_tiny_sd(tmp_path / "tiny")
    guided = quiet(GuidedStableDiffusionPipeline.from_pretrained(path))
    stock = quiet(StableDiffusionPipeline.from_pretrained(path))
    assert torch.equal(_latents(guided), _latents(stock))
    back = GuidedStableDiffusionPipeline.from_pipe(guided)
    assert back.unet is guided.unet and isinstance(back, GuidedStableDiffusionPipeline)
    guided.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("guidance", ["apg", {"name": "cfgpp", "scale": 0.6}, APG(scale=4.0, space="model")])
def test_every_method_runs_through_the_pipeline(sd_pair, guidance) -> None:
    _, guided = sd_pair
    out = guided(PROMPT, num_inference_steps=3, guidance=guidance, generator=seeded(0), output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all() and out.nfe == 6


def test_guidance_scale_with_a_method_name_sets_its_scale(sd_pair) -> None:
    _, guided = sd_pair
    assert guided(PROMPT, num_inference_steps=2, guidance="apg", guidance_scale=3.0).guidance["scale"] == 3.0
    with pytest.raises(ValueError, match="set them on the guidance object itself"):
        guided(PROMPT, num_inference_steps=2, guidance=CFG(scale=2.0), guidance_scale=3.0)


def test_callback_on_step_end_sees_and_replaces_latents_as_in_stock(sd_pair) -> None:
    stock, guided = sd_pair
    seen = []

    def halve_at_step_one(pipe, i, t, kwargs):
        seen.append((type(pipe).__name__, i, sorted(kwargs)))
        return {"latents": kwargs["latents"] * 0.5} if i == 1 else {}

    args = dict(callback_on_step_end=halve_at_step_one, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    got = _latents(guided, **args)
    assert seen[1] == ("GuidedStableDiffusionPipeline", 1, ["latents", "prompt_embeds"]) and len(seen) == 4
    stock_args = dict(callback_on_step_end=halve_at_step_one, callback_on_step_end_tensor_inputs=["latents"])
    assert torch.equal(got, _latents(stock, **stock_args))


def test_a_callback_writing_the_conditioning_changes_the_later_steps(sd_pair) -> None:
    """The stacked conditioning is reused from step to step only while its tensors stay the same:
    a callback that replaces ``prompt_embeds``, or writes it in place, steers the later steps,
    and both ways alike."""
    _, guided = sd_pair

    def replace(pipe, i, t, kwargs):
        return {"prompt_embeds": kwargs["prompt_embeds"] * 0.5} if i == 1 else {}

    def write_in_place(pipe, i, t, kwargs):
        if i == 1:
            kwargs["prompt_embeds"].mul_(0.5)
        return {}

    inputs = dict(callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    plain = _latents(guided)
    replaced = _latents(guided, callback_on_step_end=replace, **inputs)
    written = _latents(guided, callback_on_step_end=write_in_place, **inputs)
    assert not torch.equal(replaced, plain)
    assert torch.equal(written, replaced)


def _count_unet_calls(pipe):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize("kwargs, message", [
    (dict(guidance="cfg", guidance_scale=-2.0), r"cfg: parameter 'scale' must be \[0, 100\], got -2.0"),
    (dict(guidance="nope"), r"unknown method 'nope'"),
    (dict(guidance="cfgpp", sampler="scheduler"), r"sampler: method 'cfgpp' renoises"),
    (dict(sampler="lms"), r"sampler: must be one of"),
    (dict(height=30), r"divisible by 8"),
    (dict(ip_adapter_image="x.png"), r"unsupported argument\(s\) \['ip_adapter_image'\]"),
    (dict(generator=[seeded(0), seeded(1)]), r"generator: a list needs one generator per image \(1\), got 2"),
])
def test_bad_input_fails_before_any_model_call(sd_pair, kwargs, message) -> None:
    _, guided = sd_pair
    calls = _count_unet_calls(guided)
    with pytest.raises(ValueError, match=message):
        guided(PROMPT, num_inference_steps=2, **kwargs)
    assert calls == []


def test_nan_latents_stop_the_pipeline_naming_the_failing_step(sd_pair) -> None:
    """Non-finite latents are noted on the device at every step and read once, after the last one
    (no host sync per step): the error names the first failing step, the run has ended."""
    _, guided = sd_pair

    def poison(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * float("nan")} if i == 1 else {}

    seen = []
    with pytest.raises(NonFiniteLatentsError, match=r"step 3 of 4 .* method 'cfg'"):
        guided(PROMPT, num_inference_steps=4, callback_on_step_end=lambda p, i, t, k: (seen.append(i), poison(p, i, t, k))[1])
    assert seen == [0, 1, 2, 3]


def test_pipeline_object_is_reusable_and_not_mutated_by_calls(sd_pair) -> None:
    _, guided = sd_pair
    first = _latents(guided, guidance="apg")
    _latents(guided, guidance="cfgpp", num_inference_steps=7)
    assert torch.equal(_latents(guided, guidance="apg"), first)
    assert guided.scheduler.num_inference_steps is None


def test_fkc_particles_through_the_pipeline(sd_pair) -> None:
    _, guided = sd_pair
    fkc = {"name": "fkc", "scale": 3.0, "particles": 3}
    best = guided([PROMPT, "two blue squares"], num_inference_steps=4, guidance=fkc, sampler="euler_ancestral",
                  generator=[seeded(1), seeded(2)], output_type="latent")
    assert best.images.shape[0] == 2 and best.nfe_per_image == [24, 24]
    everything = guided([PROMPT, "two blue squares"], num_inference_steps=4, guidance=fkc,
                        sampler="euler_ancestral", generator=[seeded(1), seeded(2)], output_type="latent",
                        particle_output="all")
    assert everything.images.shape[0] == 6
    weights = everything.guidance_state.log_weights.view(2, 3)
    # the default output is the particle of each group of the same run drawn by its final weight,
    # from the output stream of the method's seed
    from guidance_engine.methods.fkc import draw_by_weight, output_seed

    chosen = draw_by_weight(weights, torch.Generator().manual_seed(output_seed(0)))
    picked = everything.images.view(2, 3, *everything.images.shape[1:])[torch.arange(2), chosen]
    assert torch.equal(picked, best.images)
    with pytest.warns(FutureWarning, match="particle_output='best' is now called 'draw'"):
        old_name = guided([PROMPT, "two blue squares"], num_inference_steps=4, guidance=fkc,
                          sampler="euler_ancestral", generator=[seeded(1), seeded(2)], output_type="latent",
                          particle_output="best")
    assert torch.equal(old_name.images, best.images)
    with pytest.raises(ValueError, match=r"particle_output: must be one of 'draw', 'all', got 'first'"):
        guided(PROMPT, num_inference_steps=2, guidance=fkc, sampler="euler_ancestral", particle_output="first")
    with pytest.raises(ValueError, match="needs a stochastic sampler"):
        guided(PROMPT, num_inference_steps=2, guidance=fkc, sampler="ddim")


def test_fkc_product_of_experts_takes_a_second_prompt(sd_pair) -> None:
    _, guided = sd_pair
    poe = {"name": "fkc", "target": "product", "scale": 1.0, "particles": 2}
    out = guided(PROMPT, product_prompt="two blue squares", num_inference_steps=3, guidance=poe,
                 sampler="euler_ancestral", generator=seeded(0), output_type="latent")
    assert out.images.shape[0] == 1 and out.nfe_per_image == [12]  # 2 particles x 2 experts x 3 steps
    calls = _count_unet_calls(guided)
    with pytest.raises(ValueError, match=r"needs branch\(es\) \['cond2'\]"):
        guided(PROMPT, num_inference_steps=2, guidance=poe, sampler="euler_ancestral")
    assert calls == []
