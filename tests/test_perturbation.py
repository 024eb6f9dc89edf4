"""Perturbation guidance (PAG, SEG, SLG, autoguidance): equal to the stock pipelines and to
diffusers' guiders under the documented mappings, rows of one forward, models left untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPAGPipeline
from diffusers.guiders import (AutoGuidance as DiffusersAutoGuidance, PerturbedAttentionGuidance,
                               SkipLayerGuidance, SmoothedEnergyGuidance)
from diffusers.hooks.smoothed_energy_guidance_utils import _gaussian_blur_2d

from guidance_engine import CFG, Prediction, StepInfo, resolve_guidance
from guidance_engine.guidance import Branch, Perturbation
from guidance_engine.methods.autoguidance import AutoGuidance
from guidance_engine.methods.pag import PAG
from guidance_engine.methods.perturbed import diffusers_guider_window, sd3_pipeline_window
from guidance_engine.methods.sag import SAG
from guidance_engine.methods.seg import SEG
from guidance_engine.methods.slg import SLG
from guidance_engine.pipelines import GuidedStableDiffusion3Pipeline
from guidance_engine.pipelines.branches import NetworkBranches
from guidance_engine.pipelines.perturbation import gaussian_blur_queries, resolve_layers
from guidance_engine.pipelines.row_plan import PlanBlockForward, current
from guidance_engine.pipelines.toy.tiny_models import tiny_sd3_components, tiny_sd_components
from conftest import PROMPT, quiet, seeded

STEPS = 4


def _latents(pipe, guidance, seed: int = 0, **kwargs) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=STEPS, guidance=guidance, generator=seeded(seed), output_type="latent",
                **kwargs)


def _processors(unet) -> dict:
    """Each layer's own processor (a row-plan dispatcher, installed once, is looked through)."""
    return {name: getattr(processor, "original", processor) for name, processor in unet.attn_processors.items()}


def _no_forward_but_dispatchers(modules) -> bool:
    """No module's forward is replaced, except by the row-plan dispatcher installed once."""
    return all(isinstance(vars(m).get("forward", None), (type(None), PlanBlockForward)) for m in modules)


def _same_processors(before: dict, after: dict) -> bool:
    return before.keys() == after.keys() and all(after[k] is before[k] for k in before)


@pytest.fixture
def sd3_pair():
    """Stock and guided SD3 on a tiny 4-block transformer (the shared tiny model has one block)."""
    components = tiny_sd3_components(0)
    torch.manual_seed(0)
    components["transformer"] = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32).eval()
    stock = quiet(StableDiffusion3Pipeline(**components))
    return stock, quiet(GuidedStableDiffusion3Pipeline.from_pipe(stock))


# -- equality with the stock pipelines --------------------------------------------------------

def test_pag_equals_the_stock_pag_pipeline_and_leaves_the_stock_pipelines_untouched(sd_pair) -> None:
    stock, guided = sd_pair
    before = _processors(stock.unet)
    types = {k: type(v) for k, v in before.items()}
    reference = stock(PROMPT, num_inference_steps=STEPS, generator=seeded(3), output_type="latent").images
    pag_pipe = quiet(StableDiffusionPAGPipeline.from_pipe(stock, pag_applied_layers=["mid"]))
    for cfg, pag in ((5.0, 3.0), (1.0, 2.5)):  # with CFG (3 rows a step) and PAG alone (2 rows)
        want = pag_pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=cfg, pag_scale=pag, generator=seeded(0),
                        output_type="latent").images
        got = _latents(guided, PAG(scale=cfg, pag_scale=pag, layers="mid"))
        torch.testing.assert_close(got.images, want, atol=1e-6, rtol=0)  # bit for bit here, in fact
        assert got.nfe == STEPS * (3 if cfg != 1 else 2)
        assert _same_processors(before, _processors(stock.unet))  # our call restored every processor
    assert {k: type(v) for k, v in _processors(stock.unet).items()} == types
    again = stock(PROMPT, num_inference_steps=STEPS, generator=seeded(3), output_type="latent").images
    assert torch.equal(again, reference)


