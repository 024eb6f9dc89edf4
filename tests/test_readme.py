"""Every fenced ```python and ```bash block of README.md runs as written.

The blocks are parsed from README.md at test time, so an edit of the README is re-tested. Shell
commands run in a subprocess (the ``guidance-engine`` console script is run as
``python -m guidance_engine.pipelines.apps.cli``) with a temporary directory as cwd that holds the input
files the README refers to (in.png, mask.png, prompts.txt). The Python blocks run, in README order,
in one fresh namespace (the img2img block continues the API block: ``pipe``, ``prompt``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

README = Path(__file__).resolve().parent.parent / "README.md"
CLI = [sys.executable, "-m", "guidance_engine.pipelines.apps.cli"]

# Commands not run, keyed on a substring of the command text (after `pip install ... &&` is cut):
SKIP = {
    # the test suite itself: running it from a test would recurse
    "python -m pytest": "runs the test suite (recursive)",
    # 8 processes on 8 GPUs; the same `batch` code path runs in one process in the line above
    "accelerate launch --multi_gpu": "needs several GPUs / processes",
    # starts a Gradio server that does not exit (tests/test_demo.py covers the demo)
    "guidance-engine demo": "starts a server",
}
# Placeholders replaced before running: the user's own checkpoint -> the shipped default model.
PLACEHOLDERS = {"--model /path/to/sd": ""}


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: backslash continuations joined, `#` comments dropped."""
    block = re.sub(r"\\\n", " ", block)
    commands = []
    for line in block.splitlines():
        tokens = shlex.split(line, comments=True)
        if not tokens:
            continue
        if tokens[0] == "pip" and "&&" in tokens:
            # `pip install ... && CMD`: never install from a test; only CMD runs.
            tokens = tokens[tokens.index("&&") + 1:]
        commands.append(shlex.join(tokens))
    return commands


def make_inputs(d: Path) -> None:
    """The input files the README's commands name (32x32, the size of the default model's images)."""
    img = Image.new("RGB", (32, 32), (0, 0, 255))
    ImageDraw.Draw(img).ellipse((8, 8, 24, 24), fill=(255, 0, 0))
    img.save(d / "in.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (16, 0, 32, 32))  # right half repainted
    mask.save(d / "mask.png")
    (d / "prompts.txt").write_text("a red circle on a blue background\ntwo blue squares on a yellow background\n")


BASH = readme_blocks("bash")
# Speed only: these subcommands run with `--steps 4` (replacing the README's value, or appended);
# the README's step counts take the same code path, just longer.
FEW_STEPS = {"generate", "compare", "batch", "img2img", "edit"}


def fast(argv: list[str]) -> list[str]:
    if argv[1] not in FEW_STEPS:
        return argv
    if "--steps" in argv:
        i = argv.index("--steps")
        return argv[:i] + argv[i + 2:] + ["--steps", "4"]
    return argv + ["--steps", "4"]


def run_block(block: str, d: Path) -> list[tuple[str, subprocess.CompletedProcess | str]]:
    """Run a bash block's commands in order in directory d; (command, result or skip reason)."""
    make_inputs(d)
    # one torch thread per process: the blocks run side by side (see `bash_results`)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    results = []
    for command in shell_commands(block):
        skip = [key for key in SKIP if key in command]
        if skip:
            results.append((command, SKIP[skip[0]]))
            continue
        for old, new in PLACEHOLDERS.items():
            command = command.replace(old, new)
        argv = shlex.split(command)
        if argv[0] != "guidance-engine":
            results.append((command, f"README command the test does not know how to run: {command}"))
            break
        r = subprocess.run(CLI + fast(argv)[1:], cwd=d, env=env, capture_output=True, text=True, timeout=300)
        results.append((command, r))
        if r.returncode != 0:
            break
    return results


@pytest.fixture(scope="module")
def bash_results(tmp_path_factory):
    """All bash blocks at once, each in its own directory, its commands in README order.

    Side by side only to save wall time (each command spends ~4 s importing torch/diffusers).
    """
    dirs = [tmp_path_factory.mktemp(f"bash{i}") for i in range(len(BASH))]
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
        return list(pool.map(run_block, BASH, dirs))


def test_readme_has_blocks():
    assert len(BASH) >= 4 and len(readme_blocks("python")) >= 2


@pytest.mark.parametrize("i", range(len(BASH)), ids=[f"bash{i}" for i in range(len(BASH))])
def test_readme_bash_block(i, bash_results):
    for command, r in bash_results[i]:
        if isinstance(r, str):
            assert r in SKIP.values(), r
            print(f"skipped ({r}): {command}")
            continue
        assert r.returncode == 0, f"{command}\nexit {r.returncode}\nstderr:\n{r.stderr}"


def test_skip_list_is_current():
    """Every skip entry still matches a README command (a stale entry would hide nothing)."""
    commands = [c for block in BASH for c in shell_commands(block)]
    for key in SKIP:
        assert any(key in c for c in commands), f"SKIP entry {key!r} matches no README command"


def test_readme_python_blocks(tmp_path, monkeypatch):
    make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(readme_blocks("python")):
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    assert (tmp_path / "apg.png").exists()
