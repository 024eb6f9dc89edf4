"""GFCG: the decision rule on crafted classifier outputs, the identity case (scale 0 == CFG bit for
bit), the reference class as rows of the one forward, end to end on both default models, and
bad parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guidance_engine import CFG, resolve_guidance
from guidance_engine.methods.gfcg import GFCG, adaptive_factor, reference_classes
from guidance_engine.pipelines import GuidedDiTPipeline
from guidance_engine.pipelines.toy.tiny_models import tiny_dit_components
from guidance_engine.pipelines.guide_classifier import ID2LABEL, prompt_class, shape_class, swap_prompt
from conftest import PROMPT, quiet, seeded


# -- the decision rule --------------------------------------------------------------------------

def test_reference_is_the_strongest_class_other_than_the_asked_one() -> None:
    probs = torch.tensor([[0.70, 0.10, 0.20, 0.00],    # right: the runner-up is the reference
                          [0.10, 0.60, 0.25, 0.05],    # wrong: the class it is drifting to
                          [0.25, 0.25, 0.25, 0.25]])   # tie: the first other class
    target = torch.tensor([0, 2, 3])
    assert reference_classes(probs, target).tolist() == [2, 1, 0]
    ratio = adaptive_factor(probs, target, torch.tensor([2, 1, 0]), "ratio")
    torch.testing.assert_close(ratio, torch.tensor([0.2 / 0.7, 1.0, 1.0]))  # p_r / p_c, capped at 1
    torch.testing.assert_close(adaptive_factor(probs, target, torch.tensor([2, 1, 0]), "confusion"),
                               torch.tensor([0.3, 0.75, 0.75]))
    assert adaptive_factor(probs, target, torch.tensor([2, 1, 0]), "constant").tolist() == [1.0, 1.0, 1.0]


def test_combine_is_the_formula_row_by_row() -> None:
    from guidance_engine import Prediction, StepInfo
    from guidance_engine.methods.gfcg import GFCGState

    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 2)
    a, s = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    out = {name: torch.randn(3, 4, 2, 2) for name in ("cond", "uncond", "ref2", "ref5")}
    state = GFCGState(target=torch.tensor([0, 1, 2]), reference=torch.tensor([2, -1, 5]),
                      factor=torch.tensor([1.0, 0.5, 0.25]), p_target=torch.zeros(3))
    step = StepInfo(index=3, num_steps=10, sigma=1.0, sigma_next=0.5, timestep=500.0)
    gfcg = GFCG(scale=2.0, cfg_scale=3.0)
    assert gfcg.branches(step, state).keys() == {"uncond", "cond", "gfcg_class_2", "gfcg_class_5"}
    preds = {"cond": Prediction(out["cond"], x, a, s, "epsilon"), "uncond": Prediction(out["uncond"], x, a, s, "epsilon"),
             "gfcg_class_2": Prediction(out["ref2"][:1], x[:1], a, s, "epsilon"),
             "gfcg_class_5": Prediction(out["ref5"][2:], x[2:], a, s, "epsilon")}
    got = gfcg.combine(preds, step, state).denoise.output
    c, u = out["cond"], out["uncond"]
    cfg = u + 3.0 * (c - u)
    want = torch.stack([cfg[0] + 2.0 * 1.0 * (c[0] - out["ref2"][0]),      # reference class 2
                        cfg[1] + 2.0 * 0.5 * (c[1] - u[1]),                # no estimate yet: the null row
                        cfg[2] + 2.0 * 0.25 * (c[2] - out["ref5"][2])])    # reference class 5
    torch.testing.assert_close(got, want)


class CraftedClassifier:
    """Images -> logits saying every image is class ``says`` (whatever the asked class)."""

    def __init__(self, says: int, classes: int) -> None:
        self.says, self.classes, self.calls = says, classes, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = torch.zeros(images.shape[0], self.classes)
        logits[:, self.says] = 5.0
        return logits


@pytest.fixture
def tiny_dit():
    return quiet(GuidedDiTPipeline(**tiny_dit_components(num_classes=12, learned_sigma=False)))


def test_reference_rows_are_the_class_the_classifier_says_in_the_one_forward(tiny_dit) -> None:
    seen = []
    tiny_dit.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["class_labels"].tolist()),
                                                   with_kwargs=True)
    judge = CraftedClassifier(says=5, classes=12)
    out = tiny_dit([0, 3], num_inference_steps=3, guidance=GFCG(scale=2.0), gfcg_classifier=judge,
                   generator=seeded(0), output_type="latent")
    # step 1: no estimate yet, the null class (12) is the reference; then the classifier's class 5
    assert seen == [[0, 3, 12, 12], [0, 3, 5, 5], [0, 3, 5, 5]] and out.nfe == 6 and judge.calls == 2
    assert out.guidance_state.reference.tolist() == [5, 5]
    # an image the classifier already calls right: the runner-up (here class 0 for target 5)
    seen.clear()
    tiny_dit([5], num_inference_steps=2, guidance=GFCG(scale=2.0, adaptive="constant"), gfcg_classifier=judge,
             generator=seeded(0), output_type="latent")
    assert seen == [[5, 12], [5, 0]]
    # with CFG: null, class and reference rows in one forward (3 NFE a step; 2 on the first)
    seen.clear()
    out = tiny_dit([0], num_inference_steps=3, guidance=GFCG(scale=2.0, cfg_scale=3.0), gfcg_classifier=judge,
                   generator=seeded(0), output_type="latent")
    assert seen == [[0, 12], [0, 12, 5], [0, 12, 5]] and out.nfe == 8


def test_scale_zero_is_cfg_bit_for_bit(tiny_dit) -> None:
    judge = CraftedClassifier(says=5, classes=12)
    for cfg_scale in (1.0, 4.0):
        gfcg = tiny_dit([0, 7], num_inference_steps=4, guidance=GFCG(scale=0.0, cfg_scale=cfg_scale),
                        gfcg_classifier=judge, generator=seeded(1), output_type="latent")
        cfg = tiny_dit([0, 7], num_inference_steps=4, guidance=CFG(scale=cfg_scale), generator=seeded(1),
                       output_type="latent")
        assert torch.equal(gfcg.images, cfg.images) and gfcg.nfe == cfg.nfe
    assert judge.calls == 0  # off: the classifier is not even run
    ones = tiny_dit([0, 7], num_inference_steps=4, guidance=GFCG(scale=2.0), gfcg_classifier=judge,
                    generator=seeded(1), output_type="latent")
    assert not torch.equal(ones.images, gfcg.images)


def test_first_step_is_cfg_at_one_plus_scale_with_the_null_reference(tiny_dit) -> None:
    judge = CraftedClassifier(says=5, classes=12)
    gfcg = tiny_dit([2], num_inference_steps=1, guidance=GFCG(scale=1.5), gfcg_classifier=judge,
                    generator=seeded(2), output_type="latent")
    cfg = tiny_dit([2], num_inference_steps=1, guidance=CFG(scale=2.5), generator=seeded(2), output_type="latent")
    torch.testing.assert_close(gfcg.images, cfg.images, rtol=1e-5, atol=1e-6)  # c + w (c - u) == u + (1 + w)(c - u)


# -- the shapes classes and prompts --------------------------------------------------------------

def test_shapes_classes_and_prompt_swaps() -> None:
    assert ID2LABEL[0] == "red circle" and ID2LABEL[shape_class("triangle", "yellow")] == "yellow triangle"
    assert swap_prompt("two red circles on a blue background, top left", "square", "green") == \
        "two green squares on a blue background, top left"
    assert swap_prompt("a large blue triangle on a red background", "circle", "yellow") == \
        "a large yellow circle on a red background"
    assert prompt_class(PROMPT) == shape_class("circle", "red")
    with pytest.raises(ValueError, match=r"needs prompts naming a shape .* and its colour"):
        prompt_class("a photo on a blue background")


# -- end to end ----------------------------------------------------------------------------------

def test_end_to_end_on_the_text_to_image_default_model() -> None:
    from guidance_engine.pipelines import load_pipeline

    pipe = quiet(load_pipeline(None))
    seen = []
    real = pipe.unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kwargs):
        seen.append(encoder_hidden_states.shape[0])
        return real(sample, timestep, encoder_hidden_states, **kwargs)

    pipe.unet.forward = spy
    try:
        out = pipe([PROMPT, "two green squares on a white background"], num_inference_steps=6,
                   guidance={"name": "gfcg", "scale": 2.0, "cfg_scale": 3.0}, generator=[seeded(0), seeded(1)],
                   output_type="np")
    finally:
        pipe.unet.forward = real
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all()
    assert seen == [4] + [6] * 5 and out.nfe == 17  # one forward a step: uncond, cond, reference rows
    assert out.guidance_state.target.tolist() == [0, 5] and out.guidance["cfg_scale"] == 3.0
    with pytest.raises(ValueError, match=r"GFCG on text-to-image needs prompts naming a shape"):
        pipe("a blue background", num_inference_steps=2, guidance="gfcg")


def test_end_to_end_on_the_class_conditional_default_model() -> None:
    from guidance_engine.pipelines.models import default_dit_model_path

    pipe = quiet(GuidedDiTPipeline.from_pretrained(default_dit_model_path()))
    assert pipe.null_class == 12 and pipe.id2label[4] == "red square"
    out = pipe(["red circle", "blue triangle"], num_inference_steps=6, guidance="gfcg",
               generator=[seeded(0), seeded(1)], output_type="np")
    assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all() and out.nfe == 12
    assert out.guidance_state.p_target.isfinite().all()


# -- bad parameters -------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: GFCG(scale=-1), r"gfcg: parameter 'scale' must be \[0, 100\], got -1"),
    (lambda: GFCG(cfg_scale=101), r"gfcg: parameter 'cfg_scale' must be \[0, 100\], got 101"),
    (lambda: GFCG(adaptive="softmax"), r"parameter 'adaptive' must be one of 'ratio', 'confusion', 'constant'"),
    (lambda: resolve_guidance({"name": "gfcg", "classifier": None}), r"has no parameter\(s\) classifier"),
])
def test_bad_parameters_name_the_parameter_range_and_value(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_config_round_trip_leaves_the_runtime_classifier_out(tiny_dit) -> None:
    gfcg = GFCG(scale=3.0, cfg_scale=2.0, adaptive="confusion")
    assert "classifier" not in gfcg.to_dict() and resolve_guidance(gfcg.to_dict()) == gfcg
    assert gfcg.with_classifier(CraftedClassifier(1, 12)) == gfcg  # the binding is not config


def test_pipelines_without_a_classifier_refuse_before_the_model(sdxl_pair, tiny_dit) -> None:
    _, guided = sdxl_pair
    calls = []
    guided.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"gfcg: GFCG needs a guide classifier of this model's classes and a prompt "
                                         r"per class; .* not for GuidedStableDiffusionXLPipeline"):
        guided(PROMPT, num_inference_steps=2, guidance="gfcg")
    tiny_dit.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"gfcg_classifier: GFCG needs a classifier of this model's classes"):
        tiny_dit([0], num_inference_steps=2, guidance="gfcg")  # its classes are not the shapes classes
    bad = CraftedClassifier(says=1, classes=5)  # wrong class count
    with pytest.raises(ValueError, match=r"classifier returned probabilities of shape \(1, 5\), expected \(1, 12\)"):
        tiny_dit([0], num_inference_steps=2, guidance="gfcg", gfcg_classifier=bad)
    assert calls == [1]  # the last one fails at the first classification, after one forward