@pytest.mark.parametrize("layers, start, stop", [([1, 2], 0.1, 0.55), ([3], 0.01, 0.3)])
def test_slg_equals_the_stock_sd3_skip_layer_guidance(sd3_pair, layers, start, stop) -> None:
    stock, guided = sd3_pair
    n = 10
    want = stock(PROMPT, num_inference_steps=n, guidance_scale=5.0, skip_guidance_layers=layers,
                 skip_layer_guidance_scale=2.8, skip_layer_guidance_start=start, skip_layer_guidance_stop=stop,
                 generator=seeded(0), output_type="latent").images
    ours_start, ours_stop = sd3_pipeline_window(start, stop, n)  # stock: n start < i < n stop
    slg = SLG(scale=5.0, slg_scale=2.8, layers=layers, start=ours_start, stop=ours_stop)
    got = guided(PROMPT, num_inference_steps=n, guidance=slg, generator=seeded(0), output_type="latent")
    torch.testing.assert_close(got.images, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)
    skipped = sum(1 for i in range(n) if n * start < i < n * stop)
    assert got.nfe == 2 * n + skipped
    assert _no_forward_but_dispatchers(guided.transformer.transformer_blocks) and current() is None


def test_the_stock_skip_layer_arguments_work_on_our_sd3_pipeline(sd3_pair) -> None:
    stock, guided = sd3_pair
    n, settings = 10, dict(guidance_scale=5.0, skip_guidance_layers=[2], skip_layer_guidance_scale=3.0,
                           skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.4)
    want = stock(PROMPT, num_inference_steps=n, generator=seeded(0), output_type="latent", **settings).images
    got = guided(PROMPT, num_inference_steps=n, generator=seeded(0), output_type="latent", **settings)
    torch.testing.assert_close(got.images, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)
    assert got.nfe == 2 * n + 2 and got.guidance["name"] == "slg"  # steps 2 and 3 (1 < i < 4)
    with pytest.raises(ValueError, match=r"skip_guidance_layers: the stock skip-layer arguments go with guidance"):
        guided(PROMPT, num_inference_steps=2, guidance="cfg", skip_guidance_layers=[2])


# -- equality with diffusers' guiders ---------------------------------------------------------

def _preds(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(2, 4, 8, 8, generator=g) for k in ("cond", "uncond", "perturbed", "x")}


def _ours(method, preds: dict[str, torch.Tensor], i: int, n: int, branch: str) -> torch.Tensor:
    step = StepInfo(index=i, num_steps=n, sigma=1.0, sigma_next=0.5, timestep=500.0)
    a, s = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    source = {"cond": "cond", "uncond": "uncond", branch: "perturbed"}
    wrapped = {name: Prediction(preds[source[str(name)]], preds["x"], a, s, "epsilon")
               for name in method.branches(step, method.init_state(2, torch.device("cpu")))}
    return method.combine(wrapped, step, None).denoise.output


@pytest.mark.parametrize("kind", ["pag", "seg", "slg"])
@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_three_branch_methods_equal_diffusers_guiders(kind, cfg) -> None:
    """Guider (guidance_scale s, perturbed scale w, window a..b) == ours (scale s, w, window
    ``diffusers_guider_window``); with s = 1 the guider's ``p + w (c - p)`` is our w - 1."""
    n, a, b, w = 20, 0.05, 0.6, 2.8
    guider = {"pag": lambda: PerturbedAttentionGuidance(guidance_scale=cfg, perturbed_guidance_scale=w,
                                                        perturbed_guidance_start=a, perturbed_guidance_stop=b,
                                                        perturbed_guidance_layers=[0]),
              "seg": lambda: SmoothedEnergyGuidance(guidance_scale=cfg, seg_guidance_scale=w, seg_guidance_start=a,
                                                    seg_guidance_stop=b, seg_guidance_layers=[0]),
              "slg": lambda: SkipLayerGuidance(guidance_scale=cfg, skip_layer_guidance_scale=w,
                                               skip_layer_guidance_start=a, skip_layer_guidance_stop=b,
                                               skip_layer_guidance_layers=[0])}[kind]()
    start, stop = diffusers_guider_window(a, b, n)
    ours_w = w if cfg != 1 else w - 1
    method = resolve_guidance({"name": kind, "scale": cfg, f"{kind}_scale": ours_w, "start": start, "stop": stop})
    preds = _preds()
    on = 0
    for i in range(n):
        guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(500))
        want = guider.forward(preds["cond"], preds["uncond"], preds["perturbed"]).pred
        got = _ours(method, preds, i, n, kind)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        on += int(a * n) < i < int(b * n)
    assert on == 10  # steps 2..11 of 20


