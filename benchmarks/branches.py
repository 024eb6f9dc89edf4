"""Three-branch perturbation guidance: one batched forward vs one forward per branch.

PAG, SEG and SLG need three predictions a step (unconditional, conditional, perturbed). The
engine evaluates them as rows of ONE batched forward (the perturbation acts on its rows inside
it); diffusers' guiders run one forward per branch, altering the model between them. Both are
timed here through the same sampler core, combine and models, in one process: "batched" is the
engine's branch model, "per-branch" wraps it so that every branch is its own forward. Reports
the median wall time per image over interleaved repeats and the ratio per-branch / batched.
Prints a markdown table, then ONE line of JSON.

    python benchmarks/branches.py                       # 1 thread, all models, batch 1
    python benchmarks/branches.py --models small,sd3 --batch 2 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from diffusers import (SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,  # noqa: E402
                       UNet2DConditionModel)

from guidance_engine import strict_json  # noqa: E402
from guidance_engine import resolve_guidance  # noqa: E402
from guidance_engine.pipelines import default_model_path  # noqa: E402
from guidance_engine.pipelines.branches import NetworkBranches  # noqa: E402
from guidance_engine.pipelines.stable_diffusion_3 import TransformerBranches  # noqa: E402
from guidance_engine.pipelines.toy.tiny_models import tiny_sd3_components, tiny_sd_components  # noqa: E402
from guidance_engine.samplers import sample  # noqa: E402
from guidance_engine.samplers.schedule import is_flow_scheduler  # noqa: E402

PROMPT = "two red triangles on a blue background"
# Every method with CFG on, so that each step has three branches; the perturbed term at every step.
METHODS = {
    "pag": {"name": "pag", "scale": 4.0, "pag_scale": 3.0},
    "seg": {"name": "seg", "scale": 4.0, "seg_scale": 3.0},
    "slg": {"name": "slg", "scale": 7.0, "slg_scale": 2.8, "start": 0.0, "stop": 1.0},
}


class PerBranch:
    """The engine's branch model, but one network call per branch (as diffusers' guiders)."""

    def __init__(self, inner: NetworkBranches) -> None:
        self.inner = inner

    def __call__(self, x, timestep, requests):
        out = {}
        for request in requests:
            out.update(self.inner(x, timestep, [request]))
        return out


def small_unet_pipe() -> StableDiffusionPipeline:
    """A random SD-shaped UNet (32 x 32 latents, three levels, cross-attention in two)."""
    comp = tiny_sd_components(0)
    torch.manual_seed(0)
    comp["unet"] = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=comp["text_encoder"].config.hidden_size, attention_head_dim=8, norm_num_groups=32).eval()
    return StableDiffusionPipeline(**comp, requires_safety_checker=False)


def small_sd3_pipe() -> StableDiffusion3Pipeline:
    """A random SD3 transformer: 6 joint blocks of width 64 on 16 x 16 latents (patch 1: 256 tokens)."""
    comp = tiny_sd3_components(0)
    torch.manual_seed(0)
    comp["transformer"] = SD3Transformer2DModel(
        sample_size=16, patch_size=1, in_channels=4, num_layers=6, attention_head_dim=16, num_attention_heads=4,
        caption_projection_dim=64, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32).eval()
    return StableDiffusion3Pipeline(**comp)


def setup(model: str, batch: int):
    """(branch model, latent shape, scheduler, prediction type, layers) for ``model``."""
    if model == "sd3":
        pipe = small_sd3_pipe()
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            [PROMPT] * batch, None, None, do_classifier_free_guidance=True, device="cpu")
        branches = TransformerBranches(pipe.transformer, {
            "cond": {"encoder_hidden_states": embeds, "pooled_projections": pooled},
            "uncond": {"encoder_hidden_states": negative, "pooled_projections": negative_pooled}})
        size = pipe.transformer.config.sample_size
        return branches, (batch, 4, size, size), pipe.scheduler, "flow", [2, 3]
    if model == "default":
        pipe = StableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None,
                                                       requires_safety_checker=False)
    else:
        pipe = small_unet_pipe()
    embeds, negative = pipe.encode_prompt([PROMPT] * batch, "cpu", 1, True)
    branches = NetworkBranches(pipe.unet, {"cond": {"encoder_hidden_states": embeds},
                                        "uncond": {"encoder_hidden_states": negative}})
    size = pipe.unet.config.sample_size
    prediction = "flow" if is_flow_scheduler(pipe.scheduler) else pipe.scheduler.config.get("prediction_type",
                                                                                            "epsilon")
    return branches, (batch, pipe.unet.config.in_channels, size, size), pipe.scheduler, prediction, "mid"


def run(model, shape, scheduler, prediction, guide, steps: int) -> tuple[float, torch.Tensor]:
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        result = sample(model, noise, guide, scheduler=scheduler, num_steps=steps, prediction_type=prediction,
                        progress=False)
    return time.perf_counter() - start, result.x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="small,default,sd3")
    parser.add_argument("--methods", default="pag,seg,slg")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for model in args.models.split(","):
        branches, shape, scheduler, prediction, layers = setup(model, args.batch)
        for method in args.methods.split(","):
            if model == "sd3" and method != "slg":
                continue  # SD3's joint attention: only block skipping (see docs/perturbation.md)
            guide = resolve_guidance({**METHODS[method], "layers": layers})
            variants = {"batched": branches, "per-branch": PerBranch(branches)}
            outputs = {key: run(m, shape, scheduler, prediction, guide, 2)[1] for key, m in variants.items()}  # warm-up
            gap = float((outputs["batched"] - outputs["per-branch"]).abs().max())
            times: dict[str, list[float]] = {key: [] for key in variants}
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                for key, m in variants.items():
                    times[key].append(run(m, shape, scheduler, prediction, guide, args.steps)[0] / args.batch)
            batched, per_branch = statistics.median(times["batched"]), statistics.median(times["per-branch"])
            rows.append({"model": model, "method": method, "layers": str(layers), "batched_s": batched,
                         "per_branch_s": per_branch, "ratio": per_branch / batched, "max_abs_diff": gap})

    print(f"{args.steps} steps, batch {args.batch}, {args.repeats} interleaved repeats, median seconds per image; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"thread(s)\n")
    print("| model | method | layers | batched s/img | per-branch s/img | per-branch / batched | max abs diff |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['layers']} | {r['batched_s']:.4f} | {r['per_branch_s']:.4f} | "
              f"{r['ratio']:.3f} | {r['max_abs_diff']:.1e} |")
    summary = {"benchmark": "branches", "steps": args.steps, "batch": args.batch, "repeats": args.repeats,
               "threads": torch.get_num_threads(), "methods": {k: METHODS[k] for k in args.methods.split(",")},
               "ratios": {f"{r['model']}/{r['method']}": round(r["ratio"], 4) for r in rows},
               "median_ratio": round(statistics.median(r["ratio"] for r in rows), 4)}
    print()
    print(strict_json.dumps(summary))


if __name__ == "__main__":
    main()
