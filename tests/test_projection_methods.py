"""TCFG, FDG, MAMBO-G, APG-Mix and Perp-Neg: against diffusers' guiders (documented mappings),
against their papers' formulas written out here, their identity cases, and end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import PROMPT, seeded
from diffusers.guiders import (
    AdaptiveProjectedMixGuidance,
    MagnitudeAwareGuidance,
    TangentialClassifierFreeGuidance,
)
from diffusers.guiders import frequency_decoupled_guidance as diffusers_fdg

from guidance_engine import CFG, Prediction, StepInfo, method_names, resolve_guidance
from guidance_engine.methods import FDG, MAMBOG, TCFG, APGMix, PerpNeg
from guidance_engine.methods.fdg import laplacian_pyramid, pyr_up, reconstruct

torch.set_num_threads(1)
NEW = ("tcfg", "fdg", "mambo_g", "apg_mix", "perp_neg")


def _step(i: int = 0, n: int = 10) -> StepInfo:
    return StepInfo(index=i, num_steps=n, sigma=1.0, sigma_next=0.5, timestep=500.0)


def _preds(kind: str = "epsilon", seed: int = 0, shape: tuple[int, ...] = (3, 4, 16, 16)) -> dict[str, Prediction]:
    """Correlated random cond / uncond / negative predictions (as a network's would be)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    a = torch.tensor(0.6, dtype=torch.float64)
    s = torch.tensor(0.4 if kind == "flow" else 0.8, dtype=torch.float64)
    base = torch.randn(shape, generator=g)
    return {b: Prediction(base + 0.5 * torch.randn(shape, generator=g), x, a, s, kind)
            for b in ("uncond", "cond", "negative")}


def _diffusers(guider, cond: torch.Tensor, uncond: torch.Tensor, i: int = 0, n: int = 10) -> torch.Tensor:
    guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(999 - i))
    if i == 0:
        guider.prepare_inputs({})  # momentum buffers are (re)created at step 0
    return guider.forward(cond, uncond).pred


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(got, want, atol=tol * max(1.0, float(want.abs().max())), rtol=tol)


# -- config ------------------------------------------------------------------------------------

def test_registered_with_documented_parameters_and_round_trip() -> None:
    assert set(NEW) <= set(method_names())
    for name in NEW:
        method = resolve_guidance(name)
        assert resolve_guidance(method.to_dict()) == method
        for f in method.parameters():
            validated = "low" in f.metadata or f.metadata.get("schedule") or "accepted" in f.metadata
            assert validated and f.metadata["doc"], (name, f.name)
        assert method.paper and "arXiv" in method.paper or name == "apg_mix"


