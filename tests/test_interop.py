"""diffusers' guiders as engine methods (guidance_engine/interop.py) and the engine's methods as
guiders of diffusers' modular pipelines (guidance_engine/pipelines/modular.py).

References: diffusers' own code, run here: each guider's ``forward`` and windows on the same
tensors, and diffusers' modular SDXL pipeline (StableDiffusionXLAutoBlocks) on the tiny SDXL
components. Bit for bit where the float operations are the same; "within float32 rounding"
elsewhere, with the bound measured, not assumed: the modular loop runs every branch as its own
forward of B rows where the engine (like the stock pipelines) batches them, which rounds the
network's output differently. BATCHING measures that effect on plain CFG; a mapped method must
stay within a small multiple of it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conftest import PROMPT, quiet, seeded
from diffusers import SD3Transformer2DModel, StableDiffusionXLPipeline
from diffusers.guiders import (AdaptiveProjectedGuidance, AdaptiveProjectedMixGuidance, AutoGuidance,
                               ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance, LTX2Guidance,
                               MagnitudeAwareGuidance, PerturbedAttentionGuidance, SkipLayerGuidance,
                               SmoothedEnergyGuidance, TangentialClassifierFreeGuidance)
from diffusers.guiders import frequency_decoupled_guidance as diffusers_fdg
from diffusers.hooks import LayerSkipConfig
from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig
from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
from diffusers.utils import logging

from guidance_engine import method_names, resolve_guidance
from guidance_engine.guidance import StepInfo
from guidance_engine.interop import DiffusersWindow, from_diffusers_guider, is_diffusers_guider
from guidance_engine.methods import (APG, CFG, FDG, MAMBOG, PAG, SEG, SLG, AdaptiveGuidance, APGMix, CFGZeroStar,
                                     TCFG)
from guidance_engine.methods import AutoGuidance as EngineAutoGuidance
from guidance_engine.methods.fdg import laplacian_pyramid, pyr_up
from guidance_engine.pipelines import GuidedStableDiffusionXLPipeline
from guidance_engine.pipelines.modular import EngineGuider, fits_modular
from guidance_engine.pipelines.toy.tiny_models import seeded_weights, tiny_sdxl_components
from guidance_engine.prediction import Prediction
from guidance_engine.vectors import cosine

torch.set_num_threads(1)
logging.set_verbosity_error()  # the guiders' "experimental" warning on every construction

DOCS = Path(__file__).resolve().parents[1] / "docs" / "interop.md"
MID = "mid_block.attentions.0.transformer_blocks"  # the tiny SDXL UNet's mid-block attention blocks
DOWN = "down_blocks.1.attentions.0.transformer_blocks"
UP = "up_blocks.0.attentions.0.transformer_blocks"
STEPS = 4


def pag_config(fqn: str = MID) -> LayerSkipConfig:
    return LayerSkipConfig(indices=[0], fqn=fqn, skip_attention=False, skip_attention_scores=True, skip_ff=False)


@pytest.fixture
def fdg_guider(monkeypatch):
    """diffusers' FrequencyDecoupledGuidance without kornia (not installed): its two pyramid
    functions replaced by ours (equal to kornia's on even sizes, tests/test_projection_methods.py),
    so that its level logic is what is compared."""
    monkeypatch.setattr(diffusers_fdg, "_CAN_USE_KORNIA", True)
    monkeypatch.setattr(diffusers_fdg, "build_laplacian_pyramid_func", laplacian_pyramid)
    monkeypatch.setattr(diffusers_fdg, "upsample_and_blur_func",
                        lambda x: pyr_up(x, (2 * x.shape[-2], 2 * x.shape[-1])))
    return diffusers_fdg.FrequencyDecoupledGuidance


# -- 1. the mapping, object by object --------------------------------------------------------------

MAPPINGS = [
    (lambda: ClassifierFreeGuidance(guidance_scale=5.0), CFG(scale=5.0)),
    (lambda: ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.7, use_original_formulation=True),
     CFG(scale=5.0, rescale=0.7)),
    (lambda: ClassifierFreeGuidance(guidance_scale=1.0 + 1e-12), CFG(scale=1.0)),  # diffusers' isclose: off
    (lambda: ClassifierFreeGuidance(guidance_scale=5.0, enabled=False), CFG(scale=1.0)),
    (lambda: ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=2),
     CFGZeroStar(scale=4.0, zero_steps=2)),
    (lambda: AdaptiveProjectedGuidance(guidance_scale=6.5, use_original_formulation=True, eta=0.0,
                                       adaptive_projected_guidance_momentum=-0.5),
     APG(scale=7.5, eta=0.0, norm_threshold=15.0, momentum=-0.5, space="model")),
    (lambda: AdaptiveProjectedGuidance(guidance_scale=6.5, use_original_formulation=True,
                                       adaptive_projected_guidance_rescale=0.0),
     APG(scale=7.5, eta=1.0, norm_threshold=math.inf, momentum=0.0, space="model")),
    (lambda: AdaptiveProjectedGuidance(guidance_scale=6.0, adaptive_projected_guidance_rescale=0.0),
     APG(scale=6.0, eta=1.0, norm_threshold=math.inf, momentum=0.0, space="model")),
    (lambda: AdaptiveProjectedMixGuidance(use_original_formulation=True),
     APGMix(scale=4.5, apg_scale=11.0, cfg_steps=6, eta=0.0, norm_threshold=10.0, momentum=-0.5, space="model")),
    (lambda: AdaptiveProjectedMixGuidance(guidance_scale=1.0), CFG(scale=1.0)),
    (lambda: AdaptiveProjectedMixGuidance(guidance_scale=3.0, adaptive_projected_guidance_scale=1.0), CFG(scale=3.0)),
    (lambda: TangentialClassifierFreeGuidance(guidance_scale=3.0, use_original_formulation=True), TCFG(scale=4.0)),
    (lambda: MagnitudeAwareGuidance(guidance_scale=8.0, alpha=3.0), MAMBOG(scale=8.0, alpha=3.0, space="model")),
    (lambda: AutoGuidance(guidance_scale=3.0, auto_guidance_config=LayerSkipConfig(indices=[0, 1], fqn=UP)),
     EngineAutoGuidance(scale=3.0, reference="skip", reference_input="uncond", layers=(f"{UP}.0", f"{UP}.1"))),
    (lambda: AutoGuidance(guidance_scale=3.0, auto_guidance_layers=[7], dropout=1.0),
     EngineAutoGuidance(scale=3.0, reference="skip", reference_input="uncond", layers=(7,))),
    (lambda: LTX2Guidance(guidance_scale=3.0, guidance_rescale=0.5), CFG(scale=3.0, rescale=0.5)),
    (lambda: PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=0.0,
                                        perturbed_guidance_layers=[1]), CFG(scale=5.0)),
]


@pytest.mark.parametrize("make, want", MAPPINGS)
def test_a_guider_maps_to_the_engine_method_with_its_parameters(make, want) -> None:
    guider = make()
    assert is_diffusers_guider(guider) and not is_diffusers_guider(want)
    assert from_diffusers_guider(guider) == want


# (guider, the engine method before its window, diffusers' window, strict start)
WINDOWED = [
    (lambda: ClassifierFreeGuidance(guidance_scale=5.0, start=0.2, stop=0.8), CFG(scale=5.0), False),
    (lambda: ClassifierFreeZeroStarGuidance(guidance_scale=4.0, start=0.1, stop=0.9), CFGZeroStar(scale=4.0), False),
    (lambda: PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=2.0,
                                        perturbed_guidance_config=pag_config()),
     PAG(scale=5.0, pag_scale=2.0, layers=(f"{MID}.0",), start=0.0, stop=1.0), True),
    (lambda: PerturbedAttentionGuidance(guidance_scale=1.0, perturbed_guidance_scale=3.0,
                                        perturbed_guidance_layers=[2, 3]),  # CFG off: p + w (c - p)
     PAG(scale=1.0, pag_scale=2.0, layers=(2, 3), start=0.0, stop=1.0), True),
    (lambda: SkipLayerGuidance(guidance_scale=7.0, skip_layer_guidance_layers=[7, 8, 9]),
     SLG(scale=7.0, slg_scale=2.8, layers=(7, 8, 9), start=0.0, stop=1.0), True),
    (lambda: SkipLayerGuidance(guidance_scale=7.0, skip_layer_config=[pag_config("single_transformer_blocks")]),
     PAG(scale=7.0, pag_scale=2.8, layers=("single.0",), start=0.0, stop=1.0), True),
    (lambda: SmoothedEnergyGuidance(guidance_scale=4.0, seg_guidance_scale=3.0, seg_blur_sigma=10.0,
                                    seg_guidance_layers=[1]),  # sigma <= 9999.9: diffusers takes the mean
     SEG(scale=4.0, seg_scale=3.0, blur_sigma=math.inf, layers=(1,), start=0.0, stop=1.0), True),
    (lambda: SmoothedEnergyGuidance(guidance_scale=4.0, seg_guidance_scale=3.0, seg_guidance_layers=[1]),
     SEG(scale=4.0, seg_scale=3.0, blur_sigma=9999999.0, layers=(1,), start=0.0, stop=1.0), True),
]


@pytest.mark.parametrize("make, inner, strict", WINDOWED)
def test_a_window_that_depends_on_the_step_count_is_resolved_at_every_run(make, inner, strict) -> None:
    """diffusers' window, ``int(a n) <= i < int(b n)`` (the perturbation terms: ``int(a n) < i``),
    against ours, ``start <= i / n < stop``, read off diffusers' own enabled-tests at every step of
    runs of 1 to 40 steps."""
    guider = make()
    mapped = from_diffusers_guider(guider)
    assert isinstance(mapped, DiffusersWindow) and mapped.inner == inner and mapped.strict_start is strict
    for n in range(1, 41):
        resolved = mapped.resolved(n)
        for i in range(n):
            guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(999))
            step = StepInfo(index=i, num_steps=n, sigma=1.0, sigma_next=0.5, timestep=999.0)
            if strict:  # the perturbation term (CFG runs at every step in both)
                theirs = guider._is_slg_enabled() if hasattr(guider, "_is_slg_enabled") else guider._is_seg_enabled()
                assert theirs == (resolved.perturb_scale_at(step) != 0), (n, i)
            else:
                assert guider._is_cfg_enabled() == resolved.active(step), (n, i)


REFUSALS = [
    (lambda: ClassifierFreeGuidance(guidance_scale=150.0),
     r"ClassifierFreeGuidance: guidance_scale=150.0 .* cfg's 'scale' = 150.0, which must be \[0, 100\]"),
    (lambda: ClassifierFreeGuidance(guidance_rescale=1.5), r"guidance_rescale=1.5 .* 'rescale' = 1.5, which must be"),
    (lambda: ClassifierFreeZeroStarGuidance(guidance_rescale=0.7),
     r"ClassifierFreeZeroStarGuidance: guidance_rescale=0.7 .* cfg_zero_star has no guidance rescale"),
    (lambda: AdaptiveProjectedGuidance(adaptive_projected_guidance_momentum=-0.5),
     r"AdaptiveProjectedGuidance: use_original_formulation=False .* D_u \+ w U"),
    (lambda: AdaptiveProjectedGuidance(use_original_formulation=True, adaptive_projected_guidance_norm_dim=1),
     r"adaptive_projected_guidance_norm_dim=1 .* every non-batch dimension"),
    (lambda: AdaptiveProjectedGuidance(use_original_formulation=True, eta=2.0),
     r"AdaptiveProjectedGuidance: eta=2.0 .* apg's 'eta' = 2.0, which must be \[0, 1\]"),
    (lambda: AdaptiveProjectedMixGuidance(), r"AdaptiveProjectedMixGuidance: use_original_formulation=False"),
    (lambda: MagnitudeAwareGuidance(guidance_rescale=0.3), r"MagnitudeAwareGuidance: guidance_rescale=0.3"),
    (lambda: PerturbedAttentionGuidance(perturbed_guidance_layers=[1], start=0.1),
     r"PerturbedAttentionGuidance: start, stop=\(0.1, 1.0\) .* CFG term .* every step"),
    (lambda: PerturbedAttentionGuidance(guidance_scale=1.0, perturbed_guidance_scale=0.5,
                                        perturbed_guidance_layers=[1]),
     r"perturbed_guidance_scale=0.5 .* pag's 'pag_scale' = -0.5, which must be \[0, 100\]"),
    (lambda: SkipLayerGuidance(skip_layer_config=LayerSkipConfig(indices=[1], skip_ff=False)),
     r"SkipLayerGuidance: skip_layer_config=.* ours skips whole blocks"),
    (lambda: SkipLayerGuidance(skip_layer_config=LayerSkipConfig(indices=[1], fqn="blocks")),
     r"skip_layer_config=.* fqn 'blocks' names no block stack"),
    (lambda: AutoGuidance(auto_guidance_layers=[1], dropout=0.5),
     r"AutoGuidance: auto_guidance_config=.* dropout 0.5 < 1"),
    (lambda: SmoothedEnergyGuidance(
        seg_guidance_config=SmoothedEnergyGuidanceConfig([1], _query_proj_identifiers=["q"])),
     r"SmoothedEnergyGuidance: seg_guidance_config=.* to_q only"),
    (lambda: LTX2Guidance(guidance_scale=3.0, stg_scale=1.0),
     r"LTX2Guidance: stg_scale=1.0 .* LTX2VideoTransformer3DModel"),
]


@pytest.mark.parametrize("make, message", REFUSALS)
def test_a_setting_without_an_exact_mapping_is_refused_naming_it(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        from_diffusers_guider(make())


def test_other_refusals_fdg_the_prediction_type_and_unknown_classes(fdg_guider) -> None:
    with pytest.raises(ValueError, match=r"FrequencyDecoupledGuidance: guidance_scales=\[9.0, 8.0, 4.0\] .* one scale"):
        from_diffusers_guider(fdg_guider(guidance_scales=[9.0, 8.0, 4.0]))
    with pytest.raises(ValueError, match=r"FrequencyDecoupledGuidance: use_original_formulation=True .*weights 1"):
        from_diffusers_guider(fdg_guider(guidance_scales=[9.0, 4.0], parallel_weights=0.5,
                                         use_original_formulation=True))
    assert from_diffusers_guider(fdg_guider(guidance_scales=[9.0, 9.0, 4.0], parallel_weights=0.5)) == \
        FDG(scale=9.0, scale_low=4.0, levels=3, parallel_weight=0.5)
    zero_star = ClassifierFreeZeroStarGuidance()
    assert from_diffusers_guider(zero_star, prediction_type="flow") == CFGZeroStar(scale=7.5, zero_steps=1)
    with pytest.raises(ValueError, match=r"ClassifierFreeZeroStarGuidance: prediction_type='epsilon' .* flow-matching"):
        from_diffusers_guider(zero_star, prediction_type="epsilon")

    class Custom(ClassifierFreeGuidance):  # a subclass may change the rule: not mapped
        pass

    with pytest.raises(ValueError, match=r"Custom: no engine mapping for this guider class"):
        from_diffusers_guider(Custom())
    with pytest.raises(ValueError, match=r"expected a diffusers guider, got CFG"):
        from_diffusers_guider(CFG())


# -- 2. the rule: each guider's own forward on the same tensors, over a run ----------------------------

#: our branch name -> diffusers' forward argument
ARGUMENTS = {"cond": "pred_cond", "uncond": "pred_uncond", "pag": "pred_cond_skip", "slg": "pred_cond_skip",
             "seg": "pred_cond_seg", "autoguidance_ref": "pred_uncond"}


def _predictions(kind: str, seed: int, shape: tuple[int, ...]) -> dict[str, Prediction]:
    """Correlated random cond / uncond / perturbed predictions (as a network's would be)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    a, s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.4 if kind == "flow" else 0.8, dtype=torch.float64)
    base = torch.randn(shape, generator=g)
    return {name: Prediction(base + 0.5 * torch.randn(shape, generator=g), x, a, s, kind)
            for name in ("cond", "uncond", "perturbed")}


def _compare_over_a_run(guider: Any, n: int = 6, kind: str = "epsilon", shape: tuple[int, ...] = (2, 4, 8, 8),
                        exact: bool = False) -> None:
    """At every step: the same branches (diffusers' num_conditions, our branch count; CFG-Zero*'s
    zero-init steps excepted, where its output is zero and ours evaluates the conditional branch
    only) and the same guided output (bit for bit when ``exact``, else within float32 rounding)."""
    method = from_diffusers_guider(guider)
    state = method.init_state(shape[0], torch.device("cpu"))
    for i in range(n):
        preds = _predictions(kind, i, shape)
        guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(999 - i))
        guider.prepare_inputs({"x": (torch.zeros(shape[0]), torch.zeros(shape[0]))})  # (re)creates momentum at 0
        step = StepInfo(index=i, num_steps=n, sigma=1.0, sigma_next=0.5, timestep=999.0 - i)
        wanted = list(method.branches(step, state))
        ours = method.combine({b: preds[b if b in ("cond", "uncond") else "perturbed"] for b in wanted}, step, state)
        inputs = {ARGUMENTS[b]: preds[b if b in ("cond", "uncond") else "perturbed"].output for b in wanted}
        theirs = guider.forward(**{"pred_cond": preds["cond"].output, **inputs}).pred
        zero_init = i < getattr(guider, "zero_init_steps", 0)  # ours skips the unconditional forward there
        assert len(wanted) == (1 if zero_init else guider.num_conditions), i
        if exact:
            assert torch.equal(ours.denoise.output, theirs), i
        else:
            torch.testing.assert_close(ours.denoise.output, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


@pytest.mark.parametrize("make, exact", [
    (lambda: ClassifierFreeGuidance(guidance_scale=5.0, start=0.2, stop=0.7), True),
    (lambda: ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.7, use_original_formulation=True), False),
    (lambda: AdaptiveProjectedGuidance(guidance_scale=6.5, use_original_formulation=True, eta=0.3,
                                       adaptive_projected_guidance_momentum=-0.5,
                                       adaptive_projected_guidance_rescale=4.0, stop=0.7), False),
    (lambda: AdaptiveProjectedGuidance(guidance_scale=6.0, adaptive_projected_guidance_rescale=0.0), False),
    (lambda: AdaptiveProjectedMixGuidance(use_original_formulation=True, adaptive_projected_guidance_start_step=2,
                                          adaptive_projected_guidance_rescale=4.0), False),
    (lambda: TangentialClassifierFreeGuidance(guidance_scale=5.0), False),
    (lambda: PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=2.0, perturbed_guidance_stop=0.7,
                                        perturbed_guidance_layers=[1]), True),
    (lambda: PerturbedAttentionGuidance(guidance_scale=1.0, perturbed_guidance_scale=3.0, perturbed_guidance_stop=1.0,
                                        perturbed_guidance_layers=[1]), False),
    (lambda: SkipLayerGuidance(guidance_scale=0.0, use_original_formulation=True, skip_layer_guidance_stop=1.0,
                               skip_layer_guidance_layers=[1]), False),
    (lambda: SmoothedEnergyGuidance(guidance_scale=3.0, seg_guidance_start=0.2, seg_guidance_layers=[1]), True),
    (lambda: AutoGuidance(guidance_scale=3.0, auto_guidance_layers=[1], dropout=1.0, start=0.3), True),
    (lambda: LTX2Guidance(guidance_scale=3.0), False),
])
def test_the_mapped_method_combines_as_the_guiders_forward(make, exact) -> None:
    _compare_over_a_run(make(), exact=exact)


