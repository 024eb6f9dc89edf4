"""InstructPix2Pix: the two-condition CFG method (its identities, its formula against independent
computations) and the guided pipeline (equal to the stock diffusers pipeline bit for bit, the
branches' conditioning, other methods, bad input refused before the UNet runs, loading)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline
from PIL import Image

from guidance_engine import Prediction, StepInfo, resolve_guidance
from guidance_engine.methods.cfg import CFG
from guidance_engine.methods.dual_cfg import IMAGE, DualCFG
from guidance_engine.pipelines.instruct_pix2pix import GuidedStableDiffusionInstructPix2PixPipeline as Guided
from guidance_engine.pipelines.models import pipeline_class_for
from guidance_engine.pipelines.toy.tiny_instruct_pix2pix import tiny_instruct_pix2pix_components
from guidance_engine.pipelines.toy.tiny_models import TINY_IMAGE_SIZE

from conftest import quiet

PROMPTS = ["make it red", "turn the circle into a square"]
STEPS = 3
EPS32 = torch.finfo(torch.float32).eps


# -- the method on random predictions ------------------------------------------------------------
def _preds(seed: int = 0, kind: str = "epsilon") -> dict[str, Prediction]:
    """Three branches on one input, of different spreads (so that no two terms cancel exactly)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 6, 6, generator=generator)
    a, s = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    outputs = [torch.randn(x.shape, generator=generator) * spread for spread in (1.0, 0.7, 1.3)]
    return {name: Prediction(out, x, a, s, kind) for name, out in zip(("cond", IMAGE, "uncond"), outputs)}


def _step(index: int = 1, num_steps: int = 4) -> StepInfo:
    return StepInfo(index=index, num_steps=num_steps, sigma=1.0, sigma_next=0.5, timestep=500.0)


def _guided(method, preds: dict[str, Prediction]) -> torch.Tensor:
    return method.combine(preds, _step(), None).denoise.output


def _cfg(scale: float, cond: Prediction, uncond: Prediction) -> torch.Tensor:
    """The engine's CFG between two given predictions."""
    return _guided(CFG(scale=scale), {"cond": cond, "uncond": uncond})


def test_registered_with_the_diffusers_defaults_and_checked_ranges() -> None:
    method = resolve_guidance("dual_cfg")
    assert isinstance(method, DualCFG) and (method.scale, method.image_scale, method.style) == (7.5, 1.5, "regular")
    assert method.required_branches() == {"cond", IMAGE, "uncond"}
    for bad in (-0.5, 100.5):
        with pytest.raises(ValueError, match=rf"dual_cfg: parameter 'image_scale' must be \[0, 100\], got {bad}"):
            DualCFG(image_scale=bad)
    with pytest.raises(ValueError, match=r"dual_cfg: parameter 'scale' must be \[0, 100\], got 101"):
        DualCFG(scale=101.0)
    with pytest.raises(ValueError, match=r"dual_cfg: parameter 'style' must be one of 'regular', 'nested', got 'x'"):
        DualCFG(style="x")


@pytest.mark.parametrize("style", ["regular", "nested"])
def test_both_scales_one_is_the_conditional_prediction_alone(style) -> None:
    preds = _preds(0)
    method = DualCFG(scale=1.0, image_scale=1.0, style=style)
    assert method.branches(_step(), None) == ("cond",)  # one forward row per image
    assert torch.equal(_guided(method, {"cond": preds["cond"]}), preds["cond"].output)
    outside = DualCFG(sigma_max=0.5, style=style)  # the interval excludes sigma 1: off
    assert outside.branches(_step(), None) == ("cond",)
    assert DualCFG(style=style).branches(_step(), None) == ("cond", IMAGE, "uncond")  # the stock row order


