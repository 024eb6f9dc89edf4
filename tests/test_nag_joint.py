"""NAG on joint attention (SD3 and the flow transformers): the whole run against the authors'
pipelines re-implemented here from their code (Normalized-Attention-Guidance: the SD3 joint
processor, its pipeline's batch and its ``Trunc*`` norms; the Flux processor, their Flux
transformer's forward and pipeline), NAG alone and under CFG; the identities (bit for bit); the
cost in network evaluations; composition; every other flow family; the refusal elsewhere."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import AdaLayerNorm, AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from guidance_engine import resolve_guidance
from guidance_engine.guidance import Branch, Perturbation
from guidance_engine.methods.nag import NAG, NAGAttention, normalized_attention_guidance
from guidance_engine.pipelines import (GuidedChromaPipeline, GuidedDiTPipeline, GuidedFlux2KleinPipeline,
                                       GuidedFlux2Pipeline, GuidedFluxPipeline, GuidedQwenImagePipeline,
                                       GuidedStableDiffusion3Pipeline, GuidedZImagePipeline)
from guidance_engine.pipelines.stable_diffusion_3 import TransformerBranches
from guidance_engine.pipelines.toy.tiny_chroma import tiny_chroma_components
from guidance_engine.pipelines.toy.tiny_flux2 import tiny_flux2_klein_components
from guidance_engine.pipelines.toy.tiny_flux2_dev import tiny_flux2_dev_components
from guidance_engine.pipelines.toy.tiny_models import (seeded_weights, tiny_dit_components, tiny_flux_components,
                                                       tiny_sd3_components)
from guidance_engine.pipelines.toy.tiny_qwen_image import tiny_qwen_image_components
from guidance_engine.pipelines.toy.tiny_z_image import tiny_z_image_components
from conftest import PROMPT, quiet, seeded

STEPS = 3
NEGATIVE = "a green square"
FLUX_TEXT = 16  # max_sequence_length of the tiny Flux calls
EMBEDDED_GUIDANCE = 3.5  # the stock Flux pipeline's default guidance_scale


# -- the authors' arithmetic ---------------------------------------------------------------------
def _authors_guidance(positive: torch.Tensor, negative: torch.Tensor, scale: float, tau: float, alpha: float,
                      p: int, eps: float) -> torch.Tensor:
    """Their rule as their SD3 (p 1, eps 1e-7) and Flux (p 2, eps 0) processors write it."""
    guidance = positive * scale - negative * (scale - 1)
    norm_positive = torch.norm(positive, p=p, dim=-1, keepdim=True).expand(*positive.shape)
    norm_guidance = torch.norm(guidance, p=p, dim=-1, keepdim=True).expand(*guidance.shape)
    ratio = norm_guidance / (norm_positive + eps)
    guidance = guidance * torch.minimum(ratio, ratio.new_ones(1) * tau) / (ratio + eps)
    return guidance * alpha + positive * (1 - alpha)


def _truncate_norms(model: torch.nn.Module) -> None:
    """Their ``Trunc*`` norms: each adaptive norm reads the first rows of its modulation input, as
    many as the states it normalises (the image stream's B rows of a text stream's 2B)."""
    for module in model.modules():
        if isinstance(module, (AdaLayerNorm, AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX)):
            forward = module.forward

            def truncated(x, *args, _forward=forward, **kwargs):
                rows = x.shape[0]
                args = [a[:rows] if isinstance(a, torch.Tensor) else a for a in args]
                kwargs = {k: v[:rows] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                return _forward(x, *args, **kwargs)

            module.forward = truncated


def _heads(t: torch.Tensor, rows: int, heads: int) -> torch.Tensor:
    return t.view(rows, -1, heads, t.shape[-1] // heads).transpose(1, 2)


class AuthorsJointProcessor:
    """Their SD3 joint-attention processor: ``hidden_states`` the image rows (B, or 2B under CFG:
    unconditional then conditional), ``encoder_hidden_states`` those rows' text streams then B
    negative ones; the conditional image rows serve the negative text rows too."""

    def __init__(self, scale: float, tau: float, alpha: float) -> None:
        self.scale, self.tau, self.alpha = scale, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        rows, tokens, heads = hidden_states.shape[0], hidden_states.shape[1], attn.heads
        q, k, v = (_heads(f(hidden_states), rows, heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q) if attn.norm_q is not None else q, attn.norm_k(k) if attn.norm_k is not None else k
        if encoder_hidden_states is None:  # SD 3.5's image-only attention: theirs leaves it plain
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(rows, tokens, -1)
            return attn.to_out[1](attn.to_out[0](out))
        total = encoder_hidden_states.shape[0]
        b = total - rows
        q, k, v = (torch.cat([t, t[rows - b:rows]]) for t in (q, k, v))
        tq, tk, tv = (_heads(f(encoder_hidden_states), total, heads)
                      for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        tq = attn.norm_added_q(tq) if attn.norm_added_q is not None else tq
        tk = attn.norm_added_k(tk) if attn.norm_added_k is not None else tk
        out = F.scaled_dot_product_attention(torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2))
        out = out.transpose(1, 2).reshape(total, out.shape[2], -1)
        image, text = out[:, :tokens], out[:, tokens:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        guided = _authors_guidance(image[rows - b:rows], image[rows:], self.scale, self.tau, self.alpha, 1, 1e-7)
        image = torch.cat([image[:rows - b], guided])
        return attn.to_out[1](attn.to_out[0](image)), text


class AuthorsFluxProcessor:
    """Their Flux processor: double-stream calls get the B image rows and 2B text rows [prompt;
    negative] (the image queries, keys and values tiled); single-stream calls get 2B joint rows,
    both halves' image tokens set to the guided output."""

    def __init__(self, scale: float, tau: float, alpha: float, text_tokens: int) -> None:
        self.scale, self.tau, self.alpha, self.text_tokens = scale, tau, alpha, text_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        heads = attn.heads
        double = encoder_hidden_states is not None
        total = encoder_hidden_states.shape[0] if double else hidden_states.shape[0]
        q, k, v = (f(hidden_states) for f in (attn.to_q, attn.to_k, attn.to_v))
        if double:
            q, k, v = (t.tile(2, 1, 1) for t in (q, k, v))
        q, k, v = (_heads(t, total, heads) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        text = self.text_tokens
        if double:
            tq, tk, tv = (_heads(f(encoder_hidden_states), total, heads)
                          for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q, k = torch.cat([attn.norm_added_q(tq), q], 2), torch.cat([attn.norm_added_k(tk), k], 2)
            v = torch.cat([tv, v], 2)
            text = encoder_hidden_states.shape[1]
        q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        half = total // 2
        positive, negative = (F.scaled_dot_product_attention(q[part], k[part], v[part]).transpose(1, 2)
                              .reshape(half, q.shape[2], -1) for part in (slice(0, half), slice(half, total)))
        guided = _authors_guidance(positive[:, text:], negative[:, text:], self.scale, self.tau, self.alpha, 2, 0.0)
        if double:
            image = attn.to_out[1](attn.to_out[0](guided))
            return image, attn.to_add_out(torch.cat([positive[:, :text], negative[:, :text]]))
        positive[:, text:], negative[:, text:] = guided, guided
        return torch.cat([positive, negative])


def _with_processor(model: torch.nn.Module, processor) -> torch.nn.Module:
    """A copy of ``model`` with ``processor`` on every attention layer and their truncated norms."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "processor"):
            module.processor = processor
    _truncate_norms(model)
    return model


# -- tiny models with more than one block --------------------------------------------------------
def _sd3() -> GuidedStableDiffusion3Pipeline:
    """Tiny SD 3.5-style components: three joint blocks (the last text-pre-only), q/k RMS norms, the
    image-only second attention in block 0."""
    components = tiny_sd3_components(0)
    config = {**components["transformer"].config, "num_layers": 3, "qk_norm": "rms_norm",
              "dual_attention_layers": (0,)}
    with seeded_weights(0):
        components["transformer"] = SD3Transformer2DModel.from_config(config).eval()
    return quiet(GuidedStableDiffusion3Pipeline(**components))


def _flux() -> GuidedFluxPipeline:
    """Tiny Flux components with two double- and two single-stream blocks."""
    components = tiny_flux_components(0)
    config = {**components["transformer"].config, "num_layers": 2, "num_single_layers": 2}
    with seeded_weights(0):
        components["transformer"] = FluxTransformer2DModel.from_config(config).eval()
    return quiet(GuidedFluxPipeline(**components))


@pytest.fixture(scope="module")
def sd3() -> GuidedStableDiffusion3Pipeline:
    return _sd3()


@pytest.fixture(scope="module")
def flux() -> GuidedFluxPipeline:
    return _flux()


def _run(pipe, guidance, negative_prompt=NEGATIVE, **kwargs):
    if isinstance(pipe, GuidedFluxPipeline):
        kwargs = {"max_sequence_length": FLUX_TEXT, **kwargs}
    return pipe(PROMPT, negative_prompt=negative_prompt, num_inference_steps=STEPS, height=32, width=32,
                guidance=guidance, generator=seeded(0), output_type="latent", **kwargs)


# -- the authors' pipelines ----------------------------------------------------------------------
def _authors_sd3(pipe, scale: float, nag_negative: str, cfg_negative: str | None, nag_scale: float = 5.0,
                 tau: float = 2.5, alpha: float = 0.125) -> torch.Tensor:
    """Their SD3 pipeline's loop: text rows [uncond (CFG), cond, negative], pooled projections
    [uncond (CFG), cond, cond], the image rows [uncond (CFG), cond]."""
    transformer = _with_processor(pipe.transformer, AuthorsJointProcessor(nag_scale, tau, alpha))
    cfg = scale > 1
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, device="cpu",
                                                             negative_prompt=cfg_negative,
                                                             do_classifier_free_guidance=cfg)
    negative, _, _, _ = pipe.encode_prompt(nag_negative, nag_negative, nag_negative, device="cpu",
                                           do_classifier_free_guidance=False)
    text = torch.cat([uncond, cond, negative] if cfg else [cond, negative])
    pooled = torch.cat([uncond_pooled, pooled, pooled] if cfg else [pooled, pooled])
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    latents = pipe.prepare_latents(1, transformer.config.in_channels, 32, 32, cond.dtype, "cpu", seeded(0))
    for t in scheduler.timesteps:
        x = torch.cat([latents] * 2) if cfg else latents
        out = transformer(hidden_states=x, timestep=t.expand(text.shape[0]), encoder_hidden_states=text,
                          pooled_projections=pooled, return_dict=False)[0]
        if cfg:
            u, c = out.chunk(2)
            out = u + scale * (c - u)
        latents = scheduler.step(out, t, latents, return_dict=False)[0]
    return latents


def _authors_flux_forward(model, latents, timestep, guidance, pooled, text, text_ids, image_ids) -> torch.Tensor:
    """Their Flux transformer's forward (``NAGFluxTransformer2DModel``) in diffusers 0.42's block
    signatures: B image rows through the double-stream blocks with 2B text rows, the image tiled to
    2B for the single-stream blocks, the first B rows out."""
    rows = latents.shape[0]
    hidden = model.x_embedder(latents)
    temb = model.time_text_embed(timestep.to(hidden.dtype) * 1000, guidance.to(hidden.dtype) * 1000, pooled)
    encoder = model.context_embedder(text)
    rotary = model.pos_embed(torch.cat([text_ids, image_ids]))
    for block in model.transformer_blocks:
        encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb, image_rotary_emb=rotary)
    hidden = hidden.tile(2, 1, 1)
    for block in model.single_transformer_blocks:
        encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb, image_rotary_emb=rotary)
    return model.proj_out(model.norm_out(hidden[:rows], temb))


def _authors_flux(pipe, nag_negative: str, true_cfg: float = 1.0, nag_scale: float = 5.0, tau: float = 2.5,
                  alpha: float = 0.25) -> torch.Tensor:
    """Their Flux pipeline's loop: text rows [prompt; negative], pooled projections [prompt's;
    negative's]. Under true CFG (their pipeline's negative forward meets their processor's batch
    assertion) the unconditional forward is the plain network on the negative prompt, as their SD3
    pipeline runs its unconditional rows."""
    transformer = _with_processor(pipe.transformer, AuthorsFluxProcessor(nag_scale, tau, alpha, FLUX_TEXT))
    cond, pooled, text_ids = pipe.encode_prompt(PROMPT, None, device="cpu", max_sequence_length=FLUX_TEXT)
    negative, negative_pooled, _ = pipe.encode_prompt(nag_negative, None, device="cpu", max_sequence_length=FLUX_TEXT)
    latents, image_ids = pipe.prepare_latents(1, transformer.config.in_channels // 4, 32, 32, cond.dtype, "cpu",
                                              seeded(0))
    scheduler = copy.deepcopy(pipe.scheduler)
    config = scheduler.config
    mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(scheduler, STEPS, "cpu", sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    guidance = torch.full([2], EMBEDDED_GUIDANCE)
    for t in timesteps:
        timestep = t.expand(2).to(latents.dtype) / 1000
        out = _authors_flux_forward(transformer, latents, timestep, guidance, torch.cat([pooled, negative_pooled]),
                                    torch.cat([cond, negative]), text_ids, image_ids)
        if true_cfg > 1:
            plain = pipe.transformer(hidden_states=latents, timestep=timestep[:1], guidance=guidance[:1],
                                     pooled_projections=negative_pooled, encoder_hidden_states=negative,
                                     txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
            out = plain + true_cfg * (out - plain)
        latents = scheduler.step(out, t, latents, return_dict=False)[0]
    return latents


def test_the_rule_equals_the_authors_sd3_and_flux_arithmetic() -> None:
    torch.manual_seed(0)
    positive, negative = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    for scale, tau, alpha in [(5.0, 2.5, 0.125), (3.0, 1.0, 0.25), (9.0, 100.0, 1.0)]:
        sd3 = normalized_attention_guidance(positive, negative, scale, tau, alpha, order=1)
        assert torch.allclose(sd3, _authors_guidance(positive, negative, scale, tau, alpha, 1, 1e-7), atol=1e-6)
        flux = normalized_attention_guidance(positive, negative, scale, tau, alpha, order=2)
        assert torch.allclose(flux, _authors_guidance(positive, negative, scale, tau, alpha, 2, 0.0), atol=1e-6)
    capped = normalized_attention_guidance(positive, negative, 9.0, 2.5, 1.0, order=2)  # the L2 cap acts
    ratio = capped.norm(dim=-1) / positive.norm(dim=-1)
    assert (ratio - 2.5).abs().max() < 1e-5


@pytest.mark.parametrize("scale, tau", [(1.0, 2.5), (3.0, 2.5), (1.0, 1.0)])  # tau 1: the L1 cap acts
def test_sd3_nag_equals_the_authors_pipeline(sd3, scale, tau) -> None:
    reference = _authors_sd3(sd3, scale, NEGATIVE, NEGATIVE if scale > 1 else None, tau=tau)
    ours = _run(sd3, {"name": "nag", "scale": scale, "tau": tau})
    assert (ours.images - reference).abs().max() < 1e-5
    assert ours.nfe == (2 if scale > 1 else 1) * STEPS  # NAG adds partner rows, not forwards
    plain = _run(sd3, None, guidance_scale=scale).images
    assert not torch.allclose(ours.images, plain, atol=1e-3)


def test_sd3_nag_without_a_negative_prompt_equals_the_authors_default(sd3) -> None:
    # their default negative is the empty prompt; other s, tau and alpha reach the rule as given
    reference = _authors_sd3(sd3, 1.0, "", None, nag_scale=3.0, tau=2.0, alpha=0.5)
    ours = _run(sd3, NAG(nag_scale=3.0, tau=2.0, alpha=0.5), negative_prompt=None).images
    assert (ours - reference).abs().max() < 1e-5


@pytest.mark.parametrize("true_cfg, tau", [(1.0, 2.5), (3.0, 2.5), (1.0, 1.0)])  # tau 1: the L2 cap acts
def test_flux_nag_equals_the_authors_pipeline(flux, true_cfg, tau) -> None:
    reference = _authors_flux(flux, NEGATIVE, true_cfg, tau=tau)
    ours = _run(flux, {"name": "nag", "scale": true_cfg, "tau": tau})
    assert (ours.images - reference).abs().max() < 1e-5
    assert ours.nfe == (2 if true_cfg > 1 else 1) * STEPS
    assert not torch.allclose(ours.images, _run(flux, None, true_cfg_scale=true_cfg).images, atol=1e-3)


# -- identities ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _AlwaysNAG(NAG):
    """NAG that runs its rows even where it changes nothing (s = 1): the partner-row machinery alone."""

    def alters(self, nag_scale: float) -> bool:
        return True


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_nag_scale_one_alpha_zero_and_an_empty_interval_are_the_unguided_run_bit_for_bit(family, request) -> None:
    pipe = request.getfixturevalue(family)
    cfg = {"guidance_scale": 4.0} if family == "sd3" else {"true_cfg_scale": 4.0}
    plain = _run(pipe, None, **({"guidance_scale": 1.0} if family == "sd3" else {})).images
    for nag in (NAG(nag_scale=1.0), NAG(alpha=0.0), NAG(start=1.0)):
        assert torch.equal(_run(pipe, nag).images, plain)
    assert torch.equal(_run(pipe, NAG(scale=4.0, nag_scale=1.0)).images, _run(pipe, None, **cfg).images)
    # the partner rows at s = 1 (Z = Z+ in every layer) leave the conditional prediction as it was
    carried = _run(pipe, _AlwaysNAG(nag_scale=1.0))
    assert (carried.images - plain).abs().max() < 1e-6 and carried.nfe == STEPS


def test_the_negative_prompt_acts_and_the_layers_choose_the_blocks(sd3) -> None:
    every = _run(sd3, "nag").images
    assert not torch.allclose(every, _run(sd3, "nag", negative_prompt="a blue triangle").images, atol=1e-4)
    first = _run(sd3, NAG(layers=[0])).images
    plain = _run(sd3, None, guidance_scale=1.0).images
    assert not torch.allclose(first, every, atol=1e-5) and not torch.allclose(first, plain, atol=1e-5)
    sd3.transformer.forward = _raising
    try:
        with pytest.raises(ValueError, match=r"'layers' must be transformer block indices 0..2.*7 selects nothing"):
            _run(sd3, NAG(layers=[7]))
    finally:
        del sd3.transformer.forward


def test_nag_leaves_the_shared_transformer_and_other_perturbations_as_they_were(sd3) -> None:
    stock = quiet(StableDiffusion3Pipeline(**sd3.components))
    before = stock(PROMPT, num_inference_steps=2, height=32, width=32, generator=seeded(0), output_type="latent").images
    pag = _run(sd3, {"name": "pag", "layers": [1]}).images
    _run(sd3, "nag")  # dispatchers stay on the joint-attention layers
    after = stock(PROMPT, num_inference_steps=2, height=32, width=32, generator=seeded(0), output_type="latent").images
    assert torch.equal(before, after)
    assert torch.equal(_run(sd3, {"name": "pag", "layers": [1]}).images, pag)


# -- composition ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("base", ["apg", "cfg_zero_star"])
def test_nag_under_other_methods(family, base, request) -> None:
    pipe = request.getfixturevalue(family)
    base_guide = resolve_guidance(base, scale=3.0)
    alone = _run(pipe, base_guide)
    both = _run(pipe, NAG(base=base_guide))
    assert torch.isfinite(both.images).all() and both.nfe == alone.nfe  # NAG adds no forward
    assert not torch.allclose(both.images, alone.images, atol=1e-4)
    assert torch.equal(_run(pipe, NAG(base=base_guide, nag_scale=1.0)).images, alone.images)


# -- the other flow families ---------------------------------------------------------------------
def _chroma():
    return quiet(GuidedChromaPipeline(**tiny_chroma_components(0))), {"max_sequence_length": 16}


def _flux2_klein():
    return quiet(GuidedFlux2KleinPipeline(**tiny_flux2_klein_components(0))), {"max_sequence_length": 32}


def _flux2_dev():
    return quiet(GuidedFlux2Pipeline(**tiny_flux2_dev_components(0))), {"max_sequence_length": 64}


def _qwen_image():
    return quiet(GuidedQwenImagePipeline(**tiny_qwen_image_components(0, layers=2))), {"max_sequence_length": 16}


def _z_image():
    return quiet(GuidedZImagePipeline(**tiny_z_image_components(0, layers=2))), {"max_sequence_length": 64}


@pytest.mark.parametrize("build", [_chroma, _flux2_klein, _flux2_dev, _qwen_image, _z_image])
def test_nag_runs_on_every_other_flow_family(build) -> None:
    pipe, inputs = build()

    def run(guidance, negative_prompt=NEGATIVE):
        return pipe(prompt=PROMPT, negative_prompt=negative_prompt, num_inference_steps=2, height=32, width=32,
                    guidance=guidance, generator=seeded(0), output_type="latent", **inputs)

    plain = run({"name": "cfg", "scale": 1.0}).images  # the conditional forward alone
    nag = run("nag")
    assert torch.isfinite(nag.images).all() and nag.nfe == 2
    assert not torch.allclose(nag.images, plain, atol=1e-5)
    assert not torch.allclose(nag.images, run("nag", negative_prompt="a blue triangle").images, atol=1e-5)
    carried = run(_AlwaysNAG(nag_scale=1.0))  # the partner rows alone change nothing
    assert (carried.images - plain).abs().max() < 1e-5
    with_cfg = run({"name": "nag", "scale": 3.0})
    assert torch.isfinite(with_cfg.images).all() and with_cfg.nfe == 4


def _raising(*args, **kwargs):
    raise AssertionError("the network ran")


def test_a_second_text_stream_refuses_other_attention_alterations_in_its_forward(sd3) -> None:
    config = sd3.transformer.config
    condition = {"encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim),
                 "pooled_projections": torch.randn(1, config.pooled_projection_dim)}
    branches = TransformerBranches(sd3.transformer, {"cond": condition, "uncond": condition})
    pag = Branch("pag", base="cond", perturb=Perturbation("identity", (0,)))
    nag = Branch("nag", base="cond", perturb=NAGAttention(layers=None, context="uncond"))
    x = torch.randn(1, config.in_channels, 16, 16)
    with pytest.raises(ValueError, match="cannot share a forward with other attention alterations"):
        branches(x, torch.tensor([500.0]), [(pag, None), (nag, None)])


def test_a_transformer_without_text_attention_refuses_nag_before_any_model_call() -> None:
    dit = quiet(GuidedDiTPipeline(**tiny_dit_components(num_classes=12, learned_sigma=False)))
    dit.transformer.forward = _raising
    with pytest.raises(ValueError, match="'extrapolate' needs cross-attention layers.*Transformer2DModel has none"):
        dit(class_labels=[3], num_inference_steps=2, guidance="nag", output_type="latent")
