"""docs/bad-inputs.md, built from the cases the tests run: command lines (tests/test_bad_inputs.py),
Python calls (tests/test_bad_api_inputs.py) and demo requests (tests/demo_bad_inputs.py).
``python tests/bad_inputs_doc.py > docs/bad-inputs.md`` rewrites it; a test checks it is current."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_bad_inputs  # noqa: E402
import test_bad_api_inputs  # noqa: E402
import test_bad_inputs  # noqa: E402

INTRO = """# Bad inputs and how they are refused

Every input of the command line, the Python API, batch runs and the demo is checked before any
model loads (CLI, batch, demo) or any network runs (Python: text encoder, UNet, VAE), and the
refusal names the parameter, the accepted range and the value received. The command line exits
with status 2 and one line on stderr (`guidance-engine: error: ...`), no traceback, nothing
written; Python raises `ValueError`; the demo answers the API with the message as plain text and
shows it in the page (nothing is clamped). Each row below is a test case
(tests/test_bad_inputs.py, tests/test_bad_api_inputs.py, tests/test_demo.py), and this page is
generated from them (`python tests/bad_inputs_doc.py > docs/bad-inputs.md`; a test keeps it
current). {total} cases in all; `{{tmp}}` stands for a scratch directory the test prepares (an empty
folder, a read-only one, a truncated checkpoint, an existing `exists.png`, an input `in.png`).

Prompts longer than the text encoder reads are not refused but reported: a
`PromptTruncatedWarning` and `out.warnings` in Python, a `guidance-engine: warning:` line on stderr,
the `warnings` field of the PNG metadata and of the batch manifest line, and a warning under the
demo's images. JSON written by the project (manifests, PNG metadata) is strict: an infinite bound
is written as the string `"inf"` (`guidance_engine.strict_json`) and read back as infinity.
"""


def document() -> str:
    total = (len(test_bad_inputs.CASES) + len(test_bad_api_inputs.CASES) + len(demo_bad_inputs.DEMO_CASES)
             + len(demo_bad_inputs.DEMO_CLI_CASES))
    sections = [INTRO.format(total=total),
                f"## Command line ({len(test_bad_inputs.CASES)}: generate, compare, eval, img2img, edit, batch)\n",
                test_bad_inputs.markdown_table(), "",
                f"## Python API ({len(test_bad_api_inputs.CASES)})\n", test_bad_api_inputs.markdown_table(), "",
                f"## Demo ({len(demo_bad_inputs.DEMO_CASES) + len(demo_bad_inputs.DEMO_CLI_CASES)}: API requests "
                "and `guidance-engine demo` command lines)\n", demo_bad_inputs.markdown_table(), ""]
    return "\n".join(sections)


if __name__ == "__main__":
    sys.stdout.write(document())
