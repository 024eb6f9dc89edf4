"""Branches of other prompts on every text family (pipelines/conditions.add_text_branches):
Perp-Neg's several weighted negatives, each its own branch, and ICG's independent conditions
(random-token prompts or noise) where the family has no provider of its own.

Oracles: the authors' summed rule on random predictions; on every family, one weighted negative
of `negatives` == the call's negative prompt at that `neg_scale`, bit for bit (the two encodings
and row layouts must be the same); zero weights == CFG with no extra forward."""

from __future__ import annotations

import pytest
import torch

from guidance_engine import Prediction, StepInfo, resolve_guidance
from guidance_engine.methods import ICG, PerpNeg
from guidance_engine.methods.perp_neg import perp_neg
from test_family_methods import FAMILIES

TEXT_FAMILIES = [family for family in FAMILIES if family != "DiT"]
NEGATIVE, OTHER = "a green square", "a blue circle"


def _step() -> StepInfo:
    return StepInfo(index=0, num_steps=2, sigma=1.0, sigma_next=0.5, timestep=500.0)


def _preds(names, seed: int = 0) -> dict[str, Prediction]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, 5, generator=generator)
    a, s = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    base = torch.randn(x.shape, generator=generator)
    return {name: Prediction(base + 0.5 * torch.randn(x.shape, generator=generator), x, a, s, "epsilon")
            for name in names}


def test_several_negatives_are_the_authors_weighted_sum_per_sample() -> None:
    """eps_u + w (d_c - sum_i w_i perp(d_n_i, d_c)), the projection per sample, in float64 here."""
    method = PerpNeg(scale=5.0, negatives=[(NEGATIVE, 1.0), (OTHER, 0.5)])
    preds = _preds(["cond", "uncond", "negative_1", "negative_2"])
    got = method.combine(preds, _step(), None).denoise.output.double()
    c, u = preds["cond"].output.double(), preds["uncond"].output.double()
    d_c = c - u
    want = d_c.clone()
    for name, weight in (("negative_1", 1.0), ("negative_2", 0.5)):
        d_n = preds[name].output.double() - u
        coeff = (d_n * d_c).flatten(1).sum(1) / (d_c * d_c).flatten(1).sum(1)
        want -= weight * (d_n - coeff.view(-1, 1, 1, 1) * d_c)
    assert torch.allclose(got, u + 5.0 * want, atol=1e-5)
    assert torch.equal(perp_neg(c, u, [preds["negative_1"].output.double()], 5.0, [1.0]),
                       perp_neg(c, u, preds["negative_1"].output.double(), 5.0, 1.0))


def test_negatives_forms_branches_and_refusals() -> None:
    method = PerpNeg(negatives="a green square:1 | a blue circle, soft:0.5 | text")
    assert method.negatives == ((NEGATIVE, 1.0), ("a blue circle, soft", 0.5), ("text", 1.0))
    assert method.branch_prompts() == {"negative_1": NEGATIVE, "negative_2": "a blue circle, soft",
                                       "negative_3": "text"}
    assert method.required_branches() == {"cond", "uncond", "negative_1", "negative_2", "negative_3"}
    assert method.branches(_step(), None) == ("uncond", "negative_1", "negative_2", "negative_3", "cond")
    assert resolve_guidance(method.to_dict()) == method
    zero = PerpNeg(negatives=[(NEGATIVE, 0.0)])
    assert zero.branches(_step(), None) == ("uncond", "cond")  # a zero weight costs no forward
    preds = _preds(["cond", "uncond"])
    assert torch.equal(zero.combine(preds, _step(), None).denoise.output,
                       resolve_guidance("cfg", scale=7.5).combine(preds, _step(), None).denoise.output)
    for bad in ([("x", 101.0)], [("", 1.0)], [("x",)], "x:-1", 5):
        with pytest.raises(ValueError, match=r"perp_neg: parameter 'negatives' must be a list of \(prompt, weight\)"):
            PerpNeg(negatives=bad)


@pytest.fixture(scope="module")
def pipes():
    built = {}
    for family in TEXT_FAMILIES:
        pipe, network, inputs = FAMILIES[family]()
        pipe.set_progress_bar_config(disable=True)
        built[family] = (pipe, inputs)
    return built