@pytest.mark.parametrize("scale", [2.1, 1.0])
def test_autoguidance_equals_the_diffusers_guider_on_its_uncond_reference(scale) -> None:
    """diffusers' AutoGuidance (layers skipped on the negative-prompt branch) is ours with
    ``reference='skip', reference_input='uncond'``: ref + w (cond - ref)."""
    n = 10
    guider = DiffusersAutoGuidance(guidance_scale=scale, auto_guidance_layers=[0], dropout=1.0)
    method = AutoGuidance(scale=scale, reference="skip", reference_input="uncond", layers=[0])
    preds = _preds(1)
    for i in range(n):
        guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(500))
        want = guider.forward(preds["cond"], preds["perturbed"]).pred
        got = _ours(method, preds, i, n, "autoguidance_ref")
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_window_mappings() -> None:
    assert diffusers_guider_window(0.01, 0.2, 28) == (1 / 28, 5 / 28)  # guider: steps 1..4
    assert sd3_pipeline_window(0.01, 0.2, 28) == (1 / 28, 6 / 28)  # stock SD3: steps 1..5
    slg = SLG()  # our defaults at 28 steps: the stock SD3 steps 1..5
    assert [i for i in range(28) if slg.perturb_scale_at(StepInfo(i, 28, 1.0, 0.5, 500.0))] == [1, 2, 3, 4, 5]


# -- identities -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [PAG(scale=5.0, pag_scale=0.0), SEG(scale=5.0, seg_scale=0.0),
                                    SLG(scale=5.0, slg_scale=0.0, layers="mid"),
                                    SAG(scale=5.0, sag_scale=0.0), PAG(scale=5.0, sigma_max=0.0),
                                    SEG(scale=5.0, start=1.0, stop=1.0)])
def test_zero_perturbation_is_cfg_bit_for_bit(sd_pair, method) -> None:
    _, guided = sd_pair
    want = _latents(guided, CFG(scale=5.0))
    got = _latents(guided, method)
    assert torch.equal(got.images, want.images) and got.nfe == want.nfe == 2 * STEPS


def test_slg_zero_is_cfg_on_sd3(sd3_pair) -> None:
    _, guided = sd3_pair
    want = _latents(guided, CFG(scale=5.0))
    got = _latents(guided, SLG(scale=5.0, slg_scale=0.0, layers=[1]))
    assert torch.equal(got.images, want.images)


@pytest.mark.parametrize("perturbation", [Perturbation("blur", ("mid",), sigma=1.0), Perturbation("blur", ("mid",)),
                                          Perturbation("skip", ("up",)), Perturbation("identity", ("down", "up"))])
def test_only_the_perturbed_rows_change(sd_pair, perturbation) -> None:
    _, guided = sd_pair
    embeds = guided.encode_prompt([PROMPT, "blue"], "cpu", 1, True)
    branches = NetworkBranches(guided.unet, {"cond": {"encoder_hidden_states": embeds[0]},
                                          "uncond": {"encoder_hidden_states": embeds[1]}})
    x, t = torch.randn(2, 4, 16, 16, generator=seeded(0)), torch.tensor(500)
    plain = branches(x, t, [("uncond", None), ("cond", None)])
    branch = Branch("p", base="cond", perturb=perturbation)
    mixed = branches(x, t, [("uncond", None), ("cond", None), (branch, None)])
    for name in ("uncond", "cond"):
        torch.testing.assert_close(mixed[name], plain[name], atol=1e-6, rtol=0)
    assert (mixed["p"] - plain["cond"]).abs().max() > 1e-4  # the perturbation does something
    alone = branches(x, t, [(branch, None)])  # every row perturbed: no plain rows at all
    torch.testing.assert_close(alone["p"], mixed["p"], atol=1e-5, rtol=0)


