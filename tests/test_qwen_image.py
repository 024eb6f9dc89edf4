"""GuidedQwenImagePipeline (packed latent tokens, Qwen2.5-VL embeddings with padding masks, true
CFG with the per-token renorm) against the stock QwenImagePipeline on tiny random models."""

from __future__ import annotations

import inspect
import re

import pytest
import torch
from diffusers import QwenImagePipeline

from guidance_engine import resolve_guidance
from guidance_engine.methods.cfg_renorm import CFGRenorm
from guidance_engine.pipelines.flow_transformer import pack_latents, unpack_latents
from guidance_engine.pipelines.messages import PromptTruncatedWarning
from guidance_engine.pipelines.models import pipeline_class_for
from guidance_engine.pipelines.qwen_image import GuidedQwenImagePipeline
from guidance_engine.pipelines.toy.tiny_qwen_image import save_tiny_qwen_image, tiny_qwen_image_components
from conftest import PROMPT, quiet, seeded

CALL = {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 16, "output_type": "latent"}
#: the tiny model's packed latents: 16 x 16 latents of 4 channels in 2 x 2 patches
PACKED = (1, 64, 16)
TRUE_CFG = {"negative_prompt": "blue", "true_cfg_scale": 4.0}


def qwen_pair(**options):
    stock = quiet(QwenImagePipeline(**tiny_qwen_image_components(0, **options)))
    return stock, quiet(GuidedQwenImagePipeline.from_pipe(stock))


@pytest.fixture
def pair():
    return qwen_pair()


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
    pipe.vae.decode = refusing("vae")
    return calls


def test_the_tiny_tokenizer_gives_the_template_opening_its_stock_length(pair) -> None:
    """The stock pipeline drops the first 34 tokens (the system turn and the user turn's opening):
    with the tiny vocabulary they are exactly those, so the embeddings are the prompt's."""
    stock, _ = pair
    ids = stock.tokenizer(stock.prompt_template_encode.format(PROMPT))["input_ids"]
    tokens = stock.tokenizer.convert_ids_to_tokens(ids)
    drop = stock.prompt_template_encode_start_idx
    assert tokens[drop - 3:drop] == ["<|im_start|>", "user", "\u010a"]
    assert tokens[drop:drop + 3] == ["a", "\u0120red", "\u0120circle"]
    assert tokens[-3:] == ["<|im_start|>", "assistant", "\u010a"]


def test_packing_is_the_stock_permutation() -> None:
    latents = torch.randn(2, 4, 6, 8, generator=seeded(0))
    tokens = pack_latents(latents)
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(latents, 2, 4, 6, 8))
    stock = QwenImagePipeline._unpack_latents(tokens, 12, 16, 2)  # (B, C, 1, H, W) at pixel size 12 x 16
    assert torch.equal(unpack_latents(tokens, 6, 8), stock[:, :, 0])


def test_the_stock_signature_is_kept() -> None:
    """The stock arguments in the stock order with the stock defaults (``true_cfg_scale`` None
    standing for the stock 4.0, so that a method keeps its own scale unless it is given)."""
    stock = inspect.signature(QwenImagePipeline.__call__).parameters
    ours = inspect.signature(GuidedQwenImagePipeline.__call__).parameters
    assert list(ours)[:len(stock)] == list(stock)
    changed = {name for name in stock if ours[name].default != stock[name].default}
    assert changed == {"true_cfg_scale"} and stock["true_cfg_scale"].default == 4.0
    assert {"guidance", "sampler", "eta", "particle_output"} <= set(ours)


def test_default_call_reproduces_stock_bit_for_bit(pair) -> None:
    """No negative prompt: the conditional forward alone (the stock true_cfg_scale 4 needs one)."""
    stock, guided = pair
    want = stock(PROMPT, generator=seeded(0), **CALL).images
    got = guided(PROMPT, generator=seeded(0), **CALL)
    assert torch.equal(got.images, want) and got.nfe == 3
    assert tuple(got.images.shape) == PACKED


