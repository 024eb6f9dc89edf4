"""GuidedFlux2Pipeline (Flux.2 [dev]: patchified latent tokens, stacked Mistral 3 embeddings after a
system message, an embedded guidance value, no CFG in the stock recipe, reference images) against
the stock Flux2Pipeline on tiny random models."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import Flux2Pipeline
from PIL import Image

from guidance_engine.pipelines.flux2_dev import GuidedFlux2Pipeline
from guidance_engine.pipelines.messages import PromptTruncatedWarning
from guidance_engine.pipelines.models import load_pipeline, pipeline_class_for
from guidance_engine.pipelines.toy.tiny_flux2_dev import build_tiny_mistral_tokenizer, tiny_flux2_dev_components
from conftest import PROMPT, quiet, seeded

#: the templated PROMPT (system message included) is 39 tokens
CALL = {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 48, "output_type": "latent"}
#: the start noise as the stock pipeline takes it: 16 x 16 x 2 VAE latents patchified to 8 x 8 x 8
PATCHIFIED = (1, 8, 8, 8)
#: what a callback sees and what output_type="latent" returns: 64 tokens of 8 channels
TOKENS = (1, 64, 8)
#: stacked hidden states 10, 20, 30 of the 16-wide text encoder
EMBEDS = (1, 48, 48)


@pytest.fixture
def pair():
    stock = quiet(Flux2Pipeline(**tiny_flux2_dev_components(0)))
    return stock, quiet(GuidedFlux2Pipeline.from_pipe(stock))


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


def record_guidance(pipe) -> list[torch.Tensor]:
    """Record the embedded guidance value of every transformer forward."""
    seen: list[torch.Tensor] = []
    forward = pipe.transformer.forward

    def recording(*args, **kwargs):
        seen.append(kwargs["guidance"].clone())
        return forward(*args, **kwargs)

    pipe.transformer.forward = recording
    return seen


def test_the_tiny_tokenizer_renders_the_system_message_and_prompt_into_whole_tokens() -> None:
    tokenizer = build_tiny_mistral_tokenizer()
    messages = [{"role": "system", "content": [{"type": "text", "text": "You give structured responses."}]},
                {"role": "user", "content": [{"type": "text", "text": "a red circle"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s>[SYSTEM_PROMPT]You give structured responses.[/SYSTEM_PROMPT][INST]a red circle[/INST]"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<s>", "[SYSTEM_PROMPT]", "You", "\u0120give", "\u0120structured", "\u0120responses", ".",
        "[/SYSTEM_PROMPT]", "[INST]", "a", "\u0120red", "\u0120circle", "[/INST]"]
    assert tokenizer.decode(ids) == text


def test_the_stock_signature_is_kept() -> None:
    stock = inspect.signature(Flux2Pipeline.__call__).parameters
    ours = inspect.signature(GuidedFlux2Pipeline.__call__).parameters
    assert list(ours)[:len(stock)] == list(stock)
    assert all(ours[name].default == stock[name].default for name in stock)
    assert {"negative_prompt", "negative_prompt_embeds", "guidance", "sampler", "eta", "particle_output"} <= set(ours)


@pytest.mark.parametrize("guidance_scale", [None, 1.5])  # None: the stock default, 4.0
def test_default_call_is_stock_bit_for_bit(pair, guidance_scale) -> None:
    """The conditional forward alone with the embedded value, in every one of its forwards."""
    stock, guided = pair
    scale = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    want = stock(prompt=PROMPT, generator=seeded(0), **scale, **CALL).images
    seen = record_guidance(guided)
    got = guided(prompt=PROMPT, generator=seeded(0), **scale, **CALL)
    assert torch.equal(got.images, want) and got.nfe == 3 and tuple(want.shape) == TOKENS
    assert len(seen) == 3 and all(torch.equal(g, torch.tensor([guidance_scale or 4.0])) for g in seen)


def test_the_embedded_value_acts(pair) -> None:
    stock, _ = pair
    default = stock(prompt=PROMPT, generator=seeded(0), **CALL).images
    assert not torch.equal(default, stock(prompt=PROMPT, guidance_scale=1.5, generator=seeded(0), **CALL).images)


def test_decoded_images_equal_stock(pair) -> None:
    stock, guided = pair
    call = {**CALL, "output_type": "pt"}
    want = stock(prompt=PROMPT, generator=seeded(0), **call).images
    assert tuple(want.shape) == (1, 3, 32, 32)
    assert torch.equal(guided(prompt=PROMPT, generator=seeded(0), **call).images, want)
    (image,) = guided(prompt=PROMPT, generator=seeded(0), return_dict=False, **call)
    assert torch.equal(image, want)


@pytest.mark.parametrize("output_type", ["latent", "pt"])
def test_batches_and_generator_lists_equal_stock(pair, output_type) -> None:
    stock, guided = pair
    prompts = ["a red circle", "a blue square"]
    kwargs = {**CALL, "num_images_per_prompt": 2, "output_type": output_type}
    want = stock(prompt=prompts, generator=[seeded(i) for i in range(4)], **kwargs).images
    got = guided(prompt=prompts, generator=[seeded(i) for i in range(4)], **kwargs)
    assert torch.equal(got.images, want) and got.nfe_per_image == [3] * 4 and want.shape[0] == 4


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
    assert torch.equal(got, want) and set(seen) == {(TOKENS, EMBEDS)} and len(seen) == 6
    assert not torch.equal(want, stock(prompt=PROMPT, latents=latents, **CALL).images)  # the callback acted


def test_prompt_embeds_equal_stock(pair) -> None:
    stock, guided = pair
    prompts = ["a red circle", "a blue square"]
    embeds, _ = stock.encode_prompt(prompts, device="cpu", max_sequence_length=48)
    kwargs = {"num_images_per_prompt": 2, **CALL}
    want = stock(prompt=prompts, generator=[seeded(i) for i in range(4)], **kwargs).images
    assert torch.equal(guided(prompt_embeds=embeds, generator=[seeded(i) for i in range(4)], **kwargs).images, want)
    assert torch.equal(stock(prompt_embeds=embeds, generator=[seeded(i) for i in range(4)], **kwargs).images, want)


def test_reference_images_equal_stock(pair) -> None:
    stock, guided = pair
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    reference = Image.fromarray(pixels)
    want = stock(image=reference, prompt=PROMPT, generator=seeded(0), **CALL).images
    got = guided(image=reference, prompt=PROMPT, generator=seeded(0), **CALL)
    assert torch.equal(got.images, want) and got.nfe == 3
    assert not torch.equal(want, stock(prompt=PROMPT, generator=seeded(0), **CALL).images)
    references = [reference, reference.rotate(90)]
    kwargs = {**CALL, "num_images_per_prompt": 2}
    want = stock(image=references, prompt=PROMPT, generator=[seeded(0), seeded(1)], **kwargs).images
    assert torch.equal(guided(image=references, prompt=PROMPT, generator=[seeded(0), seeded(1)], **kwargs).images, want)
    two = guided(image=references, prompt=PROMPT, guidance="apg", generator=seeded(0), **CALL).images
    assert tuple(two.shape) == TOKENS and torch.isfinite(two).all()


def test_from_pipe_shares_components_and_leaves_stock_working(pair) -> None:
    stock, guided = pair
    assert guided.transformer is stock.transformer and guided.text_encoder is stock.text_encoder
    assert guided.vae is stock.vae and guided.tokenizer is stock.tokenizer
    before = stock(prompt=PROMPT, generator=seeded(0), **CALL).images
    guided(prompt=PROMPT, guidance="apg", generator=seeded(0), **CALL)
    assert torch.equal(stock(prompt=PROMPT, generator=seeded(0), **CALL).images, before)


def test_a_saved_stock_directory_loads_the_guided_pipeline(tmp_path, pair) -> None:
    stock, _ = pair
    stock.save_pretrained(tmp_path, safe_serialization=True)
    loaded = quiet(GuidedFlux2Pipeline.from_pretrained(tmp_path))
    assert loaded.tokenizer.chat_template == stock.tokenizer.chat_template  # stored with the tokenizer
    assert pipeline_class_for(tmp_path) is GuidedFlux2Pipeline
    assert isinstance(load_pipeline(str(tmp_path)), GuidedFlux2Pipeline)
    call = {**CALL, "output_type": "pt"}
    assert torch.equal(loaded(prompt=PROMPT, generator=seeded(0), **call).images,
                       stock(prompt=PROMPT, generator=seeded(0), **call).images)


@pytest.mark.parametrize("guidance, sampler", [("apg", None), ("cfgpp", "euler"), ("cfg_zero_star", None)])
def test_methods_run(pair, guidance, sampler) -> None:
    _, guided = pair
    out = guided(prompt=PROMPT, guidance=guidance, sampler=sampler, generator=seeded(0), **CALL)
    assert tuple(out.images.shape) == TOKENS and torch.isfinite(out.images).all()
    assert out.nfe > 3  # the unconditional (empty prompt) branch ran


def test_a_method_keeps_its_scale_and_every_branch_the_embedded_value(pair) -> None:
    """guidance_scale is embedded in the conditional and unconditional forwards alike; CFG runs at
    its own default scale (7.5) unless the spec sets one."""
    stock, guided = pair
    seen = record_guidance(guided)
    out = guided(prompt=PROMPT, guidance="cfg", guidance_scale=2.5, generator=seeded(0), **CALL)
    assert out.guidance["scale"] == 7.5 and out.nfe == 6
    assert len(seen) == 6 and all(torch.equal(g, torch.tensor([2.5])) for g in seen)
    spelled = guided(prompt=PROMPT, guidance={"name": "cfg", "scale": 7.5}, guidance_scale=2.5, generator=seeded(0),
                     **CALL)
    assert torch.equal(spelled.images, out.images)
    unguided = guided(prompt=PROMPT, guidance={"name": "cfg", "scale": 1.0}, guidance_scale=2.5, generator=seeded(0),
                      **CALL)
    assert torch.equal(unguided.images, stock(prompt=PROMPT, guidance_scale=2.5, generator=seeded(0), **CALL).images)
    assert unguided.nfe == 3 and not torch.equal(unguided.images, out.images)


def test_negative_prompt_is_the_unconditional_branch_of_a_method(pair) -> None:
    stock, guided = pair
    negative, _ = stock.encode_prompt("blue", device="cpu", max_sequence_length=48)
    want = guided(prompt=PROMPT, guidance="cfg", negative_prompt="blue", generator=seeded(0), **CALL).images
    embedded = guided(prompt=PROMPT, guidance="cfg", negative_prompt_embeds=negative, generator=seeded(0), **CALL)
    assert torch.equal(embedded.images, want)
    assert not torch.equal(want, guided(prompt=PROMPT, guidance="cfg", generator=seeded(0), **CALL).images)


@pytest.mark.parametrize("guidance, extra, nfe", [
    ("perp_neg", {"negative_prompt": "blue"}, 9),
    ({"name": "fkc", "particles": 2}, {"sampler": "euler_ancestral"}, 12)])
def test_other_branches_and_particles_run(pair, guidance, extra, nfe) -> None:
    _, guided = pair
    out = guided(prompt=PROMPT, guidance=guidance, generator=seeded(0), **extra, **CALL)
    assert tuple(out.images.shape) == TOKENS and torch.isfinite(out.images).all()
    assert out.nfe == nfe  # perp_neg: cond, empty, negative; fkc: 2 particles of cond + uncond


@pytest.mark.parametrize("spec, nfe", [
    ({"name": "pag", "layers": [0, "single.0"]}, 9), ({"name": "seg", "layers": [0, "single.0"]}, 6),
    ({"name": "slg", "layers": [0, "single.0"], "start": 0.0, "stop": 1.0}, 9), ({"name": "tsg", "t_min": 0.0}, 6)])
def test_layer_methods_run_and_leave_the_model_as_it_was(pair, spec, nfe) -> None:
    """Flux2Branches alters the blocks (tests/test_flow_layers.py checks how); [dev] inherits it."""
    stock, guided = pair
    before = stock(prompt=PROMPT, generator=seeded(0), **CALL).images
    out = guided(prompt=PROMPT, guidance=spec, generator=seeded(0), **CALL)
    assert torch.isfinite(out.images).all() and out.nfe == nfe and not torch.equal(out.images, before)
    assert torch.equal(guided(prompt=PROMPT, generator=seeded(0), **CALL).images, before)


@pytest.mark.parametrize("guidance, message", [
    ("sag", r"method 'sag' reads a plain self-attention map, which GuidedFlux2Pipeline"),
    ("dual_cfg", r"method 'dual_cfg' needs branch"),
    ("slg", r"transformer block indices 0\.\.0 \(double-stream\)")])  # its default layers 7, 8, 9
def test_unavailable_methods_are_refused_before_any_transformer_forward(pair, guidance, message) -> None:
    _, guided = pair
    calls = []
    guided.transformer.forward = lambda *a, **k: calls.append(1)  # the prompts may be encoded
    with pytest.raises(ValueError, match=message):
        guided(prompt=PROMPT, guidance=guidance, generator=seeded(0), **CALL)
    assert calls == []


@pytest.mark.parametrize("kwargs, message", [
    ({"caption_upsample_temperature": 0.15}, r"caption_upsample_temperature: .*upsample_prompt.*0\.15"),
    ({"guidance_scale": None}, r"guidance_scale: the guidance value embedded .*got None"),
    ({"negative_prompt": "blue"}, r"negative_prompt: guidance=None runs the stock Flux\.2 \[dev\] recipe"),
    ({"negative_prompt_embeds": torch.zeros(1, 4, 48)}, r"negative_prompt_embeds: guidance=None"),
    ({"guidance": "cfg", "negative_prompt": ["blue"] * 3}, r"negative_prompt: expected a string or a list of 1"),
    ({"guidance": "cfg", "negative_prompt_embeds": torch.zeros(2, 4, 48)}, r"negative_prompt_embeds: expected 1 rows"),
    ({"text_encoder_out_layers": (10, 31)}, r"text_encoder_out_layers: .*\[-31, 30\].*\(10, 31\)"),
    ({"max_sequence_length": 0}, r"max_sequence_length: must be an integer >= 1, got 0"),
    ({"image": []}, r"image: expected a PIL image"),
    ({"latents": torch.zeros(TOKENS)}, r"latents: expected a tensor of shape \(1, 8, 8, 8\)"),
    ({"ip_adapter_image": object()}, r"unsupported argument\(s\) \['ip_adapter_image'\]"),
])
def test_bad_inputs_are_refused_before_any_model_call(pair, kwargs, message) -> None:
    _, guided = pair
    calls = forbid_model_calls(guided)
    with pytest.raises(ValueError, match=message):
        guided(prompt=PROMPT, generator=seeded(0), **{**CALL, **kwargs})
    assert calls == []


def test_a_zero_upsampling_temperature_is_the_stock_call(pair) -> None:
    """The stock pipeline upsamples only for a truthy temperature."""
    stock, guided = pair
    want = stock(prompt=PROMPT, caption_upsample_temperature=0.0, generator=seeded(0), **CALL).images
    assert torch.equal(guided(prompt=PROMPT, caption_upsample_temperature=0.0, generator=seeded(0), **CALL).images,
                       want)


def test_a_prompt_longer_than_max_sequence_length_warns_and_is_cut_as_stock(pair) -> None:
    stock, guided = pair
    call = {**CALL, "max_sequence_length": 36}
    want = stock(prompt=PROMPT, generator=seeded(0), **call).images
    with pytest.warns(PromptTruncatedWarning, match=r"prompt: .* 39 tokens .*max_sequence_length=36; "
                                                    r"cut: ' blue background'"):
        got = guided(prompt=PROMPT, generator=seeded(0), **call)
    assert torch.equal(got.images, want) and len(got.warnings) == 1
