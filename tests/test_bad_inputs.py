"""Bad command-line input (generate, compare, eval, img2img, edit, batch) is refused before any
model loads: exit status 2, one line naming the option, its accepted range and the value received,
no traceback, nothing written.
The table of docs/bad-inputs.md is this list (``python tests/test_bad_inputs.py`` prints it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from guidance_engine.pipelines import models
from guidance_engine.pipelines.apps import cli, cli_common

# (arguments, text the message must contain); "{tmp}" is the test's empty directory.
CASES: list[tuple[list[str], str]] = [
    (["generate", "x", "--width", "0"], "--width: must be an integer in [8, 4096], got 0"),
    (["generate", "x", "--height", "-64"], "--height: must be an integer in [8, 4096], got -64"),
    (["generate", "x", "--height", "100000", "--width", "100000"], "--height: must be an integer in [8, 4096], got 100000"),
    (["generate", "x", "--height", "30"], "--height: must be a multiple of 8 in [8, 4096], got 30"),
    (["generate", "x", "--seed", "-1"], "--seed: must be an integer in [0, 9223372036854775807], got -1"),
    (["generate", "x", "--seed", str(2**64)], f"--seed: must be an integer in [0, 9223372036854775807], got {2**64}"),
    (["generate", "x", "--seed", str(2**63 - 1), "--num-images", "2"], "--seed: seeds 9223372036854775807..9223372036854775808 must stay in"),
    (["generate", "x", "--num-images", "0"], "--num-images: must be an integer in [1, 1024], got 0"),
    (["generate", "x", "--steps", "0"], "--steps: must be an integer in [1, 1000], got 0"),
    (["generate", "x", "--steps", "1001"], "--steps: must be an integer in [1, 1000], got 1001"),
    (["generate", "x", "--eta", "1.5"], "--eta: must be in [0, 1], got 1.5"),
    (["generate", "x", "--eta", "-0.1"], "--eta: must be in [0, 1], got -0.1"),
    (["generate", "x", "--device", "bogus"], "--device: must be one of cpu, cuda, cuda:N, mps, got 'bogus'"),
    (["generate", "x", "--device", "cuda"], "--device: no CUDA device is available on this machine, got 'cuda'"),
    (["generate", "x", "--device", "tpu"], "--device: must be one of cpu, cuda, cuda:N, mps, got 'tpu'"),
    (["generate", "x", "--model", "{tmp}/missing"], "is not a directory"),
    (["generate", "x", "--model", "{tmp}/empty"], "has no model_index.json"),
    (["generate", "x", "--scheduler", "dpm_fast"], "--scheduler: must be one of ddim, ddpm, pndm, lms, euler, euler_a, "
     "heun, dpm2, dpm2_a, dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde, dpmpp_2m_sde_karras, unipc, deis, lcm, got 'dpm_fast'"),
    (["generate", "x", "--timestep-spacing", "even"],
     "--timestep-spacing: must be one of leading, trailing, linspace, got 'even'"),
    (["generate", "x", "--scheduler", "euler_a", "--karras"], "--karras: EulerAncestralDiscreteScheduler has no Karras sigmas"),
    (["generate", "x", "--ays"], "--steps: --ays runs the 10 timesteps of diffusers' AYS schedule; pass --steps 10, got 30"),
    (["generate", "x", "--lora", "{tmp}/missing.safetensors"], "--lora: no such file or directory '{tmp}/missing.safetensors'"),
    (["generate", "x", "--model", "{tmp}/absent.ckpt"], "--model: no such file '{tmp}/absent.ckpt'"),
    (["img2img", "{tmp}/in.png", "x", "--config", "{tmp}/empty"], "--config: only a single-file --model takes a config directory"),
    (["generate", "x", "--model", "{tmp}/truncated"], "unet/diffusion_pytorch_model.safetensors is truncated"),
    (["generate", "x", "--model", "{tmp}/nounet"], "names component 'unet' in model_index.json but has no unet/ folder"),
    (["generate", "x", "-o", "{tmp}"], "-o/--output: must name a file, got"),
    (["generate", "x", "-o", "{tmp}/out.jpg"], "-o/--output: must end in .png"),
    (["generate", "x", "-o", "{tmp}/exists.png"], "exists; pass --overwrite to replace it"),
    (["generate", "x", "--num-images", "2", "-o", "{tmp}/pair.png"], "pair-1.png' exists; pass --overwrite"),
    (["generate", "x", "-o", "{tmp}/readonly/out.png"], "-o/--output: the directory"),
    (["generate", "x", "-o", "{tmp}/afile.txt/out.png"], "is not a directory, so"),
    (["generate", "x", "--method", "cfgpp", "--scale", "3"], "cfgpp: parameter 'scale' must be [0, 1], got 3.0"),
    (["generate", "x", "--method", "cfgpp", "--param", "schedule=linear"], "cfgpp: schedule 'linear' runs parameter 'scale' from 0 to 1.2"),
    (["generate", "x", "--method", "nope"], "nope"),
    (["generate", "x", "--param", "bogus"], "--param: expected NAME=VALUE, got 'bogus'"),
    (["generate", "x", "--method", "fkc", "--param", "particles=0"], "fkc: parameter 'particles' must be an integer in [1, 4096], got 0"),
    (["compare", "x", "--seeds", "0"], "--seeds: must be an integer in [1, 1024], got 0"),
    (["compare", "x", "--seed", "-5"], "--seed: must be an integer in [0, 9223372036854775807], got -5"),
    (["compare", "x", "--steps", "0"], "--steps: must be an integer in [1, 1000], got 0"),
    (["compare", "x", "-o", "{tmp}/grid.gif"], "-o/--output: must end in .png"),
    (["compare", "x", "-o", "{tmp}/exists.png"], "exists; pass --overwrite to replace it"),
    (["compare", "x", "--methods", ","], "--methods: expected e.g. 'cfg,apg:scale=10', got ','"),
    (["compare", "x", "--device", "cuda:3"], "--device: no CUDA device is available on this machine"),
    (["eval", "--seeds", "-1"], "--seeds: must be an integer in [1, 100000], got -1"),
    (["eval", "--steps", "5000"], "--steps: must be an integer in [1, 1000], got 5000"),
    (["eval", "--plot", "{tmp}/plot.svg"], "--plot: must end in .png"),
    (["eval", "--model", "{tmp}/empty"], "has no model_index.json"),
    (["eval", "--plot", "{tmp}/exists.png"], "--plot: '{tmp}/exists.png' exists; pass --overwrite"),
    (["generate", "x", "--method", "fkc"], "--sampler: method 'fkc' needs a stochastic sampler (euler_ancestral, or "
     "ddim with eta > 0), got sampler 'scheduler' with eta None"),
    (["generate", "x", "--method", "cfgpp", "--sampler", "scheduler"],
     "--sampler: method 'cfgpp' renoises with another prediction than it denoises with"),
    (["compare", "x", "--seed", str(2**63 - 2)], "--seed: seeds 9223372036854775806..9223372036854775809 must stay"),
    (["img2img", "{tmp}/in.png", "x", "--strength", "0"], "--strength: must be in (0, 1], got 0.0"),
    (["img2img", "{tmp}/in.png", "x", "--num-images", "0"], "--num-images: must be an integer in [1, 1024], got 0"),
    (["img2img", "{tmp}/in.png", "x", "--seed", "-3"], "--seed: must be an integer in [0, 9223372036854775807], got -3"),
    (["img2img", "{tmp}/in.png", "x", "--eta", "3"], "--eta: must be in [0, 1], got 3.0"),
    (["img2img", "{tmp}/in.png", "x", "--steps", "5000"], "--steps: must be an integer in [1, 1000], got 5000"),
    (["img2img", "{tmp}/in.png", "x", "--device", "bogus"], "--device: must be one of cpu, cuda, cuda:N, mps"),
    (["img2img", "{tmp}/in.png", "x", "-o", "{tmp}/exists.png"], "exists; pass --overwrite to replace it"),
    (["img2img", "{tmp}/in.png", "x", "-o", "{tmp}/out.webp"], "-o/--output: must end in .png"),
    (["img2img", "{tmp}/missing.png", "x"], "image: cannot read an image from '{tmp}/missing.png'"),
    (["img2img", "{tmp}/in.png", "x", "--method", "fkc", "--param", "target=anneal", "--sampler", "euler_ancestral"],
     "--method: method 'fkc' with these parameters weights its samples against the prior (pure noise)"),
    (["edit", "{tmp}/in.png", "--source-prompt", "a", "--target-prompt", "b", "--method", "fkc"],
     "--method: method 'fkc' samples with particles and has no inversion; use cfg or cfgpp"),
    (["edit", "{tmp}/in.png", "--source-prompt", "a", "--target-prompt", "b", "--steps", "0"],
     "--steps: must be an integer in [1, 1000], got 0"),
    (["edit", "{tmp}/in.png", "--source-prompt", "a", "--target-prompt", "b", "--grid", "{tmp}/g.jpg"],
     "--grid: must end in .png"),
    (["batch", "{tmp}/prompts.txt", "--out", "{tmp}/readonly/out"], "--out: the directory '{tmp}/readonly' is not "
     "writable"),
    (["batch", "{tmp}/prompts.txt", "--out", "{tmp}/afile.txt"], "--out: '{tmp}/afile.txt' exists and is not a "
     "directory"),
    (["batch", "{tmp}/prompts.txt", "--out", "{tmp}/o", "--seed", "-1"],
     "--seed: must be an integer in [0, 9223372036854775807], got -1"),
    (["batch", "{tmp}/prompts.txt", "--out", "{tmp}/o", "--height", "30"],
     "--height: must be a multiple of 8 in [8, 4096], got 30"),
    (["batch", "{tmp}/prompts.txt", "--out", "{tmp}/o", "--device", "bogus"], "--device: must be one of cpu, cuda"),
    (["batch", "{tmp}/prompts.txt", "--out", "{tmp}/o", "--steps", "5000"],
     "--steps: must be an integer in [1, 1000], got 5000"),
    (["batch", "{tmp}/prompts.txt", "--out", "{tmp}/o", "--eta", "2"], "--eta: must be in [0, 1], got 2.0"),
    (["batch", "{tmp}/prompts.txt", "--out", "{tmp}/o", "--per-prompt", "0"],
     "--per-prompt: must be an integer in [1, 1024], got 0"),
    (["batch", "{tmp}/prompts.txt", "--out", "{tmp}/o", "--model", "{tmp}/truncated"],
     "unet/diffusion_pytorch_model.safetensors is truncated"),
    (["batch", "{tmp}/fkc.jsonl", "--out", "{tmp}/o"],
     "prompts: {tmp}/fkc.jsonl:1: --sampler: method 'fkc' needs a stochastic sampler"),
    (["batch", "{tmp}/missing.txt", "--out", "{tmp}/o"], "prompts: no such file '{tmp}/missing.txt'"),
]


def _fixtures(tmp: Path) -> None:
    (tmp / "empty").mkdir()
    (tmp / "exists.png").write_bytes(b"keep")
    (tmp / "pair-1.png").write_bytes(b"keep")
    (tmp / "afile.txt").write_text("not a folder")
    (tmp / "prompts.txt").write_text("a red circle\n")
    (tmp / "fkc.jsonl").write_text('{"prompt": "a red circle", "method": "fkc"}\n')
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp / "in.png")
    readonly = tmp / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    for name, folders in (("truncated", ["unet"]), ("nounet", [])):
        model = tmp / name
        model.mkdir()
        (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", '
                                                '"unet": ["diffusers", "UNet2DConditionModel"]}')
        for folder in folders:
            (model / folder).mkdir()
            (model / folder / "diffusion_pytorch_model.safetensors").write_bytes(
                (200).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}')


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_refused_before_the_model_loads(argv, message, tmp_path, capsys, monkeypatch) -> None:
    if os.geteuid() == 0 and "readonly" in " ".join(argv):
        pytest.skip("root writes into read-only directories")
    _fixtures(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(cli_common, "load_quietly", no_model)
    monkeypatch.setattr(models, "load_pipeline", no_model)  # batch loads through it
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("guidance-engine: error: ") and "Traceback" not in err and err.count("\n") == 1, err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert (tmp_path / "exists.png").read_bytes() == b"keep"


def markdown_table() -> str:
    rows = ["| command | refused with |", "|---|---|"]
    for argv, message in CASES:
        rows.append(f"| `guidance-engine {' '.join(argv)}` | {message} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")


def test_the_docs_table_is_current() -> None:
    """docs/bad-inputs.md is generated from the cases above and their Python and demo siblings."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bad_inputs_doc import document

    assert len(CASES) >= 60
    page = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
    assert page.read_text() == document(), "regenerate: python tests/bad_inputs_doc.py > docs/bad-inputs.md"
