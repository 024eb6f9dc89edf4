"""GuidedWanPipeline (Wan 2.1 / 2.2 text-to-video: 5-D latents, UniPC with flow sigmas, two experts)
against the stock WanPipeline on tiny random models, and the layer alterations on Wan's blocks
against independent constructions on deep copies of the tiny transformer:

- SLG: the block's forward replaced by the identity;
- PAG: the stock WanAttnProcessor with a boolean identity mask (each token attends to itself);
- SEG: a forward hook on the query projection blurring each frame's queries (sigma = inf: each
  frame's mean query, written here);
- TSG: a forward hook adding the noise to the time-step MLP's output;
- NAG: a cross-attention processor written here from the authors' Wan processor (queries, keys,
  values, SDPA for both contexts, their L1-norm rule in float64).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from guidance_engine.guidance import Branch, StepInfo
from guidance_engine.methods.cfg import CFG
from guidance_engine.methods.nag import NAGAttention
from guidance_engine.pipelines.messages import PromptTruncatedWarning
from guidance_engine.pipelines.models import pipeline_class_for
from guidance_engine.pipelines.toy.tiny_wan import TINY_WAN_BOUNDARY_RATIO, tiny_wan_components
from guidance_engine.pipelines.wan import GuidedWanPipeline, TwoExpertCFG, WanBranches
from guidance_engine.pipelines.wan_attention import VideoTokens, blur_frames
from guidance_engine.prediction import Prediction
from conftest import PROMPT, quiet, seeded
from video_helpers import altered, captured_branches

STEPS = 3
CALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": STEPS, "max_sequence_length": 16,
        "output_type": "latent"}
#: one video's latents: 4 channels, 2 latent frames (5 frames), 8 x 8 (32 x 32 pixels)
LATENT = (4, 2, 8, 8)
#: its tokens: 2 frames of 4 x 4 patches
TOKENS = VideoTokens(2, 4, 4)
HIGH, LOW = torch.tensor(999), torch.tensor(600)  # a high- and a low-noise timestep (boundary 875)


def pair(**options: Any) -> tuple[WanPipeline, GuidedWanPipeline]:
    """(stock, guided) pipelines sharing one set of tiny components."""
    components = tiny_wan_components(0, **options)
    return quiet(WanPipeline(**components)), quiet(GuidedWanPipeline(**components))


@pytest.fixture(scope="module")
def wan21():
    return pair()


@pytest.fixture(scope="module")
def wan22():
    return pair(two_experts=True)


def no_forward(pipe) -> list:
    """Replace every transformer's forward by one that records the call and raises."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the transformer ran")

    for model in (pipe.transformer, pipe.transformer_2):
        if model is not None:
            model.forward = refuse
    return calls


# --------------------------------------------------------------------------- the stock recipe
@pytest.mark.parametrize("output_type", ["latent", "pt", "np"])
def test_batches_videos_per_prompt_and_generator_lists_equal_stock(wan21, output_type) -> None:
    stock, guided = wan21
    call = {**CALL, "output_type": output_type, "negative_prompt": ["blue", "red"], "num_videos_per_prompt": 2}
    prompts = ["a red circle", "a blue square"]
    want = stock(prompts, generator=[seeded(i) for i in range(4)], **call).frames
    got = guided(prompts, generator=[seeded(i) for i in range(4)], **call)
    assert type(got.frames) is type(want) and got.frames.shape == want.shape
    assert (torch.equal(got.frames, want) if output_type != "np" else (got.frames == want).all())
    assert got.nfe_per_image == [2 * STEPS] * 4 and got.frames is got.images


