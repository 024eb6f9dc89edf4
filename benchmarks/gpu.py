"""GPU timings: the Triton attention kernel against PyTorch SDPA, and the engine against stock diffusers.

(a) Attention, forward only: ``guidance_engine.cuda.attention.flash_attention`` against
    ``F.scaled_dot_product_attention`` at the attention shapes of SD 1.5 at 512 px (latent 64x64:
    self-attention at 64x64 / 32x32 / 16x16 tokens, 8 heads of 40 / 80 / 160) and SDXL at 1024 px
    (latent 128x128: attention at 64x64 / 32x32 tokens, 10 / 20 heads of 64), each also as
    cross-attention over 77 text tokens, in fp16 and bf16. The shapes are derived from the two UNet
    configs below (diffusers' ``attention_head_dim`` is, for these checkpoints, the number of heads;
    head dim = block channels / heads). q/k/v are laid out [B, L, H, D] and viewed [B, H, L, D], as
    the attention processors hand them over. Each row: the max abs difference kernel vs SDPA (same
    inputs, same dtype), and per implementation the list of N timed calls (CUDA events around each
    call, after a warm-up that also runs the kernel's autotuning); the table gives medians.
(b) Engine vs stock on an SD 1.5-shaped UNet (diffusers' ``UNet2DConditionModel`` with SD 1.5's
    architecture, random weights, built in code), 512 px, fp16, CFG 7.5 and PAG (scale 7.5, PAG
    scale 3.0 on the mid block, diffusers' default layers), batch 1 and 4, a fixed step count, DDIM,
    ``output_type="latent"`` (the VAE is not timed). Stock CFG is ``StableDiffusionPipeline``, stock
    PAG ``StableDiffusionPAGPipeline.from_pipe(stock, pag_applied_layers=["mid"])``; the engine is
    ``GuidedStableDiffusionPipeline.from_pipe(stock)`` (same modules). Stock and engine calls
    alternate (interleaved repeats); each row gives engine / stock of the medians and the max abs
    difference of their latents. The text encoder has CLIP ViT-L/14's text shape (12 layers, 768
    wide) over the project's tiny tokenizer; the VAE is small (its only role here is the scale factor 8).

Raw results (device, driver / CUDA / torch / triton / diffusers versions, shapes, dtypes, every
timing list) go to ``benchmarks/results/<date>-<device>.json``, written under a temporary name and
renamed when complete. Prints a markdown table, then ONE line of JSON.

Without CUDA the script refuses, except with ``--smoke``: tiny shapes on the CPU (the kernel in
Triton's interpreter, ``TRITON_INTERPRET=1``; SDPA; the tiny test UNet at 64 px, 2 steps, fp32) so
that CI proves the script end to end. Smoke results go to ``--results-dir`` (required; never under
benchmarks/results/) and are not GPU figures.

    python benchmarks/gpu.py                      # on a CUDA machine
    python benchmarks/gpu.py --smoke --results-dir /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # not its note on casting random weights with .to()
if "--smoke" in sys.argv[1:]:  # before triton imports: the kernel on CPU tensors runs interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from guidance_engine import strict_json  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROMPT = "a red circle on a blue background"
TEXT_TOKENS = 77

# The two architectures' attention-relevant config entries (diffusers' UNet2DConditionModel
# configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SDXL_ATTENTION = dict(sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"))


def attention_shapes(name: str, config: dict[str, Any], batch: int) -> list[dict[str, Any]]:
    """The self- and cross-attention shapes of ``config``'s cross-attention down blocks.

    Args:
        name: the model's label ("sd15", "sdxl").
        config: UNet config entries: sample_size (latent side), block_out_channels,
            attention_head_dim (an int or one per block: the number of heads), down_block_types.
        batch: rows of one UNet call (2 = one image under CFG).
    """
    heads_per_block = config["attention_head_dim"]
    shapes = []
    for i, (kind, channels) in enumerate(zip(config["down_block_types"], config["block_out_channels"])):
        if not kind.startswith("CrossAttn"):
            continue
        heads = heads_per_block if isinstance(heads_per_block, int) else heads_per_block[i]
        side = config["sample_size"] // 2 ** i
        for attn, keys in (("self", side * side), ("cross", TEXT_TOKENS)):
            shapes.append({"name": f"{name}-{attn}-{side}x{side}", "B": batch, "H": heads, "Lq": side * side,
                           "Lk": keys, "D": channels // heads})
    return shapes


SMOKE_SHAPES = [{"name": "smoke-self-8x8", "B": 2, "H": 2, "Lq": 64, "Lk": 64, "D": 40},
                {"name": "smoke-cross-8x8", "B": 2, "H": 2, "Lq": 64, "Lk": TEXT_TOKENS, "D": 40}]


class Timer:
    """Times one call: CUDA events around it on a GPU (no host sync inside), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(milliseconds, fn's result)."""
        if not self.cuda:
            start = time.perf_counter()
            out = fn()
            return (time.perf_counter() - start) * 1e3, out
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end), out


