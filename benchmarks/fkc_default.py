"""FKC vs CFG on the default model at equal NFEs (alignment, fidelity, saturation).

FKC with K particles and n steps costs K * 2n network evaluations per output image; CFG gets
the same budget as K * n steps. Both use Euler ancestral (FKC needs a stochastic sampler).
Prints a markdown table, then ONE line of JSON.

    python benchmarks/fkc_default.py --scale 5 --particles 4 --steps 10 --seeds 6
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from guidance_engine import strict_json  # noqa: E402
from guidance_engine.pipelines import GuidedStableDiffusionPipeline, default_model_path  # noqa: E402
from guidance_engine.pipelines.toy.evaluation import DEFAULT_PROMPTS, evaluate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args()
    pipe = GuidedStableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None,
                                                         requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    seeds = range(args.seeds)
    k, n = args.particles, args.steps
    common = dict(prompts=DEFAULT_PROMPTS, seeds=seeds, include_real=False, progress=False, sampler="euler_ancestral")
    rows = evaluate(pipe, [{"name": "cfg", "scale": args.scale, "label": f"cfg, {n} steps"},
                           {"name": "fkc", "scale": args.scale, "particles": k, "label": f"fkc K={k}, {n} steps"}],
                    steps=n, **common)
    rows += evaluate(pipe, [{"name": "cfg", "scale": args.scale, "label": f"cfg, {k * n} steps (equal NFEs)"}],
                     steps=k * n, **common)
    print(f"\ndefault model, scale/b {args.scale}, Euler ancestral, {len(DEFAULT_PROMPTS)} prompts x {args.seeds} seeds\n")
    print("| method | NFE/image | alignment | FD | saturation | diversity |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['nfe']:.0f} | {r['alignment']:.3f} | {r['fd']:.1f} | {r['saturation']:.3f} | "
              f"{r['diversity']:.3f} |")
    print()
    print(strict_json.dumps({"benchmark": "fkc_default", "scale": args.scale, "particles": k, "steps": n,
                      "seeds": args.seeds, "rows": {r["method"]: {key: round(float(r[key]), 4) for key in
                                                                  ("nfe", "alignment", "fd", "saturation")}
                                                    for r in rows}}))


if __name__ == "__main__":
    main()
