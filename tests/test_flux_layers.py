"""Layer-level methods on Flux transformers: PAG's identity attention and SEG's blurred queries on
double- and single-stream attention, skipped blocks (SLG) and TSG's time-embedding noise, each
against an independent construction on a copy of the tiny transformer (a boolean attention mask
built from scratch, Flux attention written out with the queries blurred, a block replaced by the
identity)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from guidance_engine.guidance import Branch, Perturbation
from guidance_engine.pipelines import GuidedFluxPipeline
from guidance_engine.pipelines.flux import FluxBranches
from guidance_engine.pipelines.perturbation import flux_identity_mask, gaussian_blur_queries
from guidance_engine.pipelines.toy.tiny_models import tiny_flux_components
from conftest import PROMPT, quiet, seeded

CALL = {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 16, "output_type": "latent"}
LATENT = (1, 1, 16, 16)  # the tiny model's unpacked latents: one channel, 16 x 16 -> 64 tokens of 2 x 2 patches


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture
def flux():
    return quiet(GuidedFluxPipeline(**tiny_flux_components(0)))


def _branches(pipe, model=None) -> FluxBranches:
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=[PROMPT], prompt_2=None, max_sequence_length=16)
    cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled,
            "guidance": torch.full((1,), 3.5)}
    img_ids = pipe._prepare_latent_image_ids(1, 8, 8, "cpu", embeds.dtype)
    return FluxBranches(model or pipe.transformer, {"cond": cond}, img_ids=img_ids, txt_ids=text_ids)


class _ReferenceMask:
    """Flux's own processor with a boolean PAG mask built here: image token i attends to the text
    and to itself only, text tokens to everything."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        tokens = text + hidden_states.shape[1]
        image = 64
        text = tokens - image
        i = torch.arange(tokens)
        allowed = (i[None, :] < text) | (i[:, None] < text) | (i[:, None] == i[None, :])
        return FluxAttnProcessor()(attn, hidden_states, encoder_hidden_states, allowed[None, None], image_rotary_emb)


class _ReferenceBlur:
    """Flux attention written out (projections, q/k norms, rotary positions, SDPA, output
    projections) with the 8 x 8 image tokens' queries blurred before the q-norm."""

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        def heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))

        query = attn.to_q(hidden_states)
        text = query.shape[1] - 64
        query = torch.cat([query[:, :text], gaussian_blur_queries(query[:, text:], 8, 8, self.sigma)], dim=1)
        query, key, value = heads(query), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None:
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value)))
        out = out.transpose(1, 2).flatten(2, 3)
        if encoder_hidden_states is None:
            return out
        context, out = out[:, :encoder_hidden_states.shape[1]], out[:, encoder_hidden_states.shape[1]:]
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(context)


@pytest.mark.parametrize("layer, module", [(0, "transformer_blocks.0.attn"),
                                           ("single.0", "single_transformer_blocks.0.attn")])
def test_seg_rows_equal_flux_attention_written_out_with_blurred_queries(flux, layer, module) -> None:
    x = torch.randn(LATENT, generator=seeded(5))
    t = torch.tensor(600.0)
    branch = Branch("seg_blurred", base="cond", perturb=Perturbation("blur", (layer,), sigma=2.0))
    got = _branches(flux)(x, t, [(branch, None)])[branch]
    reference = copy.deepcopy(flux.transformer)
    reference.get_submodule(module).set_processor(_ReferenceBlur(2.0))
    want = _branches(flux, reference)(x, t, [("cond", None)])["cond"]
    assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, _branches(flux)(x, t, [("cond", None)])["cond"], atol=1e-3)
    tiny_blur = Branch("seg_identity", base="cond", perturb=Perturbation("blur", (layer,), sigma=0.01))
    assert torch.allclose(_branches(flux)(x, t, [(tiny_blur, None)])[tiny_blur],  # a 1-tap kernel: the model
                          _branches(flux)(x, t, [("cond", None)])["cond"], atol=1e-6, rtol=0)