def test_cfg_zero_star_and_mambo_g_on_the_tensors_their_guiders_take() -> None:
    """CFG-Zero* on flow velocities (ours and the guider's space coincide there), zero-init
    included; MAMBO-G on packed [B, tokens, dim] latents (its guider raises on 4-D
    ones, see test_guiders_that_do_not_run_in_the_modular_sdxl_pipeline)."""
    _compare_over_a_run(ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=2), kind="flow", exact=True)
    _compare_over_a_run(ClassifierFreeZeroStarGuidance(guidance_scale=3.0, use_original_formulation=True), kind="flow")
    _compare_over_a_run(MagnitudeAwareGuidance(guidance_scale=8.0, alpha=3.0), kind="flow", shape=(2, 64, 16))
    _compare_over_a_run(MagnitudeAwareGuidance(guidance_scale=7.0, alpha=3.0, use_original_formulation=True),
                        shape=(2, 64, 16))


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_fdg_combines_as_its_guider(fdg_guider, p: float) -> None:
    _compare_over_a_run(fdg_guider(guidance_scales=[9.0, 9.0, 4.0], parallel_weights=p, start=0.2),
                        shape=(2, 4, 16, 16))


# -- 3. pipelines: the engine's SDXL with the mapping vs diffusers' modular SDXL with the guider -------

