"""Bad Python API input is refused before any network runs: a ValueError naming the parameter,
its accepted range and the value received, raised before the text encoder, the UNet or the VAE
is called (each is replaced by a tripwire here). The shipped model is the pipeline.
The table of docs/bad-inputs.md lists these cases (``markdown_table``)."""

from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np
import pytest
import torch

from guidance_engine.methods.cfg import CFG

#: (what the call does wrong, the call on the pipelines, text the message must contain).
#: ``p`` holds the text-to-image, img2img, inpainting and class-conditional (DiT) pipelines.
Call = Callable[[dict[str, Any]], Any]


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


IMAGE = np.zeros((32, 32, 3), dtype=np.uint8)

CASES: list[tuple[str, Call, str]] = [
    ("prompt=[]", lambda p: p["t2i"]([]), "prompt: must be a string or a non-empty list of strings, got []"),
    ("prompt=[1, 2]", lambda p: p["t2i"]([1, 2]), "prompt: must be a string or a non-empty list of strings, got [1, 2]"),
    ("num_images_per_prompt=0", lambda p: p["t2i"]("x", num_images_per_prompt=0),
     "num_images_per_prompt: must be an integer >= 1, got 0"),
    ("num_images_per_prompt=1.5", lambda p: p["t2i"]("x", num_images_per_prompt=1.5),
     "num_images_per_prompt: must be an integer >= 1, got 1.5"),
    ("num_inference_steps=0", lambda p: p["t2i"]("x", num_inference_steps=0),
     "num_inference_steps: must be an integer >= 1, got 0"),
    ("num_inference_steps=5000", lambda p: p["t2i"]("x", num_inference_steps=5000),
     "num_inference_steps: must be in [1, 1000] (the scheduler's training steps), got 5000"),
    ("num_inference_steps='10'", lambda p: p["t2i"]("x", num_inference_steps="10"),
     "num_inference_steps: must be an integer >= 1, got '10'"),
    ("timesteps=[]", lambda p: p["t2i"]("x", timesteps=[]), "timesteps: must be a non-empty list, got []"),
    ("sampler='bogus'", lambda p: p["t2i"]("x", sampler="bogus"),
     "sampler: must be one of ddim, euler, euler_ancestral, dpmpp_2m, scheduler or None, got 'bogus'"),
    ("CFG++ on the scheduler's step", lambda p: p["t2i"]("x", guidance="cfgpp", sampler="scheduler"),
     "sampler: method 'cfgpp' renoises with another prediction than it denoises with"),
    ("eta=1.5", lambda p: p["t2i"]("x", eta=1.5), "eta: must be in [0, 1], got 1.5"),
    ("eta=-0.1", lambda p: p["t2i"]("x", eta=-0.1), "eta: must be in [0, 1], got -0.1"),
    ("FKC with a deterministic sampler", lambda p: p["t2i"]("x", guidance="fkc"),
     "sampler: method 'fkc' needs a stochastic sampler (euler_ancestral, or ddim with eta > 0), got sampler "
     "'scheduler' with eta None"),
    ("two generators for one image", lambda p: p["t2i"]("x", generator=[_g(0), _g(1)]),
     "generator: a list needs one generator per image (1), got 2"),
    ("latents of the wrong shape", lambda p: p["t2i"]("x", latents=torch.zeros(1, 4, 16, 16)),
     "latents: expected a tensor of shape (1, 4, 8, 8), got (1, 4, 16, 16)"),
    ("latents as a numpy array", lambda p: p["t2i"]("x", latents=np.zeros((1, 4, 8, 8))),
     "latents: expected a tensor of shape (1, 4, 8, 8), got ndarray"),
    ("output_type='jpeg'", lambda p: p["t2i"]("x", output_type="jpeg"),
     "output_type: must be one of 'pil', 'np', 'pt', 'latent', got 'jpeg'"),
    ("guidance_scale=nan", lambda p: p["t2i"]("x", guidance_scale=float("nan")),
     "cfg: parameter 'scale' must be [0, 100], got nan"),
    ("guidance_scale=1000", lambda p: p["t2i"]("x", guidance="apg", guidance_scale=1000),
     "apg: parameter 'scale' must be [0, 100], got 1000"),
    ("guidance='nope'", lambda p: p["t2i"]("x", guidance="nope"), "guidance: unknown method 'nope'"),
    ("unknown method parameter", lambda p: p["t2i"]("x", guidance={"name": "apg", "bogus": 1}),
     "guidance: method 'apg' has no parameter(s) bogus"),
    ("guidance object and guidance_scale", lambda p: p["t2i"]("x", guidance=CFG(scale=3.0), guidance_scale=5),
     "guidance_scale/guidance_rescale: set them on the guidance object itself"),
    ("particle_output='some'", lambda p: p["t2i"]("x", particle_output="some"),
     "particle_output: must be one of 'draw', 'all', got 'some'"),
    ("Perp-Neg without a negative prompt", lambda p: p["t2i"]("x", guidance="perp_neg"),
     "negative_prompt: this guidance method (Perp-Neg) needs a negative prompt"),
    ("img2img strength=1.5", lambda p: p["i2i"]("x", image=IMAGE, strength=1.5),
     "strength: must be in (0, 1], got 1.5"),
    ("img2img int64 numpy image", lambda p: p["i2i"]("x", image=IMAGE.astype(np.int64)),
     "image: a numpy image must be uint8 (0-255) or float (0-1), got dtype int64"),
    ("img2img 1-D image", lambda p: p["i2i"]("x", image=np.zeros(32, dtype=np.float32)),
     "image: expected an image array of 2 to 4 dimensions (HW, HWC/CHW, NHWC/NCHW), got shape (32,)"),
    ("img2img image that is no file", lambda p: p["i2i"]("x", image="/nonexistent/in.png"),
     "image: cannot read an image from '/nonexistent/in.png'"),
    ("img2img image size not a multiple of 4", lambda p: p["i2i"]("x", image=np.zeros((30, 32, 3), np.uint8)),
     "image: height and width must be multiples of 4 (the VAE's downscaling factor), got 30 x 32"),
    ("img2img with FKC's prior weighting", lambda p: p["i2i"]("x", image=IMAGE, sampler="euler_ancestral",
                                                               guidance={"name": "fkc", "target": "anneal"}),
     "guidance: method 'fkc' with these parameters weights its samples against the prior (pure noise), but this "
     "run starts from a noised image (img2img or inpainting, strength 0.8)"),
    ("inpainting mask of another size", lambda p: p["inpaint"]("x", image=IMAGE,
                                                               mask_image=np.zeros((16, 16, 3), np.uint8)),
     "mask_image: its size 16 x 16 must match the image's 32 x 32"),
    ("invert with 0 steps", lambda p: p["i2i"].invert(IMAGE, "x", num_inference_steps=0),
     "num_inference_steps: must be an integer >= 1, got 0"),
    ("invert with FKC", lambda p: p["i2i"].invert(IMAGE, "x", guidance="fkc"),
     "guidance: method 'fkc' samples with particles and has no inversion; use cfg or cfgpp"),
    ("invert prompt=[]", lambda p: p["i2i"].invert(IMAGE, []),
     "prompt: must be a string or a non-empty list of strings, got []"),
    ("regenerate from something that is no inversion", lambda p: p["i2i"].regenerate("x", {"latents": 0}),
     "inversion: expected what invert() returns (an InversionOutput), got dict"),
    ("DiT class_labels=[]", lambda p: p["dit"]([]), "class_labels: give at least one class"),
    ("DiT class 99999", lambda p: p["dit"](99999), "class_labels: must be integers in [0, "),
    ("DiT output_type='jpeg'", lambda p: p["dit"](0, output_type="jpeg"),
     "output_type: must be one of 'pil', 'np', 'pt', 'latent', got 'jpeg'"),
    ("DiT eta=2", lambda p: p["dit"](0, eta=2.0), "eta: must be in [0, 1], got 2.0"),
    ("DiT latents of the wrong shape", lambda p: p["dit"](0, latents=torch.zeros(2, 4, 8, 8)),
     "latents: expected a tensor of shape (1, 4, 8, 8), got (2, 4, 8, 8)"),
]