def time_calls(timer: Timer, fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """``repeats`` timings of ``fn`` in ms after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return [timer(fn)[0] for _ in range(repeats)]


def bench_attention(shapes: list[dict[str, Any]], dtypes: tuple[torch.dtype, ...], device: torch.device,
                    warmup: int, repeats: int) -> list[dict[str, Any]]:
    """Kernel vs SDPA per shape and dtype: timing lists (ms) and the max abs difference."""
    from guidance_engine.cuda import attention

    timer, rows = Timer(device), []
    for shape in shapes:
        B, H, Lq, Lk, D = (shape[k] for k in ("B", "H", "Lq", "Lk", "D"))
        for dtype in dtypes:
            g = torch.Generator().manual_seed(Lq * 1000 + Lk + D)
            q, k, v = (torch.randn(B, L, H, D, generator=g).to(device, dtype).transpose(1, 2) for L in (Lq, Lk, Lk))
            kernel = lambda: attention.flash_attention(q, k, v)  # noqa: E731
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
            diff = (kernel().float() - sdpa().float()).abs().max().item()
            rows.append({**shape, "dtype": str(dtype).removeprefix("torch."), "max_abs_diff": diff,
                         "triton_ms": time_calls(timer, kernel, warmup, repeats),
                         "sdpa_ms": time_calls(timer, sdpa, warmup, repeats)})
    return rows


def sd15_components(smoke: bool) -> dict[str, Any]:
    """SD 1.5-shaped components with random weights (the tiny test model with ``smoke``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from guidance_engine.pipelines.toy.tiny_models import seeded_weights, tiny_sd_components

    components = tiny_sd_components(0)  # tokenizer, DDIM scheduler (SD's betas), and for smoke the rest
    if smoke:
        return components
    tokenizer = components["tokenizer"]
    with seeded_weights(0):
        components["unet"] = UNet2DConditionModel(**SD15_UNET).eval()
        components["text_encoder"] = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=TEXT_TOKENS, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)).eval()
        components["vae"] = AutoencoderKL(  # 4 blocks: scale factor 8, so 512 px is a 64x64 latent
            block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32).eval()
    return components


