"""Bad input to the Gradio demo and the text of its refusal: requests to its API (``/generate``,
the page's Generate button) and ``guidance-engine demo`` command lines. Each message names the
parameter, its accepted range and the value received; nothing is clamped and no model is called.
tests/test_demo.py runs every case; ``python tests/demo_bad_inputs.py`` prints :func:`markdown_table`
(needs no Gradio)."""

from __future__ import annotations

import sys
from typing import Any

from guidance_engine.pipelines.apps.demo_app import METHODS

PROMPT = "a red circle on a blue background"
#: a good request; every case changes some of it
GOOD: dict[str, Any] = {"prompt": PROMPT, "methods": ["cfg"], "steps": 4, "seed": 0}
_KNOWN = ", ".join(METHODS)
_SEED_RANGE = f"[0, {2**63 - 1}]"

#: (description, the request's changes to :data:`GOOD`, text the refusal contains)
DEMO_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("empty prompt", {"prompt": "  "}, "prompt: please enter a prompt (a non-empty text), got '  '"),
    ("no method", {"methods": []}, f"methods: select at least one method among {_KNOWN}, got []"),
    ("unknown method", {"methods": ["cfg", "nope"]}, f"methods: must be among {_KNOWN}, got 'nope'"),
    ("a method the demo leaves out (needs a calibration)", {"methods": ["linear_ag"]},
     f"methods: must be among {_KNOWN}, got 'linear_ag'"),
    ("methods not a list", {"methods": "cfg"}, f"methods: must be a list of method names among {_KNOWN}, got 'cfg'"),
    ("steps below the range", {"steps": 0}, "steps: must be an integer in [1, 100], got 0"),
    ("steps above the range", {"steps": 101}, "steps: must be an integer in [1, 100], got 101"),
    ("steps not an integer", {"steps": 2.5}, "steps: must be an integer in [1, 100], got 2.5"),
    ("steps not a number", {"steps": "ten"}, "steps: must be an integer in [1, 100], got 'ten'"),
    ("steps left empty", {"steps": None}, "steps: must be an integer in [1, 100], got None"),
    ("negative seed", {"seed": -1}, f"seed: must be an integer in {_SEED_RANGE}, got -1"),
    ("seed above 2^63 - 1", {"seed": 2**63}, f"seed: must be an integer in {_SEED_RANGE}, got {2**63}"),
    ("seed not an integer", {"seed": 1.5}, f"seed: must be an integer in {_SEED_RANGE}, got 1.5"),
    ("CFG++ scale above its range", {"methods": ["cfgpp"], "scale_cfgpp": 3.0},
     "cfgpp: parameter 'scale' must be [0, 1], got 3.0"),
    ("CFG scale above its range", {"scale_cfg": 250.0}, "cfg: parameter 'scale' must be [0, 100], got 250.0"),
    ("negative CFG scale", {"scale_cfg": -1.0}, "cfg: parameter 'scale' must be [0, 100], got -1.0"),
    ("APG scale not a number", {"methods": ["apg"], "scale_apg": "high"},
     "apg: parameter 'scale' must be [0, 100], got 'high'"),
    ("an out-of-range scale of the second method: the first does not run", {"methods": ["cfg", "tsg"],
     "scale_tsg": 1000.0}, "tsg: parameter 'scale' must be [0, 100], got 1000.0"),
    ("Perp-Neg without a negative prompt: CFG before it does not run", {"methods": ["cfg", "perp_neg"]},
     "negative_prompt: method 'perp_neg' (Perp-Neg) needs a non-empty negative prompt for its 'negative' "
     "branch, got ''"),
]

#: (``guidance-engine`` arguments, text of the one-line error); "{busy}": a port in use on 127.0.0.1
DEMO_CLI_CASES: list[tuple[list[str], str]] = [
    (["demo", "--port", "{busy}"], "--port: port {busy} on 127.0.0.1 is in use (another server, or another demo); "
     "pass another --port, or --port 0 for any free one"),
    (["demo", "--host", "0.0.0.0", "--port", "{busy}"], "--port: port {busy} on 0.0.0.0 is in use"),
    (["demo", "--port", "70000"], "--port: must be an integer in [0, 65535] (0: any free port), got 70000"),
    (["demo", "--port", "-1"], "--port: must be an integer in [0, 65535] (0: any free port), got -1"),
    (["demo", "--host", "999.1.1.1"], "--host: cannot bind '999.1.1.1': no such address or host name"),
    (["demo", "--host", "nosuch.invalid"], "--host: cannot bind 'nosuch.invalid': no such address or host name"),
    (["demo", "--host", "192.0.2.1"], "--host: cannot bind '192.0.2.1': Cannot assign requested address "
     "(is it an address of this machine?)"),
    (["demo", "--host", ""], "--host: must be an address or a host name of this machine, got ''"),
    (["demo", "--concurrency", "0"], "--concurrency: must be an integer >= 1, got 0"),
    (["demo", "--device", "bogus"], "--device: must be one of cpu, cuda, cuda:N, mps, got 'bogus'"),
]


def request(changes: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a case's ``/generate`` call: :data:`GOOD` with its changes."""
    return {**GOOD, **changes}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The cases as a Markdown table ``| demo request | refused with |`` (API requests, then command lines)."""
    rows = ["| demo request | refused with |", "|---|---|"]
    for description, changes, message in DEMO_CASES:
        shown = ", ".join(f"{key}={value!r}" for key, value in changes.items())
        rows.append(f"| {_cell(description)}: `{_cell(shown)}` | {_cell(message)} |")
    for argv, message in DEMO_CLI_CASES:
        command = " ".join(repr(a) if a == "" else a for a in argv).replace("{busy}", "7860")
        rows.append(f"| `guidance-engine {_cell(command)}` | {_cell(message.replace('{busy}', '7860'))} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
