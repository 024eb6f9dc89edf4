"""GuidedZImagePipeline (per-sample lists of latents and unpadded text embeddings, one batched CFG
forward, the stock norm cap and truncation) against the stock ZImagePipeline on tiny random models."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImagePipeline

from guidance_engine import resolve_guidance
from guidance_engine.pipelines.messages import PromptTruncatedWarning
from guidance_engine.pipelines.models import pipeline_class_for
from guidance_engine.pipelines.toy.tiny_z_image import save_tiny_z_image, tiny_z_image_components
from guidance_engine.pipelines.z_image import GuidedZImagePipeline
from conftest import PROMPT, quiet, seeded

CALL = {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 64, "output_type": "latent"}
#: one image's latents: 4 channels at 16 x 16 (32 x 32 pixels)
LATENTS = (1, 4, 16, 16)


@pytest.fixture
def z_pair():
    stock = quiet(ZImagePipeline(**tiny_z_image_components(0)))
    return stock, quiet(GuidedZImagePipeline.from_pipe(stock))


def forwards(pipe) -> tuple[list[tuple[int, ...]], object]:
    """The caption lengths of every transformer forward, sample by sample in forward order (the
    rows a forward batches; recorded by a hook, which the caller removes)."""
    seen: list[tuple[int, ...]] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args: seen.append(tuple(len(caption) for caption in args[2])))
    return seen, handle


def refuse_forwards(pipe) -> list[int]:
    calls: list[int] = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the transformer ran")

    pipe.transformer.forward = refuse
    return calls


def test_default_call_reproduces_stock_z_image_bit_for_bit(z_pair) -> None:
    """The stock guidance_scale 5: one batched forward of cond + uncond rows per step."""
    stock, guided = z_pair
    stock_rows, handle = forwards(stock)
    want = stock(PROMPT, generator=seeded(0), **CALL).images
    handle.remove()
    guided_rows, handle = forwards(guided)
    got = guided(PROMPT, generator=seeded(0), **CALL)
    handle.remove()
    assert torch.equal(got.images, want) and got.nfe == 6
    cond, uncond = stock_rows[0]
    assert guided_rows == stock_rows == [(cond, uncond)] * 3 and cond > uncond  # the prompt, then the empty one


def test_no_cfg_at_scale_zero_is_the_conditional_alone(z_pair) -> None:
    stock, guided = z_pair
    want = stock(PROMPT, guidance_scale=0.0, generator=seeded(1), **CALL).images
    got = guided(PROMPT, guidance_scale=0.0, generator=seeded(1), **CALL)
    assert torch.equal(got.images, want) and got.nfe == 3
    assert not torch.equal(want, stock(PROMPT, generator=seeded(1), **CALL).images)  # the stock CFG acts


@pytest.mark.parametrize("normalization, scale", [(1.0, 5.0), (True, 3.7), (0.8, 2.0)])
def test_cfg_normalization_reproduces_stock_and_caps_the_norm(z_pair, normalization, scale) -> None:
    stock, guided = z_pair
    kwargs = {"guidance_scale": scale, **CALL}
    want = stock(PROMPT, cfg_normalization=normalization, generator=seeded(0), **kwargs).images
    got = guided(PROMPT, cfg_normalization=normalization, generator=seeded(0), **kwargs)
    assert torch.equal(got.images, want) and got.nfe == 6
    assert not torch.equal(want, stock(PROMPT, generator=seeded(0), **kwargs).images)  # the cap acted


def test_cfg_truncation_reproduces_stock_and_skips_the_unconditional_forward(z_pair) -> None:
    stock, guided = z_pair
    kwargs = {"cfg_truncation": 0.1, **CALL}
    stock_rows, handle = forwards(stock)
    want = stock(PROMPT, generator=seeded(0), **kwargs).images
    handle.remove()
    # the stock rule on the stock schedule: CFG where (1000 - t) / 1000 <= 0.1, the first step only
    guided_steps = sum(v <= 0.1 for v in ((1000 - stock.scheduler.timesteps.float()) / 1000).tolist())
    guided_rows, handle = forwards(guided)
    got = guided(PROMPT, generator=seeded(0), **kwargs)
    handle.remove()
    assert guided_steps == 1 and torch.equal(got.images, want)
    assert got.nfe == 3 + guided_steps and guided_rows == stock_rows
    assert [len(rows) for rows in guided_rows] == [2, 1, 1]  # the unconditional forward skipped
    assert not torch.equal(want, stock(PROMPT, generator=seeded(0), **CALL).images)  # the truncation acted


def test_batches_with_normalization_and_truncation_equal_stock(z_pair) -> None:
    """2 prompts x 2 images, one generator per image, a negative prompt each, both stock options
    (fresh lists for each call: the stock pipeline writes templated prompts into them)."""
    stock, guided = z_pair
    kwargs = {"num_images_per_prompt": 2, "cfg_normalization": 1.0, "cfg_truncation": 0.2, **CALL}
    want = stock(["a red circle", "a blue square"], negative_prompt=["blue", "red"],
                 generator=[seeded(i) for i in range(4)], **kwargs).images
    prompts, negatives = ["a red circle", "a blue square"], ["blue", "red"]
    got = guided(prompts, negative_prompt=negatives, generator=[seeded(i) for i in range(4)], **kwargs)
    assert torch.equal(got.images, want) and got.nfe_per_image == [5] * 4  # CFG at the first two steps
    assert prompts == ["a red circle", "a blue square"] and negatives == ["blue", "red"]  # the caller's lists


def test_decoded_images_with_a_dynamic_shift_equal_stock() -> None:
    """output_type "pt" (the stock VAE decode), a negative prompt, a schedule that ``mu`` shifts."""
    stock = quiet(ZImagePipeline(**tiny_z_image_components(0, dynamic_shift=True)))
    guided = quiet(GuidedZImagePipeline.from_pipe(stock))
    call = {**CALL, "output_type": "pt", "negative_prompt": "blue", "guidance_scale": 2.0}
    want = stock(PROMPT, generator=seeded(0), **call).images
    got = guided(PROMPT, generator=seeded(0), **call).images
    assert tuple(got.shape) == (1, 3, 32, 32) and torch.equal(got, want)


def test_latents_and_callback_are_as_stock(z_pair) -> None:
    """Given latents; a callback that halves the latents after the first step and reads and
    replaces the prompt embeddings (the stock per-image list) after the second."""
    stock, guided = z_pair
    latents = torch.randn(LATENTS, generator=seeded(3))
    seen = {"stock": [], "guided": []}

    def callback(name):
        def on_step(pipe, i, t, tensors):
            seen[name].append((tuple(tensors["latents"].shape), [tuple(e.shape) for e in tensors["prompt_embeds"]]))
            if i == 0:
                return {"latents": tensors["latents"] * 0.5}
            return {"prompt_embeds": [e * 0.5 for e in tensors["prompt_embeds"]]} if i == 1 else {}
        return on_step

    inputs = ["latents", "prompt_embeds"]
    want = stock(PROMPT, latents=latents, callback_on_step_end=callback("stock"),
                 callback_on_step_end_tensor_inputs=inputs, **CALL).images
    got = guided(PROMPT, latents=latents, callback_on_step_end=callback("guided"),
                 callback_on_step_end_tensor_inputs=inputs, **CALL).images
    assert torch.equal(got, want) and seen["guided"] == seen["stock"]
    assert seen["guided"][0][0] == LATENTS and len(seen["guided"]) == 3
    plain = guided(PROMPT, latents=latents, **CALL).images
    assert not torch.equal(got, plain)  # the callback acted


def test_prompt_embedding_lists_equal_stock(z_pair) -> None:
    """Embeddings of different lengths given as the stock lists, without a prompt."""
    stock, guided = z_pair
    embeds, negative = stock.encode_prompt([PROMPT, "a blue square"], negative_prompt=["", "red"],
                                           max_sequence_length=64)
    assert len({e.shape[0] for e in embeds + negative}) > 1  # the rows really differ in length
    kwargs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative, **CALL}
    want = stock(generator=[seeded(0), seeded(1)], **kwargs).images
    assert torch.equal(guided(generator=[seeded(0), seeded(1)], **kwargs).images, want)


def test_a_named_method_gets_guidance_scale_plus_one(z_pair) -> None:
    """guidance_scale means the stock strength: RenormCFG by name at guidance_scale s runs w = s + 1,
    the stock arithmetic bit for bit; CFG at the same number is the same guidance (u + w (c - u) in
    other float rounding)."""
    stock, guided = z_pair
    want = stock(PROMPT, guidance_scale=3.0, generator=seeded(0), **CALL).images
    named = guided(PROMPT, guidance={"name": "renorm_cfg", "renorm": 0.0}, guidance_scale=3.0, generator=seeded(0),
                   **CALL)
    assert named.guidance["scale"] == 4.0 and torch.equal(named.images, want)
    cfg = guided(PROMPT, guidance="cfg", guidance_scale=3.0, generator=seeded(0), **CALL)
    assert cfg.guidance["scale"] == 4.0
    torch.testing.assert_close(cfg.images, want, rtol=1e-5, atol=1e-5)
    own = guided(PROMPT, guidance="apg", generator=seeded(0), **CALL)  # no guidance_scale: the method's default
    assert own.guidance["scale"] == resolve_guidance("apg").scale


def test_from_pipe_shares_components_and_leaves_stock_working(z_pair) -> None:
    stock, guided = z_pair
    assert guided.transformer is stock.transformer and guided.text_encoder is stock.text_encoder
    assert guided.vae is stock.vae and guided.tokenizer is stock.tokenizer
    before = stock(PROMPT, generator=seeded(0), **CALL).images
    guided(PROMPT, guidance="apg", generator=seeded(0), **CALL)
    assert torch.equal(stock(PROMPT, generator=seeded(0), **CALL).images, before)


@pytest.mark.parametrize("guidance, extra", [
    ("apg", {}), ("cfgpp", {"sampler": "euler"}), ("cfg_zero_star", {}),
    ("perp_neg", {"negative_prompt": "blue"}),
    ({"name": "fkc", "particles": 2}, {"sampler": "euler_ancestral"})])
def test_methods_run_on_z_image(z_pair, guidance, extra) -> None:
    _, guided = z_pair
    out = guided(PROMPT, guidance=guidance, generator=seeded(0), **extra, **CALL)
    assert tuple(out.images.shape) == LATENTS and torch.isfinite(out.images).all()
    assert out.nfe > 3  # more than the conditional alone


def test_reading_an_attention_map_is_refused_before_any_forward(z_pair) -> None:
    """SAG reads a plain self-attention map, which Z-Image lacks (PAG, SEG, SLG and TSG run:
    tests/test_flow_layers.py)."""
    _, guided = z_pair
    calls = refuse_forwards(guided)
    with pytest.raises(ValueError, match=r"method 'sag' .*do not have"):
        guided(PROMPT, guidance="sag", generator=seeded(0), **CALL)
    assert calls == []


def test_missing_branches_are_refused_before_any_forward(z_pair) -> None:
    _, guided = z_pair
    calls = refuse_forwards(guided)
    with pytest.raises(ValueError, match=r"method 'dual_cfg' needs branch"):
        guided(PROMPT, guidance="dual_cfg", generator=seeded(0), **CALL)
    assert calls == []


@pytest.mark.parametrize("kwargs, match", [
    ({"height": 30}, r"height: must be a positive multiple of 4"),
    ({"cfg_normalization": -1.0}, r"cfg_normalization: must be a bool or a number >= 0"),
    ({"cfg_truncation": -0.5}, r"cfg_truncation: must be a number >= 0"),
    ({"guidance_scale": "5"}, r"guidance_scale: must be a number"),
    ({"guidance": "apg", "cfg_truncation": 0.5}, r"cfg_normalization / cfg_truncation: .*guidance=None"),
    ({"prompt_embeds": [torch.zeros(3)]}, r"prompt_embeds: expected a non-empty list of \(length, width\)"),
    ({"negative_prompt": ["blue"] * 3}, r"negative_prompt: expected a string or a list of 1 strings"),
    ({"callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs": ["noise_pred"]},
     r"callback_on_step_end_tensor_inputs: must be among"),
    ({"max_sequence_length": 0}, r"max_sequence_length: must be an integer >= 1"),
])
def test_bad_inputs_are_refused_before_any_forward(z_pair, kwargs, match) -> None:
    _, guided = z_pair
    calls = refuse_forwards(guided)
    call = {**CALL, **kwargs}
    prompt = None if "prompt_embeds" in kwargs else PROMPT
    with pytest.raises(ValueError, match=match):
        guided(prompt, generator=seeded(0), **call)
    assert calls == []


def test_a_prompt_longer_than_max_sequence_length_is_reported_and_cut_as_stock(z_pair) -> None:
    stock, guided = z_pair
    call = {**CALL, "max_sequence_length": 24}
    want = stock(PROMPT, generator=seeded(0), **call).images
    with pytest.warns(PromptTruncatedWarning, match=r"prompt: .* tokens in the chat template, the text encoder "
                                                    r"reads 24"):
        got = guided(PROMPT, generator=seeded(0), **call)
    assert torch.equal(got.images, want) and len(got.warnings) == 1
    assert guided(PROMPT, generator=seeded(0), **CALL).warnings == []


def test_a_saved_stock_directory_loads_the_guided_pipeline(tmp_path) -> None:
    save_tiny_z_image(tmp_path)
    pipe = quiet(GuidedZImagePipeline.from_pretrained(tmp_path))
    stock = quiet(ZImagePipeline(**tiny_z_image_components(0)))
    kwargs = {"cfg_normalization": 1.0, "negative_prompt": "blue", **CALL}
    assert torch.equal(pipe(PROMPT, generator=seeded(0), **kwargs).images,
                       stock(PROMPT, generator=seeded(0), **kwargs).images)
    assert pipeline_class_for(tmp_path) is GuidedZImagePipeline
