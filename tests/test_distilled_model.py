"""The shipped guidance-distilled default model (``--model distilled``) and the CLI on such models:

- it is the default model's architecture plus a guidance embedding (``time_cond_proj_dim``), small,
  and the shorthand loads it (a folder named ``distilled`` would win);
- ``guidance-engine generate --model distilled`` is the stock call: the image equals diffusers'
  stock ``StableDiffusionPipeline`` on the same checkpoint, seed and embedded scale, pixel for
  pixel, at one forward per step; the negative prompt changes nothing there;
- ``--method nag`` makes the negative prompt act at the same NFE, and on seeds apart from
  benchmarks/nag.py's, it removes the attribute the negative names ("large") from images where
  the stock call draws it;
- ``--guidance-scale`` is the embedded value: recorded in the settings and the A1111 text,
  refused (naming the option, its range and the value) out of range or on a model that embeds
  none, before any model loads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from guidance_engine.pipelines.apps import cli_common
from guidance_engine.pipelines.apps.cli import main
from guidance_engine.pipelines.models import (DISTILLED_SHORTHAND, default_distilled_model_path, default_model_path,
                                              is_distilled_model, load_pipeline, pipeline_class_for, resolve_model)
from guidance_engine.pipelines.toy import shapes
from guidance_engine.pipelines.toy.evaluation import load_classifier

PROMPT = "a red circle on a blue background"
NEGATIVE = "a large red circle on a blue background"
STEPS = 20


def generate(tmp_path, name: str, *extra: str) -> int:
    return main(["generate", PROMPT, "--model", DISTILLED_SHORTHAND, "--steps", str(STEPS),
                 "-o", str(tmp_path / name), *extra])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline(DISTILLED_SHORTHAND)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_model_is_the_default_architecture_with_a_guidance_embedding() -> None:
    path = default_distilled_model_path()
    assert resolve_model(DISTILLED_SHORTHAND) == path and is_distilled_model(DISTILLED_SHORTHAND)
    assert not is_distilled_model(None) and not is_distilled_model(default_model_path())
    assert pipeline_class_for(path).__name__ == "GuidedStableDiffusionPipeline"
    student = json.loads((path / "unet" / "config.json").read_text())
    teacher = json.loads((default_model_path() / "unet" / "config.json").read_text())
    assert student["time_cond_proj_dim"] is not None and teacher.get("time_cond_proj_dim") is None
    assert {k: v for k, v in student.items() if k not in ("time_cond_proj_dim", "_diffusers_version")} == \
        {k: v for k, v in teacher.items() if k not in ("time_cond_proj_dim", "_diffusers_version")}
    assert sum(f.stat().st_size for f in path.rglob("*.safetensors")) < 8e6  # a few MB in the package


def test_a_folder_named_distilled_wins(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / DISTILLED_SHORTHAND).mkdir()
    assert str(resolve_model(DISTILLED_SHORTHAND)) == DISTILLED_SHORTHAND


def test_cli_default_is_the_stock_call_and_ignores_the_negative_prompt(tmp_path, capsys) -> None:
    assert generate(tmp_path, "plain.png") == 0
    assert f"{STEPS} network evaluations per image" in capsys.readouterr().out  # one forward a step
    assert generate(tmp_path, "negative.png", "-n", NEGATIVE) == 0
    stock = StableDiffusionPipeline.from_pretrained(default_distilled_model_path(), safety_checker=None,
                                                    requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    want = stock(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                 output_type="pil").images[0]
    assert np.array_equal(pixels(tmp_path / "plain.png"), np.asarray(want))
    assert np.array_equal(pixels(tmp_path / "negative.png"), np.asarray(want))
    image = Image.open(tmp_path / "plain.png")
    meta = json.loads(image.info["guidance-engine"])
    assert meta["guidance_scale"] == 7.5 and meta["guidance"]["name"] == "cfg" and meta["guidance"]["scale"] == 1.0
    assert "CFG scale: 1.0, Distilled CFG Scale: 7.5" in image.info["parameters"]


def test_the_embedded_scale_reaches_the_model(tmp_path) -> None:
    assert generate(tmp_path, "low.png", "--guidance-scale", "2") == 0
    assert generate(tmp_path, "default.png") == 0
    assert not np.array_equal(pixels(tmp_path / "low.png"), pixels(tmp_path / "default.png"))
    assert json.loads(Image.open(tmp_path / "low.png").info["guidance-engine"])["guidance_scale"] == 2.0


def test_cli_nag_makes_the_negative_prompt_act_at_the_same_nfe(tmp_path, capsys) -> None:
    assert generate(tmp_path, "plain.png") == 0
    assert generate(tmp_path, "nag.png", "--method", "nag", "-n", NEGATIVE) == 0
    out = capsys.readouterr().out
    assert out.count(f"{STEPS} network evaluations per image") == 2
    assert not np.array_equal(pixels(tmp_path / "plain.png"), pixels(tmp_path / "nag.png"))


def test_nag_removes_the_attribute_the_negative_names(pipe) -> None:
    """Seeds 3000-3011 (benchmarks/nag.py uses 0..N-1): the eval classifier's count of "large"."""
    seeds = range(3000, 3012)
    classifier = load_classifier("eval")
    large = shapes.SIZES.index("large")

    def large_count(guidance) -> int:
        images = pipe([PROMPT] * len(seeds), negative_prompt=[NEGATIVE] * len(seeds), guidance=guidance,
                      num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(s) for s in seeds],
                      output_type="np").images
        return int((classifier.predict(np.round(images * 255).astype(np.uint8))["size"] == large).sum())

    stock, nag = large_count(None), large_count({"name": "nag", "nag_scale": 5.0})
    assert stock >= 8 and nag <= 2, (stock, nag)


@pytest.mark.parametrize("model, value, message", [
    (None, "3", "--guidance-scale: only guidance-distilled models (a UNet with time_cond_proj_dim, e.g. --model "
                "distilled) take it, got 3.0 for the default model; --scale sets a method's scale"),
    (DISTILLED_SHORTHAND, "101", "--guidance-scale: the embedded guidance scale must be in [0, 100], got 101.0"),
    (DISTILLED_SHORTHAND, "nan", "--guidance-scale: the embedded guidance scale must be in [0, 100], got nan"),
])
def test_bad_guidance_scale_is_refused_before_loading(tmp_path, capsys, monkeypatch, model, value, message) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(cli_common, "load_quietly", refuse)
    argv = ["generate", PROMPT, "--guidance-scale", value, "-o", str(tmp_path / "x.png")]
    assert main(argv + (["--model", model] if model else [])) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