@pytest.mark.parametrize("scale, image_scale", [(7.5, 1.5), (3.0, 0.0), (0.0, 2.0), (1.0, 1.7), (12.0, 4.0)])
def test_formula_against_independent_computations(scale, image_scale) -> None:
    """Regular: the stock float32 expression bit for bit (its summation order), and IP2P's and
    ComfyUI's writings in float64; nested: ComfyUI's nested writing in float64."""
    preds = _preds(1)
    c, i, u = (preds[name].output for name in ("cond", IMAGE, "uncond"))
    stock = u + scale * (c - i) + image_scale * (i - u)  # diffusers' line, float32
    regular = _guided(DualCFG(scale=scale, image_scale=image_scale), preds)
    assert torch.equal(regular, stock)
    c64, i64, u64 = c.double(), i.double(), u.double()
    paper = u64 + image_scale * (i64 - u64) + scale * (c64 - i64)
    comfy_cfg = lambda cond, uncond, w: uncond + (cond - uncond) * w  # noqa: E731 (cfg_function's rule)
    comfy_regular = comfy_cfg(i64, u64, image_scale) + (c64 - i64) * scale
    comfy_nested = comfy_cfg(comfy_cfg(c64, i64, scale), u64, image_scale)
    torch.testing.assert_close(regular.double(), paper, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(regular.double(), comfy_regular, rtol=1e-5, atol=1e-5)
    nested = _guided(DualCFG(scale=scale, image_scale=image_scale, style="nested"), preds)
    torch.testing.assert_close(nested.double(), comfy_nested, rtol=1e-5, atol=1e-5)


def test_the_rule_is_the_same_in_x0_space() -> None:
    """The weights sum to one: the x0 of the guided output is the rule applied to the x0s."""
    preds = _preds(2, kind="v_prediction")
    guided = DualCFG(scale=6.0, image_scale=1.8).combine(preds, _step(), None).denoise
    c, i, u = (preds[name].x0.double() for name in ("cond", IMAGE, "uncond"))
    torch.testing.assert_close(guided.x0.double(), u + 6.0 * (c - i) + 1.8 * (i - u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["regular", "nested"])
def test_text_scale_zero_is_cfg_on_the_image_bit_for_bit(style) -> None:
    """s = 0: u + s_img (i - u); the text term adds an exact zero, so it is CFG at s_img between
    the image branch (as the conditional) and the unconditional one, bit for bit."""
    preds = _preds(3)
    got = _guided(DualCFG(scale=0.0, image_scale=2.5, style=style), preds)
    assert torch.equal(got, _cfg(2.5, preds[IMAGE], preds["uncond"]))


def test_a_condition_that_changes_nothing_leaves_cfg_bit_for_bit() -> None:
    """i = u (the image changes nothing): CFG at s between cond and uncond; c = i (the text changes
    nothing): CFG at s_img between cond and uncond. The vanishing term is an exact zero."""
    preds = _preds(4)
    no_image = {**preds, IMAGE: preds["uncond"]}
    assert torch.equal(_guided(DualCFG(scale=5.0, image_scale=1.5), no_image),
                       _cfg(5.0, preds["cond"], preds["uncond"]))
    no_text = {**preds, IMAGE: preds["cond"]}
    assert torch.equal(_guided(DualCFG(scale=5.0, image_scale=1.5), no_text),
                       _cfg(1.5, preds["cond"], preds["uncond"]))


def _within_rounding(got: torch.Tensor, want: torch.Tensor, preds: dict[str, Prediction], scale: float,
                     image_scale: float) -> None:
    """|got - want| within a few float32 roundings of the terms' size: each side is a few rounded
    operations on terms of at most (1 + s)(1 + s_img) times the branches' summed magnitude."""
    size = sum(pred.output.abs() for pred in preds.values()) * (1 + scale) * (1 + image_scale)
    assert torch.all((got - want).abs() <= 8 * EPS32 * size)


def test_identities_within_float32_rounding() -> None:
    """image_scale 1: CFG at s between cond and image; scale = image_scale: CFG between cond and
    uncond; nested scale 1 / image_scale 1 likewise; nested (s, s_img) = regular (s s_img, s_img).
    Mathematically exact; in float32 the three-term sum rounds each term before u (or i) cancels,
    so they agree to rounding only (and do differ in some elements here)."""
    preds = _preds(5)
    c, i, u = preds["cond"], preds[IMAGE], preds["uncond"]
    image_one = _guided(DualCFG(scale=7.5, image_scale=1.0), preds)
    _within_rounding(image_one, _cfg(7.5, c, i), preds, 7.5, 1.0)
    assert not torch.equal(image_one, _cfg(7.5, c, i))  # why the tolerance: the roundings differ
    _within_rounding(_guided(DualCFG(scale=4.0, image_scale=4.0), preds), _cfg(4.0, c, u), preds, 4.0, 4.0)
    _within_rounding(_guided(DualCFG(scale=1.0, image_scale=3.0, style="nested"), preds), _cfg(3.0, c, u),
                     preds, 1.0, 3.0)
    _within_rounding(_guided(DualCFG(scale=6.0, image_scale=1.0, style="nested"), preds), _cfg(6.0, c, i),
                     preds, 6.0, 1.0)
    _within_rounding(_guided(DualCFG(scale=3.0, image_scale=2.0, style="nested"), preds),
                     _guided(DualCFG(scale=6.0, image_scale=2.0), preds), preds, 3.0, 2.0)


def test_the_schedule_shapes_both_scales() -> None:
    method = DualCFG(scale=5.0, image_scale=2.0, schedule="linear")
    for index in range(4):
        p = index / 4
        assert method.scales_at(_step(index)) == pytest.approx((1 + 4.0 * 2 * p, 1 + 1.0 * 2 * p))
    assert method.branches(_step(0), None) == ("cond",)  # both start at 1


# -- the pipeline --------------------------------------------------------------------------------
def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3), np.uint8)
    pixels[:] = rng.integers(0, 255, 3)
    pixels[8:24, 8:24] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def components():
    return tiny_instruct_pix2pix_components(0)


