"""GuidedFluxPipeline (packed latent tokens, embedded guidance, true CFG) against the stock Flux
pipeline on tiny random models."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from guidance_engine.pipelines import GuidedFluxPipeline, load_pipeline
from guidance_engine.pipelines.models import pipeline_class_for
from guidance_engine.pipelines.toy.tiny_models import tiny_flux_components
from conftest import PROMPT, quiet, seeded

CALL = {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 16, "output_type": "latent"}
#: the tiny model's packed latents: 16 x 16 latents in 2 x 2 patches of one channel
PACKED = (1, 64, 4)


@pytest.fixture
def flux_pair():
    stock = quiet(FluxPipeline(**tiny_flux_components(0)))
    return stock, quiet(GuidedFluxPipeline.from_pipe(stock))


def test_default_call_reproduces_stock_flux_bit_for_bit(flux_pair) -> None:
    """Embedded guidance at the stock 3.5, the conditional forward alone, the stock schedule."""
    stock, guided = flux_pair
    want = stock(PROMPT, generator=seeded(0), **CALL).images
    got = guided(PROMPT, generator=seeded(0), **CALL)
    assert torch.equal(got.images, want) and got.nfe == 3
    want = stock(PROMPT, guidance_scale=5.0, generator=seeded(1), **CALL).images
    assert torch.equal(guided(PROMPT, guidance_scale=5.0, generator=seeded(1), **CALL).images, want)


def test_true_cfg_reproduces_stock_flux_bit_for_bit(flux_pair) -> None:
    stock, guided = flux_pair
    kwargs = {"negative_prompt": "blue", "true_cfg_scale": 4.0, **CALL}
    want = stock(PROMPT, generator=seeded(0), **kwargs).images
    got = guided(PROMPT, generator=seeded(0), **kwargs)
    assert torch.equal(got.images, want) and got.nfe == 6
    assert not torch.equal(want, stock(PROMPT, generator=seeded(0), **CALL).images)  # the guidance acts


def test_decoded_images_and_no_guidance_embedding_equal_stock() -> None:
    stock = quiet(FluxPipeline(**tiny_flux_components(0, guidance_embeds=False)))
    guided = quiet(GuidedFluxPipeline.from_pipe(stock))
    call = {**CALL, "output_type": "pt", "negative_prompt": "blue", "true_cfg_scale": 2.0}
    want = stock(PROMPT, generator=seeded(0), **call).images
    assert torch.equal(guided(PROMPT, generator=seeded(0), **call).images, want)


def test_from_pipe_shares_components_and_leaves_stock_working(flux_pair) -> None:
    stock, guided = flux_pair
    assert guided.transformer is stock.transformer and guided.text_encoder_2 is stock.text_encoder_2
    assert guided.vae is stock.vae
    before = stock(PROMPT, generator=seeded(0), **CALL).images
    guided(PROMPT, generator=seeded(0), guidance="apg", **CALL)
    assert torch.equal(stock(PROMPT, generator=seeded(0), **CALL).images, before)


@pytest.mark.parametrize("guidance, sampler", [("apg", None), ("cfgpp", "euler"), ("cfg_zero_star", None)])
def test_methods_run_on_flux(flux_pair, guidance, sampler) -> None:
    _, guided = flux_pair
    out = guided(PROMPT, guidance=guidance, sampler=sampler, generator=seeded(0), **CALL)
    assert tuple(out.images.shape) == PACKED and torch.isfinite(out.images).all()
    assert out.nfe > 3  # the unconditional (empty prompt) branch ran


def test_latents_and_callback_are_packed_as_stock(flux_pair) -> None:
    stock, guided = flux_pair
    latents = torch.randn(PACKED, generator=seeded(3))
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(tuple(tensors["latents"].shape))
        return {"latents": tensors["latents"] * 0.5} if i == 0 else {}

    want = stock(PROMPT, latents=latents, callback_on_step_end=callback, **CALL).images
    got = guided(PROMPT, latents=latents, callback_on_step_end=callback, **CALL).images
    assert torch.equal(got, want) and set(seen) == {PACKED}


@pytest.mark.parametrize("method", ["sag"])
def test_unsupported_alterations_are_refused_before_any_forward(flux_pair, method) -> None:
    _, guided = flux_pair
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the transformer ran")

    guided.transformer.forward = refuse
    with pytest.raises(ValueError, match=rf"method '{method}' .*(not support|do not have)"):
        guided(PROMPT, guidance=method, generator=seeded(0), **CALL)
    assert calls == []


def test_a_saved_flux_directory_loads_the_guided_pipeline(tmp_path) -> None:
    FluxPipeline(**tiny_flux_components(0)).save_pretrained(tmp_path, safe_serialization=True)
    assert pipeline_class_for(tmp_path) is GuidedFluxPipeline
    pipe = quiet(load_pipeline(str(tmp_path)))
    assert isinstance(pipe, GuidedFluxPipeline)
    stock = quiet(FluxPipeline(**tiny_flux_components(0)))
    assert torch.equal(pipe(PROMPT, generator=seeded(0), **CALL).images,
                       stock(PROMPT, generator=seeded(0), **CALL).images)


def test_batches_and_generator_lists_equal_stock(flux_pair) -> None:
    stock, guided = flux_pair
    prompts = ["a red circle", "a blue square"]
    kwargs = {"negative_prompt": ["blue", "red"], "true_cfg_scale": 3.0, "num_images_per_prompt": 2, **CALL}
    want = stock(prompts, generator=[seeded(i) for i in range(4)], **kwargs).images
    got = guided(prompts, generator=[seeded(i) for i in range(4)], **kwargs)
    assert torch.equal(got.images, want) and got.nfe_per_image == [6] * 4


@pytest.mark.parametrize("guidance, extra", [("perp_neg", {"negative_prompt": "blue"}),
                                             ({"name": "fkc", "particles": 2}, {"sampler": "euler_ancestral"})])
def test_other_branches_and_particles_run(flux_pair, guidance, extra) -> None:
    _, guided = flux_pair
    out = guided(PROMPT, guidance=guidance, generator=seeded(0), **extra, **CALL)
    assert tuple(out.images.shape) == PACKED and torch.isfinite(out.images).all()


def test_missing_branches_are_refused_before_any_forward(flux_pair) -> None:
    _, guided = flux_pair
    guided.transformer.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the transformer ran"))
    with pytest.raises(ValueError, match=r"method 'dual_cfg' needs branch"):
        guided(PROMPT, guidance="dual_cfg", generator=seeded(0), **CALL)
