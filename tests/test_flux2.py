"""GuidedFlux2KleinPipeline (patchified latent tokens, stacked Qwen3 embeddings, CFG gated by
``is_distilled``, reference images) against the stock Flux2KleinPipeline on tiny random models."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from guidance_engine.pipelines.flux2 import GuidedFlux2KleinPipeline, pack_latents, unpack_latents
from guidance_engine.pipelines.messages import PromptTruncatedWarning
from guidance_engine.pipelines.models import load_pipeline, pipeline_class_for
from guidance_engine.pipelines.toy.tiny_flux2 import build_tiny_qwen_tokenizer, tiny_flux2_klein_components
from conftest import PROMPT, quiet, seeded

CALL = {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 32, "output_type": "latent"}
#: the start noise as the stock pipeline takes it: 16 x 16 x 2 VAE latents patchified to 8 x 8 x 8
PATCHIFIED = (1, 8, 8, 8)
#: what a callback sees: 64 tokens of 8 channels
TOKENS = (1, 64, 8)
#: what output_type="latent" returns: de-normalised, unpatchified VAE latents
LATENT = (1, 2, 16, 16)


def klein_pair(is_distilled: bool = False):
    stock = quiet(Flux2KleinPipeline(**tiny_flux2_klein_components(0), is_distilled=is_distilled))
    return stock, quiet(GuidedFlux2KleinPipeline.from_pipe(stock))


@pytest.fixture
def pair():
    return klein_pair()


def forbid_model_calls(pipe) -> list[str]:
    """Replace every model's forward by one that records and raises."""
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


def test_the_tiny_tokenizer_renders_the_chat_template_into_whole_tokens() -> None:
    tokenizer = build_tiny_qwen_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a red circle"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    assert tokens[:6] == ["<|im_start|>", "user", "\u010a", "a", "\u0120red", "\u0120circle"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_packing_is_the_stock_permutation() -> None:
    latents = torch.randn(2, 8, 4, 6, generator=seeded(0))
    tokens = pack_latents(latents)
    assert torch.equal(tokens, Flux2KleinPipeline._pack_latents(latents))
    ids = Flux2KleinPipeline._prepare_latent_ids(latents)
    assert torch.equal(unpack_latents(tokens, 4, 6), Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids, 4, 6))


def test_the_stock_signature_is_kept() -> None:
    """The stock arguments in the stock order with the stock defaults (``guidance_scale`` None
    standing for the stock 4.0, so that a method keeps its own scale unless it is given)."""
    stock = inspect.signature(Flux2KleinPipeline.__call__).parameters
    ours = inspect.signature(GuidedFlux2KleinPipeline.__call__).parameters
    assert list(ours)[:len(stock)] == list(stock)
    changed = {name for name in stock if ours[name].default != stock[name].default}
    assert changed == {"guidance_scale"} and GuidedFlux2KleinPipeline.default_guidance_scale == 4.0
    assert {"negative_prompt", "guidance", "sampler", "eta", "particle_output"} <= set(ours)


def test_default_call_is_stock_cfg_bit_for_bit(pair) -> None:
    """Undistilled, guidance_scale 4 (the stock default): CFG against the empty prompt, 2 forwards a step."""
    stock, guided = pair
    want = stock(prompt=PROMPT, generator=seeded(0), **CALL).images
    got = guided(prompt=PROMPT, generator=seeded(0), **CALL)
    assert torch.equal(got.images, want) and got.nfe == 6 and tuple(want.shape) == LATENT
    alone = stock(prompt=PROMPT, guidance_scale=1.0, generator=seeded(0), **CALL).images
    assert not torch.equal(want, alone)  # the guidance acts
    got = guided(prompt=PROMPT, guidance_scale=1.0, generator=seeded(0), **CALL)
    assert torch.equal(got.images, alone) and got.nfe == 3


def test_a_distilled_model_keeps_stock_cfg_off_unless_a_method_is_named() -> None:
    stock, guided = klein_pair(is_distilled=True)
    want = stock(prompt=PROMPT, guidance_scale=5.0, generator=seeded(0), **CALL).images
    got = guided(prompt=PROMPT, guidance_scale=5.0, generator=seeded(0), **CALL)
    assert torch.equal(got.images, want) and got.nfe == 3
    undistilled, _ = klein_pair(is_distilled=False)
    cfg = undistilled(prompt=PROMPT, guidance_scale=5.0, generator=seeded(0), **CALL).images
    named = guided(prompt=PROMPT, guidance="cfg", guidance_scale=5.0, generator=seeded(0), **CALL)
    assert torch.equal(named.images, cfg) and named.nfe == 6  # asked for explicitly: CFG at guidance_scale


