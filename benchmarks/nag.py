"""NAG on the default model: does a negative prompt act at CFG 1, and what does it cost?

For prompts that leave the shape's colour open ("a circle on a blue background") and a negative
prompt naming one colour ("a red circle"), over seeds (the same initial noise for every method):
the frequency of the negative colour (eval classifier) and network evaluations per image under
the conditional prediction alone (CFG 1: the negative prompt does nothing), NAG alone (CFG 1),
CFG at `--scale` with the negative prompt, and NAG under that CFG; wall time of each relative to
the conditional-only run, measured side by side in one process (median over `--repeats`,
methods interleaved). Prints a markdown table, then ONE line of JSON.

    python benchmarks/nag.py                      # 20 steps, 32 seeds, nag_scale 5
    python benchmarks/nag.py --seeds 8 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from guidance_engine import strict_json  # noqa: E402
from guidance_engine.pipelines import GuidedStableDiffusionPipeline, default_model_path  # noqa: E402
from guidance_engine.pipelines.toy.evaluation import generate, load_classifier  # noqa: E402
from guidance_engine.pipelines.toy.shapes import COLORS  # noqa: E402

#: (prompt, negative prompt, the negative colour)
CASES = (("a circle on a blue background", "a red circle", "red"),
         ("a square on a white background", "a green square", "green"),
         ("a triangle on a black background", "a yellow triangle", "yellow"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--nag-scale", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    pipe = GuidedStableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None,
                                                         requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier("eval")
    methods = {"cond only (CFG 1)": {"name": "cfg", "scale": 1.0},
               "NAG (CFG 1)": {"name": "nag", "nag_scale": args.nag_scale},
               f"CFG {args.scale:g}": {"name": "cfg", "scale": args.scale},
               f"NAG + CFG {args.scale:g}": {"name": "nag", "scale": args.scale, "nag_scale": args.nag_scale}}
    seeds = list(range(args.seeds))
    hits = {label: [] for label in methods}
    nfe = {}
    seconds = {label: [] for label in methods}
    for repeat in range(args.repeats):
        for prompt, negative, colour in CASES:
            for label, method in methods.items():  # interleaved: machine drift hits every method alike
                images, nfe[label], took = generate(pipe, prompt, method, seeds, steps=args.steps,
                                                    negative_prompt=[negative] * len(seeds))
                seconds[label].append(took)
                if repeat == 0:
                    predicted = classifier.predict(images)["color"]
                    hits[label].extend((predicted == COLORS.index(colour)).tolist())
    base = statistics.median(seconds["cond only (CFG 1)"])
    rows = {label: {"negative_colour_frequency": float(np.mean(hits[label])), "nfe_per_image": nfe[label],
                    "time_vs_cond_only": statistics.median(seconds[label]) / base} for label in methods}

    print(f"NAG on the default model: {len(CASES)} prompts x {args.seeds} seeds, {args.steps} steps, "
          f"nag_scale {args.nag_scale:g}; time: median of {args.repeats} interleaved repeats\n")
    print("| method | negative colour frequency | NFE / image | time vs cond only |")
    print("|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['negative_colour_frequency']:.3f} | {row['nfe_per_image']:g} | "
              f"{row['time_vs_cond_only']:.2f} |")
    print(strict_json.dumps({"benchmark": "nag", "steps": args.steps, "seeds": args.seeds, "scale": args.scale,
                             "nag_scale": args.nag_scale, "cases": [c[:2] for c in CASES],
                             "torch_threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