def _pair(components, scheduler=None):
    """(stock, guided) pipelines on shared models, each call with a fresh scheduler."""
    parts = {**components, "scheduler": copy.deepcopy(scheduler or components["scheduler"])}
    stock = quiet(StableDiffusionInstructPix2PixPipeline(**parts, requires_safety_checker=False))
    return stock, quiet(Guided.from_pipe(stock))


def _generators(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + k) for k in range(n)]


@pytest.mark.filterwarnings("ignore:You have passed 4 text prompts")  # the stock pipeline's repeat notice
@pytest.mark.parametrize("scheduler", ["euler_ancestral", "ddim"])
@pytest.mark.parametrize("output_type", ["latent", "pt"])
def test_guidance_none_equals_the_stock_pipeline_bit_for_bit(components, scheduler, output_type) -> None:
    """Two prompts, two images per prompt, one generator per image, one input image per prompt."""
    ddim = DDIMScheduler.from_config(components["scheduler"].config) if scheduler == "ddim" else None
    assert ddim is None or ddim.config.steps_offset == 1
    stock, ours = _pair(components, ddim)
    kwargs = dict(prompt=PROMPTS, image=[_image(0), _image(1)], num_inference_steps=STEPS,
                  num_images_per_prompt=2, output_type=output_type)
    want = stock(**kwargs, generator=_generators(4)).images
    got = ours(**kwargs, generator=_generators(4))
    assert torch.equal(got.images, want)
    assert got.nfe_per_image == [3 * STEPS] * 4  # cond, image, uncond: one batched forward per step
    assert got.guidance["name"] == "dual_cfg" and (got.guidance["scale"], got.guidance["image_scale"]) == (7.5, 1.5)


@pytest.mark.parametrize("guidance_scale, image_guidance_scale", [(1.0, 1.5), (7.5, 0.5), (4.0, 2.0)])
def test_guidance_none_keeps_the_stock_rule_of_when_to_guide(components, guidance_scale, image_guidance_scale):
    """The stock pipeline guides only when guidance_scale > 1 and image_guidance_scale >= 1, else
    it runs the conditional rows alone: so does guidance=None."""
    stock, ours = _pair(components)
    kwargs = dict(prompt=PROMPTS[0], image=_image(2), num_inference_steps=2, guidance_scale=guidance_scale,
                  image_guidance_scale=image_guidance_scale, output_type="latent")
    want = stock(**kwargs, generator=torch.Generator().manual_seed(1)).images
    got = ours(**kwargs, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got.images, want)
    guides = guidance_scale > 1 and image_guidance_scale >= 1
    assert got.nfe == (3 if guides else 1) * 2


