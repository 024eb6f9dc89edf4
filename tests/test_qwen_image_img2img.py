"""GuidedQwenImageImg2ImgPipeline against the stock QwenImageImg2ImgPipeline on tiny random models:
the stock step-count rule (the first int(n - n * strength) steps skipped), the one-frame VAE encoding
with its per-channel normalisation, the posterior sample and the noise drawn in the stock order,
the packed ``latents=`` start, the stock true CFG with its renorm."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import QwenImageImg2ImgPipeline, QwenImagePipeline

from guidance_engine.pipelines.qwen_image_img2img import GuidedQwenImageImg2ImgPipeline
from guidance_engine.pipelines.toy.tiny_qwen_image import save_tiny_qwen_image, tiny_qwen_image_components
from guidance_engine.samplers.loop import start_index
from conftest import PROMPT, quiet, seeded

STEPS = 4
CALL = {"height": 32, "width": 32, "num_inference_steps": STEPS, "max_sequence_length": 16, "output_type": "latent"}
#: the tiny model's packed latents: 16 x 16 latents of 4 channels in 2 x 2 patches
PACKED = (1, 64, 16)
TRUE_CFG = {"negative_prompt": "blue", "true_cfg_scale": 4.0}


def _image(seed: int = 5, batch: int = 1) -> torch.Tensor:
    return torch.rand((batch, 3, 32, 32), generator=seeded(seed))


def _steps_run(strength: float) -> int:
    return STEPS - start_index(STEPS, strength, rule="skip")


@pytest.fixture
def pair():
    stock = quiet(QwenImageImg2ImgPipeline(**tiny_qwen_image_components(0)))
    return stock, quiet(GuidedQwenImageImg2ImgPipeline.from_pipe(stock))


def forbid_model_calls(pipe) -> list[str]:
    """Replace every model's forward (and the VAE's encoder) by one that records and raises."""
    calls: list[str] = []

    def refusing(name):
        def forward(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"the {name} ran")
        return forward

    pipe.transformer.forward = refusing("transformer")
    pipe.text_encoder.forward = refusing("text encoder")
    pipe.vae.encode = refusing("vae")
    return calls


def test_the_stock_signature_is_kept() -> None:
    """The stock arguments in the stock order with the stock defaults (``true_cfg_scale`` None
    standing for the stock 4.0, so that a method keeps its own scale unless it is given)."""
    stock = inspect.signature(QwenImageImg2ImgPipeline.__call__).parameters
    ours = inspect.signature(GuidedQwenImageImg2ImgPipeline.__call__).parameters
    assert list(ours)[:len(stock)] == list(stock)
    changed = {name for name in stock if ours[name].default != stock[name].default}
    assert changed == {"true_cfg_scale"} and stock["true_cfg_scale"].default == 4.0
    assert ours["strength"].default == stock["strength"].default == 0.6


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_default_call_reproduces_stock_bit_for_bit(pair, strength) -> None:
    """No negative prompt: the conditional alone. At 4 steps, 0.6 runs 3 steps by the stock rule
    (SD's would run 2), 0.3 runs 2, 1.0 all 4 from pure noise."""
    stock, guided = pair
    want = stock(PROMPT, image=_image(), strength=strength, generator=seeded(0), **CALL).images
    got = guided(PROMPT, image=_image(), strength=strength, generator=seeded(0), **CALL)
    assert torch.equal(got.images, want) and tuple(want.shape) == PACKED
    assert got.nfe == _steps_run(strength) == {0.3: 2, 0.6: 3, 1.0: 4}[strength]


def test_the_input_image_is_the_start(pair) -> None:
    """Below strength 1 another image gives another output; at 1 the image does not matter."""
    _, guided = pair
    outputs = {(seed, strength): guided(PROMPT, image=_image(seed), strength=strength, generator=seeded(0),
                                        **CALL).images
               for seed in (5, 6) for strength in (0.6, 1.0)}
    assert not torch.equal(outputs[5, 0.6], outputs[6, 0.6])
    assert torch.equal(outputs[5, 1.0], outputs[6, 1.0])


def test_true_cfg_reproduces_stock_bit_for_bit(pair) -> None:
    stock, guided = pair
    want = stock(PROMPT, image=_image(), generator=seeded(0), **TRUE_CFG, **CALL).images
    got = guided(PROMPT, image=_image(), generator=seeded(0), **TRUE_CFG, **CALL)
    assert torch.equal(got.images, want) and got.nfe == 2 * _steps_run(0.6)
    assert got.guidance["name"] == "cfg_renorm" and got.guidance["scale"] == 4.0
    assert not torch.equal(want, stock(PROMPT, image=_image(), generator=seeded(0), **CALL).images)  # CFG acts
    # the stock default scale (4) with a negative prompt
    default = guided(PROMPT, image=_image(), negative_prompt="blue", generator=seeded(0), **CALL)
    assert torch.equal(default.images, want)


@pytest.mark.parametrize("images", [1, 2])
def test_decoded_batches_and_generator_lists_equal_stock(pair, images) -> None:
    """Two prompts, two outputs each, one generator per output, decoded ("pt"): one input image
    for all, or one per prompt (each encoded with its own generator, then repeated, as stock)."""
    stock, guided = pair
    kwargs = {**CALL, "output_type": "pt", "negative_prompt": ["blue", "red"], "true_cfg_scale": 3.0,
              "num_images_per_prompt": 2, "strength": 0.7}
    prompts = ["a red circle", "a blue square"]
    want = stock(prompts, image=_image(batch=images), generator=[seeded(i) for i in range(4)], **kwargs).images
    got = guided(prompts, image=_image(batch=images), generator=[seeded(i) for i in range(4)], **kwargs)
    assert torch.equal(got.images, want) and tuple(want.shape) == (4, 3, 32, 32)
    assert got.nfe_per_image == [2 * _steps_run(0.7)] * 4


def test_given_latents_are_the_noised_start_and_callbacks_see_them_packed(pair) -> None:
    stock, guided = pair
    start = torch.randn(PACKED, generator=seeded(7))
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape)))
        return {"latents": tensors["latents"] * 0.5} if i == 0 else {}

    kwargs = {"latents": start, "strength": 0.5, "callback_on_step_end": callback, **TRUE_CFG, **CALL}
    want = stock(PROMPT, image=_image(), **kwargs).images
    got = guided(PROMPT, image=_image(), **kwargs)
    assert torch.equal(got.images, want) and got.nfe == 4
    assert seen == [(0, PACKED), (1, PACKED)] * 2  # the stock run's steps, then ours, numbered from 0


