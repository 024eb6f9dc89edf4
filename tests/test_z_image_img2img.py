"""GuidedZImageImg2ImgPipeline against the stock ZImageImg2ImgPipeline on tiny random models: the
stock step-count rule (the first int(n - n * strength) steps skipped), the posterior sample and the
noise drawn in the stock order and dtype, the stock CFG with its norm cap and its truncation on the
steps that run, the ``latents=`` start."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImagePipeline

from guidance_engine.pipelines.toy.tiny_z_image import tiny_z_image_components
from guidance_engine.pipelines.z_image_img2img import GuidedZImageImg2ImgPipeline
from guidance_engine.samplers.loop import start_index
from conftest import PROMPT, quiet, seeded

CALL = {"num_inference_steps": 4, "max_sequence_length": 64, "output_type": "latent"}
#: one image's latents: 4 channels at 16 x 16 (32 x 32 pixels)
LATENTS = (1, 4, 16, 16)


def _image(seed: int = 5, images: int = 1) -> torch.Tensor:
    return torch.rand((images, 3, 32, 32), generator=seeded(seed))


def steps_run(strength: float, steps: int = 4) -> int:
    return steps - start_index(steps, strength, rule="skip")


@pytest.fixture
def z_pair():
    stock = quiet(ZImageImg2ImgPipeline(**tiny_z_image_components(0)))
    return stock, quiet(GuidedZImageImg2ImgPipeline.from_pipe(stock))


def forwards(pipe) -> tuple[list[int], object]:
    """The samples of every transformer forward (recorded by a hook, which the caller removes)."""
    rows: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    return rows, handle


def refuse_forwards(pipe) -> list[str]:
    """Replace the transformer's, the text encoder's and the VAE's forwards by ones that record
    the call and raise."""
    calls: list[str] = []

    def refusing(name: str):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"the {name} ran")
        return refuse

    for name in ("transformer", "text_encoder", "vae"):
        getattr(pipe, name).forward = refusing(name)
    pipe.vae.encode = refusing("vae")
    return calls


@pytest.mark.parametrize("strength, run", [(0.5, 2), (0.6, 3), (1.0, 4)])
def test_default_call_reproduces_stock_bit_for_bit(z_pair, strength, run) -> None:
    """The stock CFG (guidance_scale 5) on the steps the stock rule runs: at 0.6 of 4 steps it
    skips int(1.6) = 1 and runs 3 (SD's rule would run int(2.4) = 2)."""
    stock, guided = z_pair
    stock_rows, handle = forwards(stock)
    want = stock(PROMPT, image=_image(), strength=strength, generator=seeded(0), **CALL).images
    handle.remove()
    guided_rows, handle = forwards(guided)
    got = guided(PROMPT, image=_image(), strength=strength, generator=seeded(0), **CALL)
    handle.remove()
    assert steps_run(strength) == run and tuple(got.images.shape) == LATENTS
    assert torch.equal(got.images, want) and got.nfe == 2 * run
    assert guided_rows == stock_rows == [2] * run  # one batched forward of cond + uncond per step


@pytest.mark.parametrize("normalization, scale", [(1.0, 5.0), (True, 3.7)])
def test_cfg_normalization_reproduces_stock(z_pair, normalization, scale) -> None:
    stock, guided = z_pair
    kwargs = {"guidance_scale": scale, "strength": 0.75, **CALL}
    want = stock(PROMPT, image=_image(), cfg_normalization=normalization, generator=seeded(0), **kwargs).images
    got = guided(PROMPT, image=_image(), cfg_normalization=normalization, generator=seeded(0), **kwargs)
    assert torch.equal(got.images, want) and got.nfe == 6
    assert not torch.equal(want, stock(PROMPT, image=_image(), generator=seeded(0), **kwargs).images)  # it capped


def test_cfg_truncation_acts_on_the_steps_that_run_as_stock(z_pair) -> None:
    """At strength 0.75 the steps at (1000 - t) / 1000 = 0.1, 0.25, 0.5 run: truncation 0.3
    guides the first two (on the whole schedule it would guide three of four)."""
    stock, guided = z_pair
    kwargs = {"cfg_truncation": 0.3, "strength": 0.75, **CALL}
    stock_rows, handle = forwards(stock)
    want = stock(PROMPT, image=_image(), generator=seeded(0), **kwargs).images
    handle.remove()
    first = start_index(4, 0.75, rule="skip")
    levels = ((1000 - stock.scheduler.timesteps.float()) / 1000).tolist()
    guided_steps = sum(v <= 0.3 for v in levels[first:])
    guided_rows, handle = forwards(guided)
    got = guided(PROMPT, image=_image(), generator=seeded(0), **kwargs)
    handle.remove()
    assert first == 1 and guided_steps == 2 and sum(v <= 0.3 for v in levels) == 3
    assert torch.equal(got.images, want) and got.nfe == 3 + guided_steps
    assert guided_rows == stock_rows == [2, 2, 1]  # the unconditional forward skipped at the last step
    assert not torch.equal(want, stock(PROMPT, image=_image(), generator=seeded(0), strength=0.75, **CALL).images)


@pytest.mark.parametrize("images", [1, 2])
def test_batches_with_generator_lists_and_decoded_output_equal_stock(z_pair, images) -> None:
    """2 prompts x 2 images per prompt, one generator per output image, a negative prompt each,
    both stock options, decoded; one input image for all, or one per prompt (the stock pipeline
    samples each given image's posterior once, with its own generator, and repeats the latents)."""
    stock, guided = z_pair
    kwargs = {**CALL, "output_type": "pt", "num_images_per_prompt": 2, "strength": 0.75,
              "cfg_normalization": 1.0, "cfg_truncation": 0.2}
    want = stock(["a red circle", "a blue square"], image=_image(images=images), negative_prompt=["blue", "red"],
                 generator=[seeded(i) for i in range(4)], **kwargs).images
    got = guided(["a red circle", "a blue square"], image=_image(images=images), negative_prompt=["blue", "red"],
                 generator=[seeded(i) for i in range(4)], **kwargs)
    assert tuple(got.images.shape) == (4, 3, 32, 32) and torch.equal(got.images, want)
    assert got.nfe_per_image == [4] * 4  # CFG at the first of the 3 steps run


def test_decoded_images_with_a_dynamic_shift_equal_stock() -> None:
    """output_type "pt" (the stock VAE decode), a schedule that ``mu`` shifts."""
    stock = quiet(ZImageImg2ImgPipeline(**tiny_z_image_components(0, dynamic_shift=True)))
    guided = quiet(GuidedZImageImg2ImgPipeline.from_pipe(stock))
    call = {**CALL, "output_type": "pt", "negative_prompt": "blue", "guidance_scale": 2.0}
    want = stock(PROMPT, image=_image(), generator=seeded(0), **call).images
    got = guided(PROMPT, image=_image(), generator=seeded(0), **call).images
    assert tuple(got.shape) == (1, 3, 32, 32) and torch.equal(got, want)


def test_bfloat16_starts_in_the_prompt_embeddings_dtype_as_stock(z_pair) -> None:
    """The stock img2img encodes the image and draws the noise in the embeddings' dtype (a float32
    image into a bfloat16 VAE would not even run)."""
    stock, _ = z_pair
    guided = quiet(GuidedZImageImg2ImgPipeline.from_pipe(stock, dtype=torch.bfloat16))  # casts the shared models
    assert stock.vae.dtype == stock.text_encoder.dtype == torch.bfloat16
    want = stock(PROMPT, image=_image(), generator=seeded(0), **{**CALL, "output_type": "pt"}).images
    got = guided(PROMPT, image=_image(), generator=seeded(0), **{**CALL, "output_type": "pt"}).images
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_given_latents_are_the_noised_start_as_stock(z_pair) -> None:
    """The image is then neither encoded nor noised: another image gives the same output."""
    stock, guided = z_pair
    start = torch.randn(LATENTS, generator=seeded(7))
    want = stock(PROMPT, image=_image(), latents=start, strength=0.5, **CALL).images
    got = guided(PROMPT, image=_image(seed=6), latents=start, strength=0.5, **CALL)
    assert torch.equal(got.images, want) and got.nfe == 4


def test_an_image_given_as_latents_is_not_encoded_as_stock(z_pair) -> None:
    stock, guided = z_pair
    clean = torch.randn(LATENTS, generator=seeded(8))
    want = stock(PROMPT, image=clean, height=32, width=32, generator=seeded(0), **CALL).images
    got = guided(PROMPT, image=clean, generator=seeded(0), **CALL)  # the size follows the latents
    assert torch.equal(got.images, want)


def test_the_callback_numbers_the_steps_taken_and_changes_latents_as_stock(z_pair) -> None:
    stock, guided = z_pair
    seen = {"stock": [], "guided": []}

    def callback(name):
        def on_step(pipe, i, t, tensors):
            seen[name].append((i, float(t), tuple(tensors["latents"].shape)))
            return {"latents": tensors["latents"] * 0.5} if i == 0 else {}
        return on_step

    kwargs = {"strength": 0.6, "generator": seeded(0), **CALL}
    want = stock(PROMPT, image=_image(), callback_on_step_end=callback("stock"), **kwargs).images
    kwargs["generator"] = seeded(0)
    got = guided(PROMPT, image=_image(), callback_on_step_end=callback("guided"), **kwargs).images
    assert torch.equal(got, want) and seen["guided"] == seen["stock"]
    assert [i for i, _, _ in seen["guided"]] == [0, 1, 2] and seen["guided"][0][2] == LATENTS
    assert not torch.equal(got, guided(PROMPT, image=_image(), strength=0.6, generator=seeded(0), **CALL).images)


@pytest.mark.parametrize("guidance, extra", [("apg", {}), ("perp_neg", {"negative_prompt": "blue"})])
def test_named_methods_run(z_pair, guidance, extra) -> None:
    _, guided = z_pair
    out = guided(PROMPT, image=_image(), guidance=guidance, generator=seeded(0), **extra, **CALL)
    assert tuple(out.images.shape) == LATENTS and torch.isfinite(out.images).all()
    assert out.nfe > steps_run(0.6)  # more than the conditional alone


@pytest.mark.parametrize("kwargs, match", [
    ({"strength": 0.0}, r"strength: must be in \(0, 1\], got 0.0"),
    ({"strength": 1.5}, r"strength: must be in \(0, 1\], got 1.5"),
    ({"strength": True}, r"strength: must be in \(0, 1\], got True"),
    ({"strength": "0.6"}, r"strength: must be in \(0, 1\], got '0.6'"),
    ({"image": None}, r"image: an input image is required"),
    ({"image": torch.rand((1, 3, 30, 30))}, r"height: must be a positive multiple of 4 \(pixels\), got 30"),
    ({"guidance": {"name": "fkc", "particles": 2, "target": "anneal", "scale": 2.0}, "sampler": "euler_ancestral"},
     r"starts from a noised image"),
])
def test_bad_inputs_are_refused_before_any_model_call(z_pair, kwargs, match) -> None:
    _, guided = z_pair
    calls = refuse_forwards(guided)
    call = {"image": _image(), **CALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        guided(PROMPT, generator=seeded(0), **call)
    assert calls == []


def test_from_pipe_shares_components_with_either_stock_pipeline(z_pair) -> None:
    stock, guided = z_pair
    text_to_image = ZImagePipeline(**stock.components)
    from_text = quiet(GuidedZImageImg2ImgPipeline.from_pipe(text_to_image))
    for pipe in (guided, from_text):
        assert pipe.transformer is stock.transformer and pipe.text_encoder is stock.text_encoder
        assert pipe.vae is stock.vae and pipe.tokenizer is stock.tokenizer
    before = stock(PROMPT, image=_image(), generator=seeded(0), **CALL).images
    assert torch.equal(from_text(PROMPT, image=_image(), generator=seeded(0), **CALL).images, before)
    guided(PROMPT, image=_image(), guidance="apg", generator=seeded(0), **CALL)
    assert torch.equal(stock(PROMPT, image=_image(), generator=seeded(0), **CALL).images, before)


def test_a_saved_stock_directory_loads_the_guided_pipeline(z_pair, tmp_path) -> None:
    stock, _ = z_pair
    stock.save_pretrained(tmp_path, safe_serialization=True)
    pipe = quiet(GuidedZImageImg2ImgPipeline.from_pretrained(tmp_path))
    kwargs = {"cfg_normalization": 1.0, "negative_prompt": "blue", **CALL}
    assert torch.equal(pipe(PROMPT, image=_image(), generator=seeded(0), **kwargs).images,
                       stock(PROMPT, image=_image(), generator=seeded(0), **kwargs).images)


def test_concurrent_calls_keep_their_own_input_image(z_pair) -> None:
    """Each call's image and strength are private to it (a context variable), so calls at
    different strengths on one pipeline in two threads equal the same calls made one by one."""
    _, guided = z_pair
    calls = [(0.5 if i % 2 else 1.0, i) for i in range(6)]

    def run(strength: float, seed: int) -> torch.Tensor:
        return guided(PROMPT, image=_image(seed), strength=strength, generator=seeded(seed), **CALL).images

    serial = [run(*call) for call in calls]
    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(lambda call: run(*call), calls))
    assert all(torch.equal(a, b) for a, b in zip(serial, threaded))
