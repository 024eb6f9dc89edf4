"""NAG on the shipped models: does a negative prompt act where it otherwise does nothing, and what does it cost?

Each case is a prompt that leaves one attribute open and a negative prompt naming one value of it;
over seeds (the same initial noise for every method) the benchmark counts how often the eval
classifier finds that value ("negative frequency"), how well the images keep what the prompt asks
(alignment: shape, colour and background, where the prompt names them), network evaluations per
image, and wall time relative to the first row, measured side by side in one process (median over
``--repeats``, methods interleaved). Paired on the same seeds, each NAG row is tested against the
row it adds NAG to (exact McNemar on "the negative value is absent").

Cases (``--cases``): ``colour`` leaves the shape's colour out ("a circle on a blue background",
negative "a red circle"); ``size`` leaves the size out, as 30% of the training captions do ("a red
circle on a blue background", negative "a large red circle on a blue background").

Rows: on a CFG model (the default), the conditional prediction alone (CFG 1: the negative prompt
does nothing), NAG alone, CFG at ``--scale`` with the negative prompt, NAG under that CFG. On a
guidance-distilled model (``--model distilled``: guidance embedded at ``--scale``, one forward a
step), its stock call (the negative prompt does nothing) and NAG on it. Last, a control: NAG alone
under a negative naming another value ("a small ...", "a green circle"): where NAG removes the value
because the negative names it, not because it alters attention at all, this row keeps it. Prints
a markdown table, then ONE line of JSON.

    python benchmarks/nag.py                                     # default model, colour, 32 seeds
    python benchmarks/nag.py --model distilled --cases size
    python benchmarks/nag.py --seeds 8 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gfcg import mcnemar  # noqa: E402  (the paired test of docs/gfcg.md)

from guidance_engine import strict_json  # noqa: E402
from guidance_engine.pipelines.distilled import is_guidance_distilled  # noqa: E402
from guidance_engine.pipelines.models import load_pipeline  # noqa: E402
from guidance_engine.pipelines.toy import shapes  # noqa: E402
from guidance_engine.pipelines.toy.evaluation import generate, load_classifier  # noqa: E402

#: --cases: (prompt, negative prompt, the attribute left open, the value the negative names, a control
#: negative naming another value: NAG under it should not remove the first value)
CASES = {
    "colour": (("a circle on a blue background", "a red circle", "color", "red", "a green circle"),
               ("a square on a white background", "a green square", "color", "green", "a yellow square"),
               ("a triangle on a black background", "a yellow triangle", "color", "yellow", "a red triangle")),
    "size": tuple((f"a {shape} on a {background} background", f"a large {shape} on a {background} background", "size",
                   "large", f"a small {shape} on a {background} background")
                  for shape, background in (("red circle", "blue"), ("green square", "white"),
                                            ("yellow triangle", "black"))),
}


#: the label of the control row (NAG alone under the control negative)
CONTROL = "control: NAG, the negative names another value"


def method_rows(distilled: bool, scale: float, nag_scale: float) -> dict[str, tuple[dict, str | None]]:
    """label -> (guidance, the label of the row it adds NAG to, or None); the control row last."""
    nag = {"name": "nag", "nag_scale": nag_scale}
    if distilled:  # CFG at scale 1 on a distilled UNet is its stock call: the prompt's rows alone
        stock = f"stock (embedded {scale:g})"
        return {stock: ({"name": "cfg", "scale": 1.0}, None), f"NAG (embedded {scale:g})": (nag, stock),
                CONTROL: (nag, stock)}
    return {"cond only (CFG 1)": ({"name": "cfg", "scale": 1.0}, None),
            "NAG (CFG 1)": (nag, "cond only (CFG 1)"),
            f"CFG {scale:g}": ({"name": "cfg", "scale": scale}, None),
            f"NAG + CFG {scale:g}": ({**nag, "scale": scale}, f"CFG {scale:g}"),
            CONTROL: (nag, "cond only (CFG 1)")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory, or 'distilled' (default: the shipped one)")
    parser.add_argument("--cases", default="colour", choices=sorted(CASES), help="which attribute the negatives name")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--scale", type=float, default=7.5, help="CFG's scale, or the distilled model's embedded one")
    parser.add_argument("--nag-scale", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    distilled = is_guidance_distilled(pipe.unet)
    call = {"guidance_scale": args.scale} if distilled else {}
    classifier = load_classifier("eval")
    rows_spec = method_rows(distilled, args.scale, args.nag_scale)
    seeds = list(range(args.seeds))
    present = {label: [] for label in rows_spec}
    aligned = {label: [] for label in rows_spec}
    nfe, seconds = {}, {label: [] for label in rows_spec}
    for repeat in range(args.repeats):
        for prompt, negative, attribute, value, control in CASES[args.cases]:
            asked = {k: v for k, v in shapes.parse_prompt(prompt).items() if v >= 0}
            for label, (method, _) in rows_spec.items():  # interleaved: machine drift hits every method alike
                said = control if label == CONTROL else negative
                images, nfe[label], took = generate(pipe, prompt, method, seeds, steps=args.steps,
                                                    negative_prompt=[said] * len(seeds), **call)
                seconds[label].append(took)
                if repeat == 0:
                    predicted = classifier.predict(images)
                    present[label].extend((predicted[attribute] == shapes.ATTRIBUTES[attribute].index(value)).tolist())
                    aligned[label].extend(np.mean([predicted[k] == v for k, v in asked.items()], axis=0).tolist())
    first = next(iter(rows_spec))
    base_time = statistics.median(seconds[first])
    rows = {}
    for label, (_, paired_with) in rows_spec.items():
        rows[label] = {"negative_frequency": float(np.mean(present[label])), "alignment": float(np.mean(aligned[label])),
                       "nfe_per_image": nfe[label], "time_vs_first_row": statistics.median(seconds[label]) / base_time}
        if paired_with is not None:  # McNemar on "the negative value is absent", this row against its partner
            test = mcnemar(~np.array(present[label]), ~np.array(present[paired_with]))
            rows[label]["vs"] = {"row": paired_with, "only_this_avoids": test["only_gfcg"],
                                 "only_that_avoids": test["only_cfg"], "p_value": test["p_value"]}

    kind = "guidance-distilled, embedded scale" if distilled else "CFG model, CFG scale"
    print(f"NAG on {args.model or 'the default model'} ({kind} {args.scale:g}): {args.cases} cases, "
          f"{len(CASES[args.cases])} prompts x {args.seeds} seeds, {args.steps} steps, nag_scale {args.nag_scale:g}; "
          f"time: median of {args.repeats} interleaved repeats\n")
    print("| method | negative frequency | alignment | NFE / image | time vs first row | "
          "vs the row without NAG: only NAG avoids / only it avoids / McNemar p |")
    print("|---|---|---|---|---|---|")
    for label, row in rows.items():
        vs = row.get("vs")
        paired = f"{vs['only_this_avoids']} / {vs['only_that_avoids']} / {vs['p_value']:.2g}" if vs else ""
        print(f"| {label} | {row['negative_frequency']:.3f} | {row['alignment']:.3f} | {row['nfe_per_image']:g} | "
              f"{row['time_vs_first_row']:.2f} | {paired} |")
    print(strict_json.dumps({"benchmark": "nag", "model": str(args.model or "default"), "distilled": distilled,
                             "cases": args.cases, "steps": args.steps, "seeds": args.seeds, "scale": args.scale,
                             "nag_scale": args.nag_scale, "prompts": [c[:2] + c[4:] for c in CASES[args.cases]],
                             "torch_threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
