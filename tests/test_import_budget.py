"""What the CLI imports before it needs a model: ``--help``, ``methods`` and bad-input errors load
no model stack (no diffusers, transformers, gradio, triton, scipy or accelerate; torch only, which
the methods are written in). Checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("diffusers", "transformers", "gradio", "triton", "scipy", "accelerate")

SCRIPT = """
import contextlib, io, json, sys
from guidance_engine.pipelines.apps.cli import main
codes = []
for argv in {argvs!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            codes.append(main(argv))
        except SystemExit as stop:
            codes.append(stop.code)
print(json.dumps({{"codes": codes, "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def test_help_methods_and_bad_input_load_no_model_stack(tmp_path) -> None:
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"")
    argvs = [["--help"], ["methods"], ["generate", "--help"],
             ["generate", "a red circle", "--steps", "0", "-o", str(tmp_path / "a.png")],
             ["generate", "a red circle", "--width", "33", "-o", str(tmp_path / "b.png")],
             ["generate", "a red circle", "-o", str(existing)],
             ["generate", "a red circle", "--method", "apg", "--scale", "-1", "-o", str(tmp_path / "c.png")]]
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(argvs=argvs, heavy=HEAVY)], capture_output=True,
                         text=True, timeout=300, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0, 2, 2, 2, 2]  # help and listings succeed; each bad input is refused
    assert result["loaded"] == []