# -- the query blur ---------------------------------------------------------------------------

def test_query_blur_matches_the_authors_kernel_and_its_limits() -> None:
    q = torch.randn(2, 64, 6, generator=seeded(1))
    # diffusers' helper takes its Gaussian branch only when sigma exceeds the threshold (the test
    # it inverts): with threshold 0 it is the authors' square-grid blur
    for sigma in (0.5, 1.0, 3.0):
        size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
        want = _gaussian_blur_2d(q.clone(), size, sigma, 0.0)
        torch.testing.assert_close(gaussian_blur_queries(q, 8, 8, sigma), want, atol=1e-5, rtol=1e-5)
    mean = gaussian_blur_queries(q, 8, 8, math.inf)
    torch.testing.assert_close(mean, q.mean(dim=1, keepdim=True).expand_as(q))
    torch.testing.assert_close(gaussian_blur_queries(q, 8, 8, 1e-3), q)  # tiny sigma: no blur
    wide = gaussian_blur_queries(torch.randn(1, 4 * 16, 3), 4, 16, 1.0)  # non-square grids work
    assert wide.shape == (1, 64, 3)


# -- restoration and errors -------------------------------------------------------------------

def test_an_exception_mid_forward_restores_every_processor(sd_pair) -> None:
    _, guided = sd_pair
    before = _processors(guided.unet)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    handle = guided.unet.up_blocks[1].register_forward_pre_hook(boom)  # after the perturbed mid block
    try:
        for method in (PAG(), SEG(), SLG(layers="mid", start=0.0), SAG()):
            with pytest.raises(RuntimeError, match="boom"):
                _latents(guided, method)
            assert _same_processors(before, _processors(guided.unet))
            assert _no_forward_but_dispatchers(guided.unet.modules()) and current() is None
    finally:
        handle.remove()


