"""GuidedChromaPipeline (packed latent tokens, T5 attention masks over text and image tokens, CFG
in separate forwards) against the stock Chroma pipeline on tiny random models."""

from __future__ import annotations

import pytest
import torch
from diffusers import ChromaPipeline

from guidance_engine.pipelines.chroma import ChromaBranches, GuidedChromaPipeline
from guidance_engine.pipelines.messages import PromptTruncatedWarning
from guidance_engine.pipelines.models import pipeline_class_for
from guidance_engine.pipelines.toy.tiny_chroma import tiny_chroma_components
from conftest import PROMPT, quiet, seeded

CALL = {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 16, "output_type": "latent"}
#: the tiny model's packed latents: 16 x 16 latents in 2 x 2 patches of one channel
PACKED = (1, 64, 4)


@pytest.fixture
def chroma_pair():
    stock = quiet(ChromaPipeline(**tiny_chroma_components(0)))
    return stock, quiet(GuidedChromaPipeline.from_pipe(stock))


def refuse_forwards(pipe) -> list[int]:
    """Replace the transformer's forward by one that fails the test; returns its call log."""
    calls: list[int] = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the transformer ran")

    pipe.transformer.forward = refuse
    return calls


def test_default_call_is_stock_cfg_bit_for_bit(chroma_pair) -> None:
    """The stock default: CFG at 5.0 against the empty prompt, two forwards a step."""
    stock, guided = chroma_pair
    want = stock(PROMPT, generator=seeded(0), **CALL).images
    got = guided(PROMPT, generator=seeded(0), **CALL)
    assert torch.equal(got.images, want) and got.nfe == 6
    assert got.guidance["name"] == "cfg" and got.guidance["scale"] == 5.0


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_a_scale_of_at_most_one_is_the_conditional_alone(chroma_pair, scale) -> None:
    """The stock condition ``guidance_scale > 1``: otherwise one forward a step, unguided."""
    stock, guided = chroma_pair
    want = stock(PROMPT, guidance_scale=scale, generator=seeded(0), **CALL).images
    got = guided(PROMPT, guidance_scale=scale, generator=seeded(0), **CALL)
    assert torch.equal(got.images, want) and got.nfe == 3
    assert not torch.equal(want, stock(PROMPT, generator=seeded(0), **CALL).images)  # the guidance acts


def test_forwards_are_the_stock_ones_in_the_stock_order(chroma_pair) -> None:
    """cond then uncond, each a forward of its own with its embeddings, mask and text positions."""
    stock, guided = chroma_pair
    forward = stock.transformer.forward

    def recorded(pipe) -> list[tuple[torch.Tensor, ...]]:
        calls = []

        def record(*args, **kwargs):
            calls.append(tuple(kwargs[k] for k in ("encoder_hidden_states", "attention_mask", "txt_ids")))
            return forward(*args, **kwargs)

        pipe.transformer.forward = record
        pipe(PROMPT, negative_prompt="a blue square", generator=seeded(0), **CALL)
        return calls

    want, got = recorded(stock), recorded(guided)
    assert len(got) == len(want) == 6
    assert not torch.equal(want[0][1], want[1][1])  # the prompts' masks differ: the order is seen
    for ours, theirs in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_negative_prompt_and_decoded_images_equal_stock(chroma_pair) -> None:
    stock, guided = chroma_pair
    call = {**CALL, "negative_prompt": "blue", "guidance_scale": 4.0}
    want = stock(PROMPT, generator=seeded(0), **call).images
    assert torch.equal(guided(PROMPT, generator=seeded(0), **call).images, want)
    assert not torch.equal(want, stock(PROMPT, guidance_scale=4.0, generator=seeded(0), **CALL).images)
    call["output_type"] = "pt"
    want = stock(PROMPT, generator=seeded(1), **call).images
    got = guided(PROMPT, generator=seeded(1), **call).images
    assert tuple(got.shape) == (1, 3, 32, 32) and torch.equal(got, want)


