"""Engine vs stock diffusers: wall-time overhead of the sampler core for CFG.

Runs the stock StableDiffusionPipeline and GuidedStableDiffusionPipeline (sharing the same
components) alternately, same prompt, seed, scheduler and steps, in one process. Each repeat times
every variant once, in a rotating order (so no variant always runs first after another), and each
engine time is paired with the stock time of the same repeat: the median of the paired ratios
engine / stock with a 95% bootstrap interval (resampling the pairs), and the extra time per step
(median paired difference / steps, in microseconds).

On a shared machine the network's own time varies by tens of percent from call to call, which
swamps a 1% overhead in whole-call ratios. Both pipelines call the same UNet (one module, shared by
``from_pipe``) with the same inputs (shapes, dtypes, layout and timestep dtype checked equal), so
the benchmark also times each call's UNet forwards and reports the time *outside* the network: the
sampler core's cost. Its headline ratio holds the network time equal: per pair,
(network_stock + outside_engine) / (network_stock + outside_stock), with a 95% bootstrap interval.
Prints a markdown table, then ONE line of JSON.

    python benchmarks/overhead.py                 # default model + a medium random SD UNet
    python benchmarks/overhead.py --repeats 9 --steps 20 --models medium
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,  # noqa: E402
                       StableDiffusionPipeline, UNet2DConditionModel)

from guidance_engine import strict_json  # noqa: E402
from guidance_engine.pipelines import GuidedStableDiffusionPipeline, default_model_path  # noqa: E402
from guidance_engine.pipelines.toy.tiny_models import tiny_sd_components  # noqa: E402

PROMPT = "two red triangles on a blue background"


def medium_components() -> dict:
    """A random SD-shaped model big enough that the UNet dominates a step, as in real use."""
    comp = tiny_sd_components(0)
    torch.manual_seed(0)
    comp["unet"] = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=comp["text_encoder"].config.hidden_size, attention_head_dim=8, norm_num_groups=32).eval()
    return comp


def load(name: str) -> StableDiffusionPipeline:
    if name == "default":
        stock = StableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None,
                                                        requires_safety_checker=False)
    else:
        stock = StableDiffusionPipeline(**medium_components(), requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    return stock


class NetworkClock:
    """Seconds spent inside ``unet``'s forwards (an instance attribute wrapping the forward, so
    every caller of the module is timed the same way)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.seconds = 0.0
        forward = unet.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return forward(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        unet.forward = timed


def time_call(pipe, steps: int, clock: NetworkClock | None = None, **kwargs) -> tuple[float, float]:
    """(whole call, of which inside the network) in seconds."""
    inside = clock.seconds if clock is not None else 0.0
    start = time.perf_counter()
    pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
         **kwargs)
    whole = time.perf_counter() - start
    return whole, (clock.seconds - inside) if clock is not None else 0.0


