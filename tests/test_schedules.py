"""Guidance schedules: each shape against its published formula computed independently, the
string forms round-tripping through configs, the range checks, and the per-step forms (explicit
lists, phases, callables) in a pipeline run, checked before any model call."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from guidance_engine import CFG, StepInfo, resolve_guidance
from guidance_engine.methods import NAG, PAG, CFGPlusPlus
from guidance_engine.schedules import Beta, ClampLinear, Explicit, Phases, as_schedule
from conftest import PROMPT, seeded


def _step(i: int, n: int, timestep: float = 500.0) -> StepInfo:
    return StepInfo(index=i, num_steps=n, sigma=1.0, sigma_next=0.5, timestep=timestep)


def _scales(method, n: int, name: str = "scale") -> list[float]:
    return [method.shaped(name, _step(i, n)) for i in range(n)]


def test_wang_et_al_shapes_in_their_own_convention() -> None:
    """Wang et al. 2024 write the guided eps as eps_c + w_t (eps_c - eps_u) (w = s - 1) with the
    diffusion time t from T down to 0: linear w_t = 2 w (1 - t/T), cosine w_t = w (1 + cos(pi t/T)),
    clamped forms max(c, .). Our step i of n is t/T = 1 - i/n."""
    n, s = 20, 6.0
    w = s - 1.0
    for i, got in enumerate(_scales(CFG(scale=s, schedule="linear"), n)):
        assert got - 1.0 == pytest.approx(2 * w * (1 - (1 - i / n)), abs=1e-12)
    for i, got in enumerate(_scales(CFG(scale=s, schedule="cosine"), n)):
        assert got - 1.0 == pytest.approx(w * (1 + math.cos(math.pi * (1 - i / n))), abs=1e-12)
    for c in (1.0, 4.0):
        for i, got in enumerate(_scales(CFG(scale=s, schedule=f"clamp_linear(floor={c + 1})"), n)):
            assert got - 1.0 == pytest.approx(max(c, 2 * w * (i / n)), abs=1e-12)
        for i, got in enumerate(_scales(CFG(scale=s, schedule=f"clamp_cosine(floor={c + 1})"), n)):
            assert got - 1.0 == pytest.approx(max(c, w * (1 + math.cos(math.pi * (1 - i / n)))), abs=1e-12)


def test_power_cosine_is_incantations_pcs() -> None:
    """PCS: w0 (1 - cos(pi x^k)) / 2 of the guidance above the neutral value, x = i / n."""
    n, s = 16, 5.0
    for k in (0.1, 1.0, 2.0, 4.0):
        got = _scales(CFG(scale=s, schedule=f"power_cosine(power={k})"), n)
        want = [1.0 + (s - 1.0) * (1 - math.cos(math.pi * (i / n) ** k)) / 2 for i in range(n)]
        assert got == pytest.approx(want, abs=1e-12)
        assert max(got) <= s  # it rises to the scale, never past it


@pytest.mark.parametrize("a,b,normalize", [(2.0, 2.0, False), (2.0, 5.0, True), (1.0, 3.0, False), (4.0, 1.0, True),
                                           (1.0, 1.0, False)])
def test_beta_is_the_official_beta_cfg_density(a, b, normalize) -> None:
    """beta-CFG's official code: the guidance difference times beta.pdf(step / (n - 1), a, b)
    (divided by the pdf at the mode (a - 1) / (a + b - 2) when normalised); scipy's density here."""
    n, s = 12, 0.8  # CFG++ (neutral 0): the official arithmetic s pdf(q) exactly
    got = [CFGPlusPlus(scale=s, schedule=Beta(a=a, b=b, normalize=normalize)).scale_at(_step(i, n))
           for i in range(n)] if s * (1 if normalize else _peak(a, b)) <= 1 else None
    density = [scipy.stats.beta.pdf(i / (n - 1), a, b) for i in range(n)]
    if normalize:
        density = [d / scipy.stats.beta.pdf((a - 1) / (a + b - 2), a, b) for d in density]
    want = [s * d for d in density]
    if got is None:  # this unnormalised density would take lambda past 1: refused up front
        with pytest.raises(ValueError, match=r"cfgpp: schedule .* runs parameter 'scale' from 0 to .* outside the "
                                             r"accepted \[0, 1\]"):
            CFGPlusPlus(scale=s, schedule=Beta(a=a, b=b, normalize=normalize))
        got = [CFG(scale=1.0 + s, schedule=Beta(a=a, b=b, normalize=normalize)).scale_at(_step(i, n)) - 1.0
               for i in range(n)]
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