@pytest.mark.parametrize("is_distilled", [False, True])
def test_decoded_images_equal_stock(is_distilled) -> None:
    stock, guided = klein_pair(is_distilled)
    call = {**CALL, "output_type": "pt"}
    want = stock(prompt=PROMPT, generator=seeded(0), **call).images
    assert tuple(want.shape) == (1, 3, 32, 32)
    assert torch.equal(guided(prompt=PROMPT, generator=seeded(0), **call).images, want)
    (image,) = guided(prompt=PROMPT, generator=seeded(0), return_dict=False, **call)
    assert torch.equal(image, want)


@pytest.mark.parametrize("is_distilled", [False, True])
def test_batches_and_generator_lists_equal_stock(is_distilled) -> None:
    stock, guided = klein_pair(is_distilled)
    prompts = ["a red circle", "a blue square"]
    kwargs = {"num_images_per_prompt": 2, **CALL}
    want = stock(prompt=prompts, generator=[seeded(i) for i in range(4)], **kwargs).images
    got = guided(prompt=prompts, generator=[seeded(i) for i in range(4)], **kwargs)
    assert torch.equal(got.images, want) and got.nfe_per_image == [3 if is_distilled else 6] * 4


def test_latents_and_callback_are_seen_as_stock_sees_them(pair) -> None:
    stock, guided = pair
    latents = torch.randn(PATCHIFIED, generator=seeded(3))
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((tuple(tensors["latents"].shape), tuple(tensors["prompt_embeds"].shape)))
        return {"latents": tensors["latents"] * 0.5} if i == 0 else {}

    inputs = ["latents", "prompt_embeds"]
    want = stock(prompt=PROMPT, latents=latents, callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=inputs, **CALL).images
    got = guided(prompt=PROMPT, latents=latents, callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=inputs, **CALL).images
    assert torch.equal(got, want) and set(seen) == {(TOKENS, (1, 32, 48))}
    assert not torch.equal(want, stock(prompt=PROMPT, latents=latents, **CALL).images)  # the callback acted


def test_negative_prompt_is_the_unconditional_branch(pair) -> None:
    """Stock takes a negative only as embeddings; ``negative_prompt`` is the same text encoded."""
    stock, guided = pair
    negative, _ = stock.encode_prompt("blue", device="cpu", max_sequence_length=32)
    want = stock(prompt=PROMPT, negative_prompt_embeds=negative, generator=seeded(0), **CALL).images
    assert torch.equal(guided(prompt=PROMPT, negative_prompt="blue", generator=seeded(0), **CALL).images, want)
    assert torch.equal(guided(prompt=PROMPT, negative_prompt_embeds=negative, generator=seeded(0),
                              **CALL).images, want)
    assert not torch.equal(want, stock(prompt=PROMPT, generator=seeded(0), **CALL).images)


def test_prompt_embeds_equal_stock(pair) -> None:
    """Stock's CFG breaks on prompt embeddings of several prompts (it encodes one empty negative
    prompt for all); here they equal the prompts they encode."""
    stock, guided = pair
    prompts = ["a red circle", "a blue square"]
    embeds, _ = stock.encode_prompt(prompts, device="cpu", max_sequence_length=32)
    kwargs = {"num_images_per_prompt": 2, **CALL}
    want = stock(prompt=prompts, generator=[seeded(i) for i in range(4)], **kwargs).images
    got = guided(prompt_embeds=embeds, generator=[seeded(i) for i in range(4)], **kwargs)
    assert torch.equal(got.images, want) and got.nfe_per_image == [6] * 4
    with pytest.raises(RuntimeError, match="size of tensor"):
        stock(prompt_embeds=embeds, generator=seeded(0), **kwargs)
    want = stock(prompt_embeds=embeds, generator=seeded(0), **CALL).images  # one negative row, broadcast
    assert torch.equal(guided(prompt_embeds=embeds, generator=seeded(0), **CALL).images, want)


def test_reference_images_equal_stock(pair) -> None:
    stock, guided = pair
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    reference = Image.fromarray(pixels)
    want = stock(image=reference, prompt=PROMPT, generator=seeded(0), **CALL).images
    got = guided(image=reference, prompt=PROMPT, generator=seeded(0), **CALL)
    assert torch.equal(got.images, want) and got.nfe == 6
    assert not torch.equal(want, stock(prompt=PROMPT, generator=seeded(0), **CALL).images)
    two = guided(image=[reference, reference.rotate(90)], prompt=PROMPT, guidance="apg", generator=seeded(0),
                 **CALL).images
    assert tuple(two.shape) == LATENT and torch.isfinite(two).all()


def test_from_pipe_shares_components_and_leaves_stock_working(pair) -> None:
    stock, guided = pair
    assert guided.transformer is stock.transformer and guided.text_encoder is stock.text_encoder
    assert guided.vae is stock.vae and guided.config.is_distilled == stock.config.is_distilled
    before = stock(prompt=PROMPT, generator=seeded(0), **CALL).images
    guided(prompt=PROMPT, guidance="apg", generator=seeded(0), **CALL)
    assert torch.equal(stock(prompt=PROMPT, generator=seeded(0), **CALL).images, before)