def test_latents_given_as_the_image_are_used_as_stock(pair) -> None:
    """A tensor with the VAE's z_dim channels is normalised latents: neither encoded nor normalised."""
    stock, guided = pair
    latents = torch.randn((1, 4, 16, 16), generator=seeded(8))
    want = stock(PROMPT, image=latents, generator=seeded(0), **CALL).images
    got = guided(PROMPT, image=latents, generator=seeded(0), **CALL).images
    assert torch.equal(got, want)
    assert not torch.equal(want, stock(PROMPT, image=latents * 2, generator=seeded(0), **CALL).images)


def test_the_output_keeps_the_input_size_and_methods_run(pair) -> None:
    _, guided = pair
    image = torch.rand((1, 3, 48, 32), generator=seeded(1))
    call = {k: v for k, v in CALL.items() if k not in ("height", "width")}
    out = guided(PROMPT, image=image, guidance="apg", generator=seeded(0), **call)
    assert tuple(out.images.shape) == (1, 96, 16) and torch.isfinite(out.images).all()
    assert out.nfe == 2 * _steps_run(0.6)  # the unconditional (empty prompt) branch ran at every step


@pytest.mark.parametrize("guidance, extra, branches", [
    ("perp_neg", {"negative_prompt": "blue"}, 3),
    ({"name": "fkc", "particles": 2}, {"sampler": "euler_ancestral"}, 4),
])
def test_other_branches_and_particles_run_from_the_image(pair, guidance, extra, branches) -> None:
    """perp_neg: cond, empty and negative prompt a step; fkc: 2 particles of cond + uncond, each
    particle starting from the one input image."""
    _, guided = pair
    out = guided(PROMPT, image=_image(), guidance=guidance, generator=seeded(0), **extra, **CALL)
    assert tuple(out.images.shape) == PACKED and torch.isfinite(out.images).all()
    assert out.nfe == branches * _steps_run(0.6)


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.2, True, "0.5"])
def test_bad_strength_is_refused_before_any_model_call(pair, strength) -> None:
    _, guided = pair
    calls = forbid_model_calls(guided)
    with pytest.raises(ValueError, match=r"strength: must be in \(0, 1\]"):
        guided(PROMPT, image=_image(), strength=strength, generator=seeded(0), **CALL)
    assert calls == []


def test_a_missing_image_and_fkc_prior_weighting_are_refused_before_any_model_call(pair) -> None:
    _, guided = pair
    calls = forbid_model_calls(guided)
    with pytest.raises(ValueError, match=r"image: an input image is required"):
        guided(PROMPT, generator=seeded(0), **CALL)
    with pytest.raises(ValueError, match=r"starts from a noised image"):
        guided(PROMPT, image=_image(), guidance={"name": "fkc", "particles": 2, "target": "anneal", "scale": 2.0},
               sampler="euler_ancestral", generator=seeded(0), **CALL)
    assert calls == []


@pytest.mark.parametrize("source", [QwenImagePipeline, QwenImageImg2ImgPipeline])
def test_from_pipe_shares_components_and_leaves_stock_working(source) -> None:
    components = tiny_qwen_image_components(0)
    stock = quiet(source(**components))
    guided = quiet(GuidedQwenImageImg2ImgPipeline.from_pipe(stock))
    for name in ("transformer", "text_encoder", "vae", "tokenizer"):
        assert getattr(guided, name) is components[name]
    reference = quiet(QwenImageImg2ImgPipeline.from_pipe(stock))
    before = reference(PROMPT, image=_image(), generator=seeded(0), **TRUE_CFG, **CALL).images
    got = guided(PROMPT, image=_image(), generator=seeded(0), **TRUE_CFG, **CALL).images
    guided(PROMPT, image=_image(), guidance="apg", generator=seeded(0), **CALL)
    after = reference(PROMPT, image=_image(), generator=seeded(0), **TRUE_CFG, **CALL).images
    assert torch.equal(got, before) and torch.equal(after, before)


def test_a_saved_stock_directory_loads_the_guided_pipeline(tmp_path, pair) -> None:
    stock, _ = pair
    save_tiny_qwen_image(tmp_path)
    pipe = quiet(GuidedQwenImageImg2ImgPipeline.from_pretrained(tmp_path))
    call = {**CALL, **TRUE_CFG, "output_type": "pt"}
    assert torch.equal(pipe(PROMPT, image=_image(), generator=seeded(0), **call).images,
                       stock(PROMPT, image=_image(), generator=seeded(0), **call).images)
