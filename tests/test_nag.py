"""NAG (normalized attention guidance): its rule against the authors' formula, the whole method
against a reference built the authors' way (their processor on the cross-attention layers and
their batch: the sample rows once, the text contexts [prompt; negative]), its identity cases,
composition, cost and refusals. Joint attention (SD3, the flow transformers): tests/test_nag_joint.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from guidance_engine import resolve_guidance
from guidance_engine.methods.nag import NAG, normalized_attention_guidance
from conftest import PROMPT, seeded

STEPS = 3
NEGATIVE = "a green square"


def _authors_rule(positive: torch.Tensor, negative: torch.Tensor, scale: float, tau: float,
                  alpha: float) -> torch.Tensor:
    """The authors' UNet processor's arithmetic, written as they compute it."""
    guidance = positive * scale - negative * (scale - 1)
    norm_positive = torch.norm(positive, p=1, dim=-1, keepdim=True).expand(*positive.shape)
    norm_guidance = torch.norm(guidance, p=1, dim=-1, keepdim=True).expand(*guidance.shape)
    ratio = norm_guidance / norm_positive
    guidance = guidance * torch.minimum(ratio, ratio.new_ones(1) * tau) / ratio
    return guidance * alpha + positive * (1 - alpha)


class AuthorsCrossAttention:
    """A cross-attention processor in the authors' layout: ``hidden_states`` has the sample rows
    (B: conditional only, or 2B: unconditional then conditional), ``encoder_hidden_states`` those
    rows' contexts followed by B negative contexts; the conditional rows attend to both."""

    def __init__(self, scale: float, tau: float, alpha: float) -> None:
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        rows = hidden_states.shape[0]
        contexts = encoder_hidden_states.shape[0]
        b = contexts - rows  # the negative contexts at the end
        query = attn.to_q(hidden_states)
        query = torch.cat([query, query[rows - b:]])  # the conditional rows' queries, once more
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head = key.shape[-1] // attn.heads

        def split(t):
            return t.view(contexts, -1, attn.heads, head).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(query), split(key), split(value))
        out = out.transpose(1, 2).reshape(contexts, -1, attn.heads * head)
        guided = _authors_rule(out[rows - b:rows], out[rows:], self.scale, self.tau, self.alpha)
        out = torch.cat([out[:rows - b], guided])
        return attn.to_out[1](attn.to_out[0](out))


def _authors_run(stock, scale: float, nag_scale: float, tau: float, alpha: float, negative_prompt: str,
                 cfg_negative: str | None = None) -> torch.Tensor:
    """The authors' pipeline loop on the stock SD pipeline's parts: their processor on every
    cross-attention layer of a copy of the UNet, the contexts [uncond (with CFG), cond, negative]."""
    unet = copy.deepcopy(stock.unet)
    unet.set_attn_processor({name: AuthorsCrossAttention(nag_scale, tau, alpha) if "attn2" in name else proc
                             for name, proc in unet.attn_processors.items()})
    cond, uncond = stock.encode_prompt(PROMPT, "cpu", 1, True, cfg_negative)
    nag_negative = stock.encode_prompt(negative_prompt, "cpu", 1, False)[0]
    contexts = torch.cat([uncond, cond, nag_negative] if scale > 1 else [cond, nag_negative])
    scheduler = stock.scheduler
    scheduler.set_timesteps(STEPS)
    latents = stock.prepare_latents(1, unet.config.in_channels, 32, 32, cond.dtype, "cpu", seeded(0))
    for t in scheduler.timesteps:
        x = torch.cat([latents] * 2) if scale > 1 else latents
        out = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=contexts).sample
        if scale > 1:
            u, c = out.chunk(2)
            out = u + scale * (c - u)
        latents = scheduler.step(out, t, latents).prev_sample
    return latents


def _ours(pipe, guidance, negative_prompt=None, **kwargs) -> torch.Tensor:
    return pipe(PROMPT, negative_prompt=negative_prompt, num_inference_steps=STEPS, height=32, width=32,
                guidance=guidance, generator=seeded(0), output_type="latent", **kwargs).images


# -- the rule ------------------------------------------------------------------------------------
def test_the_rule_equals_the_authors_arithmetic() -> None:
    torch.manual_seed(0)
    positive, negative = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    for scale, tau, alpha in [(5.0, 2.5, 0.5), (3.0, 1.0, 0.25), (9.0, 100.0, 1.0), (1.5, 2.5, 0.125)]:
        ours = normalized_attention_guidance(positive, negative, scale, tau, alpha)
        assert torch.allclose(ours, _authors_rule(positive, negative, scale, tau, alpha), atol=1e-6)
    # the cap acts: at s = 9 most tokens grow past tau = 2.5 and are shrunk to it exactly
    ours = normalized_attention_guidance(positive, negative, 9.0, 2.5, 1.0)
    ratio = ours.abs().sum(-1) / positive.abs().sum(-1)
    assert (ratio - 2.5).abs().max() < 1e-5