@pytest.mark.parametrize("is_distilled", [False, True])
def test_a_saved_stock_directory_loads_the_guided_pipeline(tmp_path, is_distilled) -> None:
    stock, _ = klein_pair(is_distilled)
    stock.save_pretrained(tmp_path, safe_serialization=True)
    loaded = quiet(GuidedFlux2KleinPipeline.from_pretrained(tmp_path))
    assert loaded.config.is_distilled is is_distilled
    assert pipeline_class_for(tmp_path) is GuidedFlux2KleinPipeline
    assert isinstance(load_pipeline(str(tmp_path)), GuidedFlux2KleinPipeline)
    call = {**CALL, "output_type": "pt"}
    assert torch.equal(loaded(prompt=PROMPT, generator=seeded(0), **call).images,
                       stock(prompt=PROMPT, generator=seeded(0), **call).images)


@pytest.mark.parametrize("guidance, sampler", [("apg", None), ("cfgpp", "euler"), ("cfg_zero_star", None)])
def test_methods_run(pair, guidance, sampler) -> None:
    _, guided = pair
    out = guided(prompt=PROMPT, guidance=guidance, sampler=sampler, generator=seeded(0), **CALL)
    assert tuple(out.images.shape) == LATENT and torch.isfinite(out.images).all()
    assert out.nfe > 3  # the unconditional (empty prompt) branch ran


@pytest.mark.parametrize("guidance, extra, nfe", [
    ("perp_neg", {"negative_prompt": "blue"}, 9),
    ({"name": "fkc", "particles": 2}, {"sampler": "euler_ancestral"}, 12)])
def test_other_branches_and_particles_run(pair, guidance, extra, nfe) -> None:
    _, guided = pair
    out = guided(prompt=PROMPT, guidance=guidance, generator=seeded(0), **extra, **CALL)
    assert tuple(out.images.shape) == LATENT and torch.isfinite(out.images).all()
    assert out.nfe == nfe  # perp_neg: cond, empty, negative; fkc: 2 particles of cond + uncond


def test_reading_an_attention_map_is_refused_before_any_model_call(pair) -> None:
    """SAG reads a plain self-attention map, which Flux.2 lacks (PAG, SEG, SLG and TSG run:
    tests/test_flow_layers.py)."""
    _, guided = pair
    calls = forbid_model_calls(guided)
    with pytest.raises(ValueError, match=r"method 'sag' .*do not have"):
        guided(prompt=PROMPT, guidance="sag", generator=seeded(0), **CALL)
    assert calls == []


def test_missing_branches_are_refused_before_any_transformer_forward(pair) -> None:
    _, guided = pair
    calls = []
    guided.transformer.forward = lambda *a, **k: calls.append(1)  # the prompts may be encoded
    with pytest.raises(ValueError, match=r"method 'dual_cfg' needs branch"):
        guided(prompt=PROMPT, guidance="dual_cfg", generator=seeded(0), **CALL)
    assert calls == []


@pytest.mark.parametrize("kwargs, message", [
    ({"text_encoder_out_layers": (9, 28)}, r"text_encoder_out_layers: .*\[-28, 27\].*\(9, 28\)"),
    ({"max_sequence_length": 0}, r"max_sequence_length: must be an integer >= 1, got 0"),
    ({"image": []}, r"image: expected a PIL image"),
    ({"negative_prompt": ["blue"] * 3}, r"negative_prompt: expected a string or a list of 1"),
    ({"negative_prompt_embeds": torch.zeros(2, 4, 48)}, r"negative_prompt_embeds: expected 1 rows"),
    ({"latents": torch.zeros(TOKENS)}, r"latents: expected a tensor of shape \(1, 8, 8, 8\)"),
    ({"ip_adapter_image": object()}, r"unsupported argument\(s\) \['ip_adapter_image'\]"),
])
def test_bad_inputs_are_refused_before_any_model_call(pair, kwargs, message) -> None:
    _, guided = pair
    calls = forbid_model_calls(guided)
    with pytest.raises(ValueError, match=message):
        guided(prompt=PROMPT, generator=seeded(0), **{**CALL, **kwargs})
    assert calls == []


def test_a_prompt_longer_than_max_sequence_length_warns_and_is_cut_as_stock(pair) -> None:
    stock, guided = pair
    call = {**CALL, "max_sequence_length": 16}  # the templated prompt is 21 tokens
    want = stock(prompt=PROMPT, generator=seeded(0), **call).images
    with pytest.warns(PromptTruncatedWarning, match=r"prompt: .* 21 tokens .*max_sequence_length=16"):
        got = guided(prompt=PROMPT, generator=seeded(0), **call)
    assert torch.equal(got.images, want) and len(got.warnings) == 1
