"""GuidedStableDiffusion3Pipeline (flow matching) against the stock SD3 pipeline on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from guidance_engine.pipelines import GuidedStableDiffusion3Pipeline
from guidance_engine.pipelines.toy.tiny_models import tiny_sd3_components
from conftest import PROMPT, quiet, seeded


@pytest.fixture
def sd3_pair():
    stock = quiet(StableDiffusion3Pipeline(**tiny_sd3_components(0)))
    return stock, quiet(GuidedStableDiffusion3Pipeline.from_pipe(stock))


def test_cfg_reproduces_stock_sd3_bit_for_bit(sd3_pair) -> None:
    stock, guided = sd3_pair
    want = stock(PROMPT, negative_prompt="blue", num_inference_steps=4, generator=seeded(0), output_type="np").images
    got = guided(PROMPT, negative_prompt="blue", num_inference_steps=4, generator=seeded(0), output_type="np")
    assert np.array_equal(got.images, want) and got.nfe == 8
    latents = stock(PROMPT, num_inference_steps=4, generator=seeded(1), output_type="latent").images
    own = guided(PROMPT, num_inference_steps=4, generator=seeded(1), output_type="latent", sampler="euler").images
    torch.testing.assert_close(own, latents, atol=1e-5 * float(latents.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("guidance, sampler", [("cfgpp", None), ("apg", None), ("cfg_zero_star", None),
                                               ({"name": "fkc", "particles": 2}, "euler_ancestral"),
                                               ({"name": "ag", "threshold": 0.0}, None)])
def test_methods_run_on_the_flow_model(sd3_pair, guidance, sampler) -> None:
    _, guided = sd3_pair
    out = guided(PROMPT, num_inference_steps=4, guidance=guidance, sampler=sampler, generator=seeded(0),
                 output_type="np")
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_unsupported_arguments_are_refused(sd3_pair) -> None:
    _, guided = sd3_pair
    calls = []
    guided.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    with pytest.raises(ValueError, match=r"method .tsg. perturbs the time-step embedding, which is not available"):
        guided(PROMPT, num_inference_steps=2, guidance={"name": "tsg", "t_min": 0.0})
    assert calls == []
    with pytest.raises(ValueError, match=r"unsupported argument\(s\) \['ip_adapter_image'\]"):
        guided(PROMPT, num_inference_steps=2, ip_adapter_image=np.zeros((8, 8, 3)))


def test_a_saved_stock_directory_is_detected_and_loads_the_guided_pipeline(tmp_path) -> None:
    """What the CLI and batch do with an SD3 checkpoint: model_index.json names the family."""
    from guidance_engine.pipelines.models import pipeline_class_for

    StableDiffusion3Pipeline(**tiny_sd3_components(0)).save_pretrained(tmp_path, safe_serialization=True)
    assert pipeline_class_for(tmp_path) is GuidedStableDiffusion3Pipeline
    absent = {"text_encoder_3": None, "tokenizer_3": None}  # the tiny model has no T5 (nor has stock loading)
    pipe = quiet(GuidedStableDiffusion3Pipeline.from_pretrained(tmp_path, **absent))
    stock = quiet(StableDiffusion3Pipeline.from_pretrained(tmp_path, **absent))
    call = {"num_inference_steps": 2, "output_type": "latent", "height": 32, "width": 32}
    assert torch.equal(pipe(PROMPT, generator=seeded(0), **call).images,
                       stock(PROMPT, generator=seeded(0), **call).images)