def test_batches_and_generator_lists_equal_stock(chroma_pair) -> None:
    """Prompts of different lengths: each row's attention mask hides its own padding."""
    stock, guided = chroma_pair
    prompts = ["a red circle", "a small blue square on a big green background"]
    kwargs = {"negative_prompt": ["blue", "a red triangle"], "guidance_scale": 3.0, "num_images_per_prompt": 2,
              **CALL}
    want = stock(prompts, generator=[seeded(i) for i in range(4)], **kwargs).images
    got = guided(prompts, generator=[seeded(i) for i in range(4)], **kwargs)
    assert torch.equal(got.images, want) and got.nfe_per_image == [6] * 4
    for output_type in ("latent", "pt"):
        call = {**kwargs, "output_type": output_type}
        want = stock(prompts, generator=seeded(5), **call).images
        assert torch.equal(guided(prompts, generator=seeded(5), **call).images, want)


def test_latents_and_callback_are_packed_as_stock(chroma_pair) -> None:
    stock, guided = chroma_pair
    latents = torch.randn(PACKED, generator=seeded(3))
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(tuple(tensors["latents"].shape))
        return {"latents": tensors["latents"] * 0.5} if i == 0 else {}

    want = stock(PROMPT, latents=latents, callback_on_step_end=callback, **CALL).images
    got = guided(PROMPT, latents=latents, callback_on_step_end=callback, **CALL).images
    assert torch.equal(got, want) and set(seen) == {PACKED} and len(seen) == 6
    assert not torch.equal(want, stock(PROMPT, latents=latents, **CALL).images)  # the callback acts


def test_given_embeddings_and_masks_equal_stock(chroma_pair) -> None:
    stock, guided = chroma_pair
    with torch.no_grad():  # as inside the pipeline call (autograd picks other kernels)
        embeds, _, mask, negative, _, negative_mask = stock.encode_prompt(
            PROMPT, negative_prompt="blue", max_sequence_length=16)
    kwargs = {"prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_prompt_embeds": negative,
              "negative_prompt_attention_mask": negative_mask, **CALL}
    want = stock(generator=seeded(0), **kwargs).images
    assert torch.equal(guided(generator=seeded(0), **kwargs).images, want)
    assert torch.equal(want, stock(PROMPT, negative_prompt="blue", generator=seeded(0), **CALL).images)
    # given per prompt, they are repeated per image as computed ones (stock runs only one image a prompt)
    want = stock(PROMPT, negative_prompt="blue", num_images_per_prompt=2, generator=[seeded(1), seeded(2)],
                 **CALL).images
    got = guided(num_images_per_prompt=2, generator=[seeded(1), seeded(2)], **kwargs).images
    assert tuple(got.shape) == (2, *PACKED[1:]) and torch.equal(got, want)


def test_from_pipe_shares_components_and_leaves_stock_working(chroma_pair) -> None:
    stock, guided = chroma_pair
    assert guided.transformer is stock.transformer and guided.text_encoder is stock.text_encoder
    assert guided.vae is stock.vae
    before = stock(PROMPT, generator=seeded(0), **CALL).images
    guided(PROMPT, guidance="apg", generator=seeded(0), **CALL)
    assert torch.equal(stock(PROMPT, generator=seeded(0), **CALL).images, before)


@pytest.mark.parametrize("guidance, extra", [
    ("apg", {}), ("cfgpp", {"sampler": "euler"}), ("cfg_zero_star", {}),
    ("perp_neg", {"negative_prompt": "blue"}),
    ({"name": "fkc", "particles": 2}, {"sampler": "euler_ancestral"}),
])
def test_methods_run_on_chroma(chroma_pair, guidance, extra) -> None:
    _, guided = chroma_pair
    out = guided(PROMPT, guidance=guidance, generator=seeded(0), **extra, **CALL)
    assert tuple(out.images.shape) == PACKED and torch.isfinite(out.images).all()
    assert out.nfe > 3  # more than the conditional alone: the other branches ran


def test_a_method_takes_guidance_scale_as_its_scale(chroma_pair) -> None:
    _, guided = chroma_pair
    assert guided(PROMPT, guidance="apg", guidance_scale=2.5, generator=seeded(0), **CALL).guidance["scale"] == 2.5


