"""Every registered method on every model family: it runs (finite latents, network evaluations
counted) or it is refused with a ValueError naming it, before the family's network runs once.

docs/families.md is the table of outcomes (``python tests/test_family_methods.py`` rewrites it;
a test keeps it current)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from guidance_engine import method_names, resolve_guidance

STEPS = 2
PROMPT = "a red circle on a blue background"


def _sd():
    from guidance_engine.pipelines import GuidedStableDiffusionPipeline
    from guidance_engine.pipelines.toy.tiny_models import tiny_sd_components

    return GuidedStableDiffusionPipeline(**tiny_sd_components(0), requires_safety_checker=False), "unet", {
        "prompt": PROMPT}


def _sdxl():
    from guidance_engine.pipelines import GuidedStableDiffusionXLPipeline
    from guidance_engine.pipelines.toy.tiny_models import tiny_sdxl_components

    return GuidedStableDiffusionXLPipeline(**tiny_sdxl_components(0)), "unet", {"prompt": PROMPT}


def _sd3():
    from guidance_engine.pipelines import GuidedStableDiffusion3Pipeline
    from guidance_engine.pipelines.toy.tiny_models import tiny_sd3_components

    return GuidedStableDiffusion3Pipeline(**tiny_sd3_components(0)), "transformer", {"prompt": PROMPT}


def _flux():
    from guidance_engine.pipelines import GuidedFluxPipeline
    from guidance_engine.pipelines.toy.tiny_models import tiny_flux_components

    return GuidedFluxPipeline(**tiny_flux_components(0)), "transformer", {
        "prompt": PROMPT, "height": 32, "width": 32, "max_sequence_length": 16}


def _flux2_klein():
    from guidance_engine.pipelines import GuidedFlux2KleinPipeline
    from guidance_engine.pipelines.toy.tiny_flux2 import tiny_flux2_klein_components

    return GuidedFlux2KleinPipeline(**tiny_flux2_klein_components(0)), "transformer", {
        "prompt": PROMPT, "height": 32, "width": 32, "max_sequence_length": 32}


def _flux2_dev():
    from guidance_engine.pipelines import GuidedFlux2Pipeline
    from guidance_engine.pipelines.toy.tiny_flux2_dev import tiny_flux2_dev_components

    return GuidedFlux2Pipeline(**tiny_flux2_dev_components(0)), "transformer", {
        "prompt": PROMPT, "height": 32, "width": 32, "max_sequence_length": 64}


def _chroma():
    from guidance_engine.pipelines import GuidedChromaPipeline
    from guidance_engine.pipelines.toy.tiny_chroma import tiny_chroma_components

    return GuidedChromaPipeline(**tiny_chroma_components(0)), "transformer", {
        "prompt": PROMPT, "height": 32, "width": 32, "max_sequence_length": 16}


def _qwen_image():
    from guidance_engine.pipelines import GuidedQwenImagePipeline
    from guidance_engine.pipelines.toy.tiny_qwen_image import tiny_qwen_image_components

    return GuidedQwenImagePipeline(**tiny_qwen_image_components(0)), "transformer", {
        "prompt": PROMPT, "height": 32, "width": 32, "max_sequence_length": 16}


def _z_image():
    from guidance_engine.pipelines import GuidedZImagePipeline
    from guidance_engine.pipelines.toy.tiny_z_image import tiny_z_image_components

    return GuidedZImagePipeline(**tiny_z_image_components(0)), "transformer", {
        "prompt": PROMPT, "height": 32, "width": 32, "max_sequence_length": 64}


def _wan():
    from guidance_engine.pipelines import GuidedWanPipeline
    from guidance_engine.pipelines.toy.tiny_wan import tiny_wan_components

    return GuidedWanPipeline(**tiny_wan_components(0)), "transformer", {
        "prompt": PROMPT, "height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 16}


def _ltx():
    from guidance_engine.pipelines import GuidedLTXPipeline
    from guidance_engine.pipelines.toy.tiny_ltx import tiny_ltx_components

    return GuidedLTXPipeline(**tiny_ltx_components(0)), "transformer", {
        "prompt": PROMPT, "height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16}


def _hunyuan_video15():
    from guidance_engine.pipelines import GuidedHunyuanVideo15Pipeline
    from guidance_engine.pipelines.toy.tiny_hunyuan_video15 import tiny_hunyuan_video15_components

    pipe = GuidedHunyuanVideo15Pipeline(**tiny_hunyuan_video15_components(0))
    # the stock text lengths (Qwen 1000, ByT5 256, 729 image tokens) shortened, as tests/test_hunyuan_video15.py
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length, pipe.vision_num_semantic_tokens = 32, 16, 8
    return pipe, "transformer", {"prompt": PROMPT, "height": 32, "width": 32, "num_frames": 5}


def _dit():
    from guidance_engine.pipelines import GuidedDiTPipeline
    from guidance_engine.pipelines.toy.tiny_models import tiny_dit_components

    return GuidedDiTPipeline(**tiny_dit_components(num_classes=12, learned_sigma=False)), "transformer", {
        "class_labels": [3]}


#: Layer-level methods on the tiny transformers: block 0 (the family defaults 7, 8, 9 do not exist there).
TINY_BLOCKS = {"SD3": [0], "Flux.1": [0], "Flux.2 [dev]": [0], "Flux.2 Klein": [0], "Chroma": [0], "Qwen-Image": [0],
               "Z-Image": [0], "Wan": [0], "LTX-Video": [0], "HunyuanVideo 1.5": [0], "DiT": [0]}

FAMILIES: dict[str, Callable[[], tuple[Any, str, dict[str, Any]]]] = {
    "SD 1.x/2.x": _sd, "SDXL": _sdxl, "SD3": _sd3, "Flux.1": _flux, "Flux.2 [dev]": _flux2_dev, "Flux.2 Klein": _flux2_klein,
    "Chroma": _chroma, "Qwen-Image": _qwen_image, "Z-Image": _z_image, "Wan": _wan, "LTX-Video": _ltx,
    "HunyuanVideo 1.5": _hunyuan_video15, "DiT": _dit}


def outcome(family: str, name: str, pipe, network: str, inputs: dict[str, Any]) -> str:
    """"runs (N NFE)" or "refused: <message>"; AssertionError when a method crashes, is refused
    after the network ran, or returns non-finite latents."""
    guide = resolve_guidance(name) if name != "linear_ag" else None
    if guide is None:
        return "refused: needs a calibration directory (guidance-engine calibrate-linear-ag) of this model"
    spec: dict[str, Any] = {"name": name}
    if family in TINY_BLOCKS and any(f.name == "layers" for f in type(guide).parameters()):
        spec["layers"] = TINY_BLOCKS[family]  # the tiny transformers have one or two blocks, not the default 7-9
    kwargs: dict[str, Any] = {"guidance": spec, "num_inference_steps": STEPS, "output_type": "latent",
                              "generator": torch.Generator().manual_seed(0)}
    if guide.requires_stochastic_sampler:
        kwargs["sampler"] = "euler_ancestral"
    if "negative" in guide.required_branches() and "prompt" in inputs:
        kwargs["negative_prompt"] = "a green square"
    calls = []
    handle = getattr(pipe, network).register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        out = pipe(**inputs, **kwargs)
    except ValueError as error:
        message = str(error)
        assert not calls, f"{family} / {name}: refused after {len(calls)} forwards: {message}"
        assert name in message or "guidance" in message or "gfcg" in message, message
        return "refused: " + message.split("\n")[0]
    finally:
        handle.remove()
    latents = out.images
    assert torch.isfinite(latents).all(), f"{family} / {name}: non-finite latents"
    assert out.nfe > 0
    return f"runs ({out.nfe:g} NFE for {STEPS} steps)"


def build_all() -> dict[str, tuple[Any, str, dict[str, Any]]]:
    """Every family's tiny pipeline (quiet), its main network's attribute and its call inputs."""
    built = {}
    for family, build in FAMILIES.items():
        pipe, network, inputs = build()
        pipe.set_progress_bar_config(disable=True)
        built[family] = (pipe, network, inputs)
    return built


@pytest.fixture(scope="module")
def pipes():
    return build_all()


def table(results: dict[tuple[str, str], str]) -> str:
    rows = ["| method | " + " | ".join(FAMILIES) + " |", "|---|" + "---|" * len(FAMILIES)]
    for name in method_names():
        cells = []
        for family in FAMILIES:
            result = results[(family, name)]
            cells.append(result.replace("|", "/") if len(result) < 140 else result[:137] + "...")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def all_outcomes(pipes) -> dict[tuple[str, str], str]:
    return {(family, name): outcome(family, name, *pipes[family]) for family in FAMILIES for name in method_names()}


DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"
INTRO = """# Methods x model families

Every registered method on every model family, on the tiny random models the tests build
(tests/test_family_methods.py, 2 steps; layer-level methods on block 0 of the tiny transformers):
"runs" with its network evaluations, or "refused" with the message the call raises, always before
the family's network has run once. Refusals name what is missing (a provider this family lacks, a
reference network, a calibration, an alteration its blocks cannot take). Generated by
`python tests/test_family_methods.py > docs/families.md`; a test keeps it current.

"""


def test_every_method_runs_or_is_refused_before_the_network_on_every_family(pipes) -> None:
    results = all_outcomes(pipes)
    assert sum(r.startswith("runs") for r in results.values()) >= 60
    def outcomes_only(text: str) -> str:  # NFE counts of per-sample methods (AG) may move with float rounding
        return re.sub(r" \(\d+ NFE for \d+ steps\)", "", text)

    assert outcomes_only(DOC.read_text()) == outcomes_only(INTRO + table(results) + "\n"), \
        "regenerate: python tests/test_family_methods.py > docs/families.md"


if __name__ == "__main__":
    sys.stdout.write(INTRO + table(all_outcomes(build_all())) + "\n")
