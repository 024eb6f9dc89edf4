"""The Triton flash-attention kernel, run on CPU tensors by Triton's interpreter.

Tolerance as in flash-attention's tests: against a float64 reference, the kernel's max error is
at most 2x PyTorch's own SDPA error in the same dtype, plus 2x the rounding error of the output
dtype near 0.3 (``ref + 0.3 - 0.3 - ref``). Sizes stay small: the interpreter runs numpy per program.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported here (the kernel interprets CPU tensors anyway)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from guidance_engine.cuda.attention import all_configs, flash_attention  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (40, 64, 80, 128, 256, 3, 100)  # the SD sizes, then odd sizes padded to a power of two
LENGTHS = ((1, 1), (1, 77), (77, 77), (33, 19), (64, 128))  # single token, CLIP context, odd, tile multiples


def inputs(B, H, Lq, Lk, D, dtype, seed=0, Bk=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g).to(dtype)
    k = torch.randn(Bk or B, H, Lk, D, generator=g).to(dtype)
    v = torch.randn(Bk or B, H, Lk, D, generator=g).to(dtype)
    return q, k, v


def assert_flash_tolerance(out, q, k, v, scale=None):
    """flash-attention's forward check: |out - ref| <= 2 |sdpa_dtype - ref| + rounding epsilon."""
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    torch_error = (F.scaled_dot_product_attention(q, k, v, scale=scale).double() - ref).abs().max().item()
    eps = 2 * ((ref.to(q.dtype) + 0.3 - 0.3).double() - ref).abs().max().item()
    error = (out.double() - ref).abs().max().item()
    assert out.dtype == q.dtype and out.shape == q.shape
    assert error <= 2 * torch_error + eps, f"kernel error {error:.3e}, PyTorch {torch_error:.3e}, eps {eps:.3e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda x: f"{x[0]}x{x[1]}")
def test_matches_reference(dtype, head_dim, lengths):
    q, k, v = inputs(1, 2, *lengths, head_dim, dtype, seed=head_dim)
    assert_flash_tolerance(flash_attention(q, k, v), q, k, v)


@pytest.mark.parametrize("config", all_configs(),
                         ids=lambda c: "m{BLOCK_M}n{BLOCK_N}w{num_warps}s{num_stages}".format(**c))
def test_every_autotune_config(config):
    """Each Ampere/Hopper config is correct (ragged tiles on both axes) and bitwise reproducible."""
    for dtype in (torch.float16, torch.float32):
        q, k, v = inputs(2, 2, 133, 77, 80, dtype, seed=1)
        out = flash_attention(q, k, v, config=config)
        assert_flash_tolerance(out, q, k, v)
        assert torch.equal(out, flash_attention(q, k, v, config=config))


def test_configs_cover_both_architectures():
    from guidance_engine.cuda.attention import CONFIGS
    assert set(CONFIGS) == {"ampere", "hopper"} and all(CONFIGS.values())
    assert len(all_configs()) == len({c for arch in CONFIGS.values() for c in arch})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rerun_is_bitwise_equal(dtype):
    q, k, v = inputs(2, 2, 77, 77, 64, dtype, seed=2)
    assert torch.equal(flash_attention(q, k, v), flash_attention(q, k, v))


def test_custom_scale():
    q, k, v = inputs(1, 2, 17, 77, 64, torch.float32, seed=3)
    assert_flash_tolerance(flash_attention(q, k, v, scale=0.3), q, k, v, scale=0.3)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_kv_index_sharing_equals_expanded_kv(dtype):
    """Rows 0-1 (unconditional) read one K/V row: exactly the result with K/V copied per row."""
    q, k, v = inputs(4, 2, 33, 77, 40, dtype, seed=4, Bk=3)
    index = torch.tensor([0, 0, 1, 2])
    shared = flash_attention(q, k, v, kv_index=index)
    assert torch.equal(shared, flash_attention(q, k[index], v[index]))
    assert_flash_tolerance(shared, q, k[index], v[index])
    expanded = flash_attention(q[:2], k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1))  # zero strides
    assert torch.equal(shared[:2], expanded)


def test_strided_inputs_read_without_copies():
    """Transposed, sliced and strided views give bitwise the result of their contiguous copies."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 41, 2, 64, generator=g).transpose(1, 2)  # diffusers' [B, L, H, D] view
    k = torch.randn(2, 2, 77, 128, generator=g)[..., 32:96]  # a slice of the head dimension
    v = torch.randn(2, 2, 154, 64, generator=g)[:, :, ::2]  # every other key
    out = flash_attention(q, k, v)
    assert torch.equal(out, flash_attention(q.contiguous(), k.contiguous(), v.contiguous()))
    assert out.stride() == q.stride()  # laid out like q, so transpose(1, 2).reshape is free
    assert_flash_tolerance(out, q, k, v)


def test_empty_batch():
    q, k, v = inputs(1, 2, 5, 7, 16, torch.float32)
    assert flash_attention(q[:0], k[:0], v[:0]).shape == (0, 2, 5, 16)


@pytest.mark.parametrize("case, match", [
    (lambda q, k, v: (q[0], k, v), "q: expected a 4-D tensor"),
    (lambda q, k, v: (q.double(), k.double(), v.double()), "dtype must be one of"),
    (lambda q, k, v: (q, k.half(), v.half()), "must share a dtype"),
    (lambda q, k, v: (q, k, v[:, :, :3]), "k/v: shapes must match"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), "heads: q has 2"),
    (lambda q, k, v: (q, k[..., :8], v[..., :8]), "head_dim: q has 16"),
    (lambda q, k, v: (q, k[:1], v[:1]), "without kv_index it must equal"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), "at least one key"),
    (lambda q, k, v: (q.to("meta"), k.to("meta"), v.to("meta")), "device"),
])
def test_wrapper_errors(case, match):
    q, k, v = inputs(2, 2, 5, 7, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        flash_attention(*case(q, k, v))


def test_wrapper_errors_head_dim_and_index():
    q, k, v = inputs(1, 1, 3, 3, 257, torch.float16)
    with pytest.raises(ValueError, match=r"head_dim: must be in \[1, 256\], got 257"):
        flash_attention(q, k, v)
    q, k, v = inputs(2, 1, 3, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="kv_index: expected an int64 tensor of shape"):
        flash_attention(q, k, v, kv_index=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"kv_index: values must be in \[0, 2\), got \[0, 2\]"):
        flash_attention(q, k, v, kv_index=torch.tensor([0, 2]))