def test_row_subsets_read_their_own_rows_masks(chroma_pair) -> None:
    """A branch evaluated on some rows only (methods that guide some samples) gets those rows'
    embeddings, masks and text positions: prompts of different lengths have different masks."""
    _, guided = chroma_pair
    prompts = ["a red circle", "a small blue square on a big green background"]
    cond = guided.prompt_condition(prompts, None, None, rows=2, image_tokens=64, device=torch.device("cpu"),
                                   num_images_per_prompt=1, max_sequence_length=16, lora_scale=None)
    assert not torch.equal(cond["attention_mask"][0], cond["attention_mask"][1])
    img_ids = guided._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)
    branches = ChromaBranches(guided.transformer, {"cond": cond}, img_ids=img_ids)
    x, t = torch.randn(2, 1, 16, 16, generator=seeded(1)), torch.tensor(500.0)
    full = branches(x, t, [("cond", None)])["cond"]
    second = branches(x, t, [("cond", torch.tensor([1]))])["cond"]
    torch.testing.assert_close(second, full[1:], rtol=0, atol=1e-5)
    first_mask = {**cond, "attention_mask": cond["attention_mask"][[0, 0]]}
    wrong = ChromaBranches(guided.transformer, {"cond": first_mask}, img_ids=img_ids)(
        x, t, [("cond", torch.tensor([1]))])["cond"]
    assert (wrong - second).abs().max() > 1e-4  # the mask matters: a wrong row would be seen


def test_reading_an_attention_map_is_refused_before_any_forward(chroma_pair) -> None:
    """SAG reads a plain self-attention map, which Chroma lacks (PAG, SEG, SLG and TSG run:
    tests/test_flow_layers.py)."""
    _, guided = chroma_pair
    calls = refuse_forwards(guided)
    with pytest.raises(ValueError, match=r"method 'sag' .*do not have"):
        guided(PROMPT, guidance="sag", generator=seeded(0), **CALL)
    assert calls == []


def test_missing_branches_are_refused_before_any_forward(chroma_pair) -> None:
    _, guided = chroma_pair
    calls = refuse_forwards(guided)
    with pytest.raises(ValueError, match=r"method 'dual_cfg' needs branch"):
        guided(PROMPT, guidance="dual_cfg", generator=seeded(0), **CALL)
    assert calls == []


@pytest.mark.parametrize("kwargs, match", [
    ({"max_sequence_length": 0}, r"max_sequence_length: must be an integer in \[1, 512\], got 0"),
    ({"ip_adapter_image_embeds": [torch.zeros(1, 4)]}, r"unsupported argument\(s\) \['ip_adapter_image_embeds'\]"),
    ({"prompt_embeds": torch.zeros(1, 16, 32), "prompt_attention_mask": torch.ones(1, 15), "prompt": None},
     r"prompt_attention_mask: expected a tensor of shape \(1, 16\)"),
    ({"prompt_embeds": torch.zeros(1, 16, 8), "prompt_attention_mask": torch.ones(1, 16), "prompt": None},
     r"prompt_embeds: expected a \(1, tokens, 32\) tensor"),
    ({"negative_prompt": ["blue", "red"]}, r"negative_prompt: expected a string or a list of 1 strings"),
])
def test_bad_inputs_are_refused_before_any_forward(chroma_pair, kwargs, match) -> None:
    _, guided = chroma_pair
    calls = refuse_forwards(guided)
    call = {"prompt": PROMPT, **CALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        guided(generator=seeded(0), **call)
    assert calls == []


def test_a_cut_prompt_is_reported_and_still_equals_stock(chroma_pair) -> None:
    stock, guided = chroma_pair
    call = {**CALL, "max_sequence_length": 6}
    want = stock(PROMPT, generator=seeded(0), **call).images
    with pytest.warns(PromptTruncatedWarning, match=r"max_sequence_length=6; cut: 'a blue background'"):
        got = guided(PROMPT, generator=seeded(0), **call)
    assert torch.equal(got.images, want) and len(got.warnings) == 1


def test_a_saved_stock_directory_loads_the_guided_pipeline(tmp_path) -> None:
    ChromaPipeline(**tiny_chroma_components(0)).save_pretrained(tmp_path, safe_serialization=True)
    pipe = quiet(GuidedChromaPipeline.from_pretrained(tmp_path))
    assert isinstance(pipe, GuidedChromaPipeline) and pipeline_class_for(tmp_path) is GuidedChromaPipeline
    stock = quiet(ChromaPipeline.from_pretrained(tmp_path))
    call = {**CALL, "negative_prompt": "blue"}
    want = quiet(ChromaPipeline(**tiny_chroma_components(0)))(PROMPT, generator=seeded(0), **call).images
    assert torch.equal(stock(PROMPT, generator=seeded(0), **call).images, want)
    assert torch.equal(pipe(PROMPT, generator=seeded(0), **call).images, want)