def test_true_cfg_reproduces_stock_bit_for_bit(pair) -> None:
    stock, guided = pair
    want = stock(PROMPT, generator=seeded(0), **TRUE_CFG, **CALL).images
    got = guided(PROMPT, generator=seeded(0), **TRUE_CFG, **CALL)
    assert torch.equal(got.images, want) and got.nfe == 6
    assert got.guidance["name"] == "cfg_renorm" and got.guidance["scale"] == 4.0
    assert not torch.equal(want, stock(PROMPT, generator=seeded(0), **CALL).images)  # the guidance acts
    # the stock default scale (4) with a negative prompt, and a scale <= 1 (no CFG, one forward a step)
    default = guided(PROMPT, negative_prompt="blue", generator=seeded(0), **CALL)
    assert torch.equal(default.images, want)
    off = {"negative_prompt": "blue", "true_cfg_scale": 1.0, **CALL}
    got = guided(PROMPT, generator=seeded(0), **off)
    assert torch.equal(got.images, stock(PROMPT, generator=seeded(0), **off).images) and got.nfe == 3


def test_the_renorm_is_what_makes_the_stock_recipe(pair) -> None:
    """Plain CFG at the same scale is not the stock output: the per-token renorm is."""
    stock, guided = pair
    want = stock(PROMPT, generator=seeded(0), **TRUE_CFG, **CALL).images
    plain = guided(PROMPT, guidance="cfg", generator=seeded(0), **TRUE_CFG, **CALL).images
    per_pixel = guided(PROMPT, guidance=CFGRenorm(scale=4.0, patch=1), negative_prompt="blue", generator=seeded(0),
                       **CALL).images
    assert not torch.equal(plain, want) and not torch.equal(per_pixel, want)


def test_decoded_images_equal_stock(pair) -> None:
    """output_type "pt": the latents de-normalised with the VAE's per-channel mean and std, one frame decoded."""
    stock, guided = pair
    call = {**CALL, "output_type": "pt", "negative_prompt": "blue", "true_cfg_scale": 2.0}
    want = stock(PROMPT, generator=seeded(0), **call).images
    got = guided(PROMPT, generator=seeded(0), **call).images
    assert torch.equal(got, want) and tuple(got.shape) == (1, 3, 32, 32)


def test_batches_and_generator_lists_equal_stock(pair) -> None:
    """Two prompts of one token length (the stock masks are then None), two images each."""
    stock, guided = pair
    prompts = ["a red circle", "a blue square"]
    kwargs = {"negative_prompt": ["blue", "red"], "true_cfg_scale": 3.0, "num_images_per_prompt": 2, **CALL}
    want = stock(prompts, generator=[seeded(i) for i in range(4)], **kwargs).images
    got = guided(prompts, generator=[seeded(i) for i in range(4)], **kwargs)
    assert torch.equal(got.images, want) and got.nfe_per_image == [6] * 4


def test_each_image_gets_its_own_prompts_padding_mask(pair) -> None:
    """Prompts of different lengths, two images each: the stock encode_prompt gives the images the
    masks p0, p1, p0, p1 for the embeddings p0, p0, p1, p1 (diffusers issue #13581); ours equals
    the stock pipeline given each image's own embeddings and mask."""
    stock, guided = pair
    prompts, negatives = ["a red circle on a blue background", "a star"], ["blue", "a green big square"]
    generators = lambda: [seeded(i) for i in range(4)]  # noqa: E731
    kwargs = {"true_cfg_scale": 3.0, **CALL}
    got = guided(prompts, negative_prompt=negatives, num_images_per_prompt=2, generator=generators(), **kwargs)

    def per_image(texts):
        embeds, mask = stock.encode_prompt(texts, max_sequence_length=16)
        return embeds.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)

    (embeds, mask), (negative, negative_mask) = per_image(prompts), per_image(negatives)
    want = stock(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative,
                 negative_prompt_embeds_mask=negative_mask, generator=generators(), **kwargs).images
    assert torch.equal(got.images, want)
    buggy = stock(prompts, negative_prompt=negatives, num_images_per_prompt=2, generator=generators(), **kwargs)
    assert not torch.equal(buggy.images, want)  # the stock misalignment changes the images


def test_prompt_embeds_with_masks_equal_stock(pair) -> None:
    stock, guided = pair
    embeds, mask = stock.encode_prompt(["a red circle on a blue background", "a star"], max_sequence_length=16)
    negative, negative_mask = stock.encode_prompt(["blue", "red"], max_sequence_length=16)
    kwargs = {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "negative_prompt_embeds": negative,
              "negative_prompt_embeds_mask": negative_mask, "true_cfg_scale": 2.5, **CALL}
    want = stock(generator=[seeded(0), seeded(1)], **kwargs).images
    assert torch.equal(guided(generator=[seeded(0), seeded(1)], **kwargs).images, want)


