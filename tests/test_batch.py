"""``guidance-engine batch``: several processes, resume after a kill, rebuild from the manifest,
input errors. On the tiny model saved in code, 2 steps, a handful of prompts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from guidance_engine.pipelines import models
from guidance_engine.pipelines.apps.batch import image_name, image_seed, rebuild_from_manifest
from guidance_engine.pipelines.apps.cli import main
from guidance_engine.pipelines.toy.tiny_models import save_tiny_sd

LINES = [
    {"prompt": "a red circle on a blue background"},
    {"prompt": "a green square", "negative_prompt": "a red circle"},
    {"prompt": "a yellow triangle", "method": "apg", "scale": 4.0, "params": {"momentum": -0.25}},
    {"prompt": "a blue circle on a red background", "seed": 1234},
    {"prompt": "two small squares"},
]
PER_PROMPT = 2


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", CUDA_VISIBLE_DEVICES="",
               HF_HOME=str(tmp / "hf"), OMP_NUM_THREADS="1")  # HF_HOME: no user accelerate config
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _shard_lines(out: Path) -> list[dict]:
    return [json.loads(line) for shard in sorted(out.glob("manifest-*.jsonl"))
            for line in shard.read_text().splitlines()]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _expected_files(prompts: int, per_prompt: int) -> list[str]:
    return [image_name(p, i) for p in range(prompts) for i in range(per_prompt)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model, the prompts file and a single-process reference run at batch size 1."""
    root = tmp_path_factory.mktemp("batch")
    model = save_tiny_sd(root / "model")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in LINES[:3]) + "\n\n"
                       + "\n".join(json.dumps(line) for line in LINES[3:]) + "\n")
    ref = root / "ref"
    assert main(["batch", str(prompts), "--out", str(ref), "--model", str(model), "--steps", "2",
                 "--per-prompt", str(PER_PROMPT), "--seed", "5", "--batch-size", "1", "--no-progress"]) == 0
    return root, model, prompts, ref


def test_reference_run_writes_every_image_once_with_its_settings(setup) -> None:
    _, _, _, ref = setup
    entries = _manifest(ref)
    assert [e["file"] for e in entries] == _expected_files(len(LINES), PER_PROMPT)
    assert sorted(p.name for p in ref.glob("*.png")) == _expected_files(len(LINES), PER_PROMPT)
    assert not list(ref.glob(".*"))  # no temporary file left
    by_file = {e["file"]: e for e in entries}
    assert by_file["00000-01.png"]["seed"] == image_seed(5, 0, 1)
    assert by_file["00003-01.png"]["seed"] == 1235  # a line's own seed: seed + image index
    assert by_file["00001-00.png"]["negative_prompt"] == "a red circle"
    apg = by_file["00002-00.png"]["guidance"]
    assert apg["name"] == "apg" and apg["scale"] == 4.0 and apg["momentum"] == -0.25
    assert by_file["00000-00.png"]["guidance"]["name"] == "cfg" and by_file["00000-00.png"]["nfe"] == 4
    meta = json.loads(Image.open(ref / "00002-01.png").text["guidance-engine"])
    assert meta["seed"] == by_file["00002-01.png"]["seed"]


