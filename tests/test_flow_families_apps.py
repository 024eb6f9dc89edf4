"""The flow-transformer families through the apps: a directory saved by each STOCK pipeline is
detected from its model_index.json and runs in the CLI's generate and img2img (where the family has
it; refused before loading where not), in batch and in the demo's generator (tiny random models,
2 steps)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from guidance_engine.pipelines.apps.cli import main
from guidance_engine.pipelines.models import load_pipeline, pipeline_class_for


def _save(family: str, path) -> str:
    if family == "chroma":
        from diffusers import ChromaPipeline
        from guidance_engine.pipelines.toy.tiny_chroma import tiny_chroma_components
        ChromaPipeline(**tiny_chroma_components(0)).save_pretrained(path, safe_serialization=True)
        return "GuidedChromaPipeline"
    if family == "qwen_image":
        from guidance_engine.pipelines.toy.tiny_qwen_image import save_tiny_qwen_image
        save_tiny_qwen_image(path)
        return "GuidedQwenImagePipeline"
    if family == "z_image":
        from guidance_engine.pipelines.toy.tiny_z_image import save_tiny_z_image
        save_tiny_z_image(path)
        return "GuidedZImagePipeline"
    from diffusers import Flux2KleinPipeline
    from guidance_engine.pipelines.toy.tiny_flux2 import tiny_flux2_klein_components
    Flux2KleinPipeline(**tiny_flux2_klein_components(0)).save_pretrained(path, safe_serialization=True)
    return "GuidedFlux2KleinPipeline"


@pytest.mark.parametrize("family", ["chroma", "qwen_image", "z_image", "flux2_klein"])
def test_generate_batch_and_demo_take_a_stock_checkpoint(tmp_path, capsys, family) -> None:
    model = tmp_path / family
    expected = _save(family, model)
    assert pipeline_class_for(model).__name__ == expected
    out = tmp_path / "out.png"
    assert main(["generate", "a red circle", "--model", str(model), "--steps", "2", "--height", "32",
                 "--width", "32", "--method", "apg", "-o", str(out)]) == 0
    meta = json.loads(Image.open(out).text["guidance-engine"])
    assert Image.open(out).size == (32, 32) and meta["guidance"]["name"] == "apg" and meta["nfe"] == 4

    i2i = ["img2img", str(out), "a red circle", "--model", str(model), "--steps", "4", "--strength", "0.5",
           "-o", str(tmp_path / "i2i.png")]
    if family in ("qwen_image", "z_image"):  # their img2img pipelines run from the same checkpoint
        assert main(i2i) == 0 and Image.open(tmp_path / "i2i.png").size == (32, 32)
    else:  # not offered on these families yet: refused before the model loads
        assert main(i2i) == 2 and not (tmp_path / "i2i.png").exists()
        assert ("img2img needs a Stable Diffusion 1.x/2.x or SDXL, Flux.1, Qwen-Image or Z-Image checkpoint here, "
                f"got a {expected}") in capsys.readouterr().err

    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    assert main(["batch", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "batch"), "--model", str(model),
                 "--steps", "2", "--height", "32", "--width", "32", "--no-progress"]) == 0
    lines = (tmp_path / "batch" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all((tmp_path / "batch" / json.loads(line)["file"]).is_file() for line in lines)

    if family == "z_image":
        return  # the demo uses the model's default size, which ZImagePipeline fixes at 1024 px: beyond the tiny rope
    from guidance_engine.pipelines.apps.demo_app import METHODS, Generator

    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = 32 // pipe.vae_scale_factor  # the demo uses the model's own size: 32 px here
    gallery, stats, _ = Generator(pipe)("a red circle", ["cfg"], 2, 0, *[None] * len(METHODS))
    assert len(gallery) == 1 and stats[0]["nfe"] == 4