def _run(pipe, inputs, guidance, **kwargs):
    return pipe(**inputs, guidance=guidance, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_one_weighted_negative_equals_the_call_negative_prompt_on_every_family(pipes, family) -> None:
    pipe, inputs = pipes[family]
    call = _run(pipe, inputs, PerpNeg(scale=4.0, neg_scale=0.7), negative_prompt=NEGATIVE)
    listed = _run(pipe, inputs, PerpNeg(scale=4.0, negatives=[(NEGATIVE, 0.7)]))
    assert torch.equal(call.images, listed.images)
    assert listed.nfe_per_image == call.nfe_per_image == [6.0]


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_two_negatives_and_a_plain_negative_prompt_on_every_family(pipes, family) -> None:
    """Two weighted negatives (4 forwards a step), with the call's negative prompt as CFG's usual
    negative in "uncond": each negative changes the result."""
    pipe, inputs = pipes[family]
    both = _run(pipe, inputs, PerpNeg(scale=4.0, negatives=[(NEGATIVE, 1.0), (OTHER, 0.5)]),
                negative_prompt="a red circle")
    assert torch.isfinite(both.images).all() and both.nfe_per_image == [8.0]
    one = _run(pipe, inputs, PerpNeg(scale=4.0, negatives=[(NEGATIVE, 1.0)]), negative_prompt="a red circle")
    assert not torch.equal(both.images, one.images)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
@pytest.mark.parametrize("condition", ["random_tokens", "noise"])
def test_icg_runs_on_every_text_family_seeded_and_redrawn(pipes, family, condition) -> None:
    pipe, inputs = pipes[family]
    method = ICG(scale=3.0, condition=condition)
    first = _run(pipe, inputs, method)
    again = _run(pipe, inputs, method)
    assert torch.isfinite(first.images).all() and first.nfe_per_image == [4.0]
    assert torch.equal(first.images, again.images)  # drawn from the call's generator
    cfg = _run(pipe, inputs, resolve_guidance("cfg", scale=3.0))
    assert not torch.equal(first.images, cfg.images)  # y_hat is not the empty prompt


def test_random_prompt_conditions_are_redrawn_every_step_and_keep_the_family_keys(pipes) -> None:
    """The provider behind ICG on the families without one of their own: every call a new prompt
    of random tokens through the family's encoding; noise at the embeddings' std."""
    from guidance_engine.pipelines import conditions

    pipe, _ = pipes["SDXL"]
    captured = []

    def encode(texts):
        captured.append(texts)
        return {"encoder_hidden_states": pipe.encode_prompt(texts, device="cpu", num_images_per_prompt=1,
                                                            do_classifier_free_guidance=False)[0]}

    cond = {"encoder_hidden_states": torch.randn(2, 8, 4)}
    providers = conditions.random_prompt_conditions(pipe, cond, encode, batch_size=2,
                                                    generator=torch.Generator().manual_seed(3))
    one, two = providers["icg_random_tokens"](), providers["icg_random_tokens"]()
    assert len(captured) == 2 and captured[0] != captured[1] and len(captured[0]) == 2
    assert one["encoder_hidden_states"].shape[0] == 2 and not torch.equal(one["encoder_hidden_states"],
                                                                         two["encoder_hidden_states"])
    noise = providers["icg_noise"]()
    assert noise["encoder_hidden_states"].shape == cond["encoder_hidden_states"].shape
    assert abs(float(noise["encoder_hidden_states"].std()) / float(cond["encoder_hidden_states"].std()) - 1) < 0.35


def test_perp_neg_on_sd3_now_runs_with_the_negative_prompt(pipes) -> None:
    pipe, inputs = pipes["SD3"]
    out = _run(pipe, inputs, PerpNeg(scale=4.0), negative_prompt=NEGATIVE)
    assert torch.isfinite(out.images).all() and out.nfe_per_image == [6.0]
    plain = _run(pipe, inputs, resolve_guidance("cfg", scale=4.0), negative_prompt=NEGATIVE)
    assert not torch.equal(out.images, plain.images)