def test_two_processes_match_a_single_process_run(setup) -> None:
    root, model, prompts, ref = setup
    out = root / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()),
           "-m", "guidance_engine.pipelines.apps.cli", "batch", str(prompts), "--out", str(out), "--model", str(model),
           "--steps", "2", "--per-prompt", str(PER_PROMPT), "--seed", "5", "--batch-size", "2", "--device", "cpu",
           "--no-progress"]
    run = subprocess.run(cmd, env=_env(root), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 process(es)" in run.stdout
    shards = {shard.name: [json.loads(x)["file"] for x in shard.read_text().splitlines()]
              for shard in out.glob("manifest-*.jsonl")}
    assert sorted(shards) == ["manifest-0.jsonl", "manifest-1.jsonl"] and all(shards.values())
    done = [name for files in shards.values() for name in files]
    assert sorted(done) == _expected_files(len(LINES), PER_PROMPT)  # every image exactly once
    entries = {e["file"]: e for e in _manifest(out)}
    reference = {e["file"]: e for e in _manifest(ref)}
    assert {e["process_index"] for e in entries.values()} == {0, 1}
    for name, entry in entries.items():
        same = {k: v for k, v in entry.items() if k not in ("seconds", "process_index")}
        assert same == {k: v for k, v in reference[name].items() if k not in ("seconds", "process_index")}
        # batch size 2 vs 1: the same seeds, equal up to float rounding
        assert np.abs(_pixels(out / name) - _pixels(ref / name)).max() <= 2, name


# The run under test, slowed down after each image so that the kill lands midway on a busy machine.
SLOW_CLI = """
import sys, time
from guidance_engine.pipelines.apps import cli, cli_common
save = cli_common.atomic_save_png
def slow_save(*args, **kwargs):
    save(*args, **kwargs)
    time.sleep(0.5)
cli_common.atomic_save_png = slow_save
sys.exit(cli.main(sys.argv[1:]))
"""


def test_killed_run_resumes_without_duplicates(setup) -> None:
    root, model, _, _ = setup
    prompts = root / "many.txt"
    prompts.write_text("\n".join(f"shape number {i}" for i in range(6)) + "\n")
    out = root / "killed"
    args = ["batch", str(prompts), "--out", str(out), "--model", str(model), "--steps", "2", "--per-prompt", "2",
            "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], env=_env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(list(out.glob("*.png"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    before = sorted(p.name for p in out.glob("*.png"))
    assert 3 <= len(before) < 12, "the run should have been killed midway"
    # what a kill inside a write leaves: an unfinished manifest line, a temporary PNG
    with open(out / "manifest-0.jsonl", "a") as handle:
        handle.write('{"file": "00005-01.png", "prompt_in')
    (out / ".00005-01.png.abc123.tmp").write_bytes(b"\x89PNG partial")

    assert main(args) == 0
    expected = _expected_files(6, 2)
    assert sorted(p.name for p in out.glob("*.png")) == expected
    assert not list(out.glob(".*.tmp"))
    for name in expected:
        Image.open(out / name).load()  # every PNG is complete
    lines = _shard_lines(out)  # the unfinished line was cut off, the rest parse
    files = [e["file"] for e in lines]
    assert len(files) == len(set(files))  # nothing generated twice
    assert set(files) == set(expected)
    assert [e["file"] for e in _manifest(out)] == expected
    # a third run has nothing to do
    assert main(args) == 0
    assert len(_shard_lines(out)) == len(expected)


def test_rebuild_from_manifest_line_is_pixel_exact(setup) -> None:
    root, model, _, ref = setup
    pipe = models.load_pipeline(str(model))
    lines = (ref / "manifest.jsonl").read_text().splitlines()
    for line in (lines[2], lines[5], lines[7]):  # negative prompt, APG, a line's own seed
        entry = json.loads(line)
        rebuilt = np.asarray(rebuild_from_manifest(line, pipe).convert("RGB")).astype(np.int16)
        assert np.array_equal(rebuilt, _pixels(ref / entry["file"])), entry["file"]
    # the model named in the line, loaded by the function itself
    entry = json.loads(lines[0])
    assert np.array_equal(np.asarray(rebuild_from_manifest(entry).convert("RGB")).astype(np.int16),
                          _pixels(ref / entry["file"]))


def test_fkc_groups_stay_together_and_rebuild(setup, tmp_path) -> None:
    _, model, _, _ = setup
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "fkc"
    common = ["batch", str(prompts), "--out", str(out), "--model", str(model), "--steps", "2", "--method", "fkc",
              "--param", "particles=2", "--sampler", "euler_ancestral", "--no-progress"]
    assert main([*common, "--per-prompt", "3"]) == 2  # groups of 2 images
    assert main([*common, "--per-prompt", "2", "--batch-size", "1"]) == 0
    line = (out / "manifest.jsonl").read_text().splitlines()[1]
    entry = json.loads(line)
    assert entry["group_images"] == [0, 1] and entry["image_index"] == 1
    assert np.array_equal(np.asarray(rebuild_from_manifest(line).convert("RGB")).astype(np.int16),
                          _pixels(out / entry["file"]))


def test_bad_inputs_fail_before_the_model_loads(tmp_path, capsys, monkeypatch) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(models, "load_pipeline", no_model)
    out = tmp_path / "out"

    def error(*argv: str) -> str:
        assert main(["batch", *argv, "--out", str(out), "--steps", "2"]) == 2
        return capsys.readouterr().err

    assert f"prompts: no such file '{tmp_path / 'missing.txt'}'" in error(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "has no prompts" in error(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n\n{"prompt": "a square",\n')
    assert f"prompts: {bad}:3: not valid JSON" in error(str(bad))
    bad.write_text('{"prompt": "a red circle"}\n{"prompt": "x", "method": "apg", "params": {"bogus": 1}}\n')
    message = error(str(bad))
    assert f"prompts: {bad}:2: guidance: method 'apg' has no parameter(s) bogus" in message
    bad.write_text('{"prompt": "a red circle", "sede": 3}\n')
    assert f"prompts: {bad}:1: unknown key(s) sede" in error(str(bad))
    good = tmp_path / "good.txt"
    good.write_text("a red circle\n")
    assert "--per-prompt: must be an integer in [1, 1024], got 0" in error(str(good), "--per-prompt", "0")
    assert "--batch-size: must be an integer in [1, 1024], got 0" in error(str(good), "--batch-size", "0")
    assert "cfgpp: parameter 'scale' must be [0, 1], got 3.0" in error(str(good), "--method", "cfgpp", "--scale", "3")
    assert "--sampler: method 'fkc' needs a stochastic sampler" in error(str(good), "--method", "fkc")
    assert "--per-prompt: fkc couples groups of 8 images" in error(str(good), "--method", "fkc", "--sampler",
                                                                   "euler_ancestral")
    assert not out.exists()


def test_class_conditional_batch_and_rebuild(tmp_path, capsys, monkeypatch) -> None:
    """``--model dit``: each line is a class name or id; the images are the pipeline's own, the
    manifest rebuilds them; bad classes and text-only options fail before the model loads."""
    import torch

    from guidance_engine.pipelines import GuidedDiTPipeline

    prompts = tmp_path / "classes.txt"
    prompts.write_text("blue square\n8\n")
    out = tmp_path / "out"
    common = ["batch", str(prompts), "--out", str(out), "--model", "dit", "--steps", "3", "--no-progress"]
    assert main([*common, "--method", "gfcg", "--param", "cfg_scale=3", "--per-prompt", "2", "--batch-size", "4"]) == 0
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["prompt"] for e in lines] == ["blue square", "blue square", "8", "8"]
    pipe = GuidedDiTPipeline.from_pretrained(models.default_dit_model_path())
    expected = pipe(["blue square", "blue square", 8, 8], guidance={"name": "gfcg", "cfg_scale": 3},
                    num_inference_steps=3, output_type="np",
                    generator=[torch.Generator().manual_seed(e["seed"]) for e in lines]).images
    for entry, image in zip(lines, expected):
        assert entry["nfe"] == 2 + 3 * 2
        assert np.abs(_pixels(out / entry["file"]) - np.round(image * 255)).max() <= 1  # batch of 4 vs 4
    rebuilt = np.asarray(rebuild_from_manifest(lines[3], pipe).convert("RGB")).astype(np.int16)
    assert np.abs(rebuilt - _pixels(out / lines[3]["file"])).max() <= 1

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(models, "load_pipeline", no_model)
    bad = tmp_path / "bad.txt"
    bad.write_text("red circle\npurple circle\n")
    assert main(["batch", str(bad), "--out", str(tmp_path / "o2"), "--model", "dit", "--no-progress"]) == 2
    assert f"prompts: {bad}:2: unknown class name 'purple circle'" in capsys.readouterr().err
    bad.write_text("12\n")
    assert main(["batch", str(bad), "--out", str(tmp_path / "o2"), "--model", "dit", "--no-progress"]) == 2
    assert f"prompts: {bad}:1: class ids must be in [0, 12), got 12" in capsys.readouterr().err
    assert main([*common, "--height", "64"]) == 2
    assert "--height: a class-conditional model" in capsys.readouterr().err
    jsonl = tmp_path / "neg.jsonl"
    jsonl.write_text('{"prompt": "red circle", "negative_prompt": "blue"}\n')
    assert main(["batch", str(jsonl), "--out", str(tmp_path / "o2"), "--model", "dit", "--no-progress"]) == 2
    assert f"prompts: {jsonl}:1: negative_prompt: a class-conditional model" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
