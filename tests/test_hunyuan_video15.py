"""GuidedHunyuanVideo15Pipeline (HunyuanVideo 1.5 text-to-video: Qwen2.5-VL and ByT5 embeddings with
their masks, the stock CFG in a diffusers guider, a dual-stream transformer with joint attention)
against the stock HunyuanVideo15Pipeline on tiny random models; the layer alterations on its blocks
against independent constructions on deep copies of the tiny transformer:

- SLG: the block's forward replaced by one returning its two streams;
- STG-R (a block's joint attention skipped): a processor returning its inputs, as Hyung et al.'s
  STG-R processor on HunyuanVideo does;
- PAG / STG-A: the stock processor, its attention call given the identity on the video tokens
  (the attention function patched for the reference forward only);
- TSG: a forward hook adding the noise to the time-step MLP's output.

The tests shorten the stock text lengths (Qwen 1000 -> 32 tokens, ByT5 256 -> 16, image tokens
729 -> 8, instance attributes the stock encoder reads) on both pipelines; one test runs the stock
lengths.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from diffusers import HunyuanVideo15Pipeline
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance
from diffusers.models.transformers import transformer_hunyuan_video15
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

from guidance_engine.guidance import Branch
from guidance_engine.pipelines.hunyuan_video15 import GuidedHunyuanVideo15Pipeline, HunyuanVideo15Branches
from guidance_engine.pipelines.toy.tiny_hunyuan_video15 import tiny_hunyuan_video15_components
from conftest import PROMPT, quiet, seeded
from video_helpers import altered, captured_branches, no_forward

STEPS = 3
CALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": STEPS, "output_type": "latent"}
#: one video's latents: 4 channels, 3 latent frames (5 frames), 8 x 8
LATENT = (4, 3, 8, 8)
PROMPTS = ["a red circle", "a blue square"]
GLYPH = 'a sign saying "hello"'  # a quoted text: the ByT5 glyph encoder runs
T = torch.tensor(900.0)
#: the stock text lengths, shortened for speed on both pipelines (see the module docstring)
SHORT = {"tokenizer_max_length": 32, "tokenizer_2_max_length": 16, "vision_num_semantic_tokens": 8}


def shortened(pipe, **lengths: int):
    for name, value in {**SHORT, **lengths}.items():
        setattr(pipe, name, value)
    return quiet(pipe)


def pair(short: bool = True, **options: Any) -> tuple[HunyuanVideo15Pipeline, GuidedHunyuanVideo15Pipeline]:
    """(stock, guided) pipelines sharing one set of tiny components."""
    components = tiny_hunyuan_video15_components(0, **options)
    stock, guided = HunyuanVideo15Pipeline(**components), GuidedHunyuanVideo15Pipeline(**components)
    return (shortened(stock), shortened(guided)) if short else (quiet(stock), quiet(guided))


@pytest.fixture(scope="module")
def hunyuan():
    return pair()


# --------------------------------------------------------------------------- the stock recipe
@pytest.mark.parametrize("output_type", ["latent", "pt", "np"])
def test_one_video_equals_stock(hunyuan, output_type) -> None:
    stock, guided = hunyuan
    call = {**CALL, "output_type": output_type, "negative_prompt": "blue"}
    want = stock(PROMPT, generator=seeded(0), **call).frames
    got = guided(PROMPT, generator=seeded(0), **call)
    assert type(got.frames) is type(want) and got.frames.shape == want.shape
    assert (torch.equal(got.frames, want) if output_type != "np" else (got.frames == want).all())
    assert got.nfe_per_image == [2 * STEPS] and got.frames is got.images


def test_batches_and_generator_lists_equal_stock(hunyuan) -> None:
    """Two prompts with a generator list: the stock latents; decoded, the stock VAE and video
    processor on each video (the stock decode of two videos fails: see the module docstring of
    the pipeline)."""
    stock, guided = hunyuan
    call = {**CALL, "negative_prompt": ["blue", "red"]}
    want = stock(PROMPTS, generator=[seeded(0), seeded(1)], **call).frames
    got = guided(PROMPTS, generator=[seeded(0), seeded(1)], **call)
    assert torch.equal(got.frames, want) and got.nfe_per_image == [2 * STEPS] * 2
    with pytest.raises(RuntimeError, match="broadcast"):  # the stock VAE on two videos
        stock.vae.decode(want / stock.vae.config.scaling_factor)
    with torch.no_grad():
        each = torch.cat([stock.vae.decode(row[None] / stock.vae.config.scaling_factor).sample for row in want])
    decoded = guided(PROMPTS, generator=[seeded(0), seeded(1)], **{**call, "output_type": "pt"}).frames
    assert torch.equal(decoded, stock.video_processor.postprocess_video(each, output_type="pt"))


def test_videos_per_prompt_equal_stock_on_the_repeated_prompts(hunyuan) -> None:
    """Two videos per prompt (the stock call fails there: one zero image embedding per prompt)
    equal the stock pipeline on the prompts repeated, one video each."""
    stock, guided = hunyuan
    want = stock([PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, negative_prompt=["blue"] * 2 + ["red"] * 2,
                 generator=[seeded(i) for i in range(4)], **CALL).frames
    got = guided(PROMPTS, negative_prompt=["blue", "red"], num_videos_per_prompt=2,
                 generator=[seeded(i) for i in range(4)], **CALL)
    assert torch.equal(got.frames, want) and got.nfe_per_image == [2 * STEPS] * 4


@pytest.mark.parametrize("guider, nfe", [
    ({"guidance_scale": 6.0}, 2 * STEPS),
    ({"guidance_scale": 1.0}, STEPS),  # the neutral scale: the conditional forward alone
    ({"guidance_scale": 4.0, "guidance_rescale": 0.7}, 2 * STEPS),
    ({"guidance_scale": 4.0, "start": 0.34, "stop": 0.67}, 4),  # CFG at step int(0.34 * 3) = 1 only
    ({"guidance_scale": 2.0, "use_original_formulation": True}, 2 * STEPS),
    ({"guidance_scale": 4.0, "guidance_rescale": 0.5, "enabled": False}, STEPS),  # rescale still applied
])
def test_the_guiders_recipes_equal_stock(guider, nfe) -> None:
    components = tiny_hunyuan_video15_components(0)
    components["guider"] = ClassifierFreeGuidance(**guider)
    stock = shortened(HunyuanVideo15Pipeline(**components))
    guided = shortened(GuidedHunyuanVideo15Pipeline(**components))
    want = stock(PROMPT, negative_prompt="blue", generator=seeded(0), **CALL).frames
    got = guided(PROMPT, negative_prompt="blue", generator=seeded(0), **CALL)
    assert torch.equal(got.frames, want) and got.nfe == nfe


def test_guidance_scale_replaces_the_guiders(hunyuan) -> None:
    stock, guided = hunyuan
    components = {**stock.components, "guider": ClassifierFreeGuidance(guidance_scale=3.0)}
    want = shortened(HunyuanVideo15Pipeline(**components))(PROMPT, generator=seeded(0), **CALL).frames
    assert torch.equal(guided(PROMPT, guidance_scale=3.0, generator=seeded(0), **CALL).frames, want)
    assert not torch.equal(guided(PROMPT, generator=seeded(0), **CALL).frames, want)  # the guider's 6.0


def test_latents_quoted_text_and_given_embeddings_equal_stock(hunyuan) -> None:
    stock, guided = hunyuan
    latents = torch.randn((1, *LATENT), generator=seeded(3))
    assert torch.equal(guided(GLYPH, latents=latents, **CALL).frames, stock(GLYPH, latents=latents, **CALL).frames)
    with torch.no_grad():
        embeds, mask, embeds_2, mask_2 = stock.encode_prompt(GLYPH, device="cpu", batch_size=1)
    assert mask_2.sum() > 0  # the glyph encoder's tokens are in the conditioning
    given = {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "prompt_embeds_2": embeds_2,
             "prompt_embeds_mask_2": mask_2}
    want = stock(generator=seeded(0), **given, **CALL).frames
    assert torch.equal(guided(generator=seeded(0), **given, **CALL).frames, want)
    assert torch.equal(guided(GLYPH, generator=seeded(0), **CALL).frames, want)


def test_the_stock_text_lengths_equal_stock() -> None:
    """Qwen2.5-VL over 1000 + 108 template tokens (the first 108 dropped: the tiny tokenizer's
    system turn is that long), ByT5 over 256, 729 zero image tokens."""
    stock, guided = pair(short=False)
    assert stock.tokenizer_max_length == 1000 and stock.vision_num_semantic_tokens == 729
    want = stock(GLYPH, negative_prompt="blue", generator=seeded(0), **{**CALL, "num_inference_steps": 2}).frames
    got = guided(GLYPH, negative_prompt="blue", generator=seeded(0), **{**CALL, "num_inference_steps": 2})
    assert torch.equal(got.frames, want)


def test_a_directory_saved_by_the_stock_pipeline_loads_and_equals_stock(tmp_path) -> None:
    stock = quiet(HunyuanVideo15Pipeline(**tiny_hunyuan_video15_components(0, guidance_scale=4.5)))
    stock.save_pretrained(tmp_path, safe_serialization=True)
    loaded = shortened(GuidedHunyuanVideo15Pipeline.from_pretrained(tmp_path))
    from guidance_engine.pipelines.models import pipeline_class_for

    assert pipeline_class_for(tmp_path) is GuidedHunyuanVideo15Pipeline  # what the CLI and batch detect
    assert loaded.guider.config.guidance_scale == 4.5  # the guider's config travels
    reloaded = shortened(HunyuanVideo15Pipeline.from_pretrained(tmp_path))  # stock on the same files (test_wan)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.transformer.state_dict().values(),
                                                 stock.transformer.state_dict().values()))
    call = {**CALL, "negative_prompt": "blue", "output_type": "pt"}
    assert torch.equal(loaded(PROMPT, generator=seeded(0), **call).frames,
                       reloaded(PROMPT, generator=seeded(0), **call).frames)


def test_from_pipe_shares_components_and_leaves_stock_working() -> None:
    stock = shortened(HunyuanVideo15Pipeline(**tiny_hunyuan_video15_components(0)))
    guided = shortened(GuidedHunyuanVideo15Pipeline.from_pipe(stock))
    assert guided.transformer is stock.transformer and guided.guider is stock.guider
    before = stock(PROMPT, generator=seeded(0), **CALL).frames
    for layers in ([1], ["transformer_blocks.0.attn"]):  # dispatchers on a block and on a joint attention
        guided(PROMPT, generator=seeded(0), guidance={"name": "slg", "layers": layers, "start": 0.0}, **CALL)
    guided(PROMPT, generator=seeded(0), guidance={"name": "pag", "layers": [0]}, **CALL)
    assert torch.equal(guided(PROMPT, generator=seeded(0), **CALL).frames, before)
    assert torch.equal(stock(PROMPT, generator=seeded(0), **CALL).frames, before)


# --------------------------------------------------------------------------- methods
@pytest.mark.parametrize("guidance, extra, nfe", [
    ("apg", {}, 2 * STEPS),
    ("cfgpp", {"sampler": "euler"}, 2 * STEPS),
    ("cfg_zero_star", {}, 1 + 2 * (STEPS - 1)),  # the first step's velocity is zeroed: cond alone
    ("perp_neg", {"negative_prompt": "blue"}, 3 * STEPS),  # cond, empty prompt, negative prompt
    ({"name": "fkc", "particles": 2}, {"sampler": "euler_ancestral"}, 2 * 2 * STEPS),  # a group of 2 particles
    ({"name": "slg", "layers": [1], "start": 0.0, "stop": 1.0}, {}, 3 * STEPS),
    ({"name": "slg", "scale": 1.0, "slg_scale": 2.0, "layers": ["transformer_blocks.1.attn"], "start": 0.0,
      "stop": 1.0}, {}, 2 * STEPS),  # STG-R on a guidance-distilled model: c + w (c - p), their HunyuanVideo rule
    ({"name": "pag", "layers": [0]}, {}, 3 * STEPS),  # STG-A
    ({"name": "tsg", "t_min": 0.0}, {}, 2 * STEPS),  # cond and the noised-time branch
    ("icg", {}, 2 * STEPS),  # cond and a prompt of random tokens, encoded as the prompt
    ({"name": "perp_neg", "negatives": [("blue", 1.0), ("red", 0.5)]}, {}, 4 * STEPS),  # a branch per negative
])
def test_methods_run_on_hunyuan_video15(hunyuan, guidance, extra, nfe) -> None:
    _, guided = hunyuan
    out = guided(PROMPT, guidance=guidance, generator=seeded(0), **extra, **CALL)
    assert tuple(out.frames.shape) == (1, *LATENT) and torch.isfinite(out.frames).all()
    assert out.nfe == nfe


def test_ag_runs_and_one_listed_negative_is_the_calls_negative_prompt(hunyuan) -> None:
    _, guided = hunyuan
    out = guided(PROMPT, guidance="ag", generator=seeded(0), **CALL)
    assert torch.isfinite(out.frames).all() and STEPS < out.nfe <= 2 * STEPS
    listed = guided(PROMPT, guidance={"name": "perp_neg", "negatives": [("blue", 1.0)]}, generator=seeded(0), **CALL)
    given = guided(PROMPT, guidance="perp_neg", negative_prompt="blue", generator=seeded(0), **CALL)
    assert torch.equal(listed.frames, given.frames) and listed.nfe == given.nfe == 3 * STEPS


@pytest.mark.parametrize("call, message", [
    ({"guidance": "nag", "negative_prompt": "blue"},
     r"method 'nag' alters cross-attention, which GuidedHunyuanVideo15Pipeline does not have"),
    ({"guidance": {"name": "seg", "layers": [0]}}, r"needs perturbation 'blur', which GuidedHunyuanVideo15Pipeline "
                                                   r"does not support yet \(it supports identity, skip\)"),
    ({"guidance": "sag"}, r"method 'sag' reads a self-attention map, which GuidedHunyuanVideo15Pipeline does not "
                          r"record"),
    ({"guidance": {"name": "slg", "layers": [2]}},
     r"'layers' must be HunyuanVideo 1.5 transformer block indices 0..1 .*got 2"),
    ({"guidance": {"name": "pag", "layers": ["transformer_blocks.0.attn"]}},
     r"'layers' must be HunyuanVideo 1.5 transformer block indices 0..1 \(or 'transformer_blocks.<i>'\), got "
     r"'transformer_blocks.0.attn'"),  # a named attention is a skip's only
    ({"guidance": "pag"}, r"default layers \[2\] are not all among this model's HunyuanVideo 1.5"),
    ({"guidance": "perp_neg"}, r"needs a negative prompt"),
    ({"num_videos_per_prompt": 0}, r"num_videos_per_prompt: must be an integer >= 1, got 0"),
    ({"guidance": "apg", "reference": 1}, r"unsupported argument\(s\) \['reference'\]"),
])
def test_refusals_come_before_any_forward(call, message) -> None:
    _, guided = pair()
    calls = no_forward(guided)
    with pytest.raises(ValueError, match=message):
        guided(generator=seeded(0), **{"prompt": PROMPT, **CALL, **call})
    assert calls == []


def test_another_guider_is_refused_with_guidance_none_before_any_forward() -> None:
    components = {**tiny_hunyuan_video15_components(0), "guider": AdaptiveProjectedGuidance()}
    guided = shortened(GuidedHunyuanVideo15Pipeline(**components))
    calls = no_forward(guided)
    with pytest.raises(ValueError, match=r"guider: guidance=None runs the stock guider, which the engine "
                                         r"reproduces for ClassifierFreeGuidance only, got AdaptiveProjectedGuidance"):
        guided(PROMPT, **CALL)
    assert calls == []


# --------------------------------------------------------------------------- layers against references
@pytest.fixture(scope="module")
def branches(hunyuan) -> HunyuanVideo15Branches:
    """The branch model a pipeline call builds (the stock conditions), before any denoising step."""
    return captured_branches(hunyuan[1], prompt=GLYPH, negative_prompt="blue", **CALL)


def evaluate(branches, x: torch.Tensor, requests, model=None) -> dict[str, torch.Tensor]:
    if model is not None:
        branches = copy.copy(branches)
        branches.model = model
    with torch.no_grad():
        return branches(x, T, requests)


def plain(branches, x: torch.Tensor, model=None) -> torch.Tensor:
    return evaluate(branches, x, [("cond", None)], model)["cond"]


def latents(seed: int) -> torch.Tensor:
    return torch.randn((1, *LATENT), generator=seeded(seed))


@pytest.mark.parametrize("layer", [0, 1])
def test_skipped_blocks_pass_both_streams(branches, layer) -> None:
    x = latents(1)
    got = evaluate(branches, x, [(altered("skip", layer), None)])[altered("skip", layer)]
    reference = copy.deepcopy(branches.model)
    reference.transformer_blocks[layer].forward = lambda hidden_states, encoder_hidden_states, *a, **k: (
        hidden_states, encoder_hidden_states)
    assert torch.equal(got, plain(branches, x, reference))
    assert not torch.allclose(got, plain(branches, x), atol=1e-4)


class _PassThrough(HunyuanVideo15AttnProcessor2_0):
    """Hyung et al.'s STG-R on a joint attention: its outputs are its inputs."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return hidden_states, encoder_hidden_states


