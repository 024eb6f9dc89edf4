"""CFGRenorm (Qwen-Image's true CFG): its identity case, the formula against an independent
per-token computation, the stock packed-token arithmetic bit for bit, tokens of zero norm."""

from __future__ import annotations

import pytest
import torch

from guidance_engine import Prediction, StepInfo, resolve_guidance
from guidance_engine.methods.cfg_renorm import CFGRenorm, patch_image, patch_tokens

STEP = StepInfo(index=1, num_steps=4, sigma=1.0, sigma_next=0.5, timestep=500.0)


def _preds(seed: int, shape: tuple[int, ...] = (3, 4, 6, 8), kind: str = "flow") -> dict[str, Prediction]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    a, s = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    return {b: Prediction(torch.randn(shape, generator=generator), x, a, s, kind) for b in ("cond", "uncond")}


def _per_token(c: torch.Tensor, u: torch.Tensor, scale: float, patch: int) -> torch.Tensor:
    """The rule written out token by token, in float64: each p x p patch of every sample as one vector."""
    c, u = c.double(), u.double()
    out = torch.empty_like(c)
    b, _, h, w = c.shape
    for n in range(b):
        for i in range(0, h, patch):
            for j in range(0, w, patch):
                cell = (n, slice(None), slice(i, i + patch), slice(j, j + patch))
                g = u[cell] + scale * (c[cell] - u[cell])
                out[cell] = g * (c[cell].norm() / g.norm())
    return out


def test_scale_one_is_the_conditional_prediction_alone() -> None:
    preds = _preds(0)
    method = CFGRenorm(scale=1.0)
    assert method.branches(STEP, None) == ("cond",)
    got = method.combine({"cond": preds["cond"]}, STEP, None).denoise
    assert got.output is preds["cond"].output
    # with both branches at scale 1 the guided output is the conditional one (up to rounding)
    both = method.combine(preds, STEP, None).denoise.output
    torch.testing.assert_close(both, preds["cond"].output, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_the_formula_equals_an_independent_per_token_computation(scale: float, patch: int) -> None:
    preds = _preds(1)
    got = CFGRenorm(scale=scale, patch=patch).combine(preds, STEP, None).denoise.output
    want = _per_token(preds["cond"].output, preds["uncond"].output, scale, patch)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_each_token_has_the_conditional_norm_and_the_guided_direction() -> None:
    preds = _preds(2)
    c, u = preds["cond"].output, preds["uncond"].output
    got = patch_tokens(CFGRenorm(scale=5.0).combine(preds, STEP, None).denoise.output, 2)
    torch.testing.assert_close(got.norm(dim=-1), patch_tokens(c, 2).norm(dim=-1), rtol=1e-5, atol=1e-6)
    guided = patch_tokens(u + 5.0 * (c - u), 2)
    cosine = torch.nn.functional.cosine_similarity(got, guided, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=1e-5)


def test_the_stock_packed_token_arithmetic_bit_for_bit() -> None:
    """The QwenImagePipeline loop's lines on its packed (B, tokens, C * 4) outputs, unpacked."""
    preds = _preds(3)
    cond, neg = patch_tokens(preds["cond"].output, 2), patch_tokens(preds["uncond"].output, 2)
    comb = neg + 4.0 * (cond - neg)
    stock = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    got = CFGRenorm(scale=4.0).combine(preds, STEP, None).denoise.output
    assert torch.equal(got, patch_image(stock, got.shape, 2))


def test_patching_is_a_permutation_inverted_exactly() -> None:
    x = torch.randn(2, 3, 6, 4, generator=torch.Generator().manual_seed(4))
    for patch in (1, 2):
        tokens = patch_tokens(x, patch)
        assert tokens.shape == (2, 6 * 4 // patch ** 2, 3 * patch ** 2)
        assert torch.equal(patch_image(tokens, x.shape, patch), x)
    assert torch.equal(patch_tokens(x, 2)[0, 0], x[0, :, :2, :2].reshape(-1))  # (channel, row, column) order


def test_a_token_of_zero_guided_norm_is_left_as_it_is() -> None:
    """Where the guided token is zero (here: equal branches at scale 0 give u there) the stock
    arithmetic divides 0 by 0; the method keeps the zero token and no NaN reaches the others."""
    preds = _preds(5, shape=(1, 2, 4, 4))
    u = preds["uncond"].output.clone()
    u[0, :, :2, :2] = 0.0  # one 2 x 2 token of the unconditional output is zero
    preds["uncond"] = preds["uncond"].with_output(u)
    got = CFGRenorm(scale=0.0).combine(preds, STEP, None).denoise.output  # g = u
    assert torch.isfinite(got).all()
    assert torch.equal(got[0, :, :2, :2], torch.zeros(2, 2, 2))
    want = _per_token(preds["cond"].output[:, :, 2:, 2:], u[:, :, 2:, 2:], 0.0, 2)
    torch.testing.assert_close(got[:, :, 2:, 2:].double(), want, rtol=1e-5, atol=1e-6)


def test_outside_the_interval_it_is_the_conditional_prediction() -> None:
    preds = _preds(6)
    method = CFGRenorm(scale=4.0, start=0.5)
    assert method.branches(STEP, None) == ("cond",)
    assert method.combine({"cond": preds["cond"]}, STEP, None).denoise is preds["cond"]


def test_eps_outputs_are_renormed_on_the_raw_output() -> None:
    preds = _preds(7, kind="epsilon")
    got = CFGRenorm(scale=3.0).combine(preds, STEP, None).denoise
    assert got.kind == "epsilon"
    want = _per_token(preds["cond"].output, preds["uncond"].output, 3.0, 2)
    torch.testing.assert_close(got.output.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec, message", [
    ({"scale": -1.0}, r"cfg_renorm: parameter 'scale' must be \[0, 100\], got -1.0"),
    ({"patch": 0}, r"cfg_renorm: parameter 'patch' must be an integer in \[1, 64\], got 0"),
    ({"patch": 1.5}, r"cfg_renorm: parameter 'patch' must be an integer in \[1, 64\], got 1.5"),
])
def test_bad_parameters_are_refused(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_guidance({"name": "cfg_renorm", **spec})


def test_latents_the_patch_does_not_divide_are_refused() -> None:
    preds = _preds(8, shape=(1, 4, 6, 6))
    with pytest.raises(ValueError, match=r"parameter 'patch' \(4\) must divide .* got latents of shape \(1, 4, 6, 6\)"):
        CFGRenorm(scale=2.0, patch=4).combine(preds, STEP, None)


def test_video_latents_are_renormed_frame_by_frame() -> None:
    """(B, C, F, H, W): each frame's p x p tokens, exactly as that frame alone as an image."""
    from guidance_engine.methods.cfg_renorm import renormed

    generator = torch.Generator().manual_seed(5)
    guided, cond = (torch.randn(2, 3, 4, 6, 8, generator=generator) for _ in range(2))
    video = renormed(guided, cond, 2)
    for frame in range(4):
        assert torch.equal(video[:, :, frame], renormed(guided[:, :, frame], cond[:, :, frame], 2))