@dataclass
class XL:
    """The tiny SDXL components in the stock, the engine's and diffusers' modular pipelines."""

    engine: GuidedStableDiffusionXLPipeline
    modular: Any

    def engine_latents(self, guidance: Any, prompt: Any = PROMPT, steps: int = STEPS, **kwargs: Any) -> Any:
        return self.engine(prompt, num_inference_steps=steps, guidance=guidance, generator=seeded(0),
                           output_type="latent", **kwargs)

    def modular_latents(self, guider: Any, prompt: Any = PROMPT, steps: int = STEPS) -> torch.Tensor:
        self.modular.update_components(guider=guider)
        return self.modular(prompt=prompt, num_inference_steps=steps, generator=seeded(0), output="latents")


@pytest.fixture(scope="module")
def xl() -> XL:
    """Two copies of the same weights: a UNet the engine has perturbed carries its row-plan
    dispatcher processors, which diffusers' PAG hook refuses (docs/interop.md)."""
    stock = quiet(StableDiffusionXLPipeline(**tiny_sdxl_components(0)))
    components = tiny_sdxl_components(0)
    modular = StableDiffusionXLAutoBlocks().init_pipeline()
    modular.update_components(**{k: v for k, v in components.items() if v is not None and k in modular.component_names})
    modular.set_progress_bar_config(disable=True)
    return XL(quiet(GuidedStableDiffusionXLPipeline.from_pipe(stock)), modular)