def test_latents_and_callback_are_packed_as_stock(pair) -> None:
    stock, guided = pair
    latents = torch.randn(PACKED, generator=seeded(3))
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(tuple(tensors["latents"].shape))
        return {"latents": tensors["latents"] * 0.5} if i == 0 else {}

    want = stock(PROMPT, latents=latents, callback_on_step_end=callback, **TRUE_CFG, **CALL).images
    got = guided(PROMPT, latents=latents, callback_on_step_end=callback, **TRUE_CFG, **CALL).images
    assert torch.equal(got, want) and set(seen) == {PACKED} and len(seen) == 6


def test_a_callback_replacing_prompt_embeds_acts_as_in_stock(pair) -> None:
    stock, guided = pair

    def callback(pipe, i, t, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"] * 0.5}

    kwargs = {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"],
              **TRUE_CFG, **CALL}
    want = stock(PROMPT, generator=seeded(0), **kwargs).images
    assert torch.equal(guided(PROMPT, generator=seeded(0), **kwargs).images, want)
    assert not torch.equal(want, stock(PROMPT, generator=seeded(0), **TRUE_CFG, **CALL).images)


def test_true_cfg_scale_is_a_named_methods_scale_and_the_empty_prompt_its_default(pair) -> None:
    stock, guided = pair
    # named, with a negative prompt: the stock recipe again
    got = guided(PROMPT, guidance="cfg_renorm", generator=seeded(0), **TRUE_CFG, **CALL)
    assert torch.equal(got.images, stock(PROMPT, generator=seeded(0), **TRUE_CFG, **CALL).images)
    # named, without one: the empty prompt is the unconditional branch (stock with negative_prompt="")
    got = guided(PROMPT, guidance="cfg_renorm", true_cfg_scale=3.0, generator=seeded(0), **CALL)
    want = stock(PROMPT, negative_prompt="", true_cfg_scale=3.0, generator=seeded(0), **CALL).images
    assert torch.equal(got.images, want) and got.guidance["scale"] == 3.0
    own = guided(PROMPT, guidance="apg", generator=seeded(0), **CALL).guidance["scale"]
    assert own == resolve_guidance("apg").scale  # without true_cfg_scale a method keeps its own default


def test_from_pipe_shares_components_and_leaves_stock_working(pair) -> None:
    stock, guided = pair
    assert guided.transformer is stock.transformer and guided.text_encoder is stock.text_encoder
    assert guided.vae is stock.vae and guided.tokenizer is stock.tokenizer
    before = stock(PROMPT, generator=seeded(0), **TRUE_CFG, **CALL).images
    guided(PROMPT, guidance="apg", generator=seeded(0), **CALL)
    assert torch.equal(stock(PROMPT, generator=seeded(0), **TRUE_CFG, **CALL).images, before)


def test_a_saved_stock_directory_loads_the_guided_pipeline(tmp_path) -> None:
    save_tiny_qwen_image(tmp_path)
    assert pipeline_class_for(tmp_path) is GuidedQwenImagePipeline
    pipe = quiet(GuidedQwenImagePipeline.from_pretrained(tmp_path))
    stock, _ = qwen_pair()
    call = {**CALL, **TRUE_CFG, "output_type": "pt"}
    assert torch.equal(pipe(PROMPT, generator=seeded(0), **call).images,
                       stock(PROMPT, generator=seeded(0), **call).images)


@pytest.mark.parametrize("guidance, sampler", [("apg", None), ("cfgpp", "euler"), ("cfg_zero_star", None)])
def test_methods_run(pair, guidance, sampler) -> None:
    _, guided = pair
    out = guided(PROMPT, guidance=guidance, sampler=sampler, generator=seeded(0), **CALL)
    assert tuple(out.images.shape) == PACKED and torch.isfinite(out.images).all()
    assert out.nfe > 3  # the unconditional (empty prompt) branch ran


@pytest.mark.parametrize("guidance, extra, nfe", [
    ("perp_neg", {"negative_prompt": "blue"}, 9),
    ({"name": "fkc", "particles": 2}, {"sampler": "euler_ancestral"}, 12),
])
def test_other_branches_and_particles_run(pair, guidance, extra, nfe) -> None:
    _, guided = pair
    out = guided(PROMPT, guidance=guidance, generator=seeded(0), **extra, **CALL)
    assert tuple(out.images.shape) == PACKED and torch.isfinite(out.images).all()
    assert out.nfe == nfe  # perp_neg: cond, empty, negative; fkc: 2 particles of cond + uncond


def test_reading_an_attention_map_is_refused_before_any_model_call(pair) -> None:
    """SAG reads a plain self-attention map, which Qwen-Image lacks (PAG, SEG, SLG and TSG run:
    tests/test_flow_layers.py)."""
    _, guided = pair
    calls = forbid_model_calls(guided)
    with pytest.raises(ValueError, match=r"method 'sag' .*do not have"):
        guided(PROMPT, guidance="sag", generator=seeded(0), **CALL)
    assert calls == []


def test_missing_branches_are_refused_before_any_transformer_forward(pair) -> None:
    _, guided = pair
    calls = []
    guided.transformer.forward = lambda *a, **k: calls.append(1)  # the prompts may be encoded
    with pytest.raises(ValueError, match=r"method 'dual_cfg' needs branch"):
        guided(PROMPT, guidance="dual_cfg", generator=seeded(0), **CALL)
    assert calls == []


def test_a_distilled_model_needs_guidance_scale_and_gets_the_stock_value() -> None:
    """guidance_embeds=True: no call without guidance_scale (before any model call); with it, the
    transformer gets the value as the stock pipeline passes it (the stock transformer's embedding
    does not take it yet, so both stop at the first forward)."""
    stock, guided = qwen_pair(guidance_embeds=True)
    calls = forbid_model_calls(guided)
    with pytest.raises(ValueError, match=r"guidance_scale: required for a guidance-distilled transformer"):
        guided(PROMPT, generator=seeded(0), **CALL)
    assert calls == []
    del guided.text_encoder.forward  # the prompts may be encoded now (the components are shared with stock)
    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs["guidance"])
        raise RuntimeError("recorded")

    guided.transformer.forward = record
    for pipe in (stock, guided):
        with pytest.raises(RuntimeError, match="recorded"):
            pipe(PROMPT, guidance_scale=3.0, num_images_per_prompt=2, generator=seeded(0), **CALL)
    assert torch.equal(seen[0], seen[1]) and seen[0].tolist() == [3.0, 3.0] and seen[1].dtype == torch.float32