def bench_pipelines(smoke: bool, device: torch.device, dtype: torch.dtype, size: int, steps: int,
                    batches: tuple[int, ...], warmup: int, repeats: int, scale: float,
                    pag_scale: float) -> list[dict[str, Any]]:
    """Engine vs stock for CFG and PAG at each batch: interleaved timing lists (ms) and latent difference."""
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline

    from guidance_engine.methods.pag import PAG
    from guidance_engine.pipelines import GuidedStableDiffusionPipeline

    stock = StableDiffusionPipeline(**sd15_components(smoke), requires_safety_checker=False).to(device, dtype)
    stock_pag = StableDiffusionPAGPipeline.from_pipe(stock, pag_applied_layers=["mid"])
    engine = GuidedStableDiffusionPipeline.from_pipe(stock)
    for pipe in (stock, stock_pag, engine):
        pipe.set_progress_bar_config(disable=True)
    common = dict(height=size, width=size, num_inference_steps=steps, output_type="latent")
    variants = {
        "cfg": (lambda n, g: stock(PROMPT, num_images_per_prompt=n, guidance_scale=scale, generator=g, **common),
                lambda n, g: engine(PROMPT, num_images_per_prompt=n, guidance_scale=scale, generator=g, **common)),
        "pag": (lambda n, g: stock_pag(PROMPT, num_images_per_prompt=n, guidance_scale=scale, pag_scale=pag_scale,
                                       generator=g, **common),
                lambda n, g: engine(PROMPT, num_images_per_prompt=n, generator=g, **common,
                                    guidance=PAG(scale=scale, pag_scale=pag_scale, layers="mid"))),
    }
    timer, rows = Timer(device), []
    for method, (run_stock, run_engine) in variants.items():
        for batch in batches:
            seeded = lambda: torch.Generator(device).manual_seed(0)  # noqa: E731
            want, got = run_stock(batch, seeded()).images, run_engine(batch, seeded()).images  # warm-up 1
            for _ in range(warmup - 1):
                run_stock(batch, seeded()), run_engine(batch, seeded())
            stock_ms, engine_ms = [], []
            for _ in range(repeats):  # interleaved, so drift hits both alike
                stock_ms.append(timer(lambda: run_stock(batch, seeded()))[0])
                engine_ms.append(timer(lambda: run_engine(batch, seeded()))[0])
            rows.append({"method": method, "batch": batch, "size": size, "steps": steps,
                         "dtype": str(dtype).removeprefix("torch."), "stock_ms": stock_ms, "engine_ms": engine_ms,
                         "ratio": statistics.median(engine_ms) / statistics.median(stock_ms),
                         "latent_max_abs_diff": (got.float() - want.float()).abs().max().item()})
    return rows


def versions(device: torch.device) -> dict[str, Any]:
    """The device and the software stack the figures belong to."""
    import diffusers
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    record = {"device": "cpu (smoke)" if device.type != "cuda" else torch.cuda.get_device_name(device),
              "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "triton": triton_version, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
              "driver": None, "capability": None, "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        record["capability"] = list(torch.cuda.get_device_capability(device))
        try:  # torch does not expose the driver version; nvidia-smi does
            query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=30, check=True)
            record["driver"] = query.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return record


