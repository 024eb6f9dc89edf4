"""The guidance-engine command: generate, methods, errors."""

from __future__ import annotations

import json

from PIL import Image

from guidance_engine.registry import method_class, method_names
from guidance_engine.pipelines.apps.cli import main
from guidance_engine.pipelines.toy.tiny_models import save_tiny_sd


def test_generate_writes_png_with_its_settings(tmp_path, capsys) -> None:
    model = save_tiny_sd(tmp_path / "model")
    out = tmp_path / "out" / "img.png"
    code = main(["generate", "a red circle on a blue background", "--method", "apg", "--scale", "4",
                 "--param", "momentum=-0.25", "--steps", "3", "--seed", "7", "--num-images", "2",
                 "--model", str(model), "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6 network evaluations per image" in printed
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == ["img-0.png", "img-1.png"]  # no temporary file left behind
    meta = json.loads(Image.open(out.parent / "img-1.png").text["guidance-engine"])
    assert meta["seed"] == 8 and meta["guidance"]["name"] == "apg" and meta["guidance"]["momentum"] == -0.25
    assert meta["guidance"]["scale"] == 4.0 and meta["nfe"] == 6


def test_generate_default_model_runs(tmp_path) -> None:
    out = tmp_path / "default.png"
    assert main(["generate", "a red circle on a blue background", "--steps", "2", "-o", str(out)]) == 0
    assert Image.open(out).size[0] >= 32


def test_errors_name_the_parameter_and_exit_2(tmp_path, capsys) -> None:
    assert main(["generate", "x", "--method", "cfgpp", "--scale", "3", "-o", str(tmp_path / "a.png")]) == 2
    assert "cfgpp: parameter 'scale' must be [0, 1], got 3.0" in capsys.readouterr().err
    assert main(["generate", "x", "--param", "bogus", "-o", str(tmp_path / "a.png")]) == 2
    assert "--param: expected NAME=VALUE, got 'bogus'" in capsys.readouterr().err
    assert main(["generate", "x", "--steps", "0", "-o", str(tmp_path / "a.png")]) == 2
    assert "--steps: must be an integer in [1, 1000], got 0" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_methods_lists_every_method_with_ranges(capsys) -> None:
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for expected in ("cfg:", "cfgpp:", "apg:", "--param NAME=VALUE", "(0, inf)", "dpmpp_2m"):
        assert expected in text
    assert max(map(len, text.splitlines())) <= 100  # readable in a 100-column terminal
    assert "[0, 9223372036854775807]" in text and "e+18" not in text  # FKC's seed range, exactly
    assert "norm_threshold     15.0         (0, inf)" in text
    flat = " ".join(text.split())
    for name in method_names():  # every summary whole, never cut at a column
        summary = " ".join((method_class(name).__doc__ or "").strip().split("\n\n")[0].split()).replace("``", "")
        assert f"{name}: {summary}" in flat, name


def test_eval_and_compare_commands(tmp_path, capsys) -> None:
    assert main(["eval", "--methods", "cfg:scale=1,apg:scale=5", "--seeds", "1", "--steps", "2",
                 "--plot", str(tmp_path / "m.png")]) == 0
    table = capsys.readouterr().out
    assert "| cfg(scale=1) |" in table and "apg(scale=5" in table and (tmp_path / "m.png").is_file()
    out = tmp_path / "grid.png"
    assert main(["compare", "a red circle on a blue background", "--methods", "cfg,cfgpp", "--seeds", "2",
                 "--steps", "2", "-o", str(out)]) == 0
    assert Image.open(out).size[0] > 64
    assert main(["eval", "--methods", "cfg:scale=-3"]) == 2
    assert "parameter 'scale' must be [0, 100], got -3" in capsys.readouterr().err


def test_generate_class_conditional_model_takes_class_names_and_ids(tmp_path, capsys) -> None:
    """``--model dit`` is the shipped class-conditional model; the prompt is a class name or id,
    and the written image is the pipeline's own for that class and seed."""
    import numpy as np
    import torch

    from guidance_engine.pipelines import GuidedDiTPipeline
    from guidance_engine.pipelines.models import default_dit_model_path

    out = tmp_path / "dit.png"
    args = ["--model", "dit", "--method", "gfcg", "--param", "cfg_scale=3", "--steps", "4", "--seed", "5"]
    assert main(["generate", "blue square", *args, "--num-images", "2", "-o", str(out)]) == 0
    assert "11 network evaluations per image" in capsys.readouterr().out  # 2 + 3 x 3
    pipe = GuidedDiTPipeline.from_pretrained(default_dit_model_path())
    expected = pipe(["blue square"] * 2, guidance={"name": "gfcg", "cfg_scale": 3}, num_inference_steps=4,
                    generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    for i in range(2):
        written = Image.open(tmp_path / f"dit-{i}.png")
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(expected[i]))
        assert json.loads(written.text["guidance-engine"])["prompt"] == "blue square"
    assert main(["generate", "6", *args, "-o", str(tmp_path / "six.png")]) == 0  # id 6 is "blue square"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "six.png").convert("RGB")),
                          np.asarray(Image.open(tmp_path / "dit-0.png").convert("RGB")))


def test_generate_class_conditional_refuses_text_options(tmp_path, capsys) -> None:
    out = str(tmp_path / "x.png")
    assert main(["generate", "purple circle", "--model", "dit", "-o", out]) == 2
    assert "class_labels: unknown class name 'purple circle'" in capsys.readouterr().err
    assert main(["generate", "12", "--model", "dit", "-o", out]) == 2
    assert "class_labels: must be integers in [0, 12) or class names, got 12" in capsys.readouterr().err
    assert main(["generate", "red circle", "--model", "dit", "--negative-prompt", "blue", "-o", out]) == 2
    assert "--negative-prompt: a class-conditional model" in capsys.readouterr().err
    assert main(["eval", "--model", "dit"]) == 2
    assert "--model: eval scores text-to-image models" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_the_console_script_exits_with_mains_code_after_the_exit_handlers(tmp_path) -> None:
    """``run`` (the installed ``guidance-engine``) skips the interpreter's teardown, not what a
    normal exit does first: an atexit handler runs, buffered output arrives whole, the code is main's."""
    import subprocess
    import sys

    from guidance_engine.pipelines.apps.cli import methods_listing

    marker = tmp_path / "atexit-ran"
    script = ("import atexit, pathlib, sys\n"
              f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
              "from guidance_engine.pipelines.apps.cli import run\n"
              "sys.argv = ['guidance-engine', *sys.argv[1:]]\n"
              "run()\n")
    listed = subprocess.run([sys.executable, "-c", script, "methods"], capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and listed.stdout == methods_listing() + "\n"
    assert marker.read_text() == "yes"
    marker.unlink()
    # in an empty folder: the default output name (out.png) must not exist already, as it does in a
    # checkout where the README's first command ran
    refused = subprocess.run([sys.executable, "-c", script, "generate", "a red circle", "--steps", "0"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert refused.returncode == 2 and "guidance-engine: error: --steps" in refused.stderr
    assert marker.read_text() == "yes"