@pytest.fixture(scope="module")
def batching(xl: XL) -> float:
    """The float32 effect of one forward per branch: |modular CFG - engine CFG| (the stock SDXL
    pipeline is the engine's bit for bit, tests/test_pipelines.py), floored at 8 ulps."""
    gap = (xl.modular_latents(ClassifierFreeGuidance(guidance_scale=5.0)) -
           xl.engine_latents(CFG(scale=5.0)).images).abs().max()
    return max(float(gap), 8 * torch.finfo(torch.float32).eps)


PIPELINE_GUIDERS = [
    lambda: ClassifierFreeGuidance(guidance_scale=4.0, guidance_rescale=0.7, use_original_formulation=True,
                                   start=0.25, stop=0.75),
    lambda: AdaptiveProjectedGuidance(guidance_scale=6.0, use_original_formulation=True, eta=0.0,
                                      adaptive_projected_guidance_momentum=-0.5,
                                      adaptive_projected_guidance_rescale=2.0),
    lambda: AdaptiveProjectedMixGuidance(use_original_formulation=True, adaptive_projected_guidance_start_step=1),
    lambda: TangentialClassifierFreeGuidance(guidance_scale=5.0),
    lambda: PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
                                       perturbed_guidance_stop=1.0, perturbed_guidance_config=pag_config()),
    lambda: SkipLayerGuidance(guidance_scale=5.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
                              skip_layer_guidance_stop=0.8, skip_layer_config=LayerSkipConfig(indices=[0], fqn=DOWN)),
    lambda: AutoGuidance(guidance_scale=3.0, auto_guidance_config=LayerSkipConfig(indices=[0], fqn=UP)),
]