def bootstrap_median_interval(values: list[float], seed: int, resamples: int = 10000) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the median of ``values`` (paired ratios)."""
    import numpy as np

    data = np.asarray(values)
    draws = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    medians = np.median(data[draws], axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,medium")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scale", type=float, default=7.5)
    args = parser.parse_args()

    rows = []
    for model in args.models.split(","):
        stock = load(model)
        guided = GuidedStableDiffusionPipeline.from_pipe(stock)
        guided.set_progress_bar_config(disable=True)
        assert guided.unet is stock.unet
        clock = NetworkClock(stock.unet)
        for scheduler_name, cls in (("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler),
                                    ("dpmpp_2m", DPMSolverMultistepScheduler)):
            stock.scheduler = guided.scheduler = cls.from_config(stock.scheduler.config)
            variants = {"stock": (stock, {}), "engine (scheduler.step)": (guided, {}),
                        f"engine ({scheduler_name} solver)": (guided, {"sampler": scheduler_name})}
            for pipe, kwargs in variants.values():  # warm-up
                time_call(pipe, 2, guidance_scale=args.scale, **kwargs)
            times: dict[str, list[float]] = {k: [] for k in variants}
            inside: dict[str, list[float]] = {k: [] for k in variants}
            keys = list(variants)
            for repeat in range(args.repeats):  # interleaved, so drift hits every variant alike
                shift = repeat % len(keys)
                for key in keys[shift:] + keys[:shift]:
                    pipe, kwargs = variants[key]
                    whole, network = time_call(pipe, args.steps, clock, guidance_scale=args.scale, **kwargs)
                    times[key].append(whole)
                    inside[key].append(network)
            base, base_net = times["stock"], inside["stock"]
            for key, values in times.items():
                ratios = [t / b for t, b in zip(values, base)]
                low, high = bootstrap_median_interval(ratios, seed=len(rows))
                extra_us = statistics.median(t - b for t, b in zip(values, base)) / args.steps * 1e6
                outside = [t - n for t, n in zip(values, inside[key])]
                base_outside = [b - n for b, n in zip(base, base_net)]
                held = [(n + o) / (n + bo) for n, o, bo in zip(base_net, outside, base_outside)]
                held_low, held_high = bootstrap_median_interval(held, seed=len(rows) + 1000)
                rows.append({"model": model, "scheduler": scheduler_name, "variant": key,
                             "median_s": statistics.median(values), "ratio_to_stock": statistics.median(ratios),
                             "ci_low": low, "ci_high": high, "extra_us_per_step": extra_us,
                             "network_s": statistics.median(inside[key]),
                             "outside_us_per_step": statistics.median(outside) / args.steps * 1e6,
                             "extra_outside_us_per_step": statistics.median(
                                 o - bo for o, bo in zip(outside, base_outside)) / args.steps * 1e6,
                             "held_ratio": statistics.median(held), "held_low": held_low, "held_high": held_high})

    print(f"steps {args.steps}, CFG scale {args.scale}, {args.repeats} interleaved repeats, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | scheduler | variant | median s | of it in the UNet s | paired ratio to stock | 95% interval "
          "| extra us/step | outside the UNet us/step | extra outside us/step | ratio, network time held equal "
          "| 95% interval |")
    print("|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|")
    for r in rows:
        stock_row = r["variant"] == "stock"
        interval = "" if stock_row else f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        extra = "" if stock_row else f"{r['extra_us_per_step']:.0f}"
        extra_outside = "" if stock_row else f"{r['extra_outside_us_per_step']:.0f}"
        held = "" if stock_row else f"[{r['held_low']:.4f}, {r['held_high']:.4f}]"
        print(f"| {r['model']} | {r['scheduler']} | {r['variant']} | {r['median_s']:.3f} | {r['network_s']:.3f} | "
              f"{r['ratio_to_stock']:.3f} | {interval} | {extra} | {r['outside_us_per_step']:.0f} | {extra_outside} | "
              f"{r['held_ratio']:.4f} | {held} |")
    engine = [r for r in rows if r["variant"] != "stock"]
    summary = {"benchmark": "overhead", "steps": args.steps, "scale": args.scale, "repeats": args.repeats,
               "load_average": round(os.getloadavg()[0], 2),
               "max_ratio": round(max(r["ratio_to_stock"] for r in engine), 4),
               "median_ratio": round(statistics.median(r["ratio_to_stock"] for r in engine), 4),
               "paths_whose_interval_reaches_1.01": sum(r["ci_low"] <= 1.01 for r in engine),
               "paths": len(engine),
               "held_paths_meeting_target": sum(r["held_low"] <= 1.01 and r["held_ratio"] <= 1.01 for r in engine),
               "max_held_ratio": round(max(r["held_ratio"] for r in engine), 4),
               "max_held_ci_high": round(max(r["held_high"] for r in engine), 4),
               "max_extra_outside_us_per_step": round(max(r["extra_outside_us_per_step"] for r in engine), 1),
               "ratios": {f"{r['model']}/{r['scheduler']}/{r['variant']}":
                          [round(r["ratio_to_stock"], 4), round(r["ci_low"], 4), round(r["ci_high"], 4)]
                          for r in engine},
               "held_ratios": {f"{r['model']}/{r['scheduler']}/{r['variant']}":
                               [round(r["held_ratio"], 4), round(r["held_low"], 4), round(r["held_high"], 4)]
                               for r in engine}}
    print()
    print(strict_json.dumps(summary))


if __name__ == "__main__":
    main()