def test_an_exception_mid_forward_restores_skipped_blocks(sd3_pair) -> None:
    _, guided = sd3_pair
    handle = guided.transformer.transformer_blocks[3].register_forward_pre_hook(
        lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            _latents(guided, SLG(layers=[1, 2], start=0.0))
    finally:
        handle.remove()
    assert _no_forward_but_dispatchers(guided.transformer.transformer_blocks) and current() is None


@pytest.mark.parametrize("make, message", [
    (lambda: PAG(layers="middle"), r"pag: parameter 'layers' must be block names .* got 'middle'"),
    (lambda: PAG(layers=[-1]), r"pag: parameter 'layers' must be .* got \[-1\]"),
    (lambda: SEG(blur_sigma=0.0), r"seg: parameter 'blur_sigma' must be \(0, inf\), got 0.0"),
    (lambda: SLG(slg_scale=-1.0), r"slg: parameter 'slg_scale' must be \[0, 100\], got -1.0"),
    (lambda: AutoGuidance(reference="ema"), r"parameter 'reference' must be one of 'network', 'skip', got 'ema'"),
    (lambda: Perturbation("noise"), r"kind must be one of 'identity', 'blur', 'skip', 'extrapolate', 'shuffle', got 'noise'"),
])
def test_bad_parameters_name_the_parameter_range_and_value(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_layers_spec_forms_and_round_trip() -> None:
    assert PAG(layers="mid").layers == ("mid",)
    assert SLG(layers="7, 8,9").layers == (7, 8, 9)
    assert PAG(layers=["down.1", "up.0.attentions.0"]).layers == ("down.1", "up.0.attentions.0")
    pag = PAG(layers="mid,up.1", pag_scale=2.0)
    assert resolve_guidance(pag.to_dict()) == pag


@pytest.mark.parametrize("method, message", [
    (PAG(layers="down.7"), r"pag: parameter 'layers' must be 'mid', 'down', 'up'.*'down.7' selects nothing"),
    (SLG(layers=[7], start=0.0), r"slg: parameter 'layers' must be .* for a UNet, got 7"),
    (AutoGuidance(), r"needs a 'reference' network: pass reference_unet="),
])
def test_bad_layers_or_missing_networks_fail_before_any_model_call(sd_pair, method, message) -> None:
    _, guided = sd_pair
    calls = []
    handle = guided.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            _latents(guided, method)
    finally:
        handle.remove()
    assert calls == []


def test_sd3_refuses_sag_and_bad_layers_before_any_model_call(sd3_pair) -> None:
    _, guided = sd3_pair
    calls = []
    handle = guided.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"method .sag. reads a plain self-attention map, which SD3 transformers"):
            _latents(guided, SAG(layers=[1]))
        with pytest.raises(ValueError, match=r"slg: parameter 'layers' must be transformer block indices 0..3; 7"):
            _latents(guided, SLG(start=0.0))  # the default 7, 8, 9 on a 4-block model
    finally:
        handle.remove()
    assert calls == []
    assert [name for name, _ in resolve_layers(guided.transformer, Perturbation("skip", (1, 3)))] == \
        ["transformer_blocks.1", "transformer_blocks.3"]


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_pag_on_sd3_equals_the_stock_sd3_pag_pipeline(sd3_pair, cfg) -> None:
    """PAG on SD3's joint attention (identity image-to-image block, as diffusers' SD3 PAG pipeline)."""
    from diffusers import StableDiffusion3PAGPipeline

    stock, guided = sd3_pair
    before = _processors(stock.transformer)
    pag_stock = quiet(StableDiffusion3PAGPipeline.from_pipe(stock, pag_applied_layers=["blocks.1", "blocks.2"]))
    kwargs = dict(num_inference_steps=4, output_type="np")
    want = pag_stock(PROMPT, guidance_scale=cfg, pag_scale=3.0, generator=seeded(0), **kwargs).images
    got = guided(PROMPT, guidance=PAG(scale=cfg, pag_scale=3.0, layers=[1, 2]), generator=seeded(0), **kwargs)
    np.testing.assert_array_equal(got.images, want)
    assert got.nfe == (3 if cfg != 1 else 2) * 4
    # the plain stock pipeline on the same transformer: its processors are the same objects again
    pag_stock.transformer.set_attn_processor(dict(before))  # (it empties the dict it is given)
    assert _same_processors(before, _processors(stock.transformer))
    stock(PROMPT, generator=seeded(0), **kwargs)
    guided(PROMPT, guidance=PAG(scale=cfg, pag_scale=3.0, layers=[1, 2]), generator=seeded(0), **kwargs)
    assert _same_processors(before, _processors(stock.transformer))


# -- autoguidance -----------------------------------------------------------------------------

def _reference_unet(seed: int = 1):
    return tiny_sd_components(seed)["unet"]


def test_autoguidance_reference_rows_are_a_separate_call_of_the_reference_network(sd_pair) -> None:
    _, guided = sd_pair
    reference = _reference_unet()
    embeds = guided.encode_prompt([PROMPT, "blue"], "cpu", 1, True)[0]
    branches = NetworkBranches(guided.unet, {"cond": {"encoder_hidden_states": embeds}},
                            networks={"reference": reference})
    x, t = torch.randn(2, 4, 16, 16, generator=seeded(0)), torch.tensor(500)
    ref = AutoGuidance().reference_branch
    out = branches(x, t, [(ref, None), ("cond", None)])
    torch.testing.assert_close(out[ref], reference(x, t, encoder_hidden_states=embeds).sample, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["cond"], guided.unet(x, t, encoder_hidden_states=embeds).sample,
                               atol=1e-6, rtol=0)


def test_autoguidance_through_the_pipeline(sd_pair) -> None:
    _, guided = sd_pair
    reference = _reference_unet()
    calls = {"main": [], "reference": []}
    hooks = [guided.unet.register_forward_pre_hook(lambda m, a: calls["main"].append(a[0].shape[0])),
             reference.register_forward_pre_hook(lambda m, a: calls["reference"].append(a[0].shape[0]))]
    try:
        out = _latents(guided, AutoGuidance(scale=2.0), reference_unet=reference)
    finally:
        for handle in hooks:
            handle.remove()
    assert calls == {"main": [1] * STEPS, "reference": [1] * STEPS} and out.nfe == 2 * STEPS
    cond_only = _latents(guided, CFG(scale=1.0))
    assert not torch.equal(out.images, cond_only.images)
    # w = 1 is the main model alone; the reference equal to the main model changes nothing
    assert torch.equal(_latents(guided, AutoGuidance(scale=1.0), reference_unet=reference).images, cond_only.images)
    same = _latents(guided, AutoGuidance(scale=3.0), reference_unet=guided.unet)
    torch.testing.assert_close(same.images, cond_only.images, atol=1e-5, rtol=0)
    # diffusers' variant: layers skipped on the unconditional input, rows of the one forward
    skip = _latents(guided, AutoGuidance(reference="skip", reference_input="uncond", layers="mid"))
    assert skip.nfe == 2 * STEPS and torch.isfinite(skip.images).all()


def test_autoguidance_reference_from_pretrained_and_the_model_directory(sd_pair, tmp_path) -> None:
    from guidance_engine.pipelines import GuidedStableDiffusionPipeline

    stock, guided = sd_pair
    reference = _reference_unet()
    want = _latents(guided, AutoGuidance(), reference_unet=reference).images
    converted = quiet(GuidedStableDiffusionPipeline.from_pipe(stock, reference_unet=reference))
    assert torch.equal(_latents(converted, AutoGuidance()).images, want)
    stock.save_pretrained(tmp_path)
    reference.save_pretrained(tmp_path / "reference_unet")
    loaded = quiet(GuidedStableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None,
                                                                 requires_safety_checker=False))
    auto = _latents(loaded, AutoGuidance()).images  # loads reference_unet/ on demand
    state = loaded._reference_unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
    assert torch.equal(_latents(loaded, AutoGuidance(), reference_unet=loaded._reference_unet).images, auto)
    given = quiet(GuidedStableDiffusionPipeline.from_pretrained(tmp_path, reference_unet=guided.unet,
                                                                safety_checker=None, requires_safety_checker=False))
    assert given._reference_unet is guided.unet


