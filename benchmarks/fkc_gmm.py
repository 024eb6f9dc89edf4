"""FKC vs CFG on an analytic Gaussian mixture: distance to the true target p_c^b p_u^(1-b).

The "network" is the exact eps of a labelled Gaussian mixture (guidance_engine.pipelines.toy.gmm), so every
error is the method's (and the discretisation's), not a model's. CFG at weight b samples a biased
law; FKC at the same b reweights and resamples groups of K particles towards the target. All
methods get the same noise, solver (DDIM eta=1, i.e. Euler ancestral on DDIM's levels), steps and
number of output samples (all particles of all groups); distances are to exact target draws
(rejection sampling) and, in 2-D, to the target's density on a grid. Prints a markdown table,
then ONE line of JSON.

    python benchmarks/fkc_gmm.py                           # 2-D, b = 3, 100 steps, 16384 samples
    python benchmarks/fkc_gmm.py --dim 8 --scale 3         # 8-D (MMD only)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from diffusers import DDIMScheduler

from guidance_engine import strict_json
from guidance_engine import CFG
from guidance_engine.pipelines.toy.gmm import (GaussianMixture, GMMBranchModel, grid_kl, grid_probabilities,
                                 guided_log_density, mmd, sample_guided_target)
from guidance_engine.methods.fkc import FKC
from guidance_engine.samplers import sample

LIMIT, BINS = 5.0, 30  # the KL grid: 30 x 30 cells on [-5, 5]^2


def mixture(dim: int) -> GaussianMixture:
    """Class 0: two components; class 1: two, one overlapping class 0 (so CFG's bias shows)."""
    base = torch.tensor([[-2.0, 0.0], [1.0, 1.5], [2.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
    means = torch.zeros(4, dim, dtype=torch.float64)
    means[:, :2] = base
    if dim > 2:  # spread the components in the extra dimensions too, reproducibly
        means[:, 2:] = 1.5 * torch.randn(4, dim - 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return GaussianMixture(means, torch.tensor([0.5, 0.6, 0.5, 0.8], dtype=torch.float64),
                           torch.full((4,), 0.25, dtype=torch.float64), torch.tensor([0, 0, 1, 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2)
    parser.add_argument("--scale", type=float, default=3.0, help="b, the CFG weight (same for CFG and FKC)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--samples", type=int, default=16384, help="output samples per run (all particles)")
    parser.add_argument("--particles", type=int, nargs="+", default=[2, 4, 8, 16, 64, 128])
    parser.add_argument("--seeds", type=int, default=3, help="runs per method (noise and resampling seeds)")
    parser.add_argument("--mmd-samples", type=int, default=8192, help="subsample for MMD (cost is quadratic)")
    parser.add_argument("--bandwidth", type=float, default=1.0, help="MMD Gaussian kernel bandwidth")
    parser.add_argument("--clamp", type=float, default=float("inf"), help="FKC clamp (inf = paper)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    mix = mixture(args.dim)
    scheduler = DDIMScheduler(clip_sample=False)  # DDPM's linear betas, 1000 steps; final level abar = 1
    model = GMMBranchModel(mix, scheduler, label=0)
    b, n, m = args.scale, args.samples, args.mmd_samples
    target = grid_probabilities(lambda x: guided_log_density(x, mix, 0, b), LIMIT, BINS) if args.dim == 2 else None

    def distances(x: torch.Tensor, seed: int) -> tuple[float, float]:
        ref = sample_guided_target(m, mix, 0, b, torch.Generator().manual_seed(10_000 + seed))
        kl = grid_kl(x, target, LIMIT) if target is not None else float("nan")
        return kl, mmd(x[:m], ref, args.bandwidth)

    methods = [("exact target draws", None, 0), ("CFG", CFG(scale=b), 1)]
    methods += [(f"FKC K={k}", FKC(scale=b, particles=k, clamp=args.clamp), k) for k in args.particles]
    rows = []
    for label, guidance, k in methods:
        kls, mmds, secs, nfe = [], [], [], 0.0
        for seed in range(args.seeds):
            start = time.perf_counter()
            if guidance is None:
                x = sample_guided_target(n, mix, 0, b, torch.Generator().manual_seed(seed)).float()
            else:
                if isinstance(guidance, FKC):
                    guidance = guidance.new(seed=seed)
                noise = torch.randn(n, args.dim, generator=torch.Generator().manual_seed(seed))
                result = sample(model, noise, guidance, scheduler=scheduler, num_steps=args.steps,
                                prediction_type="epsilon", sampler="ddim", eta=1.0,
                                generator=torch.Generator().manual_seed(1000 + seed), progress=False)
                x, nfe = result.x, result.nfe
            secs.append(time.perf_counter() - start)
            kl, d = distances(x, seed)
            kls.append(kl)
            mmds.append(d)
        rows.append(dict(method=label, particles=k, kl=statistics.mean(kls), mmd2=statistics.mean(mmds),
                         mmd2_sd=statistics.stdev(mmds) if len(mmds) > 1 else 0.0, nfe=nfe,
                         nfe_one_per_group=nfe * k, seconds=statistics.mean(secs)))

    print(f"FKC vs CFG on a {args.dim}-D Gaussian mixture, b = {b:g}, {args.steps} steps DDIM eta=1, "
          f"{n} samples per run, mean of {args.seeds} seeds (torch {torch.__version__}, 1 thread)\n")
    print("| method | KL(hist ‖ target), 2-D grid | MMD² (h={:g}) | ± sd | NFE per sample (all particles) "
          "| NFE per kept image (1 per group) | s per run |".format(args.bandwidth))
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        kl = "n/a" if r["kl"] != r["kl"] else f"{r['kl']:.4f}"
        print(f"| {r['method']} | {kl} | {r['mmd2']:.5f} | {r['mmd2_sd']:.5f} | {r['nfe']:g} | "
              f"{r['nfe_one_per_group']:g} | {r['seconds']:.2f} |")
    cfg = rows[1]
    fkc = {r["particles"]: r for r in rows[2:]}
    head = fkc.get(64) or rows[-1]
    summary = {"dim": args.dim, "scale": b, "steps": args.steps, "samples": n, "seeds": args.seeds,
               "floor_kl": rows[0]["kl"], "floor_mmd2": rows[0]["mmd2"],
               "cfg_kl": cfg["kl"], "cfg_mmd2": cfg["mmd2"],
               "ratio_kl_cfg_over_fkc64": cfg["kl"] / head["kl"], "ratio_mmd2_cfg_over_fkc64": cfg["mmd2"] / head["mmd2"],
               "fkc_kl_per_k": {k: r["kl"] for k, r in fkc.items()},
               "fkc_mmd2_per_k": {k: r["mmd2"] for k, r in fkc.items()}}
    print()
    print(strict_json.dumps(summary))  # no KL in D > 2: "nan"


if __name__ == "__main__":
    main()
