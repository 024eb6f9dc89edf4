"""GuidedLTXPipeline (LTX-Video text-to-video: packed video tokens, T5 embeddings with padding masks,
one batched CFG forward, a timestep-conditioned VAE) against the stock LTXPipeline on tiny random
models; the layer alterations on LTX's blocks against independent constructions on deep copies of
the tiny transformer:

- SLG: the block's forward replaced by the identity; STG-R (a block's self-attention skipped): a
  processor returning the attention's input, as Hyung et al.'s STG-R processor does;
- PAG / STG-A: the stock LTXVideoAttnProcessor with a boolean identity mask;
- SEG: a forward hook on the query projection (sigma = inf: each frame's mean query);
- TSG: a forward hook adding the noise to the time-step MLP's output;
- NAG: a cross-attention processor written here from the authors' rule (SDPA under each
  context with its own mask, their L1-norm rule in float64);

and STG as Hyung et al.'s LTX pipelines run it (junhahyung/stguidance,
diffusers/ltxvideo/pipeline_stg_ltx.py: one forward of [uncond, cond, perturbed] rows, u + s (c - u)
+ w (c - p), and their ``do_rescaling``: g (phi std(c) / std(g) + 1 - phi), one std over the
batch), re-implemented here as a loop over a deep copy, against the engine's PAG and SLG (with
``rescale``); ``rescale`` 0 is the perturbation rule itself, bit for bit, and at w = 0 the stock
CFG rescale, bit for bit.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import LTXPipeline
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

from guidance_engine.guidance import Branch, StepInfo
from guidance_engine.methods.nag import NAGAttention
from guidance_engine.methods.perturbed import perturbed_guidance
from guidance_engine.prediction import Prediction
from guidance_engine.registry import resolve_guidance
from guidance_engine.pipelines.ltx import GuidedLTXPipeline, LTXBranches
from guidance_engine.pipelines.ltx_attention import text_mask_bias
from guidance_engine.pipelines.messages import PromptTruncatedWarning
from guidance_engine.pipelines.toy.tiny_ltx import tiny_ltx_components
from conftest import PROMPT, quiet, seeded
from video_helpers import altered, captured_branches, no_forward

STEPS = 3
CALL = {"height": 32, "width": 32, "num_frames": 9, "num_inference_steps": STEPS, "max_sequence_length": 16,
        "output_type": "latent"}
#: one video's packed latents: 3 latent frames (9 frames) x 8 x 8 tokens of 8 channels
PACKED = (3 * 8 * 8, 8)
#: its unpacked latents (what the branch model sees): 8 channels, 3 frames, 8 x 8
LATENT = (8, 3, 8, 8)
T = torch.tensor(900.0)  # a timestep of the schedule's first half
#: two prompts of one token length (the stock masks then agree with ours: see the mask test)
PROMPTS = ["a red circle", "a blue square"]


def pair(**options: Any) -> tuple[LTXPipeline, GuidedLTXPipeline]:
    """(stock, guided) pipelines sharing one set of tiny components."""
    components = tiny_ltx_components(0, **options)
    return quiet(LTXPipeline(**components)), quiet(GuidedLTXPipeline(**components))


@pytest.fixture(scope="module")
def ltx():
    return pair()


# --------------------------------------------------------------------------- the stock recipe
@pytest.mark.parametrize("output_type", ["latent", "pt", "np"])
def test_batches_videos_per_prompt_and_generator_lists_equal_stock(ltx, output_type) -> None:
    stock, guided = ltx
    call = {**CALL, "output_type": output_type, "negative_prompt": ["blue", "red"], "num_videos_per_prompt": 2}
    want = stock(PROMPTS, generator=[seeded(i) for i in range(4)], **call).frames
    got = guided(PROMPTS, generator=[seeded(i) for i in range(4)], **call)
    assert type(got.frames) is type(want) and got.frames.shape == want.shape
    assert (torch.equal(got.frames, want) if output_type != "np" else (got.frames == want).all())
    assert got.nfe_per_image == [2 * STEPS] * 4 and got.frames is got.images


def test_default_scale_rescale_and_no_guidance_equal_stock(ltx) -> None:
    """The stock 3.0 (both rows); Lin et al.'s rescale on top; a scale of 1 or below: the
    conditional forward alone (and no rescale, as the stock loop)."""
    stock, guided = ltx
    for extra, nfe in (({}, 2 * STEPS), ({"guidance_rescale": 0.7, "guidance_scale": 5.0}, 2 * STEPS),
                       ({"guidance_scale": 1.0, "guidance_rescale": 0.7}, STEPS), ({"guidance_scale": 0.5}, STEPS)):
        want = stock(PROMPTS, generator=seeded(1), **CALL, **extra).frames
        got = guided(PROMPTS, generator=seeded(1), **CALL, **extra)
        assert torch.equal(got.frames, want) and got.nfe == nfe, extra
    rescaled = stock(PROMPTS, generator=seeded(1), guidance_rescale=0.7, **CALL).frames
    assert not torch.equal(rescaled, stock(PROMPTS, generator=seeded(1), **CALL).frames)  # the rescale acts


def test_latents_and_a_callback_changing_them_equal_stock(ltx) -> None:
    """Given packed latents; a callback seeing the packed latents and the negative embeddings,
    halving the latents after the first step (as the stock loop passes and takes them)."""
    stock, guided = ltx
    latents = torch.randn((1, *PACKED), generator=seeded(3))
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, float(t), tuple(tensors["latents"].shape), tuple(tensors["negative_prompt_embeds"].shape)))
        return {"latents": tensors["latents"] * 0.5} if i == 0 else {}

    inputs = ["latents", "negative_prompt_embeds"]
    want = stock(PROMPT, latents=latents, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs,
                 **CALL).frames
    stock_seen, seen[:] = list(seen), []
    got = guided(PROMPT, latents=latents, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs,
                 **CALL).frames
    assert torch.equal(got, want) and seen == stock_seen and len(seen) == STEPS
    assert not torch.equal(want, stock(PROMPT, latents=latents, **CALL).frames)  # the callback acts


def test_a_timestep_conditioned_vae_decodes_as_stock() -> None:
    """LTX-Video 0.9.1+'s VAE: the latents noised with noise drawn after the loop (one generator
    per video), decoded at the decode timestep; the default (noise scale = timestep) and a given one."""
    stock, guided = pair(timestep_conditioning=True)
    for decode in ({"decode_timestep": 0.05}, {"decode_timestep": [0.05, 0.1], "decode_noise_scale": 0.025}):
        call = {**CALL, "output_type": "pt", **decode}
        want = stock(PROMPTS, generator=[seeded(0), seeded(1)], **call).frames
        assert torch.equal(guided(PROMPTS, generator=[seeded(0), seeded(1)], **call).frames, want), decode
    plain = stock(PROMPTS, generator=[seeded(0), seeded(1)], **{**CALL, "output_type": "pt"}).frames
    assert not torch.equal(plain, want)  # the decode noise and timestep act


def test_each_video_gets_its_own_prompts_padding_mask(ltx) -> None:
    """Prompts of different token lengths, two videos each: the stock encoder pairs the embeddings
    p0, p0, p1, p1 with the masks p0, p1, p0, p1; ours equals the stock pipeline given each
    video's own embeddings and mask (and differs from its own mix-up)."""
    stock, guided = ltx
    prompts, negatives = [PROMPT, "a star"], ["blue", "a green square"]

    def per_video(texts):
        with torch.no_grad():
            embeds, mask, _, _ = stock.encode_prompt(texts, do_classifier_free_guidance=False, max_sequence_length=16)
        return embeds.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)

    (embeds, mask), (negative, negative_mask) = per_video(prompts), per_video(negatives)
    want = stock(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                 negative_prompt_attention_mask=negative_mask, generator=[seeded(i) for i in range(4)], **CALL).frames
    call = {**CALL, "negative_prompt": negatives, "num_videos_per_prompt": 2}
    got = guided(prompts, generator=[seeded(i) for i in range(4)], **call).frames
    assert torch.equal(got, want)
    assert not torch.equal(stock(prompts, generator=[seeded(i) for i in range(4)], **call).frames, want)