# -- self-attention guidance ------------------------------------------------------------------

def test_sag_equals_the_stock_sag_pipeline(sd_pair) -> None:
    from diffusers import StableDiffusionSAGPipeline  # deprecated in diffusers, still shipped

    stock, guided = sd_pair
    before = _processors(stock.unet)
    sag_pipe = quiet(StableDiffusionSAGPipeline(**{k: getattr(stock, k) for k in (
        "vae", "text_encoder", "tokenizer", "unet", "scheduler")}, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False))
    for cfg in (5.0, 1.0):  # with CFG: the unconditional branch's map and prediction (eq. 25)
        want = sag_pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=cfg, sag_scale=0.75, generator=seeded(0),
                        output_type="latent").images
        got = _latents(guided, SAG(scale=cfg, sag_scale=0.75))
        # its recording processor uses the classic attention, ours the model's SDPA: float rounding
        torch.testing.assert_close(got.images, want, atol=1e-4, rtol=1e-5)
        assert got.nfe == STEPS * (3 if cfg != 1 else 2)  # the degraded forward counts
        assert _same_processors(before, _processors(stock.unet))


def test_sag_records_the_source_rows_only_and_restores_the_processor(sd_pair) -> None:
    _, guided = sd_pair
    seen = []
    from guidance_engine.methods import sag as sag_module
    original = sag_module.degraded_input

    def spy(source, mass, grid, *args):
        seen.append((tuple(mass.shape), grid))
        return original(source, mass, grid, *args)

    sag_module.degraded_input = spy
    before = _processors(guided.unet)
    try:
        guided([PROMPT, "blue"], num_inference_steps=2, guidance=SAG(scale=3.0), generator=seeded(0),
               output_type="latent")
    finally:
        sag_module.degraded_input = original
    assert seen == [((2, 64), (8, 8))] * 2  # two images' unconditional rows, the 8 x 8 mid-block grid
    assert _same_processors(before, _processors(guided.unet))


