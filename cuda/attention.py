"""Flash-attention forward (Dao et al. 2022, FlashAttention-2 schedule) as a Triton kernel, with
guidance-aware sharing of keys and values: ``kv_index[b]`` names the K/V row that query row ``b``
reads, so the unconditional rows of a guided batch read one K/V copy of their common context.

    o = flash_attention(q, k, v, scale=None, kv_index=None)
    q [B, H, Lq, D], k/v [Bk, H, Lk, D], o [B, H, Lq, D] (q's dtype, q's memory layout when dense)

Deviations and caveats:
* Forward only, no attention mask, no dropout, no causal mode (diffusion UNets use none of them;
  the processor falls back to SDPA when a mask is given).
* Softmax statistics and the output accumulator are float32; the probabilities are rounded to the
  input dtype before the P @ V product (as in FlashAttention-2; PyTorch's CPU SDPA keeps them in
  fp32, and still the error stays well inside 2x of its own). fp32 inputs use IEEE fp32 dots
  (``input_precision="ieee"``, never TF32), so fp32 is slower than fp16/bf16 on tensor cores.
* Head sizes 1..256: the head dimension is padded to a power-of-two tile (at least 16, the
  smallest ``tl.dot``) and masked. Sizes that are not powers of two (40, 80) waste the padding.
* Inputs are read through their strides (no copies); zero strides (``expand``) work too.
* On CPU tensors, or with ``TRITON_INTERPRET=1``, the kernel runs in Triton's interpreter (numpy
  per program instance: for tests, slow). There (``INTERPRET``) each dot is an ideal
  fp32-accumulating MMA (exact products, fp64 sum, one rounding to fp32) and bf16 rounding is
  done by bit arithmetic: Triton 3.9's interpreter multiplies bf16 bit patterns as integers,
  truncates fp32 -> bf16 casts, and numpy's sgemm is up to 2x less accurate than PyTorch's CPU
  GEMM. The interpreter thus proves the algorithm (tiling, masking, online softmax, P rounding);
  a GPU's MMA summation order differs in the last bits.
* Autotuning picks a config per (Lq, Lk, D) in each process; configs differ in summation order,
  so two processes may disagree in the last bits. A fixed config (``config=``) is bitwise
  reproducible: no atomics, one program per query tile.
* The configs were written for Ampere (sm_80/86) and Hopper (sm_90) shared memory and register
  budgets but have not been timed here (no GPU); each one is proven correct in the interpreter.
* ``kv_index`` is range-checked on the host (one device sync) unless ``check_index=False``.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the processors fall back to SDPA; flash_attention raises
    triton = None
    tl = None

__all__ = ["CONFIGS", "MAX_HEAD_DIM", "SUPPORTED_DTYPES", "all_configs", "flash_attention", "interpreting"]

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis, which carries batch x heads

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture; pruned by head tile below.
CONFIGS: dict[str, tuple[tuple[int, int, int, int], ...]] = {
    "ampere": ((128, 64, 4, 2), (128, 32, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 2, 2)),
    "hopper": ((128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4)),
}
_INTERPRETER_CONFIG = (32, 32, 4, 1)  # small tiles keep numpy's per-instance work short


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` asks for Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _head_tile(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _fits(config: tuple[int, int, int, int], head_tile: int, element_bytes: int = 2) -> bool:
    """A coarse shared-memory estimate (Q tile plus ``num_stages`` K and V tiles within 160 KiB);
    the autotuner also skips any config that fails to launch for lack of resources."""
    block_m, block_n, _, stages = config
    return element_bytes * head_tile * (block_m + 2 * block_n * stages) <= 160 * 1024


def all_configs() -> list[dict[str, int]]:
    """Every autotune configuration of every architecture, as keyword dicts for ``config=``."""
    seen = dict.fromkeys(c for arch in CONFIGS.values() for c in arch)
    return [dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), c)) for c in seen]


if triton is not None:
    # tl.max / tl.sum / tl.zeros are jit helpers that only Triton's interpreter-mode import can
    # call from an interpreted kernel; the builtin reduce with the standard combine functions runs
    # in both modes, so one kernel serves the GPU and the interpreter whatever imported triton first.
    # For the same reason the INTERPRET branches are inline: a helper would have to be a jit
    # function for the compiler's dependency scan and a plain one for the interpreter.
    _MAX = tl.standard._elementwise_max
    _SUM = tl.standard._sum_combine

    def _attn_fwd(Q, K, V, O, KV_INDEX, qk_scale,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_ob, stride_oh, stride_om, stride_od,
                  H, LQ, LK, HEAD_DIM,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  HAS_KV_INDEX: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
        # Phase 0: which query tile, batch row, head and K/V row this program owns.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        if HAS_KV_INDEX:
            kb = tl.load(KV_INDEX + b).to(tl.int64)  # guidance: rows sharing a context share K/V
        else:
            kb = b.to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM  # the head tile is padded to a power of two

        q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh
                    + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=(offs_m[:, None] < LQ) & d_ok[None, :], other=0.0)
        k_base = K + kb * stride_kb + h * stride_kh
        v_base = V + kb * stride_vb + h * stride_vh

        # Phase 1: online softmax over key tiles (running max m_i, running sum l_i, base 2).
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
        for start_n in range(0, LK, BLOCK_N):
            keys = start_n + offs_n
            k_ok = keys < LK
            kt = tl.load(k_base + keys[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            if INTERPRET:  # an ideal fp32-accumulating MMA: exact products, fp64 sum, one rounding
                s = tl.dot(q.to(tl.float64), kt.to(tl.float64), out_dtype=tl.float64).to(tl.float32)
            else:
                s = tl.dot(q, kt, input_precision=PRECISION)
            s = tl.where(k_ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
            v = tl.load(v_base + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            # FlashAttention-2: P is rounded to the input dtype for the second dot.
            if INTERPRET:
                if V.dtype.element_ty == tl.bfloat16:  # round to nearest even by bits (see header)
                    bits = p.to(tl.uint32, bitcast=True)
                    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
                    p = bits.to(tl.float32, bitcast=True)
                else:
                    p = p.to(V.dtype.element_ty).to(tl.float32)
                pv = tl.dot(p.to(tl.float64), v.to(tl.float64), out_dtype=tl.float64).to(tl.float32)
                acc = acc * alpha[:, None] + pv
            else:
                acc = tl.dot(p.to(V.dtype.element_ty), v, acc * alpha[:, None], input_precision=PRECISION)
            m_i = m_new

        # Phase 2: normalise and store in the output dtype.
        acc = acc / l_i[:, None]
        if INTERPRET and O.dtype.element_ty == tl.bfloat16:  # then the truncating cast below is exact
            bits = acc.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            acc = bits.to(tl.float32, bitcast=True)
        tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh
                 + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < LQ) & d_ok[None, :])


@functools.lru_cache(maxsize=None)
def _kernel(interpret: bool, arch: str | None = None) -> Any:
    """The jit kernel: interpreted, plain (a fixed config) or autotuned for ``arch``.

    Built on first use rather than at import, so that the interpreter is chosen by the tensors'
    device and ``TRITON_INTERPRET`` at call time, whatever imported this module first.
    """
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(_attn_fwd)  # what triton.jit returns under TRITON_INTERPRET=1
    jitted = triton.jit(_attn_fwd)
    if arch is None:
        return jitted
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in CONFIGS[arch]]

    def prune(configs, named_args, **kwargs):
        tile = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        size = named_args["Q"].element_size()
        kept = [c for c in configs if _fits((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages),
                                            tile, size)]
        return kept or configs[-1:]

    return triton.autotune(configs=configs, key=["LQ", "LK", "HEAD_DIM"],
                           prune_configs_by={"early_config_prune": prune})(jitted)


def _arch(device: torch.device) -> str:
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major >= 9 else "ampere"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_index: torch.Tensor | None,
           check_index: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [batch, heads, length, head_dim], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: dtype must be one of float16, bfloat16, float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: all tensors must be on one device, q is on {q.device}, {name} on {t.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtype: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"device: expected cuda or cpu (interpreter) tensors, got {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"k/v: shapes must match, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, Lq, D = q.shape
    Bk, Hk, Lk, Dk = k.shape
    if Hk != H:
        raise ValueError(f"heads: q has {H}, k/v have {Hk}")
    if Dk != D:
        raise ValueError(f"head_dim: q has {D}, k/v have {Dk}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim: must be in [1, {MAX_HEAD_DIM}], got {D}")
    if Lk < 1:
        raise ValueError(f"k/v: need at least one key, got length {Lk}")
    if B * H > _MAX_GRID_Y:
        raise ValueError(f"batch x heads: at most {_MAX_GRID_Y}, got {B} x {H} = {B * H}")
    if kv_index is None:
        if Bk != B:
            raise ValueError(f"k/v batch: without kv_index it must equal q's batch {B}, got {Bk}")
        return
    if not isinstance(kv_index, torch.Tensor) or kv_index.dtype != torch.int64 or kv_index.shape != (B,):
        got = f"{getattr(kv_index, 'dtype', type(kv_index).__name__)} {tuple(getattr(kv_index, 'shape', ()))}"
        raise ValueError(f"kv_index: expected an int64 tensor of shape ({B},), got {got}")
    if kv_index.device != q.device:
        raise ValueError(f"kv_index: must be on {q.device}, got {kv_index.device}")
    if check_index and B and not (0 <= int(kv_index.min()) and int(kv_index.max()) < Bk):
        raise ValueError(f"kv_index: values must be in [0, {Bk}), got [{int(kv_index.min())}, {int(kv_index.max())}]")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    kv_index: torch.Tensor | None = None, config: dict[str, int] | None = None,
                    check_index: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale) v per (row, head), row ``b`` reading K/V row ``kv_index[b]``.

    Args:
        q: [B, H, Lq, D]; k, v: [Bk, H, Lk, D]; one dtype (fp16, bf16, fp32), one device; any strides.
        scale: the logit scale, 1/sqrt(D) when None.
        kv_index: int64 [B] with values in [0, Bk); None means row b reads row b (Bk == B).
        config: ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}`` to bypass autotuning (one of
            :func:`all_configs`); None autotunes on a GPU and uses a small fixed config in the interpreter.
        check_index: range-check ``kv_index`` (a device sync); callers that built it may skip it.

    Returns:
        o [B, H, Lq, D] in q's dtype, laid out like q when q is dense (so a [B, L, H, D] view stays one).
    """
    if triton is None:
        raise ValueError("triton: not installed; `pip install triton` (or use the SDPA processor)")
    _check(q, k, v, kv_index, check_index)
    B, H, Lq, D = q.shape
    o = torch.empty_like(q)
    if B == 0 or Lq == 0:
        return o
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    interpret = q.device.type == "cpu" or interpreting()
    meta = dict(BLOCK_D=_head_tile(D), HAS_KV_INDEX=kv_index is not None,
                INTERPRET=interpret,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    if config is None and interpret:
        config = dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), _INTERPRETER_CONFIG))
    if config is not None:
        kernel = _kernel(interpret)
        meta.update(config)
        grid = (triton.cdiv(Lq, config["BLOCK_M"]), B * H)
    else:
        kernel = _kernel(False, _arch(q.device))
        grid = lambda meta_: (triton.cdiv(Lq, meta_["BLOCK_M"]), B * H)  # noqa: E731
    index = kv_index if kv_index is not None else q  # any pointer; unread without HAS_KV_INDEX
    kernel[grid](q, k, v, o, index, scale * math.log2(math.e),
                 *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                 H, Lq, k.shape[2], D, **meta)
    return o