def _peak(a: float, b: float) -> float:
    if a == b == 1.0:
        return 1.0
    return float(scipy.stats.beta.pdf((a - 1) / (a + b - 2), a, b))


def test_string_forms_round_trip_through_configs_and_are_what_the_cli_passes() -> None:
    for text in ("linear", "clamp_cosine(floor=3)", "power_cosine(power=2)", "beta(a=2, b=3, normalize=True)",
                 "explicit(values=[7.5, 7, 6])", "phases(timesteps=[875], values=[3])"):
        method = resolve_guidance("cfg", schedule=text)  # the CLI's --param schedule=... is this string
        assert method.schedule == text and resolve_guidance(method.to_dict()) == method
    for given in ([7.5, 7.0], Beta(a=3.0), Phases(timesteps=(500.0,), values=(2.0,))):
        method = CFG(scale=4.0, schedule=given)
        config = method.to_dict()
        assert isinstance(config["schedule"], str)
        again = resolve_guidance(config)
        assert again.shape == method.shape
        assert _scales(again, 2) == _scales(method, 2)
    function = lambda p: 2.0  # noqa: E731
    method = CFG(schedule=function)
    assert method.to_dict()["schedule"] is function and resolve_guidance(method.to_dict()) == method
    with pytest.raises(ValueError, match="a callable schedule cannot be written down"):
        method.shape.spec()