def test_given_embeddings_equal_stock_and_repeat_per_video(ltx) -> None:
    stock, guided = ltx
    with torch.no_grad():  # as the pipelines encode (grad mode rounds differently)
        embeds, mask, negative, negative_mask = stock.encode_prompt(PROMPTS, negative_prompt="blue",
                                                                    max_sequence_length=16)
    call = {**CALL, "prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_prompt_embeds": negative,
            "negative_prompt_attention_mask": negative_mask}
    want = stock(generator=[seeded(0), seeded(1)], **call).frames
    assert torch.equal(guided(generator=[seeded(0), seeded(1)], **call).frames, want)
    encoded = stock(PROMPTS, negative_prompt="blue", num_videos_per_prompt=2, generator=[seeded(i) for i in range(4)],
                    **CALL).frames
    assert torch.equal(guided(num_videos_per_prompt=2, generator=[seeded(i) for i in range(4)], **call).frames,
                       encoded)


def test_a_long_prompt_is_cut_as_stock_with_a_warning(ltx) -> None:
    stock, guided = ltx
    call = {**CALL, "max_sequence_length": 4}
    with pytest.warns(PromptTruncatedWarning, match="max_sequence_length"):
        got = guided(PROMPT, generator=seeded(0), **call)
    assert len(got.warnings) == 1 and "background" in got.warnings[0]
    assert torch.equal(got.frames, stock(PROMPT, generator=seeded(0), **call).frames)