def test_default_scale_and_no_guidance_equal_stock(wan21) -> None:
    """The stock 5.0 (both forwards); a scale of 1 or below: the conditional forward alone."""
    stock, guided = wan21
    got = guided(PROMPT, generator=seeded(0), **CALL)
    assert torch.equal(got.frames, stock(PROMPT, generator=seeded(0), **CALL).frames) and got.nfe == 2 * STEPS
    for scale in (1.0, 0.5):
        got = guided(PROMPT, guidance_scale=scale, generator=seeded(1), **CALL)
        want = stock(PROMPT, guidance_scale=scale, generator=seeded(1), **CALL).frames
        assert torch.equal(got.frames, want) and got.nfe == STEPS


def test_latents_and_a_callback_changing_them_equal_stock(wan21) -> None:
    stock, guided = wan21
    latents = torch.randn((1, *LATENT), generator=seeded(3))
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape), tuple(tensors["negative_prompt_embeds"].shape)))
        return {"latents": tensors["latents"] * 0.5} if i == 0 else {}

    inputs = ["latents", "negative_prompt_embeds"]
    want = stock(PROMPT, latents=latents, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs,
                 **CALL).frames
    stock_seen, seen[:] = list(seen), []
    got = guided(PROMPT, latents=latents, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=inputs,
                 **CALL).frames
    assert torch.equal(got, want) and seen == stock_seen and len(seen) == STEPS


@pytest.mark.parametrize("guidance_scale, guidance_scale_2", [(None, None), (None, 2.0), (None, 1.0), (1.0, 5.0)])
def test_two_experts_and_the_second_scale_equal_stock(wan22, guidance_scale, guidance_scale_2) -> None:
    """Wan 2.2 A14B: the low-noise expert below t = 875 (steps 2 and 3 of 3), at its own scale;
    at a second scale of 1 the stock loop still runs both forwards (u + 1 (c - u)); at a first
    scale of 1 it runs the conditional forward alone, whatever the second."""
    stock, guided = wan22
    call = {**CALL, "negative_prompt": "blue", "guidance_scale": guidance_scale, "guidance_scale_2": guidance_scale_2}
    want = stock(PROMPT, generator=seeded(0), **{k: v for k, v in call.items() if v is not None}).frames
    got = guided(PROMPT, generator=seeded(0), **call)
    assert torch.equal(got.frames, want) and got.nfe == (STEPS if guidance_scale == 1.0 else 2 * STEPS)
    if guidance_scale is None and guidance_scale_2 is not None:  # the second scale acts
        assert not torch.equal(want, stock(PROMPT, generator=seeded(0), **{**call, "guidance_scale": 5.0,
                                                                           "guidance_scale_2": None}).frames)


def test_a_phases_schedule_gives_a_method_the_second_scale(wan22) -> None:
    """The schedule the refusal of ``guidance_scale_2`` with a method points to: CFG with a
    ``phases`` schedule at the expert boundary is the stock two-scale recipe (scale_2 != 1)."""
    stock, guided = wan22
    call = {**CALL, "negative_prompt": "blue"}
    want = stock(PROMPT, generator=seeded(0), guidance_scale=5.0, guidance_scale_2=2.0, **call).frames
    cfg = {"name": "cfg", "scale": 5.0, "schedule": "phases(timesteps=[875], values=[2.0])"}
    assert torch.equal(guided(PROMPT, guidance=cfg, generator=seeded(0), **call).frames, want)


def test_the_two_expert_cfg_is_cfg_at_each_experts_scale() -> None:
    """TwoExpertCFG (the stock Wan 2.2 recipe) on random flow predictions: CFG at ``scale`` bit for
    bit on a high-noise step (t >= boundary), at ``scale_2`` below; u + s (c - u) in float64."""
    x = torch.randn((2, *LATENT), generator=seeded(8))
    cond, uncond = (Prediction(torch.randn(x.shape, generator=seeded(9 + i)), x, torch.tensor(0.4, dtype=torch.float64),
                               torch.tensor(0.6, dtype=torch.float64), "flow") for i in range(2))
    preds = {"cond": cond, "uncond": uncond}
    two = TwoExpertCFG(scale=4.0, scale_2=2.5, boundary=875.0)
    for t, scale in ((875.0, 4.0), (874.0, 2.5)):
        step = StepInfo(index=1, num_steps=STEPS, sigma=1.5, sigma_next=0.5, timestep=t)
        got = two.combine(preds, step, None).denoise
        assert two.branches(step, None) == ("uncond", "cond")
        assert torch.equal(got.output, CFG(scale=scale).combine(preds, step, None).denoise.output)
        want = uncond.output.double() + scale * (cond.output.double() - uncond.output.double())
        assert torch.allclose(got.output.double(), want, atol=1e-6, rtol=0)


