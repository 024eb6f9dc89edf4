"""Guidance methods: config validation, registry, and the equality oracles of SPEC-methods.md."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.guiders import AdaptiveProjectedGuidance
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from guidance_engine import APG, CFG, CFGPlusPlus, Prediction, StepInfo, method_names, resolve_guidance
from guidance_engine.methods.cfg import rescale


def _step(i: int = 0, n: int = 10, sigma: float = 1.0) -> StepInfo:
    return StepInfo(index=i, num_steps=n, sigma=sigma, sigma_next=sigma / 2, timestep=500.0)


def _pair(kind: str = "epsilon", seed: int = 0, batch: int = 2):
    torch.manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8)
    alpha = torch.full((batch,), 0.8, dtype=torch.float64)
    sigma = torch.full((batch,), 0.6, dtype=torch.float64)
    c = Prediction(torch.randn_like(x), x, alpha, sigma, kind)
    u = Prediction(torch.randn_like(x), x, alpha, sigma, kind)
    return {"cond": c, "uncond": u}


# -- config ------------------------------------------------------------------------------------

def test_registry_knows_the_methods_and_rejects_unknown_names() -> None:
    assert {"cfg", "cfgpp", "apg"} <= set(method_names())
    with pytest.raises(ValueError, match=r"unknown method 'nope'; known methods: .*apg.*cfg"):
        resolve_guidance("nope")


@pytest.mark.parametrize("make, message", [
    (lambda: CFG(scale=-1), r"cfg: parameter 'scale' must be \[0, 100\], got -1"),
    (lambda: CFG(scale=float("nan")), r"cfg: parameter 'scale' must be \[0, 100\], got nan"),
    (lambda: CFG(rescale=1.5), r"parameter 'rescale' must be \[0, 1\], got 1.5"),
    (lambda: CFGPlusPlus(scale=1.2), r"cfgpp: parameter 'scale' must be \[0, 1\], got 1.2"),
    (lambda: APG(norm_threshold=0), r"apg: parameter 'norm_threshold' must be \(0, inf\), got 0"),
    (lambda: APG(space="eps"), r"parameter 'space' must be one of 'x0', 'model', got 'eps'"),
    (lambda: CFG(schedule="exp"), r"cfg: parameter 'schedule' must be a schedule name \(constant, linear, cosine, "
                                  r"clamp_linear, .*got 'exp'"),
    (lambda: CFG(start=0.8, stop=0.2), r"start \(0.8\) must not exceed stop \(0.2\)"),
    (lambda: resolve_guidance({"name": "cfg", "eta": 1}), r"method 'cfg' has no parameter\(s\) eta"),
    (lambda: resolve_guidance({"scale": 3}), r"needs a 'name' key"),
])
def test_bad_parameters_name_the_parameter_range_and_value(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_config_round_trip_and_new() -> None:
    apg = APG(scale=5.0, momentum=-0.75, norm_threshold=2.5)
    assert resolve_guidance(apg.to_dict()) == apg
    assert apg.new(eta=1.0).eta == 1.0 and apg.eta == 0.0
    assert resolve_guidance("cfg", scale=3.0) == CFG(scale=3.0)
    with pytest.raises(Exception):
        apg.scale = 2.0  # frozen: config never changes under a running sampler


def test_interval_and_schedules() -> None:
    cfg = CFG(scale=5.0, sigma_min=0.5, sigma_max=2.0)
    assert cfg.branches(_step(sigma=1.0), None) == ("uncond", "cond")
    assert cfg.branches(_step(sigma=3.0), None) == ("cond",)  # outside: no unconditional forward
    assert cfg.scale_at(_step(sigma=0.1)) == 1.0
    steps = CFG(scale=5.0, start=0.2, stop=0.5)
    assert [steps.active(_step(i)) for i in range(10)] == [False, False, True, True, True] + [False] * 5
    for schedule in ("linear", "cosine"):
        shaped = CFG(scale=5.0, schedule=schedule)
        scales = [shaped.scale_at(_step(i, 1000)) for i in range(1000)]
        assert scales[0] == pytest.approx(1.0) and scales[-1] > 5.0
        assert sum(scales) / len(scales) == pytest.approx(5.0, abs=0.01)  # mean-preserving


@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_schedule_keeps_every_scale_inside_its_accepted_range(name, schedule, tmp_path) -> None:
    """A shaped schedule runs each scale it shapes from its neutral value to 2 scale - neutral: a
    scale whose end would leave the accepted range is refused up front; an accepted one stays
    inside it at every step (CFG++ at lambda 0.6, linear, would have reached 1.14 > 1)."""
    spec = {"name": name}
    if name == "linear_ag":  # needs a calibration directory to exist
        from guidance_engine.methods.linear_ag import save_calibration

        save_calibration(tmp_path, torch.zeros(4, 4), {"num_steps": 4, "window": 0.5, "period": 0,
                                                       "predicted_steps": []})
        spec["calibration"] = str(tmp_path)
    base = resolve_guidance(spec)
    cls = type(base)
    if not cls.__dataclass_fields__["schedule"].metadata.get("schedule"):
        pytest.skip(f"{name} takes no schedule")
    metadata = {f.name: f.metadata for f in cls.parameters()}
    targets = [(param, neutral) for param, neutral in base.schedule_targets() if metadata[param].get("high")]
    if not targets:
        pytest.skip(f"{name} has no bounded scale to schedule")
    for param, neutral in targets:
        low, high = metadata[param]["low"], metadata[param]["high"]
        too_high = (high + neutral) / 2 + 0.01
        with pytest.raises(ValueError, match=rf"{name}: schedule '{schedule}' runs parameter '{param}' from .* "
                                             rf"outside the accepted \["):
            base.new(**{param: too_high}, schedule=schedule)
        method = base.new(**{param: (high + neutral) / 2}, schedule=schedule, start=0.0, stop=1.0)
        values = [method.shaped(param, _step(i, 50), neutral) for i in range(50)]
        assert all(low <= v <= high for v in values), (min(values), max(values))
        assert max(values) > getattr(method, param) or getattr(method, param) == neutral  # it is shaped
        if param != targets[0][0]:  # a second scale (APG-mix's apg_scale, FDG's scale_low, NAG's nag_scale):
            for i in range(50):     # the run derives each step's scales: it must not raise
                method.branches(_step(i, 50), method.init_state(2, torch.device("cpu")))


def test_cfgpp_linear_schedule_at_its_readme_scale_is_refused_with_the_range() -> None:
    with pytest.raises(ValueError, match=r"cfgpp: schedule 'linear' runs parameter 'scale' from 0 to 1.2 .* "
                                         r"outside the accepted \[0, 1\]"):
        CFGPlusPlus(scale=0.6, schedule="linear")
    assert max(CFGPlusPlus(scale=0.5, schedule="linear").scale_at(_step(i, 20)) for i in range(20)) <= 1.0


# -- CFG and rescale ---------------------------------------------------------------------------

def test_cfg_is_diffusers_formula_bit_for_bit() -> None:
    preds = _pair()
    out = CFG(scale=7.3).combine(preds, _step(), None).denoise.output
    c, u = preds["cond"].output, preds["uncond"].output
    assert torch.equal(out, u + 7.3 * (c - u))


def test_rescale_matches_diffusers_and_phi_zero_is_identity() -> None:
    preds = _pair()
    c, u = preds["cond"].output, preds["uncond"].output
    g = u + 7.5 * (c - u)
    assert torch.equal(rescale(g, c, 0.0), g)
    torch.testing.assert_close(rescale(g, c, 0.7), rescale_noise_cfg(g, c, 0.7), rtol=0, atol=0)
    out = CFG(scale=7.5, rescale=0.7).combine(preds, _step(), None).denoise.output
    torch.testing.assert_close(out, rescale_noise_cfg(g, c, 0.7), rtol=0, atol=0)


def test_rescale_of_a_constant_guided_output_stays_finite() -> None:
    """A sample whose guided output is constant (std 0) is left unscaled, not divided by 0."""
    c = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g = c.clone()
    g[1] = 0.25  # constant
    out = rescale(g, c, 0.7)
    assert torch.isfinite(out).all() and torch.equal(out[1], g[1])
    torch.testing.assert_close(out[:1], rescale_noise_cfg(g[:1], c[:1], 0.7), rtol=0, atol=0)


def test_cfg_at_scale_one_needs_only_the_conditional_branch() -> None:
    cfg = CFG(scale=1.0)
    assert cfg.branches(_step(), None) == ("cond",)
    preds = _pair()
    assert cfg.combine({"cond": preds["cond"]}, _step(), None).denoise is preds["cond"]


# -- CFG++ -------------------------------------------------------------------------------------

def test_cfgpp_denoises_guided_and_renoises_unconditional() -> None:
    preds = _pair()
    guided = CFGPlusPlus(scale=0.6).combine(preds, _step(), None)
    assert guided.split and guided.renoise is preds["uncond"]
    u, c = preds["uncond"].x0, preds["cond"].x0
    torch.testing.assert_close(guided.denoise.x0, u + 0.6 * (c - u), atol=1e-5, rtol=1e-5)


# -- APG ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("space", ["x0", "model"])
def test_apg_with_eta_one_no_threshold_no_momentum_is_cfg(space: str) -> None:
    """Oracle: APG(eta=1, r=inf, beta=0) == CFG."""
    preds = _pair("v_prediction")
    apg = APG(scale=6.0, eta=1.0, norm_threshold=math.inf, momentum=0.0, space=space)
    got = apg.combine(preds, _step(), apg.init_state(2, torch.device("cpu"))).denoise
    want = CFG(scale=6.0).combine(preds, _step(), None).denoise
    torch.testing.assert_close(got.x0, want.x0, atol=1e-5, rtol=1e-5)


def test_apg_model_space_matches_the_diffusers_guider_over_a_run() -> None:
    """Mapping: ours (space="model", scale w) == diffusers' AdaptiveProjectedGuidance with
    use_original_formulation=True and guidance_scale = w - 1 (same eta, r, beta)."""
    w, eta, r, beta = 5.0, 0.3, 4.0, -0.5
    ours = APG(scale=w, eta=eta, norm_threshold=r, momentum=beta, space="model")
    theirs = AdaptiveProjectedGuidance(guidance_scale=w - 1, adaptive_projected_guidance_momentum=beta,
                                       adaptive_projected_guidance_rescale=r, eta=eta,
                                       use_original_formulation=True)
    theirs.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(999))
    theirs.prepare_inputs({})  # creates the momentum buffer at step 0
    state = ours.init_state(2, torch.device("cpu"))
    for i in range(3):
        preds = _pair(seed=i)
        theirs.set_state(step=i, num_inference_steps=3, timestep=torch.tensor(999 - i))
        want = theirs.forward(preds["cond"].output, preds["uncond"].output).pred
        got = ours.combine(preds, _step(i, 3), state).denoise.output
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_apg_paper_rule_in_x0_space_step_by_step() -> None:
    """Algorithm 1 written out independently, two steps with momentum and clipping."""
    w, eta, r, beta = 4.0, 0.0, 1.5, -0.5
    apg = APG(scale=w, eta=eta, norm_threshold=r, momentum=beta)
    state = apg.init_state(2, torch.device("cpu"))
    running = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    for i in range(2):
        preds = _pair(seed=10 + i)
        dc, du = preds["cond"].x0.double(), preds["uncond"].x0.double()
        running = (dc - du) + beta * running
        d = running * torch.clamp(r / running.flatten(1).norm(dim=1), max=1).view(-1, 1, 1, 1)
        unit = dc / dc.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        par = (d * unit).flatten(1).sum(1).view(-1, 1, 1, 1) * unit
        want = dc + (w - 1) * ((d - par) + eta * par)
        got = apg.combine(preds, _step(i, 2), state).denoise.x0
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_apg_momentum_is_per_run_state() -> None:
    apg = APG(scale=4.0, momentum=-0.5)
    preds = _pair()
    first = apg.combine(preds, _step(), apg.init_state(2, torch.device("cpu"))).denoise.output
    again = apg.combine(preds, _step(), apg.init_state(2, torch.device("cpu"))).denoise.output
    assert torch.equal(first, again)  # nothing carried over on the shared method object
    state = apg.init_state(2, torch.device("cpu"))
    apg.combine(preds, _step(), state)
    picked = apg.select_state(state, torch.tensor([1, 1]))
    assert torch.equal(picked.momentum[0], state.momentum[1])
