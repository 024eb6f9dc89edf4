"""GuidedFluxImg2ImgPipeline against the stock FluxImg2ImgPipeline on tiny random models: the stock
step-count rule (the first int(n - n * strength) steps skipped), the posterior sample and the noise
drawn in the stock order, the packed ``latents=`` start."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxImg2ImgPipeline

from guidance_engine.pipelines import GuidedFluxImg2ImgPipeline
from guidance_engine.samplers.loop import start_index
from guidance_engine.pipelines.toy.tiny_models import tiny_flux_components
from conftest import PROMPT, quiet, seeded

CALL = {"height": 32, "width": 32, "num_inference_steps": 4, "max_sequence_length": 16, "output_type": "latent"}


def _image(seed: int = 5) -> torch.Tensor:
    return torch.rand((1, 3, 32, 32), generator=seeded(seed))


@pytest.fixture
def flux_img2img_pair():
    stock = quiet(FluxImg2ImgPipeline(**tiny_flux_components(0)))
    return stock, quiet(GuidedFluxImg2ImgPipeline.from_pipe(stock))


@pytest.mark.parametrize("strength", [0.6, 0.75, 1.0])
def test_default_call_reproduces_stock_flux_img2img_bit_for_bit(flux_img2img_pair, strength) -> None:
    stock, guided = flux_img2img_pair
    want = stock(PROMPT, image=_image(), strength=strength, generator=seeded(0), **CALL).images
    got = guided(PROMPT, image=_image(), strength=strength, generator=seeded(0), **CALL)
    assert torch.equal(got.images, want)
    assert got.nfe == 4 - start_index(4, strength, rule="skip")


def test_true_cfg_decoded_batches_and_generator_lists_equal_stock(flux_img2img_pair) -> None:
    stock, guided = flux_img2img_pair
    kwargs = {**CALL, "output_type": "pt", "negative_prompt": ["blue", "red"], "true_cfg_scale": 3.0,
              "num_images_per_prompt": 2, "strength": 0.7}
    prompts = ["a red circle", "a blue square"]
    want = stock(prompts, image=_image(), generator=[seeded(i) for i in range(4)], **kwargs).images
    got = guided(prompts, image=_image(), generator=[seeded(i) for i in range(4)], **kwargs)
    assert torch.equal(got.images, want) and got.nfe_per_image == [6] * 4


def test_the_step_rule_is_the_stock_one_not_sds() -> None:
    """At 3 steps and strength 0.6 SD's rule runs int(1.8) = 1 step, Flux's skips int(1.2) = 1 and runs 2."""
    assert start_index(3, 0.6, rule="run") == 2 and start_index(3, 0.6, rule="skip") == 1
    with pytest.raises(ValueError, match=r"step_rule: must be one of"):
        start_index(3, 0.6, rule="floor")


def test_given_latents_are_the_noised_start_as_stock(flux_img2img_pair) -> None:
    stock, guided = flux_img2img_pair
    start = torch.randn((1, 64, 4), generator=seeded(7))
    want = stock(PROMPT, image=_image(), latents=start, strength=0.5, **CALL).images
    got = guided(PROMPT, image=_image(), latents=start, strength=0.5, **CALL)
    assert torch.equal(got.images, want) and got.nfe == 2


def test_the_output_keeps_the_input_size_and_methods_run(flux_img2img_pair) -> None:
    _, guided = flux_img2img_pair
    image = torch.rand((1, 3, 48, 32), generator=seeded(1))
    call = {k: v for k, v in CALL.items() if k not in ("height", "width")}
    out = guided(PROMPT, image=image, guidance="apg", generator=seeded(0), **call)
    assert tuple(out.images.shape) == (1, 96, 4) and torch.isfinite(out.images).all()
    assert out.nfe > 4 - start_index(4, 0.6, rule="skip")  # the unconditional branch ran


@pytest.mark.parametrize("strength", [0.0, 1.5, True])
def test_bad_strength_is_refused_before_any_forward(flux_img2img_pair, strength) -> None:
    _, guided = flux_img2img_pair
    guided.transformer.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the transformer ran"))
    with pytest.raises(ValueError, match=r"strength: must be in \(0, 1\]"):
        guided(PROMPT, image=_image(), strength=strength, generator=seeded(0), **CALL)


def test_fkc_prior_weighting_is_refused_on_a_noised_image(flux_img2img_pair) -> None:
    _, guided = flux_img2img_pair
    with pytest.raises(ValueError, match=r"starts from a noised image"):
        guided(PROMPT, image=_image(), guidance={"name": "fkc", "particles": 2, "target": "anneal", "scale": 2.0},
               sampler="euler_ancestral", generator=seeded(0), **CALL)


def test_the_cli_runs_img2img_on_a_flux_checkpoint_and_refuses_inpainting_before_loading(tmp_path, capsys) -> None:
    from diffusers import FluxPipeline
    from PIL import Image

    from guidance_engine.pipelines.apps.cli import main

    FluxPipeline(**tiny_flux_components(0)).save_pretrained(tmp_path / "flux", safe_serialization=True)
    Image.fromarray((torch.rand((32, 32, 3), generator=seeded(2)) * 255).to(torch.uint8).numpy()).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["img2img", str(tmp_path / "in.png"), PROMPT, "--model", str(tmp_path / "flux"), "--steps", "4",
                 "--strength", "0.5", "--method", "apg", "-o", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    capsys.readouterr()
    assert main(["img2img", str(tmp_path / "in.png"), PROMPT, "--model", str(tmp_path / "flux"), "--mask",
                 str(tmp_path / "in.png"), "-o", str(tmp_path / "inpaint.png")]) == 2
    err = capsys.readouterr().err
    assert "inpainting needs a Stable Diffusion 1.x/2.x or SDXL checkpoint" in err and "Loading" not in err
    assert not (tmp_path / "inpaint.png").exists()