@pytest.mark.parametrize("kwargs, message", [
    ({"max_sequence_length": 0}, r"max_sequence_length: must be an integer in \[1, 1024\], got 0"),
    ({"negative_prompt": ["blue"] * 3}, r"negative_prompt: expected a string or a list of 1"),
    ({"negative_prompt_embeds": torch.zeros(2, 4, 16)}, r"negative_prompt_embeds: expected .* 1 rows .*\(2, 4, 16\)"),
    ({"negative_prompt_embeds": torch.zeros(1, 4, 16), "negative_prompt_embeds_mask": torch.ones(1, 5)},
     r"negative_prompt_embeds_mask: expected a tensor of shape \(1, 4\) .*got \(1, 5\)"),
    ({"latents": torch.zeros(1, 16, 16)}, r"latents: expected a tensor of shape \(1, 64, 16\)"),
    ({"guidance": CFGRenorm(scale=2.0), "true_cfg_scale": 3.0}, r"true_cfg_scale: set the scale on the guidance"),
    ({"guidance": {"name": "cfg_renorm", "patch": 0}}, r"cfg_renorm: parameter 'patch' must be an integer"),
    ({"ip_adapter_image": object()}, r"unsupported argument\(s\) \['ip_adapter_image'\]"),
])
def test_bad_inputs_are_refused_before_any_model_call(pair, kwargs, message) -> None:
    _, guided = pair
    calls = forbid_model_calls(guided)
    with pytest.raises(ValueError, match=message):
        guided(PROMPT, generator=seeded(0), **{**CALL, **kwargs})
    assert calls == []


def test_a_prompt_longer_than_max_sequence_length_warns_and_is_cut_as_stock(pair) -> None:
    stock, guided = pair
    call = {**CALL, "max_sequence_length": 5}  # the prompt is 7 tokens, 12 with the template's closing 5
    negative = "a blue square"  # 3 tokens, 8 with the closing ones: cut too
    want = stock(PROMPT, negative_prompt=negative, generator=seeded(0), **call).images
    with pytest.warns(PromptTruncatedWarning) as caught:
        got = guided(PROMPT, negative_prompt=negative, generator=seeded(0), **call)
    assert torch.equal(got.images, want) and [str(w.message) for w in caught] == got.warnings
    assert len(got.warnings) == 2
    assert re.match(r"prompt: .* is 12 tokens .* reads 5 .*; cut: ' blue background\\nassistant\\n'$", got.warnings[0])
    assert re.match(r"negative_prompt: 'a blue square' is 8 tokens .*; cut: 'assistant\\n'$", got.warnings[1])
    assert guided(PROMPT, generator=seeded(0), **CALL).warnings == []
