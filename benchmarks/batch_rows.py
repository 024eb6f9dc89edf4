"""Peak memory of a 3-branch method (PAG) with and without ``max_batch_rows``, against CFG.

Each configuration runs in a fresh process (peak resident memory, ``ru_maxrss``, is per process):
the tiny random SD components of the tests at `--size` pixels (a larger image than the default
model's 32 px, so that activations, not weights, dominate), `--images` images of one prompt,
`--steps` steps. Configurations: CFG (2 branches, one call of 2 x images rows), PAG in one call (3
x images rows), PAG with max_batch_rows = 2 x images (fits where CFG fits) and = images. Reports
peak RSS, its growth over the same process before sampling (the model loaded: what the run adds),
network calls per step, and the largest difference of the latents from the unchunked PAG run
(float32 rounding of other batch sizes). Prints a markdown table, then ONE line of JSON.

    python benchmarks/batch_rows.py                 # 256 px, 4 images, 3 steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def child(config: dict) -> dict:
    """Run one configuration in this process; peak RSS before and after sampling."""
    import torch

    torch.set_num_threads(config["threads"])
    from guidance_engine.pipelines import GuidedStableDiffusionPipeline
    from guidance_engine.pipelines.toy.tiny_models import tiny_sd_components

    pipe = GuidedStableDiffusionPipeline(**tiny_sd_components(0), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    calls: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    pipe.set_max_batch_rows(config["max_batch_rows"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = pipe("a red circle on a blue background", guidance=config["guidance"], height=config["size"],
               width=config["size"], num_images_per_prompt=config["images"], num_inference_steps=config["steps"],
               generator=torch.Generator().manual_seed(0), output_type="latent")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(out.images, config["latents"])
    return {"rss_before_mib": before / 1024, "rss_peak_mib": after / 1024, "calls_per_step": len(calls) / config["steps"],
            "largest_call_rows": max(calls), "nfe": out.nfe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import tempfile

    import torch

    n = args.images
    configs = [("CFG", {"name": "cfg", "scale": 7.5}, None),
               ("PAG, one call", {"name": "pag", "scale": 7.5, "pag_scale": 3.0}, None),
               (f"PAG, max_batch_rows {2 * n}", {"name": "pag", "scale": 7.5, "pag_scale": 3.0}, 2 * n),
               (f"PAG, max_batch_rows {n}", {"name": "pag", "scale": 7.5, "pag_scale": 3.0}, n)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, guidance, limit in configs:
            config = {"guidance": guidance, "max_batch_rows": limit, "size": args.size, "images": n,
                      "steps": args.steps, "threads": args.threads, "latents": os.path.join(tmp, f"{len(rows)}.pt")}
            result = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], check=True,
                                    capture_output=True, text=True)
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append({"config": label, "max_batch_rows": limit, **measured, "latents": config["latents"]})
        reference = torch.load(rows[1]["latents"])
        for row in rows[1:]:
            row["max_abs_diff_vs_one_call"] = float((torch.load(row.pop("latents")) - reference).abs().max())
        rows[0].pop("latents")
    print(f"Peak memory, tiny SD UNet at {args.size} px, {n} images, {args.steps} steps, {args.threads} threads "
          f"(load average {os.getloadavg()[0]:.2f})\n")
    print("| configuration | rows per call (max) | calls per step | NFE/image | peak RSS MiB | added by the run MiB |"
          " max abs diff vs one call |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        added = row["rss_peak_mib"] - row["rss_before_mib"]
        diff = row.get("max_abs_diff_vs_one_call")
        print(f"| {row['config']} | {row['largest_call_rows']} | {row['calls_per_step']:g} | {row['nfe']:g} | "
              f"{row['rss_peak_mib']:.0f} | {added:.0f} | {'' if diff is None else f'{diff:.2e}'} |")
    added = {row["config"]: round(row["rss_peak_mib"] - row["rss_before_mib"], 1) for row in rows}
    print(json.dumps({"benchmark": "batch_rows", "size": args.size, "images": n, "steps": args.steps,
                      "added_rss_mib": added,
                      "pag_chunked_at_cfg_rows_over_cfg": round(added[configs[2][0]] / added["CFG"], 3),
                      "pag_one_call_over_cfg": round(added[configs[1][0]] / added["CFG"], 3),
                      "max_abs_diff": max(row.get("max_abs_diff_vs_one_call", 0.0) for row in rows)}))


if __name__ == "__main__":
    main()