def test_the_rule_identities_and_the_zero_norm_token() -> None:
    torch.manual_seed(1)
    positive, negative = torch.randn(1, 8, 16), torch.randn(1, 8, 16)
    assert torch.equal(normalized_attention_guidance(positive, negative, 1.0, 2.5, 0.5), positive)
    assert torch.equal(normalized_attention_guidance(positive, negative, 5.0, 2.5, 0.0), positive)
    positive[0, 3] = 0  # |Z+|_1 = 0: the cap |Z~|_1 <= tau |Z+|_1 gives 0, ours as theirs
    out = normalized_attention_guidance(positive, negative, 5.0, 2.5, 1.0)
    assert torch.equal(out[0, 3], torch.zeros(16))
    assert torch.equal(_authors_rule(positive, negative, 5.0, 2.5, 1.0)[0, 3], torch.zeros(16))
    negative[0, 3] = 0  # Z+ = Z- = 0: theirs computes 0 / 0 (NaN), ours keeps the zero token
    out = normalized_attention_guidance(positive, negative, 5.0, 2.5, 1.0)
    assert torch.isfinite(out).all() and torch.equal(out[0, 3], torch.zeros(16))
    assert torch.isnan(_authors_rule(positive, negative, 5.0, 2.5, 1.0)[0, 3]).all()


# -- against the authors' construction -----------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_nag_equals_the_authors_processor_and_batch(sd_pair, scale) -> None:
    stock, guided = sd_pair
    reference = _authors_run(stock, scale, 5.0, 2.5, 0.5, NEGATIVE, cfg_negative=NEGATIVE if scale > 1 else None)
    ours = _ours(guided, {"name": "nag", "scale": scale}, negative_prompt=NEGATIVE)
    assert (ours - reference).abs().max() < 1e-5
    assert not torch.allclose(ours, _ours(guided, None, guidance_scale=scale, negative_prompt=NEGATIVE), atol=1e-3)


def test_nag_with_the_empty_negative_prompt_equals_the_authors_default(sd_pair) -> None:
    stock, guided = sd_pair
    reference = _authors_run(stock, 1.0, 3.0, 2.5, 0.25, "")
    ours = _ours(guided, NAG(nag_scale=3.0, alpha=0.25))
    assert (ours - reference).abs().max() < 1e-5


def test_nag_on_sdxl_equals_the_authors_processor(sdxl_pair) -> None:
    stock, guided = sdxl_pair
    unet = copy.deepcopy(stock.unet)
    unet.set_attn_processor({name: AuthorsCrossAttention(5.0, 2.5, 0.5) if "attn2" in name else proc
                             for name, proc in unet.attn_processors.items()})
    cond, _, pooled, _ = stock.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    nag_negative = stock.encode_prompt(NEGATIVE, device="cpu", do_classifier_free_guidance=False)[0]
    time_ids = stock._get_add_time_ids((32, 32), (0, 0), (32, 32), cond.dtype,
                                       text_encoder_projection_dim=stock.text_encoder_2.config.projection_dim)
    scheduler = stock.scheduler
    scheduler.set_timesteps(STEPS)  # (before prepare_latents: Euler's initial sigma depends on it)
    latents = stock.prepare_latents(1, unet.config.in_channels, 32, 32, cond.dtype, "cpu", seeded(0))
    for t in scheduler.timesteps:  # the authors' SDXL loop at CFG 1: pooled text and time ids of the prompt
        out = unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=torch.cat([cond, nag_negative]),
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        latents = scheduler.step(out, t, latents).prev_sample
    ours = _ours(guided, "nag", negative_prompt=NEGATIVE)
    assert (ours - latents).abs().max() < 1e-5