def test_the_identity_mask_keeps_text_and_self_only() -> None:
    mask = flux_identity_mask(5, 3, torch.zeros(()))[0, 0]  # 2 text tokens, then 3 image tokens
    kept = mask == 0
    assert kept[:2].all() and kept[:, :2].all()  # text attends to all; all attend to text
    assert torch.equal(kept[2:, 2:], torch.eye(3, dtype=torch.bool))


@pytest.mark.parametrize("layer, module", [(0, "transformer_blocks.0.attn"),
                                           ("single.0", "single_transformer_blocks.0.attn")])
def test_pag_rows_equal_flux_with_an_independent_identity_mask(flux, layer, module) -> None:
    x = torch.randn(LATENT, generator=seeded(1))
    t = torch.tensor(700.0)
    branch = Branch("pag_perturbed", base="cond", perturb=Perturbation("identity", (layer,)))
    got = _branches(flux)(x, t, [("cond", None), (branch, None)])
    reference = copy.deepcopy(flux.transformer)
    reference.get_submodule(module).set_processor(_ReferenceMask())
    want = _branches(flux, reference)(x, t, [("cond", None)])["cond"]
    plain = _branches(flux)(x, t, [("cond", None)])["cond"]
    assert torch.allclose(got[branch], want, atol=1e-6, rtol=0) and not torch.allclose(got[branch], plain)
    assert torch.equal(got["cond"], plain)  # the conditional rows are the model's


@pytest.mark.parametrize("layer, block", [(0, "transformer_blocks.0"), ("single.0", "single_transformer_blocks.0")])
def test_skipped_blocks_equal_flux_with_the_block_removed(flux, layer, block) -> None:
    x = torch.randn(LATENT, generator=seeded(2))
    t = torch.tensor(400.0)
    branch = Branch("slg_skipped", base="cond", perturb=Perturbation("skip", (layer,)))
    got = _branches(flux)(x, t, [(branch, None)])[branch]
    reference = copy.deepcopy(flux.transformer)
    reference.get_submodule(block).forward = \
        lambda hidden_states, encoder_hidden_states, *args, **kwargs: (encoder_hidden_states, hidden_states)
    assert torch.equal(got, _branches(flux, reference)(x, t, [("cond", None)])["cond"])


def test_time_noise_alters_only_the_time_step_embedding(flux) -> None:
    x = torch.randn(LATENT, generator=seeded(3))
    t = torch.tensor(500.0)
    branch = Branch("tsg_noised", base="cond", time_noise=1.0, generator=seeded(4))
    got = _branches(flux)(x, t, [(branch, None)])[branch]
    noise = torch.randn((1, 32), generator=seeded(4))
    reference = copy.deepcopy(flux.transformer)
    reference.time_text_embed.timestep_embedder.register_forward_hook(
        lambda module, inputs, emb: emb + emb.float().std() * noise)
    assert torch.equal(got, _branches(flux, reference)(x, t, [("cond", None)])["cond"])


@pytest.mark.parametrize("spec", [{"name": "pag", "layers": [0, "single.0"]}, {"name": "slg", "layers": "single.0"},
                                  {"name": "seg", "layers": [0]}, {"name": "tsg", "t_min": 0.0}])
def test_layer_methods_run_through_the_pipeline_and_leave_the_model_as_it_was(flux, spec) -> None:
    before = flux(PROMPT, generator=seeded(0), **CALL).images
    out = flux(PROMPT, guidance=spec, generator=seeded(0), **CALL)
    assert torch.isfinite(out.images).all() and out.nfe > 3 and not torch.equal(out.images, before)
    assert torch.equal(flux(PROMPT, generator=seeded(0), **CALL).images, before)


@pytest.mark.parametrize("spec, message", [
    ({"name": "pag", "layers": [5]}, r"transformer block indices 0\.\.0 \(double-stream\) or 'single\.0'\.\.'single\.0'"),
    ({"name": "sag"}, r"reads a plain self-attention map")])
def test_what_flux_cannot_do_is_refused_before_any_forward(flux, spec, message) -> None:
    flux.transformer.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the transformer ran"))
    with pytest.raises(ValueError, match=message):
        flux(PROMPT, guidance=spec, generator=seeded(0), **CALL)