def _sag_predictions(method: SAG, seed: int) -> dict:
    """Random eps predictions of the cond and uncond branches on one input, and the SAG branch with
    its probe filled as a forward would: a received-attention mass on a 4 x 4 grid and a network
    for the degraded input (an affine map, so that D(x_hat) depends on x_hat)."""
    generator = seeded(seed)
    x = torch.randn((2, 4, 8, 8), generator=generator)
    alpha = torch.full((2,), 0.8, dtype=torch.float64)
    sigma = (1 - alpha ** 2).sqrt()
    cond, uncond = (Prediction(torch.randn(x.shape, generator=generator), x, alpha, sigma, "epsilon")
                    for _ in range(2))
    offset = torch.randn(x.shape, generator=generator)
    branch = method.branch()
    branch.probe.record(2 * torch.rand((2, 16), generator=generator), (4, 4))
    branch.probe.evaluate = lambda z: 0.5 * z + offset
    return {"uncond": uncond, "cond": cond, branch: cond}


@pytest.mark.parametrize("scale, phi", [(3.0, 0.7), (1.0, 0.3)])
def test_sag_rescale_is_lins_rule_on_its_whole_combination(scale, phi) -> None:
    """In float64, per image: g (phi std(c) / std(g) + 1 - phi), g SAG's unrescaled rule (CFG and
    the degraded-input term); rescale 0 is that rule bit for bit."""
    plain, rescaled = SAG(scale=scale, sag_scale=0.75), SAG(scale=scale, sag_scale=0.75, rescale=phi)
    preds = _sag_predictions(plain, 4)
    step = StepInfo(index=1, num_steps=STEPS, sigma=0.75, sigma_next=0.5, timestep=500.0)
    g = plain.combine(preds, step, None).denoise.output
    assert torch.equal(g, plain.combine_terms(preds, step, None).denoise.output)
    got = rescaled.combine(_sag_predictions(rescaled, 4), step, None).denoise.output  # the same tensors, seeded
    c, g64 = preds["cond"].output.double(), g.double()
    want = torch.stack([g64[i] * (phi * c[i].std() / g64[i].std() + 1 - phi) for i in range(len(g64))])
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, g, atol=1e-3)  # the rescale acts


def test_sag_rescale_runs_through_the_pipeline(sd_pair) -> None:
    _, guided = sd_pair
    plain = _latents(guided, SAG(scale=5.0))
    rescaled = _latents(guided, SAG(scale=5.0, rescale=0.7))
    assert rescaled.nfe == plain.nfe == 3 * STEPS and torch.isfinite(rescaled.images).all()
    assert not torch.allclose(rescaled.images, plain.images, atol=1e-4)


def _family(name: str):
    """(guided pipeline, a weaker reference network of the same family, a generating call, the
    conditioning keyword both networks must see) for SDXL, SD3 and DiT on tiny models."""
    from guidance_engine.pipelines import GuidedDiTPipeline, GuidedStableDiffusionXLPipeline
    from guidance_engine.pipelines.toy.tiny_models import tiny_dit_components
    from guidance_engine.pipelines.toy.tiny_models import tiny_sdxl_components

    if name == "dit":
        pipe = quiet(GuidedDiTPipeline(**tiny_dit_components(num_classes=6, learned_sigma=False)))
        reference = tiny_dit_components(num_classes=6, learned_sigma=False, seed=1)["transformer"]
        return pipe, reference, lambda **kw: pipe([1, 4], num_inference_steps=STEPS, generator=seeded(0),
                                                 output_type="latent", **kw), "class_labels"
    if name == "sdxl":
        pipe = quiet(GuidedStableDiffusionXLPipeline(**tiny_sdxl_components(0)))
        reference = tiny_sdxl_components(1)["unet"]
    else:
        pipe = quiet(GuidedStableDiffusion3Pipeline(**tiny_sd3_components(0)))
        reference = tiny_sd3_components(1)["transformer"]
    return pipe, reference, lambda **kw: _latents(pipe, **kw), "encoder_hidden_states"