# -- identities, context, cost ---------------------------------------------------------------------
def test_nag_scale_one_or_alpha_zero_is_the_unguided_run_bit_for_bit(sd_pair) -> None:
    _, guided = sd_pair
    plain = _ours(guided, None, guidance_scale=1.0, negative_prompt=NEGATIVE)
    assert torch.equal(_ours(guided, NAG(nag_scale=1.0), negative_prompt=NEGATIVE), plain)
    assert torch.equal(_ours(guided, NAG(alpha=0.0), negative_prompt=NEGATIVE), plain)
    with_cfg = _ours(guided, None, guidance_scale=4.0, negative_prompt=NEGATIVE)
    assert torch.equal(_ours(guided, NAG(scale=4.0, nag_scale=1.0), negative_prompt=NEGATIVE), with_cfg)
    outside = NAG(start=1.0)  # an empty interval: NAG off at every step
    assert torch.equal(_ours(guided, outside, negative_prompt=NEGATIVE), plain)


def test_the_negative_prompt_is_the_context_and_cfg_one_costs_one_forward_per_step(sd_pair) -> None:
    _, guided = sd_pair
    run = guided(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance="nag", generator=seeded(0),
                 output_type="latent")
    assert run.nfe == STEPS  # the conditional forward only: NAG adds attention, not a forward
    other = _ours(guided, "nag", negative_prompt="a blue triangle")
    assert not torch.allclose(run.images, other, atol=1e-4)
    cfg = guided(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance={"name": "nag", "scale": 3.0},
                 generator=seeded(0), output_type="latent")
    assert cfg.nfe == 2 * STEPS


def test_nag_leaves_the_shared_unet_computing_what_it_did(sd_pair) -> None:
    stock, guided = sd_pair
    before = stock(PROMPT, num_inference_steps=2, generator=seeded(0), output_type="latent").images
    _ours(guided, "nag", negative_prompt=NEGATIVE)
    after = stock(PROMPT, num_inference_steps=2, generator=seeded(0), output_type="latent").images
    assert torch.equal(before, after)


def test_nag_layers_choose_the_cross_attention_layers(sd_pair) -> None:
    _, guided = sd_pair
    every = _ours(guided, "nag", negative_prompt=NEGATIVE)
    down = _ours(guided, NAG(layers="down"), negative_prompt=NEGATIVE)
    plain = _ours(guided, None, guidance_scale=1.0)
    assert not torch.allclose(down, every, atol=1e-5) and not torch.allclose(down, plain, atol=1e-5)
    with pytest.raises(ValueError, match="'layers' must be .*'down.7' selects nothing"):
        _ours(guided, NAG(layers="down.7"))


# -- composition -----------------------------------------------------------------------------------
@pytest.mark.parametrize("base, sampler", [("apg", None), ("cfgpp", "euler"), ("cfg_zero_star", None),
                                           ({"name": "ag", "threshold": 2.0}, None)])
def test_nag_under_other_methods(sd_pair, base, sampler) -> None:
    _, guided = sd_pair
    base_guide = resolve_guidance(base)
    alone = _ours(guided, base_guide, negative_prompt=NEGATIVE, sampler=sampler)
    both = guided(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance=NAG(base=base_guide),
                  sampler=sampler, generator=seeded(0), output_type="latent")
    alone_nfe = guided(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance=base_guide,
                       sampler=sampler, generator=seeded(0), output_type="latent").nfe
    assert torch.isfinite(both.images).all() and both.nfe == alone_nfe  # NAG adds no forward
    assert not torch.allclose(both.images, alone, atol=1e-4)
    assert NAG(base=base_guide, nag_scale=1.0).to_dict()["base"]["name"] == base_guide.name
    unaltered = _ours(guided, NAG(base=base_guide, nag_scale=1.0), negative_prompt=NEGATIVE, sampler=sampler)
    assert torch.equal(unaltered, alone)


def test_nag_with_ag_base_equals_nag_with_cfg_while_ag_never_switches(sd_pair) -> None:
    _, guided = sd_pair
    never = NAG(base={"name": "ag", "scale": 3.0, "threshold": 2.0})  # a cosine never reaches 2
    assert torch.equal(_ours(guided, never, negative_prompt=NEGATIVE),
                       _ours(guided, NAG(scale=3.0), negative_prompt=NEGATIVE))


# -- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: NAG(nag_scale=0.5), r"'nag_scale' must be \[1, 100\], got 0.5"),
    (lambda: NAG(tau=0.5), r"'tau' must be \[1, 100\], got 0.5"),
    (lambda: NAG(alpha=1.5), r"'alpha' must be \[0, 1\], got 1.5"),
    (lambda: NAG(base="pag"), "'base' must be a method that combines"),
    (lambda: NAG(base={"name": "fkc", "particles": 2}), "'base' must be a method that combines"),
    (lambda: NAG(base="apg", scale=3.0), "set the scale inside it"),
])
def test_bad_parameters_name_the_parameter(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()