@pytest.mark.parametrize("make", PIPELINE_GUIDERS)
def test_modular_pipeline_with_the_guider_equals_the_engine_with_its_mapping(xl: XL, batching: float, make) -> None:
    mapped = from_diffusers_guider(make())
    ours = xl.engine_latents(mapped).images
    theirs = xl.modular_latents(make())
    assert float((ours - theirs).abs().max()) <= 4 * batching
    plain = xl.engine_latents(CFG(scale=5.0)).images  # and the method is not CFG in disguise
    assert float((ours - plain).abs().max()) > 100 * batching
    if isinstance(mapped, DiffusersWindow):  # resolved at the run's step count: the method itself
        assert torch.equal(ours, xl.engine_latents(mapped.resolved(STEPS)).images)


def test_a_windowed_mapping_reports_its_methods_scales_in_the_pipeline(xl: XL) -> None:
    """What the stock attributes show during a run (guidance_scale, guidance_rescale, ...) is what
    they show for the wrapped method itself."""
    mapped = from_diffusers_guider(ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.7, stop=0.5))
    seen: dict[str, list] = {"wrapped": [], "method": []}

    def recorder(key: str):
        def callback(pipe, i, t, tensors):
            seen[key].append((pipe.guidance_scale, pipe.guidance_rescale, pipe.do_classifier_free_guidance))
            return tensors
        return callback

    xl.engine_latents(mapped, callback_on_step_end=recorder("wrapped"))
    xl.engine_latents(mapped.resolved(STEPS), callback_on_step_end=recorder("method"))
    assert isinstance(mapped, DiffusersWindow) and mapped.scale == 5.0 and mapped.rescale == 0.7
    assert seen["wrapped"] == seen["method"] and seen["wrapped"][0][0] == 5.0