@pytest.mark.parametrize("family", ["sdxl", "sd3", "dit"])
def test_autoguidance_reference_network_on_sdxl_sd3_and_dit(family) -> None:
    """The reference network is called once a step on the conditional rows' own conditioning
    (the main call's cond rows), w = 1 is the main model alone, and a reference equal to the
    main network changes nothing."""
    pipe, reference, generate, key = _family(family)
    main = pipe.unet if family == "sdxl" else pipe.transformer
    seen = {"main": [], "reference": []}

    def recorder(which):
        def hook(module, args, kwargs):
            seen[which].append(kwargs[key] if key in kwargs else args[2])
        return hook

    hooks = [main.register_forward_pre_hook(recorder("main"), with_kwargs=True),
             reference.register_forward_pre_hook(recorder("reference"), with_kwargs=True)]
    try:
        out = generate(guidance=AutoGuidance(scale=2.0), reference_unet=reference)
    finally:
        for handle in hooks:
            handle.remove()
    assert out.nfe == 2 * STEPS and len(seen["reference"]) == len(seen["main"]) == STEPS
    for ours, theirs in zip(seen["main"], seen["reference"]):
        assert torch.equal(ours, theirs)  # the cond rows' conditioning, nothing else
    cond_only = generate(guidance=CFG(scale=1.0))
    assert not torch.equal(out.images, cond_only.images)
    assert torch.equal(generate(guidance=AutoGuidance(scale=1.0), reference_unet=reference).images, cond_only.images)
    torch.testing.assert_close(generate(guidance=AutoGuidance(scale=3.0), reference_unet=main).images,
                               cond_only.images, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs a 'reference' network: pass reference_unet="):
        generate(guidance=AutoGuidance())


@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_seg_on_sd3_rows_equal_the_transformer_with_blurred_image_queries(sd3_pair, sigma) -> None:
    """SEG on SD3's joint attention, as rows of the one forward, equals the transformer run alone
    with block 1's image-query projection blurred by hand (a hook on ``to_q``; the text queries,
    from ``add_q_proj``, untouched); the other rows are the unaltered transformer; through the
    pipeline, seg_scale 0 is CFG."""
    from guidance_engine.pipelines.stable_diffusion_3 import TransformerBranches

    _, guided = sd3_pair
    transformer = guided.transformer
    embeds, _, pooled, _ = guided.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False,
                                                device="cpu")
    branches = TransformerBranches(transformer, {"cond": {"encoder_hidden_states": embeds,
                                                          "pooled_projections": pooled}})
    x, t = torch.randn(1, 4, 16, 16, generator=seeded(0)), torch.tensor([500.0])
    altered = Branch("s", base="cond", perturb=Perturbation("blur", (1,), sigma=sigma))
    out = branches(x, t, [("cond", None), (altered, None)])
    to_q = transformer.transformer_blocks[1].attn.to_q
    handle = to_q.register_forward_hook(lambda module, args, output: gaussian_blur_queries(output, 16, 16, sigma))
    try:
        with torch.no_grad():
            want = transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                               return_dict=False)[0]
    finally:
        handle.remove()
    with torch.no_grad():
        plain = transformer(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                            return_dict=False)[0]
    torch.testing.assert_close(out["s"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["cond"], plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["s"], plain, atol=1e-4)
    torch.testing.assert_close(_latents(guided, SEG(scale=4.0, seg_scale=0.0, layers=[1])).images,
                               _latents(guided, CFG(scale=4.0)).images, rtol=0, atol=0)
    seg = _latents(guided, SEG(scale=4.0, seg_scale=3.0, layers=[1, 2], blur_sigma=sigma))
    assert seg.nfe == 3 * STEPS and torch.isfinite(seg.images).all()
