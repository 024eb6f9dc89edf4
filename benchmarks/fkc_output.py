"""FKC's returned image vs its whole weighted population, on an exact 1-D Gaussian mixture.

W1 distance to the exact target p_c^b p_u^(1-b) of: CFG at the same b; every FKC particle,
weighted by its final normalised weight (the population); the one particle per group the
pipelines return (drawn by weight, ``FKC.output_rows``); and row 0 of each group, which is what
the old argmax output returned after a resample. DDIM eta = 1 on the exact eps of the mixture.
Prints a markdown table, then ONE line of JSON.

    python benchmarks/fkc_output.py                    # about 50 s on one CPU thread
"""

from __future__ import annotations

import argparse
import warnings

import torch
from diffusers import DDIMScheduler

from guidance_engine import strict_json
from guidance_engine import CFG
from guidance_engine.pipelines.toy.gmm import (GaussianMixture, GMMBranchModel, guided_log_density, sample_guided_target,
                                 wasserstein1_1d)
from guidance_engine.methods.fkc import FKC
from guidance_engine.samplers import sample

MIXTURE = GaussianMixture(torch.tensor([[-2.0], [1.0], [2.0], [0.0]], dtype=torch.float64),
                          torch.tensor([0.5, 0.6, 0.5, 0.8], dtype=torch.float64),
                          torch.full((4,), 0.25, dtype=torch.float64), torch.tensor([0, 0, 1, 1]))


def run(guidance, rows: int, steps: int, seed: int):
    scheduler = DDIMScheduler(clip_sample=False)
    noise = torch.randn(rows, 1, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sample(GMMBranchModel(MIXTURE, scheduler), noise, guidance, scheduler=scheduler, num_steps=steps,
                      prediction_type="epsilon", sampler="ddim", eta=1.0, progress=False,
                      generator=torch.Generator().manual_seed(1000 + seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--groups", type=int, default=4096, help="output images (groups) per run")
    parser.add_argument("--particles", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = lambda z: guided_log_density(z, MIXTURE, 0, args.scale)  # noqa: E731
    w1 = lambda x, w=None: wasserstein1_1d(x, target, 6.0, weights=w)  # noqa: E731
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    floor = mean([w1(sample_guided_target(args.groups, MIXTURE, 0, args.scale, torch.Generator().manual_seed(s)))
                  for s in range(args.seeds)])
    cfg = mean([w1(run(CFG(scale=args.scale), args.groups, args.steps, s).x) for s in range(args.seeds)])
    rows = []
    for trigger in ("interval", "ess"):
        for k in args.particles:
            found = {"population": [], "draw": [], "row0": []}
            for s in range(args.seeds):
                fkc = FKC(scale=args.scale, particles=k, trigger=trigger, seed=s)
                result = run(fkc, args.groups * k, args.steps, s)
                weights = torch.softmax(result.state.log_weights.double().view(args.groups, k), 1).view(-1)
                found["population"].append(w1(result.x, weights))
                found["draw"].append(w1(result.x[fkc.output_rows(result.state)]))
                found["row0"].append(w1(result.x[torch.arange(args.groups) * k]))
            rows.append({"trigger": trigger, "k": k, **{key: mean(v) for key, v in found.items()}})
    print(f"\nFKC output on an exact 1-D mixture, b = {args.scale}, {args.steps} steps DDIM eta = 1, "
          f"{args.groups} groups, mean of {args.seeds} seeds; W1 to the exact target\n")
    print(f"exact target draws ({args.groups}): {floor:.4f}; CFG: {cfg:.4f}\n")
    print("| trigger | K | population (weighted) | returned image (draw) | draw / population | row 0 (old argmax) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['trigger']} | {r['k']} | {r['population']:.4f} | {r['draw']:.4f} | "
              f"{r['draw'] / r['population']:.2f} | {r['row0']:.4f} |")
    print()
    print(strict_json.dumps({"benchmark": "fkc_output", "scale": args.scale, "steps": args.steps, "groups": args.groups,
                      "seeds": args.seeds, "floor_w1": round(floor, 4), "cfg_w1": round(cfg, 4),
                      "rows": {f"{r['trigger']}_k{r['k']}": {key: round(r[key], 4) for key in
                                                             ("population", "draw", "row0")} for r in rows}}))


if __name__ == "__main__":
    main()
