"""Engine vs stock diffusers: the work of one CFG step outside the network, counted, not timed.

Two counts per denoising step on the shipped default model, each the difference between a
``2 n``-step and an ``n``-step call (so the per-call work cancels), stock
``StableDiffusionPipeline`` against ``GuidedStableDiffusionPipeline`` sharing its components:

- tensor ops run outside the UNet's forwards (a torch dispatch mode, switched off inside them by
  forward hooks): each is a kernel launch on a GPU and microseconds of dispatch on a CPU;
- Python function calls (cProfile's count, builtins included) with the UNet's forward replaced by
  one that returns a cached tensor, so only the pipeline's own calls remain.

Neither depends on the machine or its load, so runs compare exactly; docs/benchmarks.md records
them, and tests/test_host_syncs.py bounds them. Prints a markdown table, then ONE line of JSON.

    python benchmarks/step_counts.py
    python benchmarks/step_counts.py --steps 3 --schedulers ddim     # quick (CI smoke test)
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,  # noqa: E402
                       StableDiffusionPipeline)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from guidance_engine import strict_json  # noqa: E402
from guidance_engine.pipelines import GuidedStableDiffusionPipeline, default_model_path  # noqa: E402

PROMPT = "two red triangles on a blue background"
SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpmpp_2m": DPMSolverMultistepScheduler}


class OpsOutside(TorchDispatchMode):
    """Counts the tensor ops run outside ``network``'s forwards."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.count = 0
        self._depth = 0
        self._hooks = [network.register_forward_pre_hook(lambda *_: self._enter(1)),
                       network.register_forward_hook(lambda *_: self._enter(-1))]

    def _enter(self, step: int) -> None:
        self._depth += step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += self._depth == 0
        return func(*args, **(kwargs or {}))

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)


def _call(pipe, steps: int, **kwargs: Any) -> None:
    pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
         guidance_scale=7.5, **kwargs)


def ops_per_step(pipe, steps: int, **kwargs: Any) -> float:
    totals = []
    for n in (steps, 2 * steps):
        with OpsOutside(pipe.unet) as ops:
            _call(pipe, n, **kwargs)
        totals.append(ops.count)
    return (totals[1] - totals[0]) / steps


def calls_per_step(pipe, steps: int, **kwargs: Any) -> float:
    """Python calls per step with the UNet's forward answering at once (a cached zero tensor)."""
    unet = pipe.unet
    cached: dict[tuple, torch.Tensor] = {}

    def null_forward(sample, *args, **kw):
        return (cached.setdefault(tuple(sample.shape), torch.zeros_like(sample)),)

    own = vars(unet).get("forward")  # an instance forward of its own (an offload hook's), put back after
    unet.forward = null_forward
    try:
        _call(pipe, 2, **kwargs)  # first-call imports done
        totals = []
        for n in (steps, 2 * steps):
            profile = cProfile.Profile()
            profile.enable()
            _call(pipe, n, **kwargs)
            profile.disable()
            totals.append(pstats.Stats(profile).total_calls)
    finally:
        if own is None:
            del unet.forward  # the class's forward again
        else:
            unet.forward = own
    return (totals[1] - totals[0]) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="n: counts are (2n-step run - n-step run) / n")
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS))
    args = parser.parse_args()

    stock = StableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None,
                                                    requires_safety_checker=False)
    guided = GuidedStableDiffusionPipeline.from_pipe(stock)
    for pipe in (stock, guided):
        pipe.set_progress_bar_config(disable=True)
    rows = []
    for name in args.schedulers.split(","):
        stock.scheduler = guided.scheduler = SCHEDULERS[name].from_config(stock.scheduler.config)
        for variant, pipe, kwargs in (("stock", stock, {}), ("engine (scheduler.step)", guided, {}),
                                      (f"engine ({name} solver)", guided, {"sampler": name})):
            rows.append({"scheduler": name, "variant": variant, "ops": ops_per_step(pipe, args.steps, **kwargs),
                         "calls": calls_per_step(pipe, args.steps, **kwargs)})

    print(f"per step, outside the UNet; CFG 7.5, shipped default model, ({2 * args.steps} - {args.steps})-step "
          f"differences, torch {torch.__version__}\n")
    print("| scheduler | variant | tensor ops | extra vs stock | Python calls | extra vs stock |")
    print("|---|---|---:|---:|---:|---:|")
    base: dict[str, dict] = {}
    for r in rows:
        base.setdefault(r["scheduler"], r)
        b = base[r["scheduler"]]
        extra_ops = "" if r is b else f"{r['ops'] - b['ops']:+.0f}"
        extra_calls = "" if r is b else f"{r['calls'] - b['calls']:+.0f}"
        print(f"| {r['scheduler']} | {r['variant']} | {r['ops']:.0f} | {extra_ops} | {r['calls']:.0f} | {extra_calls} |")
    summary = {"benchmark": "step_counts", "steps": args.steps, "torch": torch.__version__,
               "counts": {f"{r['scheduler']}/{r['variant']}": [r["ops"], r["calls"]] for r in rows},
               "max_extra_ops": max(r["ops"] - base[r["scheduler"]]["ops"] for r in rows),
               "max_extra_calls": max(r["calls"] - base[r["scheduler"]]["calls"] for r in rows)}
    print()
    print(strict_json.dumps(summary))


if __name__ == "__main__":
    main()
