"""The core's own Euler solver on every flow-transformer family: the stock recipe through
``sampler="euler"`` (the engine's step, in float64 coefficients) equals the stock pipeline (its
scheduler's step) within float32 rounding; through ``sampler=None`` it is bit for bit (each family's
own test file)."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from conftest import PROMPT, quiet, seeded


def _flux():
    from diffusers import FluxPipeline
    from guidance_engine.pipelines import GuidedFluxPipeline
    from guidance_engine.pipelines.toy.tiny_models import tiny_flux_components
    return FluxPipeline, GuidedFluxPipeline, tiny_flux_components(0), {
        "negative_prompt": "blue", "true_cfg_scale": 4.0, "max_sequence_length": 16}


def _klein():
    from diffusers import Flux2KleinPipeline
    from guidance_engine.pipelines import GuidedFlux2KleinPipeline
    from guidance_engine.pipelines.toy.tiny_flux2 import tiny_flux2_klein_components
    return Flux2KleinPipeline, GuidedFlux2KleinPipeline, tiny_flux2_klein_components(0), {
        "guidance_scale": 4.0, "max_sequence_length": 32}


def _chroma():
    from diffusers import ChromaPipeline
    from guidance_engine.pipelines import GuidedChromaPipeline
    from guidance_engine.pipelines.toy.tiny_chroma import tiny_chroma_components
    return ChromaPipeline, GuidedChromaPipeline, tiny_chroma_components(0), {
        "negative_prompt": "blue", "guidance_scale": 5.0, "max_sequence_length": 16}


def _qwen_image():
    from diffusers import QwenImagePipeline
    from guidance_engine.pipelines import GuidedQwenImagePipeline
    from guidance_engine.pipelines.toy.tiny_qwen_image import tiny_qwen_image_components
    return QwenImagePipeline, GuidedQwenImagePipeline, tiny_qwen_image_components(0), {
        "negative_prompt": "blue", "true_cfg_scale": 4.0, "max_sequence_length": 16}


def _z_image():
    from diffusers import ZImagePipeline
    from guidance_engine.pipelines import GuidedZImagePipeline
    from guidance_engine.pipelines.toy.tiny_z_image import tiny_z_image_components
    return ZImagePipeline, GuidedZImagePipeline, tiny_z_image_components(0), {
        "negative_prompt": "blue", "guidance_scale": 5.0, "cfg_normalization": 1.2, "max_sequence_length": 64}


FAMILIES: dict[str, Callable[[], tuple[Any, Any, dict[str, Any], dict[str, Any]]]] = {
    "flux": _flux, "flux2_klein": _klein, "chroma": _chroma, "qwen_image": _qwen_image, "z_image": _z_image}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_core_euler_solver_equals_the_stock_scheduler_within_float32_rounding(family) -> None:
    stock_class, guided_class, components, recipe = FAMILIES[family]()
    stock = quiet(stock_class(**components))
    guided = quiet(guided_class.from_pipe(stock))
    call = {"height": 32, "width": 32, "num_inference_steps": 4, "output_type": "latent", **recipe}
    want = stock(prompt=PROMPT, generator=seeded(0), **call).images
    got = guided(prompt=PROMPT, generator=seeded(0), sampler="euler", **call)
    assert got.nfe == 8  # the recipe's two branches ran at every step
    assert torch.allclose(got.images, want, rtol=1e-5, atol=1e-5), (got.images - want).abs().max()
    assert torch.equal(guided(prompt=PROMPT, generator=seeded(0), **call).images, want)
