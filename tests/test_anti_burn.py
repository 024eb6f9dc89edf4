"""Anti-burn guidance: Dynamic Thresholding (mcmonkey's extension), CFGNorm (ComfyUI) and FreSca.

For each: registered with its peer's defaults; ranges refused with the standard message; its
identity case equal to CFG bit for bit; the peer's arithmetic, re-implemented here in float64 on
x0 (the peers' space), against ``combine`` on random eps and flow predictions (with clamps that
bind on some samples or positions only); a run through the tiny SD pipeline (finite, 2 NFE per
step) and a flow run on the sampler core (the x0 conversions of flow outputs).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from guidance_engine import Prediction, StepInfo, resolve_guidance, strict_json
from guidance_engine.guidance import Guidance
from guidance_engine.methods.cfg import CFG
from guidance_engine.methods.cfg_norm import CFGNorm
from guidance_engine.methods.dynamic_thresholding import MODES, DynamicThresholding, dynamic_threshold, scheduled
from guidance_engine.methods.fresca import FreSca, frequency_scaled
from guidance_engine.samplers import sample
from conftest import PROMPT, ToyModel, seeded

STEP = StepInfo(index=1, num_steps=4, sigma=1.0, sigma_next=0.5, timestep=500.0)
EPS32 = torch.finfo(torch.float32).eps


def _preds(seed: int, kind: str, shape: tuple[int, ...] = (3, 4, 8, 8)) -> dict[str, Prediction]:
    """Predictions whose samples differ in noise level, magnitude and in how far u lies from c (the
    last sample's u close to c), so that the methods' clamps bind differently from sample to sample."""
    generator = torch.Generator().manual_seed(seed)
    rows = shape[0]
    sigma = torch.linspace(0.8, 0.3, rows, dtype=torch.float64)
    alpha = 1 - sigma if kind == "flow" else (1 - sigma ** 2).sqrt()
    view = (-1,) + (1,) * (len(shape) - 1)
    magnitude = torch.linspace(0.5, 2.0, rows).view(view)
    spread = torch.linspace(1.0, 0.05, rows).view(view)
    x = torch.randn(shape, generator=generator)
    cond = torch.randn(shape, generator=generator) * magnitude
    uncond = cond + spread * magnitude * torch.randn(shape, generator=generator)
    return {"cond": Prediction(cond, x, alpha, sigma, kind), "uncond": Prediction(uncond, x, alpha, sigma, kind)}


def _x0(pred: Prediction) -> torch.Tensor:
    """The denoised estimate in float64, from the raw output (written out here, not Prediction's)."""
    view = (-1,) + (1,) * (pred.output.ndim - 1)
    x, m = pred.x.double(), pred.output.double()
    a, s = pred.alpha_t.double().view(view), pred.sigma_t.double().view(view)
    return x - s * m if pred.kind == "flow" else (x - s * m) / a


def _guided(method: Guidance, preds: dict[str, Prediction]) -> Prediction:
    return method.combine(preds, STEP, method.init_state(3, torch.device("cpu"))).denoise


# -- registry and ranges -----------------------------------------------------------------------

def test_registered_with_the_peers_defaults() -> None:
    dt = resolve_guidance("dynamic_thresholding")
    assert isinstance(dt, DynamicThresholding)
    assert (dt.scale, dt.mimic_scale, dt.threshold_percentile, dt.mimic_mode, dt.mimic_scale_min, dt.cfg_mode,
            dt.cfg_scale_min, dt.sched_val, dt.separate_feature_channels, dt.scaling_startpoint,
            dt.variability_measure, dt.interpolate_phi) == (15.0, 7.0, 1.0, "constant", 0.0, "constant", 0.0, 4.0,
                                                            True, "mean", "ad", 1.0)
    norm = resolve_guidance("cfg_norm")
    assert isinstance(norm, CFGNorm) and (norm.scale, norm.strength) == (7.5, 1.0)
    fresca = resolve_guidance("fresca")
    assert isinstance(fresca, FreSca)
    assert (fresca.scale, fresca.scale_low, fresca.scale_high, fresca.freq_cutoff) == (7.5, 1.0, 1.25, 20)


@pytest.mark.parametrize("method", [
    DynamicThresholding(mimic_scale=4.0, cfg_mode="power_up", sched_val=2.0, separate_feature_channels=False),
    CFGNorm(strength=0.7, sigma_max=math.inf), FreSca(scale_high=1.5, freq_cutoff=8)])
def test_config_round_trips_through_strict_json(method) -> None:
    text = strict_json.dumps(method.to_dict())
    assert resolve_guidance(json.loads(text)) == method


@pytest.mark.parametrize("spec, message", [
    ({"name": "dynamic_thresholding", "mimic_scale": -1.0},
     r"dynamic_thresholding: parameter 'mimic_scale' must be \[0, 100\], got -1.0"),
    ({"name": "dynamic_thresholding", "threshold_percentile": 1.5},
     r"dynamic_thresholding: parameter 'threshold_percentile' must be \[0, 1\], got 1.5"),
    ({"name": "dynamic_thresholding", "cfg_mode": "Linear Down"},
     r"dynamic_thresholding: parameter 'cfg_mode' must be one of 'constant', 'linear_down', .*, got 'Linear Down'"),
    ({"name": "dynamic_thresholding", "scaling_startpoint": "MEAN"},
     r"parameter 'scaling_startpoint' must be one of 'mean', 'zero', got 'MEAN'"),
    ({"name": "dynamic_thresholding", "variability_measure": "var"},
     r"parameter 'variability_measure' must be one of 'ad', 'std', got 'var'"),
    ({"name": "dynamic_thresholding", "interpolate_phi": -0.1},
     r"parameter 'interpolate_phi' must be \[0, 1\], got -0.1"),
    ({"name": "dynamic_thresholding", "sched_val": 101},
     r"parameter 'sched_val' must be \[0, 100\], got 101"),
    ({"name": "dynamic_thresholding", "schedule": "linear", "mimic_mode": "half_cosine_up"},
     r"dynamic_thresholding: schedule 'linear' and mode\(s\) half_cosine_up would both shape the scales"),
    ({"name": "dynamic_thresholding", "schedule": "linear", "scale": 40.0, "mimic_scale": 60.0},
     r"runs parameter 'mimic_scale' from 1 to 119 .* outside the accepted \[0, 100\]"),
    ({"name": "cfg_norm", "strength": 101.0}, r"cfg_norm: parameter 'strength' must be \[0, 100\], got 101.0"),
    ({"name": "cfg_norm", "scale": -1.0}, r"cfg_norm: parameter 'scale' must be \[0, 100\], got -1.0"),
    ({"name": "fresca", "scale_high": 11.0}, r"fresca: parameter 'scale_high' must be \[0, 10\], got 11.0"),
    ({"name": "fresca", "scale_low": float("nan")}, r"fresca: parameter 'scale_low' must be \[0, 10\], got nan"),
    ({"name": "fresca", "freq_cutoff": 0}, r"fresca: parameter 'freq_cutoff' must be an integer in \[1, 100\], got 0"),
    ({"name": "fresca", "freq_cutoff": 2.5},
     r"fresca: parameter 'freq_cutoff' must be an integer in \[1, 100\], got 2.5"),
])
def test_out_of_range_parameters_are_refused(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_guidance(spec)


# -- Dynamic Thresholding ----------------------------------------------------------------------

def _extension_rule(c0: torch.Tensor, u0: torch.Tensor, s: float, s_m: float, p: float, separate: bool,
                    startpoint: str, measure: str, phi: float) -> torch.Tensor:
    """DynThresh.dynthresh's arithmetic (dynthres_core.py) in float64, written out per sample (a
    batch of one, the engine's per-sample reading of its batch-pooled spreads) and per group of
    channels (one group per channel when ``separate``, else one group of all)."""
    out = torch.empty_like(c0)
    channels = c0.shape[1]
    for b in range(c0.shape[0]):
        d = c0[b] - u0[b]
        mimic = (u0[b] + s_m * d).reshape(channels, -1)
        target = (u0[b] + s * d).reshape(channels, -1)
        target_mean = target.mean(dim=1, keepdim=True)
        mimic_dev = mimic - mimic.mean(dim=1, keepdim=True)
        target_dev = target - target_mean
        result = torch.empty_like(target)
        for group in ([slice(k, k + 1) for k in range(channels)] if separate else [slice(None)]):
            if measure == "std":
                r_m, r_g = mimic_dev[group].std(), target_dev[group].std()
            else:
                r_m, r_g = mimic_dev[group].abs().max(), torch.quantile(target_dev[group].abs().flatten(), p)
            if startpoint == "zero":
                result[group] = target[group] * (r_m / r_g)
            elif measure == "std":
                result[group] = target_dev[group] / r_g * r_m + target_mean[group]
            else:
                limit = torch.maximum(r_m, r_g)
                result[group] = target_dev[group].clamp(-limit, limit) / limit * r_m + target_mean[group]
        if phi != 1.0:
            result = phi * result + (1 - phi) * target
        out[b] = result.reshape(c0[b].shape)
    return out


DT_CASES = [  # (s, s_m, p, separate, startpoint, measure, phi)
    (15.0, 7.0, 1.0, True, "mean", "ad", 1.0),
    (15.0, 7.0, 0.9, True, "mean", "ad", 1.0),
    (15.0, 7.0, 0.95, False, "mean", "ad", 0.7),
    (10.0, 4.0, 1.0, True, "mean", "std", 1.0),
    (10.0, 4.0, 1.0, False, "mean", "std", 1.0),
    (12.0, 5.0, 0.9, True, "zero", "ad", 1.0),
    (12.0, 5.0, 1.0, False, "zero", "std", 0.5),
    (2.0, 9.0, 0.9, True, "mean", "ad", 1.0),  # a mimic above the CFG scale widens the spread
]


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
@pytest.mark.parametrize("case", DT_CASES, ids=lambda case: "-".join(map(str, case)))
def test_dynamic_thresholding_is_the_extensions_rule_on_x0(case, kind) -> None:
    s, s_m, p, separate, startpoint, measure, phi = case
    preds = _preds(1, kind)
    method = DynamicThresholding(scale=s, mimic_scale=s_m, threshold_percentile=p, separate_feature_channels=separate,
                                 scaling_startpoint=startpoint, variability_measure=measure, interpolate_phi=phi)
    want = _extension_rule(_x0(preds["cond"]), _x0(preds["uncond"]), s, s_m, p, separate, startpoint, measure, phi)
    got = _guided(method, preds)
    assert got.kind == kind
    torch.testing.assert_close(got.x0.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_the_percentile_clamp_binds_on_some_samples_and_positions_only() -> None:
    """MEAN + AD at p = 0.9: the limit is the larger of the mimic's maximum deviation and the CFG
    target's 90 % one: the latter on a sample whose u lies far from c (its top deviations, about
    10 %, are clipped), the former on the sample whose u lies close to c (only the few beyond the
    mimic's maximum are); p = 1 clips nothing."""
    preds = _preds(2, "epsilon")
    c0, u0 = _x0(preds["cond"]), _x0(preds["uncond"])
    target = (u0 + 15.0 * (c0 - u0)).flatten(2)
    mimic = (u0 + 7.0 * (c0 - u0)).flatten(2)
    target_dev = (target - target.mean(dim=2, keepdim=True)).abs()
    r_m = (mimic - mimic.mean(dim=2, keepdim=True)).abs().amax(dim=2, keepdim=True)
    r_g = torch.quantile(target_dev, 0.9, dim=2, keepdim=True)
    assert (r_g[0] > r_m[0]).all() and (r_m[-1] > r_g[-1]).all()
    clipped = (target_dev > torch.maximum(r_m, r_g)).flatten(1).float().mean(dim=1)  # fraction per sample
    assert (clipped > 0).all() and (clipped < 0.11).all() and clipped[-1] < clipped[0]
    assert not (target_dev > torch.maximum(r_m, target_dev.amax(dim=2, keepdim=True))).any()
    for p in (0.9, 1.0):
        got = _guided(DynamicThresholding(threshold_percentile=p), preds).x0.double()
        want = _extension_rule(c0, u0, 15.0, 7.0, p, True, "mean", "ad", 1.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
@pytest.mark.parametrize("options", [{}, {"scaling_startpoint": "zero", "variability_measure": "std"},
                                     {"separate_feature_channels": False, "threshold_percentile": 0.8}])
def test_mimic_equal_to_scale_or_phi_zero_is_cfg_bit_for_bit(options, kind) -> None:
    """The ComfyUI node's skip: mimic == cfg (or phi = 0) is CFG. Without the skip the rule gives CFG
    up to float32 rounding only: a few roundings (centring, division, product) of values below
    max |D|, so within 8 eps max |D|."""
    preds = _preds(3, kind)
    for scale in (1.0, 4.0, 15.0):
        cfg = _guided(CFG(scale=scale), preds)
        assert torch.equal(_guided(DynamicThresholding(scale=scale, mimic_scale=scale, **options), preds).output,
                           cfg.output)
        assert torch.equal(_guided(DynamicThresholding(scale=scale, interpolate_phi=0.0, **options), preds).output,
                           cfg.output)
        unskipped = dynamic_threshold(preds["cond"].x0, preds["uncond"].x0, scale, scale,
                                      percentile=options.get("threshold_percentile", 1.0),
                                      separate_channels=options.get("separate_feature_channels", True),
                                      startpoint=options.get("scaling_startpoint", "mean"),
                                      measure=options.get("variability_measure", "ad"), phi=1.0)
        torch.testing.assert_close(unskipped, cfg.x0, rtol=0, atol=8 * EPS32 * float(cfg.x0.abs().max()))
    assert DynamicThresholding(scale=1.0, mimic_scale=1.0).branches(STEP, None) == ("cond",)
    assert DynamicThresholding(scale=1.0, mimic_scale=7.0).branches(STEP, None) == ("uncond", "cond")


def test_predictions_without_positions_are_refused() -> None:
    flat = _preds(15, "epsilon", (3, 4))
    with pytest.raises(ValueError, match=r"dynamic_thresholding: needs predictions with a channel dimension and "
                                         r"positions \[B, C, \.\.\.\], got shape \(3, 4\)"):
        _guided(DynamicThresholding(), flat)


def _extension_interpret_scale(scale: float, mode: str, minimum: float, frac: float, value: float) -> float:
    """DynThresh.interpret_scale, mode by mode, with the extension's names and constants."""
    shapes = {
        "Linear Down": 1.0 - frac, "Half Cosine Down": math.cos(frac), "Cosine Down": math.cos(frac * 1.5707),
        "Linear Up": frac, "Half Cosine Up": 1.0 - math.cos(frac), "Cosine Up": 1.0 - math.cos(frac * 1.5707),
        "Power Up": math.pow(frac, value), "Power Down": 1.0 - math.pow(frac, value),
        "Cosine Repeating": math.cos(frac * 6.28318 * value) * 0.5 + 0.5, "Sawtooth": (frac * value) % 1.0,
    }
    portion = (frac * value) % 1.0
    shapes["Linear Repeating"] = (0.5 - portion) * 2 if portion < 0.5 else (portion - 0.5) * 2
    if mode == "Constant":
        return scale
    return (scale - minimum) * shapes[mode] + minimum


def test_the_mode_schedules_are_the_extensions() -> None:
    names = {mode: " ".join(word.capitalize() for word in mode.split("_")) for mode in MODES}
    for mode, name in names.items():
        for frac in (0.0, 0.3, 0.5, 0.75, 1.0):
            assert scheduled(12.0, mode, 3.0, frac, 2.5) == _extension_interpret_scale(12.0, name, 3.0, frac, 2.5)
    # A1111's run fraction: step i of n at i / (n - 1), both scales shaped by their own mode
    method = DynamicThresholding(cfg_mode="linear_down", cfg_scale_min=2.0, mimic_mode="half_cosine_up",
                                 mimic_scale_min=3.0, sched_val=2.0)
    for i in range(5):
        step = StepInfo(index=i, num_steps=5, sigma=1.0, sigma_next=0.5, timestep=500.0)
        assert method.scales_at(step) == (_extension_interpret_scale(15.0, "Linear Down", 2.0, i / 4, 2.0),
                                          _extension_interpret_scale(7.0, "Half Cosine Up", 3.0, i / 4, 2.0))


def test_the_engine_schedule_shapes_both_scales() -> None:
    method = DynamicThresholding(scale=9.0, mimic_scale=4.0, schedule="linear")
    for i in range(4):
        step = StepInfo(index=i, num_steps=4, sigma=1.0, sigma_next=0.5, timestep=500.0)
        assert method.scales_at(step) == (CFG(scale=9.0, schedule="linear").scale_at(step),
                                          CFG(scale=4.0, schedule="linear").scale_at(step))
    first = StepInfo(index=0, num_steps=4, sigma=1.0, sigma_next=0.5, timestep=500.0)
    assert method.branches(first, None) == ("cond",)  # both at 1: the conditional alone


# -- CFGNorm -----------------------------------------------------------------------------------

def _node_rule(c0: torch.Tensor, u0: torch.Tensor, scale: float, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The CFGNorm node's post-CFG arithmetic in float64: (result, per-position factor), the norms
    written out as square roots of channel sums."""
    guided = u0 + scale * (c0 - u0)
    cond_norm = (c0 ** 2).sum(dim=1, keepdim=True).sqrt()
    guided_norm = (guided ** 2).sum(dim=1, keepdim=True).sqrt()
    factor = torch.clamp(cond_norm / (guided_norm + 1e-8), 0.0, 1.0)
    return guided * factor * strength, factor


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
@pytest.mark.parametrize("scale, strength", [(1.5, 1.0), (7.5, 1.0), (0.5, 1.0), (4.0, 0.8), (2.0, 1.3)])
def test_cfg_norm_is_the_nodes_rule_per_position(scale, strength, kind) -> None:
    preds = _preds(4, kind)
    want, factor = _node_rule(_x0(preds["cond"]), _x0(preds["uncond"]), scale, strength)
    got = _guided(CFGNorm(scale=scale, strength=strength), preds)
    torch.testing.assert_close(got.x0.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    if scale == 1.5:  # the cap binds at some positions of a sample and not at others
        for row in range(3):
            assert (factor[row] < 1).any() and (factor[row] == 1).any()


def test_a_cap_that_never_binds_is_cfg_bit_for_bit() -> None:
    """u with x0 = 0.3 x0_c at scale 0.4: D = 0.58 D_c, shorter than D_c everywhere, factor 1."""
    preds = _preds(5, "epsilon")
    cond = preds["cond"]
    preds["uncond"] = cond.with_output(Prediction.from_x0(0.3 * cond.x0, like=cond).output)
    _, factor = _node_rule(_x0(cond), _x0(preds["uncond"]), 0.4, 1.0)
    assert (factor == 1).all()
    assert torch.equal(_guided(CFGNorm(scale=0.4), preds).output, _guided(CFG(scale=0.4), preds).output)


def test_where_the_cap_does_not_bind_cfgs_output_is_kept() -> None:
    preds = _preds(6, "flow")
    _, factor = _node_rule(_x0(preds["cond"]), _x0(preds["uncond"]), 1.5, 1.0)
    free = (factor == 1).expand_as(preds["cond"].output)
    assert free.any() and not free.all()
    got, cfg = _guided(CFGNorm(scale=1.5), preds).output, _guided(CFG(scale=1.5), preds).output
    assert torch.equal(got[free], cfg[free]) and not torch.equal(got, cfg)


# -- FreSca ------------------------------------------------------------------------------------

def _reference_filter(d: torch.Tensor, low: float, high: float, cutoff: int) -> torch.Tensor:
    """FreSca's Fourier filter in float64, its box written in frequencies: after the centring
    shift, index j of an axis of length n holds frequency j - n // 2, and the box keeps
    frequencies -r .. r - 1 (r = min(cutoff, H // 2, W // 2), the official code's bound)."""
    h, w = d.shape[-2:]
    r = min(cutoff, h // 2, w // 2)
    spectrum = torch.fft.fftshift(torch.fft.fftn(d, dim=(-2, -1)), dim=(-2, -1))
    ky, kx = torch.arange(h) - h // 2, torch.arange(w) - w // 2
    box = ((ky >= -r) & (ky < r))[:, None] & ((kx >= -r) & (kx < r))[None, :]
    mask = torch.where(box, torch.tensor(low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64))
    return torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
@pytest.mark.parametrize("shape, cutoff, low, high", [
    ((3, 4, 16, 16), 3, 1.0, 1.25),
    ((3, 4, 12, 10), 4, 0.8, 1.5),
    ((3, 3, 9, 7), 2, 1.0, 2.0),  # odd sides
    ((3, 4, 12, 10), 6, 0.8, 1.5),  # r = W // 2 = 5 on both axes (the official bound)
    ((3, 4, 8, 8), 6, 0.9, 1.4),  # a cutoff past H // 2 (where ComfyUI's slice wraps): all low
    ((3, 4, 8, 8), 20, 0.9, 1.4),
])
def test_fresca_is_the_peers_filter_of_the_x0_difference(shape, cutoff, low, high, kind) -> None:
    """ComfyUI's space (x0): D_u + s F'(D_c - D_u); ours filters the raw output's difference, the
    same guided x0 since the filter is linear."""
    preds = _preds(7, kind, shape)
    c0, u0 = _x0(preds["cond"]), _x0(preds["uncond"])
    for scale in (3.0, 7.5):
        want = u0 + scale * _reference_filter(c0 - u0, low, high, cutoff)
        got = _guided(FreSca(scale=scale, scale_low=low, scale_high=high, freq_cutoff=cutoff), preds)
        torch.testing.assert_close(got.x0.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_the_box_scales_the_zero_frequency_low_and_the_nyquist_one_high() -> None:
    constant = torch.full((1, 1, 8, 8), 2.0)
    checkerboard = (-1.0) ** (torch.arange(8)[:, None] + torch.arange(8)[None, :]).float().expand(1, 1, 8, 8)
    torch.testing.assert_close(frequency_scaled(constant, 0.5, 3.0, 2), 0.5 * constant)
    torch.testing.assert_close(frequency_scaled(checkerboard, 0.5, 3.0, 2), 3.0 * checkerboard)


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
def test_equal_band_scales_one_are_cfg_bit_for_bit(kind) -> None:
    preds = _preds(8, kind)
    for scale in (1.0, 4.0, 7.5):
        got = _guided(FreSca(scale=scale, scale_low=1.0, scale_high=1.0), preds)
        assert torch.equal(got.output, _guided(CFG(scale=scale), preds).output)
    assert FreSca(scale=1.0, scale_low=1.0, scale_high=1.0).branches(STEP, None) == ("cond",)
    assert FreSca(scale=1.0).branches(STEP, None) == ("uncond", "cond")  # s = 1 still re-weights the bands


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (12, 10), (64, 64)])
def test_the_fft_round_trip_is_its_rounding_only(size) -> None:
    """Through the transform, scales 1 give d back within eps log2(H W) max |d| (the FFT's round-off
    bound), in float32 and in float64 alike: the difference is the transform's rounding."""
    d = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(9))
    for dtype in (torch.float32, torch.float64):
        x = d.to(dtype)
        bound = torch.finfo(dtype).eps * math.log2(size[0] * size[1]) * float(x.abs().max())
        error = float((frequency_scaled(x, 1.0, 1.0, 3) - x).abs().max())
        assert frequency_scaled(x, 1.0, 1.0, 3).dtype == dtype and 0 < error <= bound


def test_video_latents_are_filtered_frame_by_frame_and_flat_ones_refused() -> None:
    video = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    frames = torch.stack([frequency_scaled(video[:, :, f], 1.0, 1.5, 2) for f in range(4)], dim=2)
    torch.testing.assert_close(frequency_scaled(video, 1.0, 1.5, 2), frames, rtol=0, atol=1e-6)
    flat = _preds(11, "flow", (3, 4, 64))
    message = r"fresca: needs spatial predictions \[B, C, \(F,\) H, W\], got shape \(3, 4, 64\)"
    with pytest.raises(ValueError, match=message):
        _guided(FreSca(), flat)


# -- all three: interval, batch, pipelines -----------------------------------------------------

#: FreSca with small boxes: at its default r = 20 every frequency of these 8 x 8 and 16 x 16 latents is low
METHODS = [DynamicThresholding(), DynamicThresholding(variability_measure="std", separate_feature_channels=False),
           CFGNorm(), CFGNorm(strength=0.9), FreSca(freq_cutoff=3), FreSca(freq_cutoff=2, scale_low=0.8)]
IDS = ["dt", "dt-std-joint", "cfg_norm", "cfg_norm-0.9", "fresca-r3", "fresca-r2-low0.8"]


def _differ(got: torch.Tensor, cfg: torch.Tensor) -> bool:
    """Whether a run differs from CFG's by more than rounding (0.1 % of its largest value)."""
    return float((got - cfg).abs().max()) > 1e-3 * float(cfg.abs().max())


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_outside_the_interval_the_conditional_prediction_alone(method) -> None:
    preds = _preds(12, "epsilon")
    off = method.new(start=0.5)  # STEP is at 1/4 of the run
    assert off.branches(STEP, None) == ("cond",)
    assert off.combine({"cond": preds["cond"]}, STEP, None).denoise is preds["cond"]


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_each_sample_of_a_batch_is_the_sample_alone(method) -> None:
    preds = _preds(13, "flow")
    batch = _guided(method, preds).output
    for row in range(3):
        alone = _guided(method, {name: pred.rows(slice(row, row + 1)) for name, pred in preds.items()}).output
        torch.testing.assert_close(alone[0], batch[row], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_tiny_sd_pipeline_runs_with_two_nfe_per_step(method, sd_pair) -> None:
    _, guided = sd_pair
    run = guided(PROMPT, guidance=method, num_inference_steps=2, output_type="latent", generator=seeded(0))
    assert torch.isfinite(run.images).all() and run.nfe == 4
    cfg = guided(PROMPT, guidance=CFG(scale=method.scale), num_inference_steps=2, output_type="latent",
                 generator=seeded(0))
    assert _differ(run.images, cfg.images)  # the method changed the run


def test_tiny_sd_pipeline_mimic_equal_to_scale_is_the_cfg_run(sd_pair) -> None:
    _, guided = sd_pair
    runs = [guided(PROMPT, guidance=method, num_inference_steps=2, output_type="latent", generator=seeded(0))
            for method in (DynamicThresholding(scale=5.0, mimic_scale=5.0), CFG(scale=5.0))]
    assert torch.equal(runs[0].images, runs[1].images)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_flow_model_run_on_the_sampler_core(method) -> None:
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(14))

    def run(guidance: Guidance):
        return sample(ToyModel("flow"), noise, guidance, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                      num_steps=3, prediction_type="flow", sigmas=[1.0, 2 / 3, 1 / 3], progress=False)

    result = run(method)
    assert torch.isfinite(result.x).all() and result.nfe_per_sample == [6, 6]
    assert _differ(result.x, run(CFG(scale=method.scale)).x)