def test_fdg_in_the_modular_pipeline(xl: XL, batching: float, fdg_guider) -> None:
    ours = xl.engine_latents(from_diffusers_guider(fdg_guider(guidance_scales=[6.0, 3.0]))).images
    assert float((ours - xl.modular_latents(fdg_guider(guidance_scales=[6.0, 3.0]))).abs().max()) <= 4 * batching


def test_seg_guider_never_blurs_and_with_its_hook_applied_equals_ours(xl: XL, batching: float, monkeypatch) -> None:
    """diffusers 0.42.1's SmoothedEnergyGuidance.prepare_models never counts the prepared batches,
    so its hook condition is never true: in the modular pipeline it is CFG. With the count made
    (the base class's one line), its blur runs and equals our SEG (sigma <= 9999.9: the mean)."""
    def make() -> SmoothedEnergyGuidance:
        return SmoothedEnergyGuidance(guidance_scale=5.0, seg_guidance_scale=3.0, seg_blur_sigma=1.0,
                                      seg_guidance_config=SmoothedEnergyGuidanceConfig([0], fqn=MID))
    cfg = xl.modular_latents(ClassifierFreeGuidance(guidance_scale=5.0))
    assert torch.equal(xl.modular_latents(make()), cfg)
    hooked = SmoothedEnergyGuidance.prepare_models

    def counting(self, denoiser) -> None:
        self._count_prepared += 1
        hooked(self, denoiser)

    monkeypatch.setattr(SmoothedEnergyGuidance, "prepare_models", counting)
    ours = xl.engine_latents(from_diffusers_guider(make())).images
    assert float((ours - xl.modular_latents(make())).abs().max()) <= 4 * batching
    assert float((ours - cfg).abs().max()) > 100 * batching


def test_guiders_that_do_not_run_in_diffusers(xl: XL) -> None:
    """diffusers 0.42.1: MagnitudeAwareGuidance's torch.norm over three dimensions fails on 4-D
    latents (the modular SDXL pipeline); SkipLayerGuidance and AutoGuidance built from
    ``*_layers=[...]`` give LayerSkipConfig an int ``indices`` that the hook cannot take, at the
    first hooked forward (ours maps either form)."""
    with pytest.raises(RuntimeError):
        xl.modular_latents(MagnitudeAwareGuidance(guidance_scale=5.0))
    with seeded_weights(0):
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=8, out_channels=4)
    for guider in (SkipLayerGuidance(skip_layer_guidance_layers=[1], skip_layer_guidance_start=0.0,
                                     skip_layer_guidance_stop=1.0),
                   AutoGuidance(auto_guidance_layers=[1], dropout=1.0)):
        guider.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(500))
        guider.prepare_inputs({"x": (torch.zeros(1), torch.zeros(1))})
        with pytest.raises(TypeError, match="has no len"):
            for _ in range(guider.num_conditions):
                guider.prepare_models(transformer)
                guider.cleanup_models(transformer)
        assert isinstance(from_diffusers_guider(guider), (DiffusersWindow, EngineAutoGuidance))