def test_the_core_euler_solver_equals_the_stock_scheduler_within_float32_rounding(ltx) -> None:
    stock, guided = ltx
    want = stock(PROMPT, generator=seeded(0), **CALL).frames
    got = guided(PROMPT, generator=seeded(0), sampler="euler", **CALL)
    assert got.nfe == 2 * STEPS and torch.allclose(got.frames, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("timestep_conditioning", [False, True])
def test_a_directory_saved_by_the_stock_pipeline_loads_and_equals_stock(tmp_path, timestep_conditioning) -> None:
    stock = quiet(LTXPipeline(**tiny_ltx_components(0, timestep_conditioning=timestep_conditioning)))
    stock.save_pretrained(tmp_path, safe_serialization=True)
    loaded = quiet(GuidedLTXPipeline.from_pretrained(tmp_path))
    from guidance_engine.pipelines.models import pipeline_class_for

    assert pipeline_class_for(tmp_path) is GuidedLTXPipeline  # what the CLI and batch detect
    assert torch.equal(loaded.vae.latents_std, stock.vae.latents_std)  # the de-normalisation travels
    call = {**CALL, "negative_prompt": "blue", "output_type": "pt", "decode_timestep": 0.05}
    reloaded = quiet(LTXPipeline.from_pretrained(tmp_path))  # stock on the same files (see test_wan)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.transformer.state_dict().values(),
                                                 stock.transformer.state_dict().values()))
    assert torch.equal(loaded(PROMPT, generator=seeded(0), **call).frames,
                       reloaded(PROMPT, generator=seeded(0), **call).frames)


def test_from_pipe_shares_components_and_leaves_stock_working() -> None:
    stock = quiet(LTXPipeline(**tiny_ltx_components(0)))
    guided = quiet(GuidedLTXPipeline.from_pipe(stock))
    assert guided.transformer is stock.transformer and guided.vae is stock.vae
    before = stock(PROMPT, generator=seeded(0), **CALL).frames
    for layers in ([1], ["transformer_blocks.0.attn1"]):  # dispatchers on a block and on a self-attention
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
    ({"name": "slg", "layers": ["transformer_blocks.1.attn1"], "start": 0.0, "stop": 1.0}, {}, 3 * STEPS),  # STG-R
    ({"name": "pag", "layers": [0]}, {}, 3 * STEPS),  # STG-A
    ({"name": "seg", "layers": [0]}, {}, 2 * STEPS),  # SEG alone (scale 1): no uncond
    ({"name": "tsg", "t_min": 0.0}, {}, 2 * STEPS),  # cond and the noised-time branch
    ({"name": "nag"}, {"negative_prompt": "blue"}, STEPS),  # alone: inside the one forward
    ("icg", {}, 2 * STEPS),  # cond and a prompt of random tokens, encoded as the prompt
    ({"name": "perp_neg", "negatives": [("blue", 1.0), ("red", 0.5)]}, {}, 4 * STEPS),  # a branch per negative
])
def test_methods_run_on_ltx(ltx, guidance, extra, nfe) -> None:
    _, guided = ltx
    out = guided(PROMPT, guidance=guidance, generator=seeded(0), **extra, **CALL)
    assert tuple(out.frames.shape) == (1, *PACKED) and torch.isfinite(out.frames).all()
    assert out.nfe == nfe