def _record_unet_inputs(unet) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], object]:
    """(calls, hook handle): each UNet call's input and text embeddings."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module, args, kwargs):
        calls.append((args[0].clone(), kwargs["encoder_hidden_states"].clone()))

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_each_branch_sees_its_text_and_image(components) -> None:
    """dual_cfg's rows [cond, image, uncond] and CFG's [uncond, cond]: the extra channels are the
    image's VAE mode latents (zeros for uncond), the text the prompt's or the empty prompt's
    embeddings, computed here from the tokenizer, text encoder and VAE directly."""
    _, ours = _pair(components)
    image = _image(3)
    with torch.no_grad():
        ids = lambda text: ours.tokenizer(text, padding="max_length", max_length=77,  # noqa: E731
                                          return_tensors="pt").input_ids
        prompt_text, empty_text = ours.text_encoder(ids(PROMPTS[0]))[0], ours.text_encoder(ids(""))[0]
        image_latents = ours.vae.encode(ours.image_processor.preprocess(image)).latent_dist.mode()
    zeros = torch.zeros_like(image_latents)
    layouts = {"dual_cfg": [(prompt_text, image_latents), (empty_text, image_latents), (empty_text, zeros)],
               "cfg": [(empty_text, zeros), (prompt_text, image_latents)]}
    for guidance, rows in layouts.items():
        calls, handle = _record_unet_inputs(ours.unet)
        try:
            ours(PROMPTS[0], image=image, num_inference_steps=1, guidance=guidance, output_type="latent")
        finally:
            handle.remove()
        (sample, text), = calls
        assert sample.shape[:2] == (len(rows), 8)
        for row, (want_text, want_image) in enumerate(rows):
            assert torch.equal(sample[row, 4:], want_image[0]), (guidance, row)
            assert torch.equal(text[row], want_text[0]), (guidance, row)


@pytest.mark.parametrize("guidance, nfe_per_step", [
    ("apg", 2), ("pag", 3), ("cfg", 2), ({"name": "dual_cfg", "style": "nested"}, 3)])
def test_other_methods_run_finite(components, guidance, nfe_per_step) -> None:
    """CFG / APG guide from uncond (empty text, zero image) to cond; PAG adds its perturbed cond rows."""
    _, ours = _pair(components)
    out = ours(PROMPTS, image=_image(4), num_inference_steps=2, guidance=guidance, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 4, 16, 16) and torch.isfinite(out.images).all()
    assert out.nfe == nfe_per_step * 2


def _refuse_unet(pipe, monkeypatch) -> None:
    """Make any UNet call fail (until the test ends: the models are shared by the module's tests)."""
    def forward(*args, **kwargs):
        raise AssertionError("the UNet ran before the input was checked")
    monkeypatch.setattr(pipe.unet, "forward", forward)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_guidance_scale=-1.0), r"dual_cfg: parameter 'image_scale' must be \[0, 100\], got -1.0"),
    (dict(image_guidance_scale=150.0), r"dual_cfg: parameter 'image_scale' must be \[0, 100\], got 150.0"),
    (dict(image=None), r"image: an input image is required"),
    (dict(image=[_image(0)] * 3), r"image: 3 images cannot be spread over 2 outputs"),
    (dict(guidance=DualCFG(), image_guidance_scale=2.0), r"guidance_scale/image_guidance_scale: set them on the "),
    (dict(guidance="apg", image_guidance_scale=2.0), r"method 'apg' has no parameter\(s\) image_scale"),
    (dict(guidance="icg"), r"method 'icg' needs branch\(es\) \['icg_random_tokens'\]"),
    (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["image_latents"]),
     r"callback_on_step_end_tensor_inputs: this pipeline offers \['latents', 'prompt_embeds'\]"),
    (dict(ip_adapter_image=_image(0)), r"unsupported argument\(s\) \['ip_adapter_image'\]"),
])
def test_bad_input_is_refused_before_the_unet_runs(components, kwargs, message, monkeypatch) -> None:
    _, ours = _pair(components)
    _refuse_unet(ours, monkeypatch)
    call = {"prompt": PROMPTS, "image": _image(0), "num_inference_steps": 2, "output_type": "latent", **kwargs}
    with pytest.raises(ValueError, match=message):
        ours(**call)


def test_a_unet_without_the_image_channels_is_refused(components, monkeypatch) -> None:
    from guidance_engine.pipelines.toy.tiny_models import tiny_sd_components

    _, ours = _pair(components)
    ours.unet = tiny_sd_components(0)["unet"]  # 4 input channels: a text-to-image UNet
    _refuse_unet(ours, monkeypatch)
    with pytest.raises(ValueError, match=r"unet: InstructPix2Pix needs a UNet with 8 input channels .* got 4"):
        ours(PROMPTS[0], image=_image(0), num_inference_steps=2)


def test_save_pretrained_of_the_stock_pipeline_loads_as_the_guided_one(components, tmp_path) -> None:
    stock, _ = _pair(components)
    stock.save_pretrained(tmp_path)
    loaded = quiet(Guided.from_pretrained(tmp_path))
    assert type(loaded) is Guided and pipeline_class_for(tmp_path) is Guided
    kwargs = dict(prompt=PROMPTS[0], image=_image(5), num_inference_steps=2, output_type="latent")
    want = stock(**kwargs, generator=torch.Generator().manual_seed(2)).images
    assert torch.equal(loaded(**kwargs, generator=torch.Generator().manual_seed(2)).images, want)


def test_from_pipe_shares_the_components_and_leaves_the_stock_pipeline_as_it_was(components) -> None:
    stock, ours = _pair(components)
    assert type(ours) is Guided
    assert all(getattr(ours, name) is getattr(stock, name) for name in ("unet", "vae", "text_encoder", "tokenizer"))
    kwargs = dict(prompt=PROMPTS[0], image=_image(6), num_inference_steps=2, output_type="latent")
    before = stock(**kwargs, generator=torch.Generator().manual_seed(3)).images
    ours(**kwargs, guidance="pag", generator=torch.Generator().manual_seed(3))  # installs row-aware processors
    assert torch.equal(stock(**kwargs, generator=torch.Generator().manual_seed(3)).images, before)
