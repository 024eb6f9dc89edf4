"""CFG, STG, APG and AG on the default video model, at equal settings: alignment and cost.

The shipped tiny Wan 2.1 (`pipelines/default_model_video`, trained by
`pipelines/toy/train_video.py` on moving shapes) generates the 12 evaluation prompts of
`pipelines/toy/video_evaluation.py` x `--seeds` seeds (the same initial noise for every method),
9 frames of 32 x 32, `--steps` UniPC steps. Every guided method runs at the same CFG scale
`--scale`:

- unguided: the conditional prediction alone (CFG 1), the floor;
- CFG: `u + s (c - u)`;
- STG: the engine's `slg` on Wan's blocks (Hyung et al., arXiv 2411.18664, STG-R: the
  conditional prediction with block `--stg-layer` skipped as a third branch, `+ w (c - p)`),
  w = `--stg-scale`, from 10 % to 90 % of the steps (the window Wan2GP skips layers in);
- APG: adaptive projected guidance at its defaults (eta 0, momentum -0.5, r 15);
- AG: adaptive guidance (Castillo et al.), CFG until cos(D_c, D_u) >= 0.995, then the
  conditional prediction alone.

Scores (video_evaluation): shape and colour by the image model's eval classifier averaged over
the frames, direction by the centroid track; alignment = their mean per clip; NFEs per clip;
wall time relative to CFG, the methods interleaved prompt by prompt in one process (machine drift
hits every method alike). Prints a markdown table, then ONE line of JSON.

    python benchmarks/video_guidance.py                  # 20 steps, 4 seeds, scale 5
    python benchmarks/video_guidance.py --seeds 2 --steps 10
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from guidance_engine import strict_json  # noqa: E402
from guidance_engine.pipelines.models import VIDEO_SHORTHAND, load_pipeline  # noqa: E402
from guidance_engine.pipelines.toy import moving_shapes  # noqa: E402
from guidance_engine.pipelines.toy.classifiers import load_classifier  # noqa: E402
from guidance_engine.pipelines.toy.video_evaluation import (DEFAULT_PROMPTS, format_table, generate_clips,  # noqa: E402
                                                            real_clips_for_prompt, score_clips, summarize)


def methods(scale: float, stg_scale: float, stg_layer: int) -> dict[str, dict]:
    """The compared methods, by row label (module docstring)."""
    return {
        "unguided (CFG 1)": {"name": "cfg", "scale": 1.0},
        f"CFG {scale:g}": {"name": "cfg", "scale": scale},
        f"STG (slg, block {stg_layer}, w {stg_scale:g})": {"name": "slg", "scale": scale, "slg_scale": stg_scale,
                                                           "layers": [stg_layer], "start": 0.1, "stop": 0.9},
        f"APG {scale:g}": {"name": "apg", "scale": scale},
        f"AG (CFG {scale:g}, 0.995)": {"name": "ag", "scale": scale},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt")
    parser.add_argument("--scale", type=float, default=5.0, help="the CFG scale of every guided method")
    parser.add_argument("--stg-scale", type=float, default=1.0, help="STG's w")
    parser.add_argument("--stg-layer", type=int, default=2, help="the Wan block STG skips (the model has 4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=VIDEO_SHORTHAND,
                        help="the Wan checkpoint directory (default: the shipped video model)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated row labels' first words to run (e.g. 'unguided,CFG'); default all")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier("eval")
    table = methods(args.scale, args.stg_scale, args.stg_layer)
    if args.methods:
        wanted = [w.strip() for w in args.methods.split(",")]
        table = {label: m for label, m in table.items() if label.split()[0] in wanted}
        if not table:
            parser.error(f"--methods: none of {wanted} starts a row label (unguided, CFG, STG, APG, AG)")
    seeds = list(range(args.seeds))
    size = {"num_frames": moving_shapes.NUM_FRAMES, "height": moving_shapes.IMAGE_SIZE,
            "width": moving_shapes.IMAGE_SIZE}
    load_before = os.getloadavg()
    scores = {label: [] for label in table}
    nfes = {label: [] for label in table}
    seconds = {label: 0.0 for label in table}
    real = []
    for i, prompt in enumerate(DEFAULT_PROMPTS):
        real += score_clips(real_clips_for_prompt(prompt, len(seeds), seed=30_000 + i), prompt, classifier)
        for label, method in table.items():  # interleaved: drift of the machine's load hits all alike
            clips, nfe, sec = generate_clips(pipe, prompt, method, seeds, args.steps, **size)
            scores[label] += score_clips(clips, prompt, classifier)
            nfes[label].append(nfe)
            seconds[label] += sec
    load_after = os.getloadavg()
    cfg_label = f"CFG {args.scale:g}"
    rows = [{"method": "data set clips (the scorer's ceiling)", **summarize(real)}]
    for label in table:
        rows.append({"method": label, "guidance": table[label], **summarize(scores[label]),
                     "nfe": float(np.mean(nfes[label])), "sec_per_clip": seconds[label] / len(scores[label]),
                     "time_vs_cfg": seconds[label] / seconds[cfg_label] if cfg_label in seconds else None})
    print(f"default video model: {len(DEFAULT_PROMPTS)} prompts x {args.seeds} seeds, {args.steps} steps, "
          f"{size['num_frames']} frames of {size['width']} x {size['height']}, scale {args.scale:g}; chance: shape "
          f"0.33, colour 0.25, direction 0.25; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after, "
          f"{os.cpu_count()} CPUs, {args.threads} thread(s)")
    print(format_table(rows))
    print(strict_json.dumps({"benchmark": "video_guidance", "steps": args.steps, "seeds": args.seeds,
                             "prompts": len(DEFAULT_PROMPTS), "scale": args.scale, "stg_scale": args.stg_scale,
                             "stg_layer": args.stg_layer, "threads": args.threads, "model": str(args.model),
                             "cpu": platform.processor() or
                             platform.machine(), "load_average": [load_before[0], load_after[0]],
                             "time": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}))


if __name__ == "__main__":
    main()