def test_the_proposed_pipeline_branch_through_a_pipeline_call(sd_pair, monkeypatch) -> None:
    """The shared change docs/interop.md proposes (GuidedPipelineMixin.resolve_guidance: a
    diffusers guider object), patched in: ``guidance=<guider>`` runs its mapping bit for bit; a
    scale given beside it, or a mapping that holds on flow models only (CFG-Zero* on SD's eps
    UNet), is refused before any model call."""
    from guidance_engine.pipelines.common import GuidedPipelineMixin
    from guidance_engine.samplers.schedule import is_flow_scheduler

    unpatched = GuidedPipelineMixin.resolve_guidance

    def resolve_guidance(self, guidance: Any, guidance_scale: float | None, guidance_rescale: float = 0.0):
        if is_diffusers_guider(guidance):
            if guidance_scale is not None or guidance_rescale:
                raise ValueError("guidance_scale/guidance_rescale: set them on the diffusers guider itself, "
                                 f"got guidance={type(guidance).__name__} and guidance_scale={guidance_scale!r}")
            prediction_type = "flow" if is_flow_scheduler(self.scheduler) else \
                self.scheduler.config.get("prediction_type", "epsilon")
            return from_diffusers_guider(guidance, prediction_type=prediction_type)
        return unpatched(self, guidance, guidance_scale, guidance_rescale)

    monkeypatch.setattr(GuidedPipelineMixin, "resolve_guidance", resolve_guidance)
    _, guided = sd_pair
    calls = []
    guided.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    guider = ClassifierFreeGuidance(guidance_scale=4.0, start=0.0, stop=0.5)
    got = guided(PROMPT, num_inference_steps=STEPS, guidance=guider, generator=seeded(0), output_type="latent")
    want = guided(PROMPT, num_inference_steps=STEPS, guidance=CFG(scale=4.0, stop=0.5), generator=seeded(0),
                  output_type="latent")
    assert torch.equal(got.images, want.images) and got.nfe == STEPS + 2
    calls.clear()
    with pytest.raises(ValueError, match="set them on the diffusers guider itself"):
        guided(PROMPT, num_inference_steps=STEPS, guidance=guider, guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"ClassifierFreeZeroStarGuidance: prediction_type='epsilon'"):
        guided(PROMPT, num_inference_steps=STEPS, guidance=ClassifierFreeZeroStarGuidance())
    assert calls == []


# -- 4. the engine's methods as guiders of the modular pipeline -------------------------------------------

def engine_guider(xl: XL, method: Any) -> EngineGuider:
    return EngineGuider(method, scheduler=xl.modular.scheduler)


def test_engine_cfg_as_a_guider_is_diffusers_cfg_bit_for_bit(xl: XL) -> None:
    """The same forwards and the same u + s (c - u): equal bit for bit, windows included."""
    assert torch.equal(xl.modular_latents(engine_guider(xl, CFG(scale=5.0))),
                       xl.modular_latents(ClassifierFreeGuidance(guidance_scale=5.0)))
    windowed = ClassifierFreeGuidance(guidance_scale=5.0, start=0.3, stop=0.8)
    assert torch.equal(xl.modular_latents(engine_guider(xl, from_diffusers_guider(windowed))),
                       xl.modular_latents(windowed))


@dataclass(frozen=True, kw_only=True)
class RecordingCFG(CFG):
    """CFG that records cos(D_c, D_u) per sample at each guided step (AG's switch test)."""

    name: ClassVar[str] = "recording_cfg"
    log: list = field(default_factory=list, compare=False)

    def combine(self, preds, step, state):
        self.log.append(cosine(preds["cond"].x0, preds["uncond"].x0))
        return super().combine(preds, step, state)


def test_adaptive_guidance_as_a_guider_equals_the_engines_own_pipeline(xl: XL, batching: float) -> None:
    """AG (diffusers has none) in the modular pipeline: two prompts whose cosines cross a threshold
    at different steps switch at the same steps as in the engine's pipeline, with the same latents
    within the batching bound; the loop still evaluates every row (no NFE saved until all switch)."""
    prompts, steps = [PROMPT, "two blue squares"], 6
    recording = RecordingCFG(scale=5.0)
    xl.modular_latents(engine_guider(xl, recording), prompts, steps)
    cos = torch.stack(recording.log)  # [steps, 2]
    threshold = float(cos[1].mean())  # between the two samples' cosines at step 1
    assert cos[1, 0] > threshold > cos[1, 1] and (cos[0] < threshold).all() and cos[2, 1] >= threshold
    ag = AdaptiveGuidance(scale=5.0, threshold=threshold)
    guider = engine_guider(xl, ag)
    theirs = xl.modular_latents(guider, prompts, steps)
    ours = xl.engine_latents(ag, prompts, steps)
    assert guider.run_state.switched_at.tolist() == ours.guidance_state.switched_at.tolist() == [1, 2]
    assert ours.nfe_per_image == [steps + 2, steps + 3]
    assert float((ours.images - theirs).abs().max()) <= 4 * batching
    # oracles: a threshold never reached is CFG bit for bit; one sample switching at step 1 is
    # diffusers' CFG stopping after step 1 (int(stop n) = 2), bit for bit
    never = engine_guider(xl, AdaptiveGuidance(scale=5.0, threshold=1.5))
    assert torch.equal(xl.modular_latents(never, prompts, steps),
                       xl.modular_latents(ClassifierFreeGuidance(guidance_scale=5.0), prompts, steps))
    assert torch.equal(xl.modular_latents(engine_guider(xl, ag), PROMPT, steps),
                       xl.modular_latents(ClassifierFreeGuidance(guidance_scale=5.0, stop=2.5 / steps), PROMPT, steps))


