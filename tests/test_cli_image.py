"""``guidance-engine img2img`` / ``edit`` on the shipped model: files, grids, errors before loading."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from guidance_engine.pipelines.toy import shapes
from guidance_engine.pipelines.apps.cli import main


def _render(tmp_path, color="red"):
    path = tmp_path / f"{color}.png"
    Image.fromarray(shapes.render({"shape": "circle", "color": color, "background": "blue", "size": "large",
                                   "position": "center", "count": "one"})).save(path)
    return path


def test_img2img_inpaint_and_edit_write_images_and_grids(tmp_path, capsys):
    image = _render(tmp_path)
    out = tmp_path / "i2i.png"
    assert main(["img2img", str(image), "a large green circle on a blue background", "--strength", "0.5",
                 "--steps", "4", "--method", "apg", "-o", str(out), "--grid", str(tmp_path / "g.png")]) == 0
    meta = json.loads(Image.open(out).text["guidance-engine"])
    assert meta["command"] == "img2img" and meta["strength"] == 0.5 and meta["nfe"] == 4
    assert Image.open(tmp_path / "g.png").width > 2 * 32
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main(["img2img", str(image), "a large red square on a blue background", "--mask", str(tmp_path / "mask.png"),
                 "--steps", "3", "--strength", "1", "-o", str(tmp_path / "inpaint.png")]) == 0
    kept = np.asarray(Image.open(tmp_path / "inpaint.png"), float)[:, :12]
    assert np.abs(kept - np.asarray(Image.open(image), float)[:, :12]).mean() < 20  # the kept half stays
    assert main(["edit", str(image), "--source-prompt", "a large red circle on a blue background",
                 "--target-prompt", "a large yellow circle on a blue background", "--steps", "4",
                 "-o", str(tmp_path / "edit.png"), "--grid", str(tmp_path / "edit-grid.png")]) == 0
    meta = json.loads(Image.open(tmp_path / "edit.png").text["guidance-engine"])
    assert meta["guidance"]["name"] == "cfgpp" and meta["nfe"] == 16
    assert "inversion 8 + regeneration 8" in capsys.readouterr().out


def test_image_commands_check_inputs_before_loading(tmp_path, capsys):
    image = _render(tmp_path)
    assert main(["img2img", str(tmp_path / "missing.png"), "x"]) == 2
    assert "image: cannot read" in capsys.readouterr().err
    assert main(["img2img", str(image), "x", "--strength", "0"]) == 2
    assert "--strength: must be in (0, 1]" in capsys.readouterr().err
    Image.new("L", (16, 16)).save(tmp_path / "small.png")
    assert main(["img2img", str(image), "x", "--mask", str(tmp_path / "small.png")]) == 2
    assert "--mask: its size 16 x 16 must match" in capsys.readouterr().err
    assert main(["edit", str(image), "--source-prompt", "a", "--target-prompt", "b", "--scale", "3"]) == 2
    assert "scale" in capsys.readouterr().err


def test_image_commands_on_an_sdxl_checkpoint(tmp_path):
    """An SDXL checkpoint gets the SDXL img2img pipeline and SDXL inversion; the written images are
    those pipelines' own."""
    import torch

    from guidance_engine.pipelines import GuidedStableDiffusionXLImg2ImgPipeline
    from guidance_engine.pipelines.toy.tiny_models import save_tiny_sdxl

    model = save_tiny_sdxl(tmp_path / "xl")
    image = _render(tmp_path)
    assert main(["img2img", str(image), "a green circle", "--strength", "0.5", "--steps", "4", "--seed", "3",
                 "--model", str(model), "-o", str(tmp_path / "xl.png")]) == 0
    pipe = GuidedStableDiffusionXLImg2ImgPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("a green circle", image=Image.open(image), strength=0.5, num_inference_steps=4,
                guidance="cfg", generator=[torch.Generator().manual_seed(3)]).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "xl.png").convert("RGB")), np.asarray(want))
    assert main(["edit", str(image), "--source-prompt", "a red circle", "--target-prompt", "a yellow circle",
                 "--steps", "3", "--model", str(model), "-o", str(tmp_path / "xl-edit.png")]) == 0
    inverted = pipe.invert(Image.open(image), "a red circle", num_inference_steps=3)
    edit = pipe.regenerate("a yellow circle", inverted).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "xl-edit.png").convert("RGB")), np.asarray(edit))