def _tripwire(*args, **kwargs):
    raise AssertionError("a network ran before the input was checked")


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    from guidance_engine.pipelines import (GuidedStableDiffusionImg2ImgPipeline,
                                           GuidedStableDiffusionInpaintPipeline)
    from guidance_engine.pipelines.models import load_pipeline

    t2i = load_pipeline(None)
    dit = load_pipeline("dit")
    for pipe in (t2i, dit):
        pipe.set_progress_bar_config(disable=True)
        for name in ("text_encoder", "unet", "transformer"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.forward = _tripwire
        pipe.vae.encode = pipe.vae.decode = _tripwire
    return {"t2i": t2i, "i2i": GuidedStableDiffusionImg2ImgPipeline.from_pipe(t2i),
            "inpaint": GuidedStableDiffusionInpaintPipeline.from_pipe(t2i), "dit": dit}


@pytest.mark.parametrize("description, call, message", CASES, ids=[c[0] for c in CASES])
def test_bad_api_input_is_refused_before_any_network_runs(description, call, message, pipes) -> None:
    with pytest.raises(ValueError) as error:
        call(pipes)
    assert message in str(error.value), str(error.value)


def markdown_table() -> str:
    rows = ["| Python call | refused with |", "|---|---|"]
    for description, _, message in CASES:
        rows.append(f"| {description} | {message.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")


LONG_PROMPT = "two small red triangles on a blue background, top left, drawn very carefully in the morning"


def test_a_prompt_longer_than_the_encoder_reads_is_reported(tmp_path, capsys) -> None:
    """The shipped text encoder reads 16 tokens: a longer prompt warns (API), is listed in the
    output's ``warnings``, printed on stderr and written to the PNG metadata (CLI) and the batch
    manifest; a short prompt says nothing."""
    import json

    from PIL import Image

    from guidance_engine.pipelines.apps import cli
    from guidance_engine.pipelines.apps.batch import run_batch
    from guidance_engine.pipelines.messages import PromptTruncatedWarning
    from guidance_engine.pipelines.models import load_pipeline

    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    with pytest.warns(PromptTruncatedWarning, match="the text encoder reads 16"):
        out = pipe(LONG_PROMPT, num_inference_steps=1, output_type="latent")
    assert len(out.warnings) == 1 and out.warnings[0].startswith(f"prompt: {LONG_PROMPT!r} is ")
    assert pipe("a red circle", num_inference_steps=1, output_type="latent").warnings == []

    png = tmp_path / "long.png"
    assert cli.main(["generate", LONG_PROMPT, "--steps", "1", "-o", str(png)]) == 0
    err = capsys.readouterr().err
    assert err.count("guidance-engine: warning: prompt: ") == 1, err
    assert "the text encoder reads 16" in json.loads(Image.open(png).text["guidance-engine"])["warnings"][0]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red circle\n{LONG_PROMPT}\n")
    run_batch(prompts, tmp_path / "batch", steps=1, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "batch" / "manifest.jsonl").read_text().splitlines()]
    assert [len(line["warnings"]) for line in sorted(lines, key=lambda e: e["prompt_index"])] == [0, 1]
    assert "prompts line 2: prompt: " in capsys.readouterr().err