def test_apg_as_a_guider_keeps_its_momentum_per_run(xl: XL, batching: float) -> None:
    """APG in x0 space (the paper's; diffusers' guider has only the raw output): equal to the
    engine's pipeline within the batching bound, and a second run starts from a fresh momentum."""
    apg = APG(scale=5.0, momentum=-0.5, norm_threshold=2.0)
    guider = engine_guider(xl, apg)
    first = xl.modular_latents(guider)
    assert torch.equal(xl.modular_latents(guider), first)
    assert float((xl.engine_latents(apg).images - first).abs().max()) <= 4 * batching


def test_the_guider_contract(xl: XL) -> None:
    """What the modular loops read: num_conditions before a run (the encoders' question), one
    BlockState per branch with diffusers' identifiers, the conditional batch first, ``enabled``,
    and a config that round-trips through ``new`` / ``from_config`` (the scheduler is no config)."""
    guider = engine_guider(xl, CFG(scale=5.0))
    assert guider.num_conditions == 2
    data = {"prompt_embeds": (torch.ones(2, 3), torch.zeros(2, 3)), "time_ids": (torch.ones(2, 6), None)}
    xl.modular.scheduler.set_timesteps(STEPS)
    guider.set_state(step=0, num_inference_steps=STEPS, timestep=xl.modular.scheduler.timesteps[0])
    batches = guider.prepare_inputs(data)
    assert [b.__guidance_identifier__ for b in batches] == ["pred_cond", "pred_uncond"]
    assert torch.equal(batches[1].prompt_embeds, data["prompt_embeds"][1]) and batches[1].time_ids is None
    guider.disable()
    assert guider.num_conditions == 1
    copy = guider.new(enabled=True)
    assert copy.engine_method == CFG(scale=5.0) and copy.scheduler is xl.modular.scheduler and copy._enabled
    assert EngineGuider.from_config(copy.config).engine_method == CFG(scale=5.0)
    # disabled: one batch, the conditional prediction returned as it is (the SDXL loop itself
    # calls enable() at every run, unless the UNet is guidance-distilled)
    guider.set_state(step=1, num_inference_steps=STEPS, timestep=xl.modular.scheduler.timesteps[1])
    (batch,) = guider.prepare_inputs(data)
    cond = torch.randn(2, 4, 16, 16)
    assert batch.__guidance_identifier__ == "pred_cond" and guider.forward(cond).pred is cond


def test_a_guider_serves_run_after_run(xl: XL) -> None:
    """The encoders ask ``num_conditions`` before a run; diffusers' guiders answer from the last
    step of the previous run, so ClassifierFreeGuidance(stop=0.5) says 1 and the next run skips the
    negative embeddings it then needs (diffusers 0.42.1: the second run raises). Ours answers
    for the run to come, and its state is fresh at step 0: the second run is the first."""
    diffusers_cfg = ClassifierFreeGuidance(guidance_scale=5.0, stop=0.5)
    xl.modular_latents(diffusers_cfg)
    with pytest.raises(AttributeError):
        xl.modular_latents(diffusers_cfg)
    guider = engine_guider(xl, CFG(scale=5.0, stop=0.5))
    first = xl.modular_latents(guider)
    assert torch.equal(xl.modular_latents(guider), first)
    assert torch.equal(first, xl.modular_latents(ClassifierFreeGuidance(guidance_scale=5.0, stop=0.5)))


@pytest.mark.parametrize("name, why", [
    ("cfgpp", "renoises with another prediction"), ("pag", "altered network"), ("fkc", "after each solver step"),
    ("perp_neg", r"needs branch\(es\) \['negative'\]"),
])
def test_a_method_that_does_not_fit_the_guider_contract_is_refused(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=rf"EngineGuider: parameter 'guidance' must be .*'{name}' .*{why}"):
        EngineGuider(name)


def test_docs_list_every_method_with_the_verdict_the_guider_gives() -> None:
    """docs/interop.md's table of the engine's methods: one row per registered method, "fits" where
    EngineGuider takes it (LinearAG: with its calibration, which the docs say)."""
    rows = {}
    for line in DOCS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    assert set(rows) == set(method_names())
    for name, verdict in rows.items():
        if name == "linear_ag":  # needs a calibration directory to exist; its branches are cond / uncond
            assert verdict == "fits"
            continue
        assert verdict == ("fits" if fits_modular(resolve_guidance(name)) is None else "no"), name