def test_bfloat16_experts_equal_stock() -> None:
    """Latents drawn and stepped in float32, cast to the experts' dtype for each forward (the
    modules Wan keeps in float32 stay so), embeddings in that dtype: as the stock loop."""
    components = tiny_wan_components(0, two_experts=True)
    for name in ("transformer", "transformer_2"):
        components[name] = components[name].to(torch.bfloat16)
    stock, guided = quiet(WanPipeline(**components)), quiet(GuidedWanPipeline(**components))
    call = {**CALL, "negative_prompt": "blue", "guidance_scale_2": 3.0}
    want = stock(PROMPT, generator=seeded(0), **call).frames
    assert want.dtype == torch.float32 and torch.equal(guided(PROMPT, generator=seeded(0), **call).frames, want)


def test_the_expert_is_chosen_by_the_timestep(wan22) -> None:
    _, guided = wan22
    branches = branches_of(guided)
    assert branches.boundary.timestep == TINY_WAN_BOUNDARY_RATIO * 1000
    x = torch.randn((1, *LATENT), generator=seeded(1))
    for t, expert in ((HIGH, guided.transformer), (torch.tensor(875), guided.transformer), (LOW, guided.transformer_2)):
        want = evaluate(branches, x, [("cond", None)], expert, t)["cond"]
        assert torch.equal(evaluate(branches, x, [("cond", None)], t=t)["cond"], want)
    other = evaluate(branches, x, [("cond", None)], guided.transformer, LOW)["cond"]
    assert not torch.allclose(other, evaluate(branches, x, [("cond", None)], t=LOW)["cond"], atol=1e-4)  # two experts


def test_per_token_timesteps_equal_stock() -> None:
    """Wan 2.2 TI2V's ``expand_timesteps``: t per token of the 2 x 2-subsampled latent grid."""
    stock, guided = pair(expand_timesteps=True)
    call = {**CALL, "negative_prompt": "blue"}
    assert torch.equal(guided(PROMPT, generator=seeded(0), **call).frames,
                       stock(PROMPT, generator=seeded(0), **call).frames)


def test_given_embeddings_equal_stock_and_repeat_per_video(wan21) -> None:
    """Given embeddings equal stock; with 2 videos per prompt (where the stock call fails) they are
    repeated per video as the stock encoder repeats the prompts it encodes."""
    stock, guided = wan21
    with torch.no_grad():  # as the pipelines encode (grad mode rounds differently)
        embeds, negative = stock.encode_prompt(["a red circle", "a blue square"], negative_prompt="blue",
                                               max_sequence_length=16)
    call = {**CALL, "prompt_embeds": embeds, "negative_prompt_embeds": negative}
    want = stock(generator=[seeded(0), seeded(1)], **call).frames
    assert torch.equal(guided(generator=[seeded(0), seeded(1)], **call).frames, want)
    encoded = stock(["a red circle", "a blue square"], negative_prompt="blue", num_videos_per_prompt=2,
                    generator=[seeded(i) for i in range(4)], **CALL).frames
    assert torch.equal(guided(num_videos_per_prompt=2, generator=[seeded(i) for i in range(4)], **call).frames,
                       encoded)