def test_ag_runs_and_one_listed_negative_is_the_calls_negative_prompt(ltx) -> None:
    _, guided = ltx
    out = guided(PROMPT, guidance="ag", generator=seeded(0), **CALL)
    assert torch.isfinite(out.frames).all() and STEPS < out.nfe <= 2 * STEPS
    listed = guided(PROMPT, guidance={"name": "perp_neg", "negatives": [("blue", 1.0)]}, generator=seeded(0), **CALL)
    given = guided(PROMPT, guidance="perp_neg", negative_prompt="blue", generator=seeded(0), **CALL)
    assert torch.equal(listed.frames, given.frames) and listed.nfe == given.nfe == 3 * STEPS


@pytest.mark.parametrize("call, message", [
    ({"guidance": "sag"}, r"method 'sag' reads a self-attention map, which GuidedLTXPipeline does not record"),
    ({"guidance": {"name": "slg", "layers": [2]}}, r"'layers' must be LTX transformer block indices 0..1 .*got 2"),
    ({"guidance": {"name": "pag", "layers": ["transformer_blocks.0.attn1"]}},
     r"'layers' must be LTX transformer block indices 0..1 \(or 'transformer_blocks.<i>'\), got "
     r"'transformer_blocks.0.attn1'"),  # a named self-attention is a skip's only
    ({"guidance": "pag"}, r"default layers \[19\] are not all among this model's LTX transformer block indices 0..1"),
    ({"guidance": "perp_neg"}, r"needs a negative prompt"),
    ({"num_videos_per_prompt": 0}, r"num_videos_per_prompt: must be an integer >= 1, got 0"),
    ({"frame_rate": 0}, r"frame_rate: must be a number > 0 \(frames per second\), got 0"),
    ({"timesteps": [900, 500]}, r"timesteps: not supported; the stock LTXPipeline sets its own sigmas"),
    ({"prompt": None, "prompt_embeds": torch.zeros(1, 16, 32), "prompt_attention_mask": torch.ones(1, 15)},
     r"prompt_attention_mask: expected a tensor of shape \(1, 16\) .*got \(1, 15\)"),
    ({"prompt": None, "prompt_embeds": torch.zeros(1, 16, 32)}, r"Must provide `prompt_attention_mask`"),  # stock
    ({"height": 48}, r"divisible by 32"),  # the stock check
    ({"guidance": "apg", "guidance_rescale": 0.5}, r"method 'apg' has no parameter\(s\) rescale"),
])
def test_refusals_come_before_any_forward(call, message) -> None:
    _, guided = pair()
    calls = no_forward(guided)
    with pytest.raises(ValueError, match=message):
        guided(generator=seeded(0), **{"prompt": PROMPT, **CALL, **call})
    assert calls == []


def test_a_bad_decode_timestep_is_refused_before_any_forward() -> None:
    _, guided = pair(timestep_conditioning=True)
    calls = no_forward(guided)
    with pytest.raises(ValueError, match=r"decode_timestep: expected a number or a list of 2 numbers \(one per "
                                         r"video\), got \[0.05\]"):
        guided(PROMPT, num_videos_per_prompt=2, decode_timestep=[0.05], **{**CALL, "output_type": "pt"})
    assert calls == []


# --------------------------------------------------------------------------- layers against references
def branches_of(pipe, **call: Any) -> LTXBranches:
    """The branch model a pipeline call builds (the stock conditions), before any denoising step."""
    return captured_branches(pipe, **{"prompt": PROMPT, **CALL, "negative_prompt": "blue", **call})


@pytest.fixture(scope="module")
def branches(ltx) -> LTXBranches:
    return branches_of(ltx[1])


def evaluate(branches, x: torch.Tensor, requests, model=None) -> dict[str, torch.Tensor]:
    """The branch model's outputs at timestep ``T``, on ``model`` (a reference copy) when given."""
    if model is not None:
        branches = copy.copy(branches)
        branches.model = model
    with torch.no_grad():
        return branches(x, T, requests)


