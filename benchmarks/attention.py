"""Triton flash attention: correctness, cross-attention K/V savings, and (on a GPU) timings.

On CPU: checks the kernel (Triton's interpreter) against float64 SDPA on a few shapes with the
tests' tolerance, then prints the exact K/V savings table (markdown) and ONE line of JSON.
On a CUDA GPU it also times the kernel, PyTorch SDPA and xformers (where it imports) per SD-shaped
attention call, prints ratios to SDPA and writes the raw timings to benchmarks/results/.

    python benchmarks/attention.py
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from guidance_engine import strict_json  # noqa: E402
from guidance_engine.cuda import attention  # noqa: E402
from guidance_engine.cuda.processors import SAVINGS_MODELS, kv_savings  # noqa: E402

# (name, B, H, Lq, Lk, D, kv rows): SD 1.5 at 512 px (8 heads of 40/80/160) and SDXL at 1024 px
# (heads of 64), self- and cross-attention; cross rows of a CFG batch of 4 share 5 contexts.
GPU_SHAPES = [
    ("sd15-self-64x64", 8, 8, 4096, 4096, 40, None), ("sd15-cross-64x64", 8, 8, 4096, 77, 40, 5),
    ("sd15-self-32x32", 8, 8, 1024, 1024, 80, None), ("sd15-cross-16x16", 8, 8, 256, 77, 160, 5),
    ("sdxl-self-64x64", 8, 10, 4096, 4096, 64, None), ("sdxl-cross-32x32", 8, 20, 1024, 77, 64, 5),
]
CPU_SHAPES = [(1, 2, 77, 77, 40), (2, 2, 33, 77, 80), (1, 1, 64, 128, 128), (1, 2, 5, 19, 100)]


def check(B, H, Lq, Lk, D, dtype, device):
    g = torch.Generator().manual_seed(B * 1000 + D)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(device, dtype) for L in (Lq, Lk, Lk))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    torch_error = (F.scaled_dot_product_attention(q, k, v).double() - ref).abs().max().item()
    eps = 2 * ((ref.to(dtype) + 0.3 - 0.3).double() - ref).abs().max().item()
    error = (attention.flash_attention(q, k, v).double() - ref).abs().max().item()
    return {"shape": [B, H, Lq, Lk, D], "dtype": str(dtype).removeprefix("torch."), "error": error,
            "sdpa_error": torch_error, "ok": error <= 2 * torch_error + eps}


def savings_table() -> tuple[str, list[dict]]:
    rows = [kv_savings(m, b) for m in SAVINGS_MODELS for b in (1, 4, 8)]
    lines = ["| model | batch | rows / distinct contexts | K/V layers (shared) | K/V proj GFLOP/step "
             "| saved GFLOP/step | K/V MiB/step (fp16) | saved MiB/step | saved |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['rows']} / {r['distinct_contexts']} | {r['kv_layers']} "
                     f"({r['shared_layers']}) | {r['kv_flops'] / 1e9:.3f} | {r['kv_flops_saved'] / 1e9:.3f} | "
                     f"{r['kv_bytes'] / 2**20:.2f} | {r['kv_bytes_saved'] / 2**20:.2f} | "
                     f"{100 * r['saved_fraction']:.1f}% |")
    return "\n".join(lines), rows


def time_gpu() -> list[dict]:
    from triton.testing import do_bench
    try:
        import xformers.ops as xops
    except Exception:
        xops = None
    results = []
    for name, B, H, Lq, Lk, D, kv_rows in GPU_SHAPES:
        q = torch.randn(B, Lq, H, D, device="cuda", dtype=torch.float16).transpose(1, 2)
        k, v = (torch.randn(kv_rows or B, Lk, H, D, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in "kv")
        index = None if kv_rows is None else torch.tensor([0] * (B // 2) + list(range(1, B // 2 + 1)), device="cuda")
        k_full, v_full = (k, v) if index is None else (k[index], v[index])
        row = {"shape": name, "B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D, "kv_rows": kv_rows,
               "triton_ms": do_bench(lambda: attention.flash_attention(q, k, v, kv_index=index, check_index=False)),
               "sdpa_ms": do_bench(lambda: F.scaled_dot_product_attention(q, k_full, v_full))}
        if xops is not None:
            qx, kx, vx = (t.transpose(1, 2) for t in (q, k_full, v_full))
            row["xformers_ms"] = do_bench(lambda: xops.memory_efficient_attention(qx, kx, vx))
        results.append(row)
        ratio = row["sdpa_ms"] / row["triton_ms"]
        print(f"{name}: triton {row['triton_ms']:.3f} ms, sdpa {row['sdpa_ms']:.3f} ms (sdpa/triton {ratio:.2f})"
              + (f", xformers {row['xformers_ms']:.3f} ms" if "xformers_ms" in row else ""))
    return results


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    checks = [check(*shape, dtype, device) for shape in CPU_SHAPES for dtype in dtypes]
    print(f"correctness ({'GPU' if device == 'cuda' else 'Triton interpreter'}): "
          f"{sum(c['ok'] for c in checks)}/{len(checks)} within 2x PyTorch's error "
          f"({time.perf_counter() - start:.1f} s)")
    table, savings = savings_table()
    print("\nCross-attention K/V per denoising step, CFG, unconditional rows sharing one context:\n")
    print(table + "\n")
    record = {"benchmark": "attention", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "triton": getattr(attention.triton, "__version__", None),
              "python": platform.python_version(), "checks": checks, "savings": savings}
    if device == "cuda":
        record["timings"] = time_gpu()
        out = Path(__file__).parent / "results" / f"attention-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(strict_json.dumps(record, indent=1))
        print(f"raw timings: {out}")
    print(strict_json.dumps(record))
    if not all(c["ok"] for c in checks):
        raise SystemExit("attention kernel outside tolerance")


if __name__ == "__main__":
    main()
