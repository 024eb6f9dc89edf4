"""Adaptive Guidance and LinearAG vs CFG on the default model: NFEs, wall time, quality.

For each method, over prompts x seeds: network evaluations per image, wall-time ratio to CFG
(side by side, one process), prompt alignment and fidelity (evaluation classifier), and the
per-image distance to the CFG image of the same seed. AG is swept over thresholds (the
NFE-quality curve that sets the default); LinearAG is calibrated first on data-set captions.
Prints a markdown table, then ONE line of JSON.

    python benchmarks/adaptive.py                       # 20 steps, scale 7.5, 8 seeds
    python benchmarks/adaptive.py --thresholds 0.99,0.995 --seeds 4 --calib-prompts 64
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from guidance_engine import strict_json  # noqa: E402
from guidance_engine.pipelines import GuidedStableDiffusionPipeline, default_model_path  # noqa: E402
from guidance_engine.pipelines.toy.calibration import calibrate_linear_ag  # noqa: E402
from guidance_engine.pipelines.toy.evaluation import DEFAULT_PROMPTS, evaluate, generate  # noqa: E402
from guidance_engine.pipelines.toy.shapes import make_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=7.5)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--thresholds", default="0.99,0.993,0.995,0.997,0.999")
    parser.add_argument("--calib-prompts", type=int, default=200)
    parser.add_argument("--window", type=float, default=0.5)
    parser.add_argument("--period", type=int, default=0)
    parser.add_argument("--linear-threshold", type=float, default=None, help="AG threshold after LinearAG's window")
    parser.add_argument("--calibration", default=None, help="existing LinearAG calibration directory")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    pipe = GuidedStableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None,
                                                         requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    calibration = args.calibration
    if calibration is None:
        calibration = tempfile.mkdtemp(prefix="linear_ag_")
        captions = list(make_dataset(args.calib_prompts, seed=1234)[1])
        calibrate_linear_ag(pipe, captions, calibration, steps=args.steps, scale=args.scale, window=args.window,
                            period=args.period)
    linear_threshold = args.linear_threshold if args.linear_threshold is not None else max(thresholds)

    methods = [{"name": "cfg", "scale": args.scale, "label": "cfg"}]
    methods += [{"name": "ag", "scale": args.scale, "threshold": t, "label": f"ag({t:g})"} for t in thresholds]
    methods += [{"name": "linear_ag", "scale": args.scale, "calibration": calibration,
                 "threshold": linear_threshold, "label": f"linear_ag({linear_threshold:g})"}]
    seeds = list(range(args.seeds))
    rows = evaluate(pipe, methods, prompts=DEFAULT_PROMPTS, seeds=seeds, steps=args.steps, include_real=False,
                    progress=True)

    # per-image distance to the CFG image of the same prompt and seed
    reference = {p: generate(pipe, p, methods[0], seeds, args.steps)[0].astype(np.float64) for p in DEFAULT_PROMPTS}
    by_label = {row["method"]: row for row in rows}
    cfg_row = by_label["cfg"]
    for method in methods:
        diffs = [np.abs(generate(pipe, p, method, seeds, args.steps)[0] - reference[p]).mean() / 255.0
                 for p in DEFAULT_PROMPTS]
        row = by_label[method["label"]]
        row["dist_to_cfg"] = float(np.mean(diffs))
        row["nfe_saving"] = 1.0 - row["nfe"] / cfg_row["nfe"]
        row["time_ratio"] = row["sec_per_image"] / cfg_row["sec_per_image"]

    print(f"\ndefault model, {args.steps} steps, scale {args.scale}, {len(DEFAULT_PROMPTS)} prompts x "
          f"{len(seeds)} seeds, LinearAG calibrated on {args.calib_prompts} trajectories "
          f"(window {args.window}, period {args.period})\n")
    print("| method | NFE/image | NFE saving | time ratio | alignment | FD | dist. to CFG image |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['nfe']:.2f} | {row['nfe_saving']:.1%} | {row['time_ratio']:.3f} | "
              f"{row['alignment']:.3f} | {row['fd']:.2f} | {row['dist_to_cfg']:.4f} |")
    summary = {"benchmark": "adaptive", "steps": args.steps, "scale": args.scale, "seeds": len(seeds),
               "prompts": len(DEFAULT_PROMPTS), "calib_prompts": args.calib_prompts,
               "rows": {row["method"]: {k: round(float(row[k]), 4) for k in
                                        ("nfe", "nfe_saving", "time_ratio", "alignment", "fd", "dist_to_cfg")}
                        for row in rows}}
    print()
    print(strict_json.dumps(summary))


if __name__ == "__main__":
    main()