def latents(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn((rows, *LATENT), generator=seeded(seed))


def plain(branches, x: torch.Tensor, model=None) -> torch.Tensor:
    return evaluate(branches, x, [("cond", None)], model)["cond"]


@pytest.mark.parametrize("layer", [0, 1])
def test_skipped_blocks_are_the_identity(branches, layer) -> None:
    x = latents(1)
    got = evaluate(branches, x, [("uncond", None), ("cond", None), (altered("skip", layer), None)])
    reference = copy.deepcopy(branches.model)
    reference.transformer_blocks[layer].forward = lambda hidden_states, *args, **kwargs: hidden_states
    assert torch.allclose(got[altered("skip", layer)], plain(branches, x, reference), atol=1e-6, rtol=0)
    assert torch.allclose(got["cond"], plain(branches, x), atol=1e-6, rtol=0)
    assert not torch.allclose(got[altered("skip", layer)], got["cond"], atol=1e-4)


class _PassThrough(LTXVideoAttnProcessor):
    """Hyung et al.'s STG-R on a self-attention layer: its output is its input."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return hidden_states


class _IdentityMask(LTXVideoAttnProcessor):
    """LTX's processor with a boolean mask on which each video token attends to itself only."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        assert attention_mask is None  # the model passes none to its self-attention
        tokens = hidden_states.shape[1]
        mask = torch.eye(tokens, dtype=torch.bool).expand(hidden_states.shape[0], 1, tokens, tokens)
        return super().__call__(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


@pytest.mark.parametrize("kind, layer, processor", [("skip", "transformer_blocks.1.attn1", _PassThrough),
                                                    ("identity", 1, _IdentityMask)])
def test_stg_r_and_stg_a_are_their_self_attention_rules(branches, kind, layer, processor) -> None:
    x = latents(2)
    got = evaluate(branches, x, [("cond", None), (altered(kind, layer), None)])
    reference = copy.deepcopy(branches.model)
    reference.transformer_blocks[1].attn1.set_processor(processor())
    want = plain(branches, x, reference)
    assert torch.allclose(got[altered(kind, layer)], want, atol=1e-6, rtol=0)
    assert not torch.allclose(got[altered(kind, layer)], got["cond"], atol=1e-4)
    assert torch.allclose(got["cond"], plain(branches, x), atol=1e-6, rtol=0)


def test_seg_blurs_each_frames_queries_apart(branches) -> None:
    x = latents(4)
    reference = copy.deepcopy(branches.model)

    def frame_mean(module, inputs, out):
        frames = out.reshape(out.shape[0], LATENT[1], LATENT[2] * LATENT[3], out.shape[-1])
        return frames.mean(dim=2, keepdim=True).expand_as(frames).reshape(out.shape)

    reference.transformer_blocks[0].attn1.to_q.register_forward_hook(frame_mean)
    got = evaluate(branches, x, [(altered("blur", 0), None)])[altered("blur", 0)]
    assert torch.allclose(got, plain(branches, x, reference), atol=1e-5, rtol=0)
    assert not torch.allclose(got, plain(branches, x), atol=1e-4)
    tiny = altered("blur", 0, sigma=0.01)  # a 1-tap kernel: the model itself
    assert torch.allclose(evaluate(branches, x, [(tiny, None)])[tiny], plain(branches, x), atol=1e-6, rtol=0)


def test_tsg_noise_is_on_the_time_step_mlp(branches) -> None:
    x = latents(5)
    noised = Branch("noised", base="cond", time_noise=1.0, generator=seeded(4))
    got = evaluate(branches, x, [(noised, None)])[noised]
    reference = copy.deepcopy(branches.model)

    def hook(module, inputs, emb):
        return emb + emb.float().std() * torch.randn(emb.shape, generator=seeded(4))

    reference.time_embed.emb.timestep_embedder.register_forward_hook(hook)
    assert torch.equal(got, plain(branches, x, reference))
    assert not torch.allclose(got, plain(branches, x), atol=1e-4)


class _NAGReference:
    """LTX's cross-attention with NAG written out from the authors' rule: Z+ and Z- from the same
    queries (q/k RMS norms over all heads, SDPA per head, each context under its own text mask),
    their rule in float64 (extrapolate, cap the L1 norm ratio at tau, blend by alpha), then the
    output projection."""

    def __init__(self, negative: torch.Tensor, negative_bias: torch.Tensor, scale: float, tau: float,
                 alpha: float) -> None:
        self.negative, self.negative_bias = negative, negative_bias
        self.scale, self.tau, self.alpha = scale, tau, alpha
        self.capped = False  # whether some token's ratio exceeded tau (the cap was exercised)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def attend(context: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.unflatten(2, (attn.heads, -1)).transpose(1, 2)

            query = heads(attn.norm_q(attn.to_q(hidden_states)))
            key, value = heads(attn.norm_k(attn.to_k(context))), heads(attn.to_v(context))
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias[:, None])
            return out.transpose(1, 2).flatten(2, 3).double()

        positive = attend(encoder_hidden_states, attention_mask)
        negative = attend(self.negative, self.negative_bias)
        guidance = positive * self.scale - negative * (self.scale - 1)
        norm_positive = positive.norm(p=1, dim=-1, keepdim=True)
        norm_guidance = guidance.norm(p=1, dim=-1, keepdim=True)
        over = norm_guidance / norm_positive > self.tau
        self.capped |= bool(over.any())
        guidance = torch.where(over, guidance / norm_guidance * norm_positive * self.tau, guidance)
        out = (guidance * self.alpha + positive * (1 - self.alpha)).float()
        return attn.to_out[1](attn.to_out[0](out))


def test_nag_extrapolates_every_cross_attention_with_each_contexts_mask(branches) -> None:
    x = latents(6)
    spec = NAGAttention(layers=None, context="uncond", scale=4.0, tau=1.2, alpha=0.25)
    nag = Branch("nag", base="cond", perturb=spec)
    got = evaluate(branches, x, [(nag, None)])[nag]
    reference = copy.deepcopy(branches.model)
    uncond = branches.conditions["uncond"]
    assert not torch.equal(uncond["encoder_attention_mask"], branches.conditions["cond"]["encoder_attention_mask"])
    with torch.no_grad():
        negative = reference.caption_projection(uncond["encoder_hidden_states"])
    bias = text_mask_bias(uncond["encoder_attention_mask"], negative.dtype)
    processors = [_NAGReference(negative, bias, spec.scale, spec.tau, spec.alpha) for _ in reference.transformer_blocks]
    for block, processor in zip(reference.transformer_blocks, processors):
        block.attn2.set_processor(processor)
    assert torch.allclose(got, plain(branches, x, reference), atol=1e-5, rtol=0)
    assert any(processor.capped for processor in processors) and not torch.allclose(got, plain(branches, x), atol=1e-4)
    default = Branch("nag_default", base="cond", perturb=NAGAttention(layers=None, context="uncond", scale=4.0,
                                                                      tau=1.2))
    assert torch.equal(evaluate(branches, x, [(default, None)])[default], got)  # alpha None: the video 0.25
    off = Branch("nag_off", base="cond", perturb=NAGAttention(layers=None, context="uncond", scale=1.0, tau=1.2,
                                                              alpha=0.25))
    assert torch.allclose(evaluate(branches, x, [(off, None)])[off], plain(branches, x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("alteration", [
    altered("skip", 1), altered("skip", "transformer_blocks.0.attn1"), altered("identity", 0),
    altered("blur", 0, sigma=2.0),
    Branch("nag", base="cond", perturb=NAGAttention(layers=None, context="uncond", scale=4.0, tau=1.2, alpha=0.25))])
def test_in_one_batched_forward_only_the_altered_rows_change(branches, alteration) -> None:
    """With the branches in one forward (the stock batching), the altered rows equal their forward
    alone and the other rows the model's, within batching's float rounding."""
    x = latents(7)
    both = evaluate(branches, x, [("uncond", None), ("cond", None), (alteration, None)])
    assert torch.allclose(both["cond"], plain(branches, x), atol=1e-5, rtol=0)
    assert torch.allclose(both[alteration], evaluate(branches, x, [(alteration, None)])[alteration], atol=1e-5, rtol=0)
    assert not torch.allclose(both[alteration], both["cond"], atol=1e-4)


# --------------------------------------------------------------------------- STG, as its authors run it
class _STGProcessor(LTXVideoAttnProcessor):
    """Hyung et al.'s STG processor on a self-attention layer, for a batch of [uncond, cond,
    perturbed] thirds: the first two thirds by LTX's processor, the last by their rule (STG-A:
    the values through the output projection; STG-R: the input itself)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        third = hidden_states.shape[0] // 3
        first = super().__call__(attn, hidden_states[:2 * third], None, None,
                                 tuple(e[:2 * third] for e in image_rotary_emb))
        perturbed = hidden_states[2 * third:]
        if self.mode == "STG-A":
            perturbed = attn.to_out[1](attn.to_out[0](attn.to_v(perturbed)))
        return torch.cat([first, perturbed])


def stg_reference(stock: LTXPipeline, mode: str, scale: float, stg_scale: float, block: int, generator,
                  rescaling: float = 0.0) -> torch.Tensor:
    """STG's LTX loop on a deep copy of the stock transformer (packed latents, the stock schedule
    and embeddings), its rule in float64: g = u + s (c - u) + w (c - p) before each stock step,
    then with ``rescaling`` phi > 0 their do_rescaling, g (phi std(c) / std(g) + 1 - phi), each
    std over the whole batch."""
    transformer = copy.deepcopy(stock.transformer)
    transformer.transformer_blocks[block].attn1.set_processor(_STGProcessor(mode))
    with torch.no_grad():
        embeds, mask, negative, negative_mask = stock.encode_prompt(PROMPT, negative_prompt="blue",
                                                                    max_sequence_length=16)
        context, context_mask = torch.cat([negative, embeds, embeds]), torch.cat([negative_mask, mask, mask])
        x = stock.prepare_latents(1, 8, 32, 32, 9, torch.float32, "cpu", generator)
        config = stock.scheduler.config  # mu: the shift interpolated linearly in the video's 192 tokens
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = config.base_shift + slope * (3 * 8 * 8 - config.base_image_seq_len)
        stock.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
        for t in stock.scheduler.timesteps:
            out = transformer(hidden_states=torch.cat([x] * 3), encoder_hidden_states=context,
                              timestep=t.expand(3), encoder_attention_mask=context_mask, num_frames=3, height=8,
                              width=8, rope_interpolation_scale=(4 / 25, 4, 4), return_dict=False)[0].double()
            u, c, p = out.chunk(3)
            guided = u + scale * (c - u) + stg_scale * (c - p)
            if rescaling:
                guided = guided * (rescaling * (c.std() / guided.std()) + (1 - rescaling))
            x = stock.scheduler.step(guided.float(), t, x, return_dict=False)[0]
    return x


STG_MODES = [
    ("STG-A", {"name": "pag", "scale": 3.0, "pag_scale": 1.0, "layers": [1]}),
    ("STG-R", {"name": "slg", "scale": 3.0, "slg_scale": 1.0, "layers": ["transformer_blocks.1.attn1"], "start": 0.0,
               "stop": 1.0}),
]


@pytest.mark.parametrize("mode, guidance", STG_MODES)
def test_stg_is_pag_or_slg_with_cfg(ltx, mode, guidance) -> None:
    stock, guided = ltx
    want = stg_reference(stock, mode, 3.0, 1.0, 1, seeded(0))
    got = guided(PROMPT, negative_prompt="blue", guidance=guidance, generator=seeded(0), **CALL)
    assert got.nfe == 3 * STEPS and torch.allclose(got.frames, want, atol=1e-5, rtol=0)
    cfg = stock(PROMPT, negative_prompt="blue", generator=seeded(0), **CALL).frames
    assert not torch.allclose(got.frames, cfg, atol=1e-3)  # the STG term acts


@pytest.mark.parametrize("mode, guidance", STG_MODES)
def test_stg_with_rescaling_is_their_do_rescaling(ltx, mode, guidance) -> None:
    """``rescale=0.7`` (their fixed rescaling_scale) against their loop with do_rescaling; the
    pipelines' ``guidance_rescale`` argument sets the same parameter."""
    stock, guided = ltx
    want = stg_reference(stock, mode, 3.0, 1.0, 1, seeded(0), rescaling=0.7)
    got = guided(PROMPT, negative_prompt="blue", guidance={**guidance, "rescale": 0.7}, generator=seeded(0), **CALL)
    assert got.nfe == 3 * STEPS and torch.allclose(got.frames, want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, stg_reference(stock, mode, 3.0, 1.0, 1, seeded(0)), atol=1e-3)  # it acts
    through_call = guided(PROMPT, negative_prompt="blue", guidance=guidance, guidance_rescale=0.7,
                          generator=seeded(0), **CALL)
    assert torch.equal(through_call.frames, got.frames)


def test_rescale_at_perturbation_scale_zero_is_the_stock_cfg_rescale_bit_for_bit(ltx) -> None:
    stock, guided = ltx
    want = stock(PROMPT, negative_prompt="blue", guidance_rescale=0.7, generator=seeded(0), **CALL).frames
    guidance = {"name": "pag", "scale": 3.0, "pag_scale": 0.0, "layers": [1], "rescale": 0.7}
    got = guided(PROMPT, negative_prompt="blue", guidance=guidance, generator=seeded(0), **CALL)
    assert torch.equal(got.frames, want) and got.nfe == 2 * STEPS


def _flow_predictions(seed: int, rows: int = 2) -> dict[str, Prediction]:
    """Random flow predictions of the cond, uncond and perturbed branches on one input (5-D, as a
    video's latents), the perturbed one under each perturbation method's branch name."""
    generator = seeded(seed)
    x = torch.randn((rows, *LATENT), generator=generator)
    sigma = torch.full((rows,), 0.6, dtype=torch.float64)

    def prediction() -> Prediction:
        return Prediction(torch.randn(x.shape, generator=generator), x, 1 - sigma, sigma, "flow")

    cond, uncond, perturbed = prediction(), prediction(), prediction()
    return {"cond": cond, "uncond": uncond, **{name: perturbed for name in ("pag", "seg", "slg")}}


STEP = StepInfo(index=1, num_steps=STEPS, sigma=1.5, sigma_next=0.5, timestep=600.0)


@pytest.mark.parametrize("name", ["pag", "seg", "slg"])
def test_rescale_zero_is_the_perturbation_rule_bit_for_bit(name) -> None:
    preds = _flow_predictions(8)
    method = resolve_guidance({"name": name, "scale": 3.0, "layers": [0], "start": 0.0, "stop": 1.0})
    w = method.perturb_scale
    out = method.combine(preds, STEP, None)
    want = perturbed_guidance(preds["cond"].output, preds["uncond"].output, preds[name].output, 3.0, w)
    assert method.rescale == 0 and not out.split and torch.equal(out.denoise.output, want)


@pytest.mark.parametrize("name, phi", [("pag", 0.7), ("seg", 0.3), ("slg", 1.0)])
def test_rescale_is_lins_rule_per_video_after_the_perturbation_term(name, phi) -> None:
    """In float64, per video: g (phi std(c) / std(g) + 1 - phi), g the whole rule (STG's form,
    video by video); PAG alone (scale 1) rescales c + w (c - p) alike."""
    preds = _flow_predictions(9)
    c, u, p = (preds[key].output.double() for key in ("cond", "uncond", name))
    for scale in (3.0, 1.0):
        method = resolve_guidance({"name": name, "scale": scale, "layers": [0], "start": 0.0, "stop": 1.0,
                                   "rescale": phi})
        w = method.perturb_scale
        g = (c if scale == 1 else u + scale * (c - u)) + w * (c - p)
        want = torch.stack([g[i] * (phi * c[i].std() / g[i].std() + 1 - phi) for i in range(len(g))])
        got = method.combine({k: v for k, v in preds.items() if scale != 1 or k != "uncond"}, STEP, None)
        assert torch.allclose(got.denoise.output.double(), want, atol=1e-5, rtol=1e-5), scale
        assert not torch.allclose(got.denoise.output.double(), g, atol=1e-3)  # the rescale acts


def test_rescale_with_a_base_method_rescales_its_prediction_plus_the_perturbation_term() -> None:
    preds = _flow_predictions(10)
    plain = resolve_guidance({"name": "pag", "layers": [0], "base": {"name": "apg", "scale": 5.0}})
    rescaled = resolve_guidance({"name": "pag", "layers": [0], "base": {"name": "apg", "scale": 5.0}, "rescale": 0.5})
    g = plain.combine(preds, STEP, plain.init_state(2, torch.device("cpu"))).denoise.output
    got = rescaled.combine(preds, STEP, rescaled.init_state(2, torch.device("cpu"))).denoise.output
    c = preds["cond"].output
    dims = list(range(1, c.ndim))
    want = 0.5 * g * (c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True)) + 0.5 * g
    assert torch.allclose(got, want, atol=1e-6, rtol=0) and not torch.allclose(got, g, atol=1e-3)


@pytest.mark.parametrize("spec, message", [
    ({"name": "pag", "rescale": 1.5}, r"pag: parameter 'rescale' must be \[0, 1\], got 1.5"),
    ({"name": "slg", "rescale": -0.1}, r"slg: parameter 'rescale' must be \[0, 1\], got -0.1"),
    ({"name": "sag", "rescale": 2.0}, r"sag: parameter 'rescale' must be \[0, 1\], got 2.0"),
])
def test_a_bad_rescale_is_refused(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_guidance(spec)