def test_a_long_prompt_is_cut_as_stock_with_a_warning(wan21) -> None:
    stock, guided = wan21
    call = {**CALL, "max_sequence_length": 4}
    with pytest.warns(PromptTruncatedWarning, match="max_sequence_length"):
        got = guided(PROMPT, generator=seeded(0), **call)
    assert len(got.warnings) == 1 and "background" in got.warnings[0]
    assert torch.equal(got.frames, stock(PROMPT, generator=seeded(0), **call).frames)


def test_the_core_euler_solver_equals_flow_match_euler_within_float32_rounding() -> None:
    """UniPC with flow sigmas is a flow schedule to the core; with FlowMatchEulerDiscreteScheduler
    swapped in, the core's Euler step equals the stock scheduler's within float32 rounding (its
    scheduler path bit for bit); on UniPC the core's solvers run."""
    components = tiny_wan_components(0)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0)
    stock, guided = quiet(WanPipeline(**components)), quiet(GuidedWanPipeline(**components))
    want = stock(PROMPT, generator=seeded(0), **CALL).frames
    got = guided(PROMPT, generator=seeded(0), sampler="euler", **CALL)
    assert got.nfe == 2 * STEPS and torch.allclose(got.frames, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(guided(PROMPT, generator=seeded(0), **CALL).frames, want)
    _, on_unipc = pair()
    for sampler in ("euler", "dpmpp_2m"):
        assert torch.isfinite(on_unipc(PROMPT, generator=seeded(0), sampler=sampler, **CALL).frames).all()


@pytest.mark.parametrize("two_experts", [False, True])
def test_a_directory_saved_by_the_stock_pipeline_loads_and_equals_stock(tmp_path, two_experts) -> None:
    stock = quiet(WanPipeline(**tiny_wan_components(0, two_experts=two_experts)))
    stock.save_pretrained(tmp_path, safe_serialization=True)
    loaded = quiet(GuidedWanPipeline.from_pretrained(tmp_path))
    assert pipeline_class_for(tmp_path) is GuidedWanPipeline  # what the CLI and batch detect
    assert (loaded.config.boundary_ratio, loaded.transformer_2 is not None) == \
        ((TINY_WAN_BOUNDARY_RATIO, True) if two_experts else (None, False))
    call = {**CALL, "negative_prompt": "blue", "guidance_scale_2": 3.0 if two_experts else None}
    # against stock loading the same directory: the weights round-trip exactly, but a forward on
    # weights read from the file can differ in the last bit from one on the in-memory tensors (seen
    # on an AMD EPYC host: 2e-6), whichever pipeline runs it
    reloaded = quiet(WanPipeline.from_pretrained(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.transformer.state_dict().values(),
                                                 stock.transformer.state_dict().values()))
    assert torch.equal(loaded(PROMPT, generator=seeded(0), **call).frames,
                       reloaded(PROMPT, generator=seeded(0), **call).frames)


def test_from_pipe_shares_components_and_leaves_stock_working() -> None:
    stock = quiet(WanPipeline(**tiny_wan_components(0)))
    guided = quiet(GuidedWanPipeline.from_pipe(stock))
    assert guided.transformer is stock.transformer and guided.vae is stock.vae
    before = stock(PROMPT, generator=seeded(0), **CALL).frames
    guided(PROMPT, generator=seeded(0), guidance={"name": "slg", "layers": [1], "start": 0.0}, **CALL)
    assert torch.equal(guided(PROMPT, generator=seeded(0), **CALL).frames, before)
    assert torch.equal(stock(PROMPT, generator=seeded(0), **CALL).frames, before)
    two = WanPipeline(**tiny_wan_components(0, two_experts=True))
    from_two = GuidedWanPipeline.from_pipe(two)
    assert from_two.transformer_2 is two.transformer_2 and from_two.config.boundary_ratio == TINY_WAN_BOUNDARY_RATIO


# --------------------------------------------------------------------------- methods
@pytest.mark.parametrize("guidance, extra, nfe", [
    ("apg", {}, 2 * STEPS),
    ("cfgpp", {"sampler": "euler"}, 2 * STEPS),
    ("cfg_zero_star", {}, 1 + 2 * (STEPS - 1)),  # the first step's velocity is zeroed: cond alone
    ("perp_neg", {"negative_prompt": "blue"}, 3 * STEPS),  # cond, empty prompt, negative prompt
    ({"name": "fkc", "particles": 2}, {"sampler": "euler_ancestral"}, 2 * 2 * STEPS),  # a group of 2 particles
    ({"name": "slg", "layers": [1], "start": 0.0, "stop": 1.0}, {}, 3 * STEPS),
    ({"name": "pag", "layers": [0], "start": 0.0}, {}, 3 * STEPS),
    ({"name": "seg", "layers": [0], "start": 0.0}, {}, 2 * STEPS),  # SEG alone (scale 1): no uncond
    ({"name": "tsg", "t_min": 0.0}, {}, 2 * STEPS),  # cond and the noised-time branch
    ({"name": "nag"}, {"negative_prompt": "blue"}, STEPS),  # alone: inside the one forward (alpha 0.25, Wan's)
    ("icg", {}, 2 * STEPS),  # cond and a prompt of random tokens, encoded as the prompt
    ({"name": "perp_neg", "negatives": [("blue", 1.0), ("red", 0.5)]}, {}, 4 * STEPS),  # a branch per negative
])
def test_methods_run_on_wan(wan21, guidance, extra, nfe) -> None:
    _, guided = wan21
    out = guided(PROMPT, guidance=guidance, generator=seeded(0), **extra, **CALL)
    assert tuple(out.frames.shape) == (1, *LATENT) and torch.isfinite(out.frames).all()
    assert out.nfe == nfe


def test_one_listed_negative_is_the_calls_negative_prompt(wan21) -> None:
    _, guided = wan21
    listed = guided(PROMPT, guidance={"name": "perp_neg", "negatives": [("blue", 1.0)]}, generator=seeded(0), **CALL)
    given = guided(PROMPT, guidance="perp_neg", negative_prompt="blue", generator=seeded(0), **CALL)
    assert torch.equal(listed.frames, given.frames) and listed.nfe == given.nfe == 3 * STEPS


def test_ag_runs_on_both_experts(wan22) -> None:
    _, guided = wan22
    out = guided(PROMPT, guidance="ag", generator=seeded(0), **CALL)
    assert torch.isfinite(out.frames).all() and STEPS < out.nfe <= 2 * STEPS


@pytest.mark.parametrize("call, message", [
    ({"guidance": "sag"}, r"method 'sag' reads a self-attention map, which GuidedWanPipeline does not record"),
    ({"guidance": "cfgpp"}, r"UniPCMultistepScheduler.step\(\) cannot do; pass sampler="),
    ({"guidance": {"name": "slg", "layers": [2]}}, r"'layers' must be Wan transformer block indices 0..1, got 2"),
    ({"guidance": "pag"}, r"default layers \[9\] are not all among this model's Wan transformer block indices 0..1"),
    ({"guidance": "perp_neg"}, r"needs a negative prompt"),
    ({"num_videos_per_prompt": 0}, r"num_videos_per_prompt: must be an integer >= 1, got 0"),
    ({"prompt": None, "prompt_embeds": torch.zeros(2, 16)}, r"prompt_embeds: expected a \(prompts, tokens, width\) "
                                                            r"tensor with 2 rows \(one per prompt\), got \(2, 16\)"),
    ({"guidance_scale_2": 2.0}, r"guidance_scale_2.*boundary_ratio"),  # the stock check: Wan 2.1
])
def test_refusals_come_before_any_forward(call, message) -> None:
    _, guided = pair()
    calls = no_forward(guided)
    with pytest.raises(ValueError, match=message):
        guided(generator=seeded(0), **{"prompt": PROMPT, **CALL, **call})
    assert calls == []


@pytest.mark.parametrize("call, message", [
    ({"guidance": "apg", "guidance_scale_2": 2.0}, r"guidance_scale_2: the low-noise expert's scale goes with "
                                                   r"guidance=None .* \(here: schedule='phases\(timesteps=\[875\], "
                                                   r"values=\[2.0\]\)'\)"),
    ({"guidance_scale_2": 150.0}, r"guidance_scale_2: must be a number in \[0, 100\], got 150.0"),
])
def test_two_expert_refusals_come_before_any_forward(call, message) -> None:
    _, guided = pair(two_experts=True)
    calls = no_forward(guided)
    with pytest.raises(ValueError, match=message):
        guided(PROMPT, generator=seeded(0), **{**CALL, **call})
    assert calls == []


def test_two_experts_without_the_second_are_refused_before_any_forward() -> None:
    components = tiny_wan_components(0, two_experts=True)
    guided = quiet(GuidedWanPipeline(**{**components, "transformer_2": None}))
    calls = no_forward(guided)
    with pytest.raises(ValueError, match=r"transformer_2: boundary_ratio is 0.875 \(two experts\), but"):
        guided(PROMPT, generator=seeded(0), **CALL)
    assert calls == []


def test_the_low_noise_expert_is_checked_for_the_layers_too() -> None:
    components = tiny_wan_components(0, two_experts=True)
    components["transformer_2"] = tiny_wan_components(1, layers=1)["transformer"]
    guided = quiet(GuidedWanPipeline(**components))
    calls = no_forward(guided)
    with pytest.raises(ValueError, match=r"'layers' must be Wan transformer block indices 0..0, got 1"):
        guided(PROMPT, guidance={"name": "slg", "layers": [1]}, generator=seeded(0), **CALL)
    assert calls == []


# --------------------------------------------------------------------------- layers against references
def branches_of(pipe, **call: Any) -> WanBranches:
    """The branch model a pipeline call builds (the stock conditions), before any denoising step."""
    return captured_branches(pipe, **{"prompt": PROMPT, **CALL, "negative_prompt": "blue", **call})


@pytest.fixture(scope="module")
def branches(wan21) -> WanBranches:
    return branches_of(wan21[1])


def evaluate(branches, x: torch.Tensor, requests, model=None, t: torch.Tensor = HIGH) -> dict[str, torch.Tensor]:
    """The branch model's outputs at timestep ``t``, on ``model`` alone (a reference copy) when given."""
    if model is not None:
        branches = copy.copy(branches)
        branches.model, branches.model_2 = model, None
    with torch.no_grad():
        return branches(x, t, requests)


def latents(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn((rows, *LATENT), generator=seeded(seed))


@pytest.mark.parametrize("layer", [0, 1])
def test_skipped_blocks_are_the_identity(branches, layer) -> None:
    x = latents(1, rows=2)
    got = evaluate(branches, x, [("cond", None), (altered("skip", layer), None)])
    reference = copy.deepcopy(branches.model)
    reference.blocks[layer].forward = lambda hidden_states, *args, **kwargs: hidden_states
    plain = evaluate(branches, x, [("cond", None)])["cond"]
    assert torch.equal(got[altered("skip", layer)], evaluate(branches, x, [("cond", None)], reference)["cond"])
    assert torch.equal(got["cond"], plain) and not torch.allclose(got[altered("skip", layer)], plain, atol=1e-4)


def test_a_skipped_block_of_the_low_noise_expert(wan22) -> None:
    two = branches_of(wan22[1])
    x = latents(2)
    got = evaluate(two, x, [(altered("skip", 0), None)], t=LOW)[altered("skip", 0)]
    reference = copy.deepcopy(two.model_2)
    reference.blocks[0].forward = lambda hidden_states, *args, **kwargs: hidden_states
    assert torch.equal(got, evaluate(two, x, [("cond", None)], reference, LOW)["cond"])


class _IdentityMask(WanAttnProcessor):
    """Wan's processor with a boolean mask on which each video token attends to itself only."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        assert attention_mask is None  # the model passes none to its self-attention
        mask = torch.eye(hidden_states.shape[1], dtype=torch.bool)
        return super().__call__(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)


def test_pag_is_identity_attention_over_every_video_token(branches) -> None:
    x = latents(3)
    got = evaluate(branches, x, [("cond", None), (altered("identity", 1), None)])
    reference = copy.deepcopy(branches.model)
    reference.blocks[1].attn1.set_processor(_IdentityMask())
    plain = evaluate(branches, x, [("cond", None)])["cond"]
    want = evaluate(branches, x, [("cond", None)], reference)["cond"]
    assert torch.allclose(got[altered("identity", 1)], want, atol=1e-6, rtol=0)
    assert not torch.allclose(got[altered("identity", 1)], plain, atol=1e-4) and torch.equal(got["cond"], plain)


def frame_mean_hook(model, layer: int) -> None:
    """Replace each frame's queries of block ``layer``'s self-attention by their mean (SEG, sigma = inf)."""
    def hook(module, inputs, out):
        frames = out.reshape(out.shape[0], TOKENS.frames, TOKENS.rows * TOKENS.columns, out.shape[-1])
        return frames.mean(dim=2, keepdim=True).expand_as(frames).reshape(out.shape)

    model.blocks[layer].attn1.to_q.register_forward_hook(hook)


def test_seg_blurs_each_frames_queries_apart(branches) -> None:
    x = latents(4)
    reference = copy.deepcopy(branches.model)
    frame_mean_hook(reference, 0)
    plain = evaluate(branches, x, [("cond", None)])["cond"]
    got = evaluate(branches, x, [(altered("blur", 0), None)])[altered("blur", 0)]
    assert torch.allclose(got, evaluate(branches, x, [("cond", None)], reference)["cond"], atol=1e-5, rtol=0)
    assert not torch.allclose(got, plain, atol=1e-4)
    tiny = altered("blur", 0, sigma=0.01)  # a 1-tap kernel: the model itself
    assert torch.allclose(evaluate(branches, x, [(tiny, None)])[tiny], plain, atol=1e-6, rtol=0)


def test_the_frame_blur_mixes_no_frames() -> None:
    """A query pattern constant within each frame is left as it is by any blur; the two frames
    keep their own values (a blur across frames would mix them)."""
    per_frame = torch.tensor([1.0, -2.0]).repeat_interleave(TOKENS.rows * TOKENS.columns)
    query = per_frame[None, :, None].expand(1, TOKENS.count, 3).contiguous()
    assert torch.allclose(blur_frames(query, TOKENS, 2.0), query, atol=1e-6, rtol=0)
    assert torch.allclose(blur_frames(query, TOKENS, math.inf), query, atol=1e-6, rtol=0)


def test_tsg_noise_is_on_the_time_step_mlp(branches) -> None:
    x = latents(5)
    noised = Branch("noised", base="cond", time_noise=1.0, generator=seeded(4))
    got = evaluate(branches, x, [(noised, None)])[noised]
    reference = copy.deepcopy(branches.model)

    def hook(module, inputs, emb):
        return emb + emb.float().std() * torch.randn(emb.shape, generator=seeded(4))

    reference.condition_embedder.time_embedder.register_forward_hook(hook)
    assert torch.equal(got, evaluate(branches, x, [("cond", None)], reference)["cond"])
    assert not torch.allclose(got, evaluate(branches, x, [("cond", None)])["cond"], atol=1e-4)


class _NAGReference:
    """Wan's cross-attention with NAG written out from the authors' Wan processor: Z+ and Z- from
    the same queries (q/k RMS norms over all heads, SDPA per head), their rule in float64
    (extrapolate, cap the L1 norm ratio at tau, blend by alpha), then the output projection."""

    def __init__(self, negative: torch.Tensor, scale: float, tau: float, alpha: float) -> None:
        self.negative, self.scale, self.tau, self.alpha = negative, scale, tau, alpha
        self.capped = False  # whether some token's ratio exceeded tau (the cap was exercised)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        def attend(context: torch.Tensor) -> torch.Tensor:
            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.unflatten(2, (attn.heads, -1)).transpose(1, 2)

            query = heads(attn.norm_q(attn.to_q(hidden_states)))
            key, value = heads(attn.norm_k(attn.to_k(context))), heads(attn.to_v(context))
            return F.scaled_dot_product_attention(query, key, value).transpose(1, 2).flatten(2, 3).double()

        positive, negative = attend(encoder_hidden_states), attend(self.negative)
        guidance = positive * self.scale - negative * (self.scale - 1)
        norm_positive = positive.norm(p=1, dim=-1, keepdim=True)
        norm_guidance = guidance.norm(p=1, dim=-1, keepdim=True)
        over = norm_guidance / norm_positive > self.tau
        self.capped |= bool(over.any())
        guidance = torch.where(over, guidance / norm_guidance * norm_positive * self.tau, guidance)
        out = (guidance * self.alpha + positive * (1 - self.alpha)).float()
        return attn.to_out[1](attn.to_out[0](out))


def test_nag_extrapolates_every_cross_attention_away_from_the_negative_prompt(branches) -> None:
    x = latents(6)
    spec = NAGAttention(layers=None, context="uncond", scale=4.0, tau=1.2, alpha=0.25)
    nag = Branch("nag", base="cond", perturb=spec)
    got = evaluate(branches, x, [(nag, None)])[nag]
    reference = copy.deepcopy(branches.model)
    with torch.no_grad():
        negative = reference.condition_embedder.text_embedder(branches.conditions["uncond"]["encoder_hidden_states"])
    processors = [_NAGReference(negative, spec.scale, spec.tau, spec.alpha) for _ in reference.blocks]
    for block, processor in zip(reference.blocks, processors):
        block.attn2.set_processor(processor)
    plain = evaluate(branches, x, [("cond", None)])["cond"]
    assert torch.allclose(got, evaluate(branches, x, [("cond", None)], reference)["cond"], atol=1e-5, rtol=0)
    assert any(processor.capped for processor in processors)
    assert not torch.allclose(got, plain, atol=1e-4)
    default = Branch("nag_default", base="cond", perturb=NAGAttention(layers=None, context="uncond", scale=4.0,
                                                                      tau=1.2))
    assert torch.equal(evaluate(branches, x, [(default, None)])[default], got)  # alpha None: Wan's 0.25
    off = Branch("nag_off", base="cond", perturb=NAGAttention(layers=None, context="uncond", scale=1.0, tau=1.2,
                                                              alpha=0.25))
    assert torch.allclose(evaluate(branches, x, [(off, None)])[off], plain, atol=1e-6, rtol=0)  # s = 1: Z+ itself


@pytest.mark.parametrize("alteration", [
    altered("skip", 1), altered("identity", 0), altered("blur", 0, sigma=2.0),
    Branch("nag", base="cond", perturb=NAGAttention(layers=None, context="uncond", scale=4.0, tau=1.2, alpha=0.25))])
def test_in_one_batched_forward_only_the_altered_rows_change(branches, alteration) -> None:
    """With the branches batched into one forward (``separate_forwards=False``), the altered rows
    equal their forward alone and the other rows the model's, within batching's float rounding."""
    batched = copy.copy(branches)
    batched.separate_forwards = False
    x = latents(7)
    both = evaluate(batched, x, [("cond", None), (alteration, None)])
    assert torch.allclose(both["cond"], evaluate(branches, x, [("cond", None)])["cond"], atol=1e-5, rtol=0)
    assert torch.allclose(both[alteration], evaluate(branches, x, [(alteration, None)])[alteration], atol=1e-5, rtol=0)
    assert not torch.allclose(both[alteration], both["cond"], atol=1e-4)
