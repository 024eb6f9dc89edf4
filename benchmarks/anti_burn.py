"""The anti-burn and new methods against CFG at equal NFE on the text-to-image default model.

Every prompt x seed is generated with each method (seed s gives every method the same initial
noise), 2 network evaluations per step for all of them: CFG at a moderate and at a high scale,
Dynamic Thresholding (the high scale mimicking the moderate one), CFGNorm and FreSca at both
scales, NAG under CFG at the moderate scale (its negative prompt the empty one: NAG then
extrapolates away from the empty context). Measured with the EVALUATION classifier: accuracy of
the shape, colour and both ("class right"), background accuracy, Frechet distance of
eval-classifier features to real images of the same prompts, mean saturation and clipping, NFE per
image. Each method is paired with CFG at the scale it runs at (exact McNemar on "class right" over
the same prompts and seeds). Prints a markdown table, then ONE line of JSON.

    python benchmarks/anti_burn.py                      # 12 prompts x 16 seeds, 20 steps
    python benchmarks/anti_burn.py --seeds 4 --steps 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gfcg import TextTask, mcnemar, measure  # noqa: E402  (the same task, metrics and test as docs/gfcg.md)

from guidance_engine import strict_json  # noqa: E402
from guidance_engine.pipelines.toy.evaluation import load_classifier  # noqa: E402


def methods(moderate: float, high: float) -> list[tuple[str, dict, float]]:
    """(label, guidance, the CFG scale it is paired with)."""
    return [
        (f"CFG {moderate:g}", {"name": "cfg", "scale": moderate}, moderate),
        (f"CFG {high:g}", {"name": "cfg", "scale": high}, high),
        (f"Dynamic Thresholding {high:g} / mimic {moderate:g}",
         {"name": "dynamic_thresholding", "scale": high, "mimic_scale": moderate}, high),
        (f"CFGNorm {moderate:g}", {"name": "cfg_norm", "scale": moderate}, moderate),
        (f"CFGNorm {high:g}", {"name": "cfg_norm", "scale": high}, high),
        # the default model's latents are 8 x 8: FreSca's default cutoff 20 (ComfyUI's, for 128 x 128
        # SD latents) would put the whole spectrum in the low band (then it is CFG); 2 keeps |k| < 2 low
        (f"FreSca {moderate:g}", {"name": "fresca", "scale": moderate, "freq_cutoff": 2}, moderate),
        (f"FreSca {high:g}", {"name": "fresca", "scale": high, "freq_cutoff": 2}, high),
        (f"NAG + CFG {moderate:g}", {"name": "nag", "scale": moderate}, moderate),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--moderate", type=float, default=7.5)
    parser.add_argument("--high", type=float, default=15.0)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    task = TextTask(args.model)
    task.pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier("eval")
    seeds = list(range(args.seeds))
    rows = []
    for label, guidance, paired_scale in methods(args.moderate, args.high):
        start = time.perf_counter()
        generated = task.generate(guidance, seeds, args.steps)
        seconds = time.perf_counter() - start
        row = {"label": label, "guidance": guidance, "paired_cfg_scale": paired_scale,
               "nfe": float(np.mean(generated["nfe"])), "seconds": seconds, **measure(classifier, generated, task.real)}
        rows.append(row)
    by_label = {row["label"]: row for row in rows}
    for row in rows:
        base = by_label[f"CFG {row['paired_cfg_scale']:g}"]
        row["vs_cfg"] = None if base is row else mcnemar(row["correct"], base["correct"])
        row["time_vs_cfg"] = row["seconds"] / base["seconds"]

    print(f"{task.description} x {len(seeds)} seeds, {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}\n")
    print("| method | NFE/image | class right | shape | colour | background | FD | saturation | clipping | "
          "vs CFG at its scale: only it / only CFG / McNemar p | time vs that CFG |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        test = row["vs_cfg"]
        paired = "" if test is None else f"{test['only_gfcg']} / {test['only_cfg']} / {test['p_value']:.3f}"
        print(f"| {row['label']} | {row['nfe']:g} | {row['acc']:.3f} | {row['acc_shape']:.3f} | "
              f"{row['acc_color']:.3f} | {row['acc_background']:.3f} | {row['fd']:.1f} | {row['saturation']:.3f} | "
              f"{row['clipping']:.4f} | {paired} | {row['time_vs_cfg']:.2f} |")
    summary = {"benchmark": "anti_burn", "seeds": len(seeds), "prompts": len(task.prompts), "steps": args.steps,
               "moderate": args.moderate, "high": args.high,
               "rows": {row["label"]: {"acc": round(row["acc"], 4), "fd": round(row["fd"], 2),
                                       "saturation": round(row["saturation"], 4), "clipping": round(row["clipping"], 5),
                                       "nfe": row["nfe"],
                                       "p_vs_cfg": None if row["vs_cfg"] is None else round(row["vs_cfg"]["p_value"], 4)}
                        for row in rows}}
    print()
    print(strict_json.dumps(summary))


if __name__ == "__main__":
    main()