def write_results(record: dict[str, Any], directory: Path) -> Path:
    """``directory/<date>-<device>.json``, written under a temporary name and renamed when complete."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", record["versions"]["device"]).strip("-")
    path = directory / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}.json"
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(strict_json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path


def med(values: list[float]) -> float:
    return statistics.median(values)


def print_tables(attention_rows: list[dict[str, Any]], pipeline_rows: list[dict[str, Any]]) -> None:
    print("| shape | B | H | Lq | Lk | D | dtype | triton ms | sdpa ms | triton / sdpa | max abs diff |")
    print("|---|---|---|---|---|---|---|---:|---:|---:|---:|")
    for r in attention_rows:
        t, s = med(r["triton_ms"]), med(r["sdpa_ms"])
        print(f"| {r['name']} | {r['B']} | {r['H']} | {r['Lq']} | {r['Lk']} | {r['D']} | {r['dtype']} | "
              f"{t:.4f} | {s:.4f} | {t / s:.3f} | {r['max_abs_diff']:.2e} |")
    print("\n| method | batch | size | steps | dtype | stock ms | engine ms | engine / stock | latent max abs diff |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for r in pipeline_rows:
        print(f"| {r['method']} | {r['batch']} | {r['size']} | {r['steps']} | {r['dtype']} | {med(r['stock_ms']):.1f} | "
              f"{med(r['engine_ms']):.1f} | {r['ratio']:.3f} | {r['latent_max_abs_diff']:.2e} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU (kernel in Triton's interpreter), to prove the script runs")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where the raw JSON goes (default benchmarks/results; required with --smoke, "
                             "and never benchmarks/results then)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row, >= 1 (default 50 / 5, smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first, >= 1 (default 10 / 2, smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps of (b), >= 1 (default 20, smoke 2)")
    args = parser.parse_args(argv)
    for name in ("repeats", "warmup", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}: must be >= 1, got {value}")
    if args.smoke:
        if args.results_dir is None:
            parser.error("--results-dir: required with --smoke (a temporary directory; smoke runs are not results)")
        if args.results_dir.resolve().is_relative_to(RESULTS_DIR):
            parser.error(f"--results-dir: smoke results never go under {RESULTS_DIR}, got {args.results_dir}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}); nothing was timed. Run it on a GPU machine, or with --smoke "
              "--results-dir DIR to check on the CPU that the script runs.", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    attn_repeats, pipe_repeats = (args.repeats or 2,) * 2 if args.smoke else (args.repeats or 50, args.repeats or 5)
    attn_warmup, pipe_warmup = (args.warmup or 1,) * 2 if args.smoke else (args.warmup or 10, args.warmup or 2)
    shapes = SMOKE_SHAPES if args.smoke else (attention_shapes("sd15", SD15_UNET, 2)
                                               + attention_shapes("sdxl", SDXL_ATTENTION, 2))
    settings = dict(size=64, steps=args.steps or 2, batches=(1, 2), dtype=torch.float32) if args.smoke else \
        dict(size=512, steps=args.steps or 20, batches=(1, 4), dtype=torch.float16)
    start = time.perf_counter()
    attention_rows = bench_attention(shapes, (torch.float16, torch.bfloat16), device, attn_warmup, attn_repeats)
    pipeline_rows = bench_pipelines(args.smoke, device, warmup=pipe_warmup, repeats=pipe_repeats, scale=7.5,
                                    pag_scale=3.0, **settings)
    record = {"benchmark": "gpu", "smoke": args.smoke, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "versions": versions(device), "seconds": time.perf_counter() - start,
              "attention": {"warmup": attn_warmup, "repeats": attn_repeats, "rows": attention_rows},
              "pipelines": {"warmup": pipe_warmup, "repeats": pipe_repeats, "scale": 7.5, "pag_scale": 3.0,
                            "pag_layers": ["mid"], "scheduler": "DDIMScheduler", "rows": pipeline_rows}}
    path = write_results(record, args.results_dir or RESULTS_DIR)
    print(f"{record['versions']['device']}, torch {torch.__version__}, triton {record['versions']['triton']}"
          + (" (SMOKE: CPU, tiny shapes; not GPU figures)" if args.smoke else "") + "\n")
    print_tables(attention_rows, pipeline_rows)
    attention_ratios = [med(r["triton_ms"]) / med(r["sdpa_ms"]) for r in attention_rows]
    summary = {"benchmark": "gpu", "smoke": args.smoke, "device": record["versions"]["device"], "results": str(path),
               "attention_rows": len(attention_rows),
               "attention_median_ratio": round(statistics.median(attention_ratios), 4),
               "attention_max_abs_diff": max(r["max_abs_diff"] for r in attention_rows),
               "engine_rows": len(pipeline_rows),
               "engine_max_ratio": round(max(r["ratio"] for r in pipeline_rows), 4),
               "engine_median_ratio": round(statistics.median(r["ratio"] for r in pipeline_rows), 4),
               "ratios": {f"{r['method']}/batch{r['batch']}": round(r["ratio"], 4) for r in pipeline_rows}}
    print()
    print(strict_json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