@pytest.mark.parametrize("spec,message", [
    ("exp", r"cfg: parameter 'schedule' must be a schedule name \(constant, linear, .*got 'exp'"),
    ("beta(a=0.5)", r"cfg: schedule 'beta': parameter 'a' must be a finite number in \[1, inf\), got 0.5"),
    ("beta(c=1)", r"cfg: schedule 'beta': no parameter\(s\) c; its parameters are a, b, normalize"),
    ("explicit(values=[])", r"cfg: schedule 'explicit': parameter 'values' must be a non-empty list"),
    ("phases(timesteps=[100, 500], values=[1, 2])", r"'timesteps' \(decreasing\)"),
    ("__import__('os').getcwd()", r"cfg: parameter 'schedule' must be a schedule name"),
    ("beta(a=__import__('os'))", r"arguments as literals"),
    ("explicit(values=[2, 200])", r"cfg: schedule 'explicit\(values=\[2, 200\]\)' runs parameter 'scale' from 1 "
                                  r"to 200, outside the accepted \[0, 100\]"),
    ("clamp_linear(floor=120)", r"runs parameter 'scale' from 1 to 120"),
    ("explicit(values=[2], parameter='nag_scale')", r"cfg: schedule 'explicit' sets parameter 'nag_scale', which cfg "
                                                     r"does not schedule \(it schedules 'scale'\)"),
])
def test_bad_schedules_name_what_is_accepted(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        CFG(scale=7.5, schedule=spec)


def test_one_parameter_schedules_leave_the_other_scales_constant() -> None:
    """An explicit list sets the main scale by default, or the parameter it names."""
    nag = NAG(scale=3.0, nag_scale=5.0, schedule="explicit(values=[2, 4], parameter='nag_scale')")
    assert [nag.nag_scale_at(_step(i, 2)) for i in range(2)] == [2.0, 4.0]
    assert _scales(nag, 2) == [3.0, 3.0]
    pag = PAG(scale=7.5, pag_scale=3.0, schedule=[0.0, 1.5])  # PAG's schedule shapes its perturbation term
    assert [pag.perturb_scale_at(_step(i, 2)) for i in range(2)] == [0.0, 1.5]
    assert _scales(pag, 2) == [7.5, 7.5]


def test_phases_switch_on_the_timestep_as_wan_2_2_does() -> None:
    """Wan 2.2: guidance_scale while t >= boundary_ratio * 1000, guidance_scale_2 below."""
    method = CFG(scale=4.0, schedule=Phases(timesteps=(875.0,), values=(3.0,)))
    timesteps = [999.0, 937.5, 875.0, 874.9, 500.0, 1.0]
    assert [method.scale_at(_step(i, 6, t)) for i, t in enumerate(timesteps)] == [4.0, 4.0, 4.0, 3.0, 3.0, 3.0]
    three = CFG(scale=5.0, schedule="phases(timesteps=[800, 300], values=[4, 2])")
    assert [three.scale_at(_step(0, 3, t)) for t in (900.0, 500.0, 100.0)] == [5.0, 4.0, 2.0]


def _no_unet(pipe):
    def refuse(*args, **kwargs):
        raise AssertionError("the UNet ran")
    pipe.unet.forward = refuse
    return pipe


def test_explicit_constant_list_equals_the_constant_schedule_bit_for_bit(sd_pair) -> None:
    _, guided = sd_pair
    kwargs = dict(num_inference_steps=3, output_type="latent")
    plain = guided(PROMPT, guidance=CFG(scale=6.0), generator=seeded(0), **kwargs).images
    listed = guided(PROMPT, guidance=CFG(scale=1.0, schedule=[6.0, 6.0, 6.0]), generator=seeded(0), **kwargs).images
    assert torch.equal(plain, listed)
    varied = guided(PROMPT, guidance=CFG(schedule=[6.0, 3.0, 1.0]), generator=seeded(0), **kwargs)
    assert not torch.equal(plain, varied.images)
    assert varied.nfe_per_image == [5.0]  # the last step at scale 1: the conditional alone, no uncond forward


def test_per_step_schedules_are_checked_against_the_run_before_any_model_call(sd_pair) -> None:
    _, guided = sd_pair
    _no_unet(guided)
    with pytest.raises(ValueError, match=r"cfg: schedule 'explicit' has 2 value\(s\), one per step, but the run has "
                                         r"3 step\(s\)"):
        guided(PROMPT, guidance=CFG(schedule=[6.0, 3.0]), num_inference_steps=3, output_type="latent")
    with pytest.raises(ValueError, match=r"cfg: schedule \(a callable\) runs parameter 'scale' from 1 to 201, outside the "
                                         r"accepted \[0, 100\]"):
        guided(PROMPT, guidance=CFG(schedule=lambda p: 1.0 + 300.0 * p), num_inference_steps=3, output_type="latent")


def test_a_callable_of_the_progress_runs(sd_pair) -> None:
    _, guided = sd_pair
    kwargs = dict(num_inference_steps=3, output_type="latent")
    listed = guided(PROMPT, guidance=CFG(schedule=[7.0, 5.0, 3.0]), generator=seeded(0), **kwargs).images
    called = guided(PROMPT, guidance=CFG(schedule=lambda p: 7.0 - 6.0 * p), generator=seeded(0), **kwargs).images
    assert torch.equal(listed, called)  # p = 0, 1/3, 2/3 give 7, 5, 3 exactly (asserted next)
    assert [7.0 - 6.0 * (i / 3) for i in range(3)] == [7.0, 5.0, 3.0]


def test_objects_and_strings_are_one_schedule() -> None:
    assert as_schedule("clamp_linear(floor=5)") == ClampLinear(floor=5.0)
    assert as_schedule([1, 2]) == Explicit(values=(1.0, 2.0))
    assert str(as_schedule("beta(b=3)")) == "beta(b=3.0)"