@pytest.mark.parametrize("make, message", [
    (lambda: TCFG(damping=1.5), r"tcfg: parameter 'damping' must be \[0, 1\], got 1.5"),
    (lambda: TCFG(scale=-1), r"tcfg: parameter 'scale' must be \[0, 100\], got -1"),
    (lambda: FDG(levels=1), r"fdg: parameter 'levels' must be an integer in \[2, 8\], got 1"),
    (lambda: FDG(levels=2.5), r"fdg: parameter 'levels' must be an integer in \[2, 8\], got 2.5"),
    (lambda: FDG(scale_low=float("nan")), r"fdg: parameter 'scale_low' must be \[0, 100\], got nan"),
    (lambda: FDG(parallel_weight=2), r"fdg: parameter 'parallel_weight' must be \[0, 1\], got 2"),
    (lambda: MAMBOG(alpha=-1), r"mambo_g: parameter 'alpha' must be \[0, 1000\], got -1"),
    (lambda: MAMBOG(space="eps"), r"mambo_g: parameter 'space' must be one of 'velocity', 'model', got 'eps'"),
    (lambda: APGMix(cfg_steps=-1), r"apg_mix: parameter 'cfg_steps' must be an integer in \[0, 10000\], got -1"),
    (lambda: APGMix(cfg_steps=1.5), r"apg_mix: parameter 'cfg_steps' must be an integer in \[0, 10000\], got 1.5"),
    (lambda: APGMix(norm_threshold=0), r"apg_mix: parameter 'norm_threshold' must be \(0, inf\), got 0"),
    (lambda: PerpNeg(neg_scale=-0.5), r"perp_neg: parameter 'neg_scale' must be \[0, 100\], got -0.5"),
    (lambda: resolve_guidance({"name": "perp_neg", "eta": 1}), r"method 'perp_neg' has no parameter\(s\) eta"),
])
def test_bad_parameters_name_the_parameter_range_and_value(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_fdg_levels_too_deep_for_the_latent_is_a_clear_error() -> None:
    preds = _preds(shape=(1, 4, 8, 8))
    FDG(levels=3).combine(preds, _step(), None)  # 8 -> 4 (blurred) -> 2 (low-pass): fits
    with pytest.raises(ValueError, match=r"fdg: parameter 'levels' \(4\) too deep .* \(1, 4, 8, 8\)"):
        FDG(levels=4).combine(preds, _step(), None)


# -- TCFG --------------------------------------------------------------------------------------

def test_tcfg_matches_diffusers_guider() -> None:
    """Mapping: TCFG(scale=w) == TangentialClassifierFreeGuidance(guidance_scale=w);
    with use_original_formulation=True its guidance_scale is ours minus one."""
    for seed, kind in ((0, "epsilon"), (1, "flow"), (2, "v_prediction")):
        preds = _preds(kind, seed)
        c, u = preds["cond"].output, preds["uncond"].output
        close(TCFG(scale=5.0).combine(preds, _step(), None).denoise.output,
              _diffusers(TangentialClassifierFreeGuidance(guidance_scale=5.0), c, u))
        close(TCFG(scale=5.0).combine(preds, _step(), None).denoise.output,
              _diffusers(TangentialClassifierFreeGuidance(guidance_scale=4.0, use_original_formulation=True), c, u))


def test_tcfg_is_the_papers_svd_rule() -> None:
    """Algorithm 1 written out with an explicit SVD: u' = <u, v1> v1, g = u' + w (c - u'); and the
    partial damping interpolates between that and CFG."""
    preds = _preds(seed=3)
    c, u = preds["cond"].output.double(), preds["uncond"].output.double()
    _, _, vh = torch.linalg.svd(torch.stack([c.flatten(1), u.flatten(1)], 1), full_matrices=False)
    v1 = vh[:, 0]
    u_normal = ((u.flatten(1) * v1).sum(1, keepdim=True) * v1).view_as(u)
    for lam in (1.0, 0.4):
        u_damped = u - lam * (u - u_normal)
        want = u_damped + 6.0 * (c - u_damped)
        close(TCFG(scale=6.0, damping=lam).combine(preds, _step(), None).denoise.output.double(), want)


def test_tcfg_identities() -> None:
    preds = _preds(seed=4)
    cfg = CFG(scale=6.0).combine(preds, _step(), None).denoise.output
    assert torch.equal(TCFG(scale=6.0, damping=0.0).combine(preds, _step(), None).denoise.output, cfg)
    close(TCFG(scale=1.0).combine(preds, _step(), None).denoise.output, preds["cond"].output)
    assert TCFG(scale=1.0).branches(_step(), None) == ("cond",)


# -- FDG ---------------------------------------------------------------------------------------

@pytest.fixture
def fdg_guider(monkeypatch):
    """diffusers' FrequencyDecoupledGuidance. It needs kornia for its pyramid; where kornia is not
    installed (here), its two pyramid functions are replaced by ours, which equal kornia's on even
    sizes (test_pyramid_is_the_burt_adelson_pyramid), so that its level logic is what is compared."""
    if not diffusers_fdg._CAN_USE_KORNIA:
        monkeypatch.setattr(diffusers_fdg, "_CAN_USE_KORNIA", True)
        monkeypatch.setattr(diffusers_fdg, "build_laplacian_pyramid_func", laplacian_pyramid)
        monkeypatch.setattr(diffusers_fdg, "upsample_and_blur_func", lambda x: pyr_up(x, (2 * x.shape[-2], 2 * x.shape[-1])))
    return diffusers_fdg.FrequencyDecoupledGuidance


@pytest.mark.parametrize("levels, p", [(2, 1.0), (3, 0.5)])
def test_fdg_matches_diffusers_guider(fdg_guider, levels: int, p: float) -> None:
    """Mapping: FDG(scale=w_high, scale_low=w_low, levels=K, parallel_weight=p) ==
    FrequencyDecoupledGuidance(guidance_scales=[w_high] * (K-1) + [w_low], parallel_weights=p);
    with use_original_formulation=True (and p = 1) its scales are ours minus one."""
    preds = _preds(seed=5)
    c, u = preds["cond"].output, preds["uncond"].output
    ours = FDG(scale=9.0, scale_low=4.0, levels=levels, parallel_weight=p).combine(preds, _step(), None)
    scales = [9.0] * (levels - 1) + [4.0]
    close(ours.denoise.output, _diffusers(fdg_guider(guidance_scales=scales, parallel_weights=p), c, u))
    if p == 1:  # D_c + w d' is D_u + (w + 1) d' only for the unprojected d' = d
        original = fdg_guider(guidance_scales=[w - 1 for w in scales], use_original_formulation=True)
        close(ours.denoise.output, _diffusers(original, c, u))


def _reference_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Burt & Adelson from the definition (kornia's conventions): 2-D 5 x 5 binomial kernel,
    reflect padding, bilinear x1/2 down, x2 up, align_corners=False."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    kernel = (torch.outer(k1, k1) / 256.0).expand(x.shape[1], 1, 5, 5)

    def blur(t):
        return F.conv2d(F.pad(t, (2, 2, 2, 2), mode="reflect"), kernel, groups=t.shape[1])

    gauss = [x]
    for _ in range(levels - 1):
        h, w = gauss[-1].shape[-2:]
        gauss.append(F.interpolate(blur(gauss[-1]), size=(h // 2, w // 2), mode="bilinear", align_corners=False))
    ups = [blur(F.interpolate(g, scale_factor=2, mode="bilinear", align_corners=False)) for g in gauss[1:]]
    return [g - up for g, up in zip(gauss, ups)] + [gauss[-1]]


def test_pyramid_is_the_burt_adelson_pyramid_and_inverts_exactly() -> None:
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    ours, ref = laplacian_pyramid(x, 3), _reference_pyramid(x, 3)
    assert [t.shape[-1] for t in ours] == [16, 8, 4]
    for a, b in zip(ours, ref):
        close(a, b, 1e-6)
    try:
        from kornia.geometry.transform import build_laplacian_pyramid
    except ImportError:
        build_laplacian_pyramid = None
    if build_laplacian_pyramid is not None:
        for a, b in zip(ours, build_laplacian_pyramid(x, 3)):
            close(a, b, 1e-6)
    close(reconstruct(ours), x, 1e-6)
    odd = torch.randn(1, 2, 13, 10)  # kornia pads such sizes to 16 x 16 and never crops back
    close(reconstruct(laplacian_pyramid(odd, 3)), odd, 1e-6)


def test_fdg_identities_and_branches() -> None:
    preds = _preds("v_prediction", 7)
    cfg = CFG(scale=6.0).combine(preds, _step(), None).denoise.output
    close(FDG(scale=6.0, scale_low=6.0).combine(preds, _step(), None).denoise.output, cfg)
    close(FDG(scale=6.0, scale_low=6.0, levels=3).combine(preds, _step(), None).denoise.output, cfg)
    assert FDG(scale=1.0, scale_low=1.0).branches(_step(), None) == ("cond",)
    assert FDG(scale=1.0, scale_low=3.0).branches(_step(), None) == ("uncond", "cond")
    # the low band alone: scale 1 on the details, w_low on the low-pass
    c, u = preds["cond"].output, preds["uncond"].output
    got = FDG(scale=1.0, scale_low=4.0).combine(preds, _step(), None).denoise.output
    low_c, low_u = laplacian_pyramid(c, 2)[1], laplacian_pyramid(u, 2)[1]
    close(got, c + pyr_up(3.0 * (low_c - low_u), c.shape[-2:]))


# -- MAMBO-G -----------------------------------------------------------------------------------

def test_mambo_g_matches_diffusers_guider() -> None:
    """Mapping: MAMBOG(scale=w, alpha=a) == MagnitudeAwareGuidance(guidance_scale=w, alpha=a) on flow
    velocities (its paper's space; space="model" for eps/v models); original formulation: w - 1.
    Shapes [B, tokens, dim], the packed latents of the transformers it targets: in diffusers 0.42.1
    with this torch it computes torch.norm over dims [1, 2, 3] of 4-D latents, which raises."""
    for kind, space in (("flow", "velocity"), ("epsilon", "model")):
        preds = _preds(kind, 8, shape=(3, 64, 8))
        c, u = preds["cond"].output, preds["uncond"].output
        ours = MAMBOG(scale=8.0, alpha=3.0, space=space).combine(preds, _step(), None).denoise.output
        close(ours, _diffusers(MagnitudeAwareGuidance(guidance_scale=8.0, alpha=3.0), c, u))
        close(ours, _diffusers(MagnitudeAwareGuidance(guidance_scale=7.0, alpha=3.0, use_original_formulation=True), c, u))


def test_mambo_g_is_the_papers_rule_on_velocities_for_any_model() -> None:
    """w_t = 1 + (w - 1) exp(-alpha ||v_c - v_u|| / ||v_u||) with v = eps - x0, on 4-D eps latents."""
    preds = _preds("epsilon", 9)
    c, u = preds["cond"], preds["uncond"]
    v_c, v_u = (c.eps - c.x0).flatten(1), (u.eps - u.x0).flatten(1)
    w = 1 + (10.0 - 1) * torch.exp(-2.0 * (v_c - v_u).norm(dim=1) / v_u.norm(dim=1))
    want = u.output + w.view(-1, 1, 1, 1) * (c.output - u.output)
    close(MAMBOG(scale=10.0, alpha=2.0).combine(preds, _step(), None).denoise.output, want)


def test_mambo_g_identity() -> None:
    preds = _preds(seed=10)
    assert torch.equal(MAMBOG(scale=6.0, alpha=0.0).combine(preds, _step(), None).denoise.output,
                       CFG(scale=6.0).combine(preds, _step(), None).denoise.output)


# -- APG-Mix -----------------------------------------------------------------------------------

def test_apg_mix_matches_diffusers_guider_over_a_run() -> None:
    """Mapping (space="model"): APGMix(scale=s, apg_scale=w, cfg_steps=K, eta, r, beta) ==
    AdaptiveProjectedMixGuidance(use_original_formulation=True, guidance_scale=s-1,
    adaptive_projected_guidance_scale=w-1, adaptive_projected_guidance_start_step=K-1, ...)."""
    ours = APGMix(scale=4.0, apg_scale=6.0, cfg_steps=2, eta=0.3, norm_threshold=4.0, momentum=-0.5, space="model")
    theirs = AdaptiveProjectedMixGuidance(guidance_scale=3.0, adaptive_projected_guidance_scale=5.0, eta=0.3,
                                          adaptive_projected_guidance_rescale=4.0,
                                          adaptive_projected_guidance_momentum=-0.5,
                                          adaptive_projected_guidance_start_step=1, use_original_formulation=True)
    state = ours.init_state(3, torch.device("cpu"))
    for i in range(5):
        preds = _preds(seed=20 + i)
        want = _diffusers(theirs, preds["cond"].output, preds["uncond"].output, i, 5)
        close(ours.combine(preds, _step(i, 5), state).denoise.output, want)


def test_apg_mix_follows_apg_algorithm_1_where_diffusers_default_does_not() -> None:
    """Written out: CFG (momentum running) for K steps, then D_c + (w - 1)(d_perp + eta d_par) with
    d the clipped momentum. diffusers' default formulation returns D_u + w U instead."""
    s, w, k, eta, r, beta = 3.0, 5.0, 2, 0.0, 3.0, -0.5
    ours = APGMix(scale=s, apg_scale=w, cfg_steps=k, eta=eta, norm_threshold=r, momentum=beta, space="model")
    theirs = AdaptiveProjectedMixGuidance(guidance_scale=s, adaptive_projected_guidance_scale=w, eta=eta,
                                          adaptive_projected_guidance_rescale=r,
                                          adaptive_projected_guidance_momentum=beta,
                                          adaptive_projected_guidance_start_step=k - 1)
    state, running = ours.init_state(3, torch.device("cpu")), torch.zeros(3, 4, 16, 16, dtype=torch.float64)
    for i in range(4):
        preds = _preds(seed=30 + i)
        c, u = preds["cond"].output.double(), preds["uncond"].output.double()
        running = (c - u) + beta * running
        if i < k:
            want = u + s * (c - u)
        else:
            d = running * torch.clamp(r / running.flatten(1).norm(dim=1), max=1).view(-1, 1, 1, 1)
            unit = c / c.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            par = (d * unit).flatten(1).sum(1).view(-1, 1, 1, 1) * unit
            want = c + (w - 1) * ((d - par) + eta * par)
        got = ours.combine(preds, _step(i, 4), state).denoise.output
        close(got.double(), want, 1e-4)
        theirs_out = _diffusers(theirs, preds["cond"].output, preds["uncond"].output, i, 4)
        if i >= k:
            assert not torch.allclose(theirs_out.double(), want, atol=1e-2)  # D_u + w U: not the paper


@pytest.mark.parametrize("space", ["x0", "model"])
def test_apg_mix_identities(space: str) -> None:
    cfg = CFG(scale=5.0)
    for mix in (APGMix(scale=5.0, cfg_steps=10, space=space),  # never switches
                APGMix(scale=5.0, apg_scale=5.0, cfg_steps=1, eta=1.0, norm_threshold=math.inf, momentum=0.0,
                       space=space)):  # APG that is CFG
        state = mix.init_state(3, torch.device("cpu"))
        for i in range(4):
            preds = _preds("v_prediction", 40 + i)
            close(mix.combine(preds, _step(i, 4), state).denoise.x0, cfg.combine(preds, _step(i, 4), None).denoise.x0)
    assert APGMix(scale=1.0, cfg_steps=2).branches(_step(1), None) == ("cond",)
    assert APGMix(scale=1.0, cfg_steps=2).branches(_step(2), None) == ("uncond", "cond")


# -- Perp-Neg ----------------------------------------------------------------------------------

def test_perp_neg_is_the_authors_rule_per_sample() -> None:
    """eps_u + w (d_c - w_neg (d_n - <d_n, d_c>/||d_c||^2 d_c)), per sample, as the authors' code."""
    preds = _preds(seed=50)
    c, u, n = (preds[b].output.double() for b in ("cond", "uncond", "negative"))
    d_c, d_n = (c - u).flatten(1), (n - u).flatten(1)
    perp = d_n - ((d_n * d_c).sum(1, keepdim=True) / (d_c * d_c).sum(1, keepdim=True)) * d_c
    want = u + 7.0 * ((c - u) - 0.8 * perp.view_as(c))
    got = PerpNeg(scale=7.0, neg_scale=0.8).combine(preds, _step(), None).denoise.output
    close(got.double(), want)
    # ComfyUI pools <d_n, d_c> over the whole batch: only a batch of one agrees with it
    pooled = d_n - ((d_n * d_c).sum() / (d_c * d_c).sum()) * d_c
    assert not torch.allclose(perp, pooled, atol=1e-3)
    one = {b: p.rows(slice(0, 1)) for b, p in preds.items()}
    close(PerpNeg(scale=7.0, neg_scale=0.8).combine(one, _step(), None).denoise.output.double(), want[:1])


def test_perp_neg_identities_and_branches() -> None:
    preds = _preds("flow", 51)
    cfg = CFG(scale=6.0).combine(preds, _step(), None).denoise.output
    assert torch.equal(PerpNeg(scale=6.0, neg_scale=0.0).combine(preds, _step(), None).denoise.output, cfg)
    same = {**preds, "negative": preds["uncond"]}  # a negative prompt that says nothing: CFG
    close(PerpNeg(scale=6.0).combine(same, _step(), None).denoise.output, cfg)
    parallel = {**preds, "negative": preds["uncond"].lerp(preds["cond"], -2.0)}  # along d_c: no effect
    close(PerpNeg(scale=6.0).combine(parallel, _step(), None).denoise.output, cfg)
    assert PerpNeg().branches(_step(), None) == ("uncond", "negative", "cond")
    assert PerpNeg(neg_scale=0.0).branches(_step(), None) == ("uncond", "cond")
    assert PerpNeg(sigma_max=0.5).branches(_step(), None) == ("cond",)  # outside its interval
    assert "negative" in PerpNeg(neg_scale=0.0).required_branches()


# -- through the SD pipeline -------------------------------------------------------------------

@pytest.mark.parametrize("guidance, nfe", [
    (TCFG(scale=5.0), 6), (FDG(scale=6.0, scale_low=3.0), 6), (MAMBOG(scale=6.0, alpha=2.0), 6),
    (APGMix(scale=3.0, apg_scale=5.0, cfg_steps=1), 6), (APGMix(scale=1.0, apg_scale=5.0, cfg_steps=1), 5),
], ids=lambda g: getattr(g, "name", g))
def test_methods_run_through_the_sd_pipeline(sd_pair, guidance, nfe) -> None:
    _, guided = sd_pair
    out = guided(PROMPT, num_inference_steps=3, guidance=guidance, generator=seeded(0), output_type="latent")
    assert torch.isfinite(out.images).all() and out.nfe == nfe


def _spy(pipe, calls: list):
    """Record the encoder_hidden_states of every UNet forward and count text-encoder calls."""
    real_unet, real_text = pipe.unet.forward, pipe.text_encoder.forward

    def unet(sample, timestep, encoder_hidden_states, **kwargs):
        calls.append(("unet", encoder_hidden_states.clone()))
        return real_unet(sample, timestep, encoder_hidden_states, **kwargs)

    def text(*args, **kwargs):
        calls.append(("text", None))
        return real_text(*args, **kwargs)

    pipe.unet.forward, pipe.text_encoder.forward = unet, text
    return lambda: (setattr(pipe.unet, "forward", real_unet), setattr(pipe.text_encoder, "forward", real_text))


def test_perp_neg_pipeline_three_branches_empty_uncond_and_negative_branch(sd_pair) -> None:
    _, guided = sd_pair
    calls: list = []
    restore = _spy(guided, calls)
    try:
        out = guided(PROMPT, num_inference_steps=3, guidance=PerpNeg(scale=5.0), negative_prompt="a blue square",
                     generator=seeded(0), output_type="latent")
    finally:
        restore()
    assert torch.isfinite(out.images).all() and out.nfe == 9
    forwards = [h for kind, h in calls if kind == "unet"]
    assert len(forwards) == 3 and all(h.shape[0] == 3 for h in forwards)  # one batched forward a step
    empty = guided.encode_prompt("", "cpu", 1, False)[0]
    negative = guided.encode_prompt("a blue square", "cpu", 1, False)[0]
    cond = guided.encode_prompt(PROMPT, "cpu", 1, False)[0]
    assert torch.equal(forwards[0][0], empty[0])  # "uncond": the empty prompt
    assert torch.equal(forwards[0][1], negative[0]) and torch.equal(forwards[0][2], cond[0])


def test_perp_neg_without_weight_is_cfg_with_the_empty_prompt(sd_pair) -> None:
    _, guided = sd_pair
    perp = guided(PROMPT, num_inference_steps=3, guidance=PerpNeg(scale=5.0, neg_scale=0.0),
                  negative_prompt="a blue square", generator=seeded(1), output_type="latent")
    cfg = guided(PROMPT, num_inference_steps=3, guidance=CFG(scale=5.0), generator=seeded(1), output_type="latent")
    assert torch.equal(perp.images, cfg.images) and perp.nfe == 6


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"negative_prompt: this guidance method \(Perp-Neg\) needs a negative prompt"),
    ({"negative_prompt": ["one", "two"]}, r"negative_prompt: expected a string or a list of 1 strings .* got \['one', 'two'\]"),
    ({"negative_prompt": 3}, r"negative_prompt: expected a string or a list of 1 strings .* got 3"),
    ({"negative_prompt_embeds": torch.zeros(2, 8, 32)}, r"negative_prompt_embeds: expected 1 rows"),
])
def test_perp_neg_bad_or_missing_negative_prompt_fails_before_any_model_call(sd_pair, kwargs, message) -> None:
    _, guided = sd_pair
    calls: list = []
    restore = _spy(guided, calls)
    try:
        with pytest.raises(ValueError, match=message):
            guided(PROMPT, num_inference_steps=2, guidance="perp_neg", **kwargs)
    finally:
        restore()
    assert calls == []


def test_perp_neg_through_the_sdxl_pipeline(sdxl_pair) -> None:
    _, guided = sdxl_pair
    rows: list[int] = []
    real = guided.unet.forward

    def spy(sample, *args, **kwargs):
        rows.append(sample.shape[0])
        return real(sample, *args, **kwargs)

    guided.unet.forward = spy
    try:
        with pytest.raises(ValueError, match=r"negative_prompt: this guidance method \(Perp-Neg\) needs"):
            guided(PROMPT, num_inference_steps=2, guidance="perp_neg")
        assert rows == []
        out = guided(PROMPT, num_inference_steps=2, guidance=PerpNeg(scale=5.0), negative_prompt="a blue square",
                     generator=seeded(0), output_type="latent")
    finally:
        guided.unet.forward = real
    assert torch.isfinite(out.images).all() and out.nfe == 6 and rows == [3, 3]
    cfg = guided(PROMPT, num_inference_steps=2, guidance=CFG(scale=5.0), generator=seeded(0), output_type="latent")
    perp0 = guided(PROMPT, num_inference_steps=2, guidance=PerpNeg(scale=5.0, neg_scale=0.0),
                   negative_prompt="a blue square", generator=seeded(0), output_type="latent")
    assert torch.equal(perp0.images, cfg.images) and not torch.equal(out.images, cfg.images)