def test_stg_r_passes_a_joint_attentions_inputs_through(branches) -> None:
    x = latents(2)
    name = altered("skip", "transformer_blocks.1.attn")
    both = evaluate(branches, x, [("cond", None), (name, None)])
    reference = copy.deepcopy(branches.model)
    reference.transformer_blocks[1].attn.set_processor(_PassThrough())
    assert torch.allclose(both[name], plain(branches, x, reference), atol=1e-6, rtol=0)
    assert torch.allclose(both["cond"], plain(branches, x), atol=1e-6, rtol=0)
    assert not torch.allclose(both[name], both["cond"], atol=1e-4)


def test_pag_is_the_identity_on_the_video_tokens_within_the_padding_mask(branches, monkeypatch) -> None:
    """The reference: the stock processor, whose attention call gets its own mask with the
    video-to-video block (3 x 8 x 8 = 192 video tokens) replaced by the identity."""
    x = latents(3)
    video = LATENT[1] * LATENT[2] * LATENT[3]
    got = evaluate(branches, x, [(altered("identity", 1), None)])[altered("identity", 1)]
    reference = copy.deepcopy(branches.model)
    stock_attention = transformer_hunyuan_video15.dispatch_attention_fn
    layer = reference.transformer_blocks[1].attn

    class _Identity(HunyuanVideo15AttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            def identity(query, key, value, attn_mask=None, **rest):
                keep = torch.ones(attn_mask.shape[-2:], dtype=torch.bool)
                keep[:video, :video] = torch.eye(video, dtype=torch.bool)
                return stock_attention(query, key, value, attn_mask=attn_mask & keep, **rest)

            monkeypatch.setattr(transformer_hunyuan_video15, "dispatch_attention_fn", identity)
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
            finally:
                monkeypatch.setattr(transformer_hunyuan_video15, "dispatch_attention_fn", stock_attention)

    layer.set_processor(_Identity())
    assert torch.allclose(got, plain(branches, x, reference), atol=1e-6, rtol=0)
    assert not torch.allclose(got, plain(branches, x), atol=1e-4)


def test_tsg_noise_is_on_the_time_step_mlp(branches) -> None:
    x = latents(5)
    noised = Branch("noised", base="cond", time_noise=1.0, generator=seeded(4))
    got = evaluate(branches, x, [(noised, None)])[noised]
    reference = copy.deepcopy(branches.model)

    def hook(module, inputs, emb):
        return emb + emb.float().std() * torch.randn(emb.shape, generator=seeded(4))

    reference.time_embed.timestep_embedder.register_forward_hook(hook)
    assert torch.equal(got, plain(branches, x, reference))
    assert not torch.allclose(got, plain(branches, x), atol=1e-4)


@pytest.mark.parametrize("alteration", [altered("skip", 1), altered("skip", "transformer_blocks.0.attn"),
                                        altered("identity", 0)])
def test_in_one_batched_forward_only_the_altered_rows_change(branches, alteration) -> None:
    batched = copy.copy(branches)
    batched.separate_forwards = False
    x = latents(7)
    both = evaluate(batched, x, [("cond", None), (alteration, None)])
    assert torch.allclose(both["cond"], plain(branches, x), atol=1e-5, rtol=0)
    assert torch.allclose(both[alteration], evaluate(branches, x, [(alteration, None)])[alteration], atol=1e-5, rtol=0)
    assert not torch.allclose(both[alteration], both["cond"], atol=1e-4)
