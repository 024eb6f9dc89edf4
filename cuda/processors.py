"""Attention processors for diffusers UNets: PyTorch SDPA (the default), xformers (where it imports
and passes a probe on the model's device) and the project's Triton flash-attention kernel, which in
a guided batch projects keys/values once per distinct text context and reads them through an index.

    set_attention(pipe, "triton")   # -> the name in effect: "triton", or "sdpa" after one warning

``kv_savings`` states, exactly and machine-independently, what that sharing saves per step.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

from . import attention

__all__ = ["ATTENTION_NAMES", "TritonAttnProcessor", "kv_savings", "set_attention", "triton_unavailable"]

ATTENTION_NAMES = ("sdpa", "xformers", "triton")
logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on ``device`` (None when it can): no triton, or neither a
    CUDA device nor ``TRITON_INTERPRET=1`` (the interpreter is for tests, far too slow otherwise)."""
    if attention.triton is None:
        return "triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and attention.interpreting()):
        return None
    return f"no GPU for the Triton kernel on {device} (and TRITON_INTERPRET is not set)"


def _xformers_unavailable(device: torch.device) -> str | None:
    """Why xformers cannot serve ``device``: not importable, or a tiny probe fails or disagrees with SDPA."""
    try:
        import xformers.ops as xops
    except Exception as error:  # ImportError, or a broken build raising anything at import
        return f"xformers does not import ({type(error).__name__})"
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q, k, v = torch.randn(3, 1, 5, 2, 8, generator=torch.Generator().manual_seed(0)).to(device, dtype).unbind(0)
    try:
        out = xops.memory_efficient_attention(q, k, v)
    except Exception as error:
        return f"xformers fails a probe on {device} ({type(error).__name__}: {error})"
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
    if not torch.allclose(out.float(), ref, atol=1e-2, rtol=1e-2):
        return f"xformers disagrees with SDPA on {device}"
    return None


class TritonAttnProcessor(AttnProcessor2_0):
    """``AttnProcessor2_0`` with the Triton kernel. Cross-attention projects K/V once per distinct
    row of ``encoder_hidden_states`` (found by ``torch.unique`` over rows, once per UNet forward:
    every layer sees the same tensor) and passes ``kv_index``. Attention masks, or a device the
    kernel cannot run on, take the SDPA path (one warning)."""

    def __init__(self) -> None:
        super().__init__()
        self._context: tuple[Any, int, torch.Tensor, torch.Tensor | None] | None = None

    def distinct_contexts(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(distinct rows [U, L, C], index [B] into them, or None when all B rows differ)."""
        cached = self._context
        if cached is not None and cached[0]() is context and cached[1] == context._version:
            return cached[2], cached[3]
        rows, index = torch.unique(context.reshape(context.shape[0], -1), dim=0, return_inverse=True)
        if rows.shape[0] == context.shape[0]:
            distinct, index = context, None
        else:
            distinct = rows.view(-1, *context.shape[1:])
        self._context = (weakref.ref(context), context._version, distinct, index)
        return distinct, index

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        reason = triton_unavailable(hidden_states.device)
        if reason is None and attention_mask is not None:
            reason = "the Triton kernel takes no attention mask"
        if reason is not None:
            _warn_once(f"attention 'triton': {reason}; using PyTorch SDPA")
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)

        kv_index = None
        if encoder_hidden_states is None:
            context = hidden_states
        else:  # cross-attention: one K/V projection per distinct context row
            context, kv_index = self.distinct_contexts(encoder_hidden_states)
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(key.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(value.shape[0], -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = attention.flash_attention(query, key, value, scale=attn.scale, kv_index=kv_index,
                                                  check_index=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


_KNOWN = (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor, TritonAttnProcessor)


def set_attention(pipe_or_unet, name: str) -> str:
    """Apply attention ``name`` (one of ``ATTENTION_NAMES``) to every attention module of a UNet
    (or a pipeline's ``unet``). Returns the name in effect: "xformers" and "triton" fall back to
    "sdpa" with one logged warning where they cannot run on the model's device."""
    if name not in ATTENTION_NAMES:
        raise ValueError(f"attention: accepted names are {list(ATTENTION_NAMES)}, got {name!r}")
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if not hasattr(unet, "set_attn_processor"):
        raise ValueError(f"set_attention: expected a pipeline with a UNet or a UNet, got {type(pipe_or_unet).__name__}")
    from guidance_engine.pipelines.row_plan import unwrapped  # a row-plan dispatcher is looked through

    foreign = sorted({type(unwrapped(p)).__name__ for p in unet.attn_processors.values()
                      if not isinstance(unwrapped(p), _KNOWN)})
    if foreign:
        raise ValueError(f"set_attention: supports self/cross-attention UNets (AttnProcessor2_0); this model "
                         f"uses {foreign} (joint attention, adapters), left unchanged")
    device = next(unet.parameters()).device
    reason = None
    if name == "xformers":
        reason = _xformers_unavailable(device)
    elif name == "triton":
        reason = triton_unavailable(device)
    if reason is not None:
        _warn_once(f"attention {name!r}: {reason}; using PyTorch SDPA")
        name = "sdpa"
    processor = {"sdpa": AttnProcessor2_0, "xformers": XFormersAttnProcessor, "triton": TritonAttnProcessor}[name]()
    unet.set_attn_processor(processor)
    return name


# --------------------------------------------------------------------------- savings
# Published configs (config.json of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-
# base-1.0 and stabilityai/stable-diffusion-3-medium-diffusers). A UNet's cross-attention layers:
# each CrossAttn down block has layers_per_block resnets, each followed by a Transformer2DModel of
# transformer_layers_per_block[i] BasicTransformerBlocks (one attn2 each, inner dim = the block's
# channels); the mid block has transformer_layers_per_block[-1]; each CrossAttn up block has
# layers_per_block + 1 of them, with the levels reversed.
_UNETS = {
    "sd1.5": dict(channels=(320, 640, 1280, 1280), cross=(True, True, True, False), layers_per_block=2,
                  transformer_layers=(1, 1, 1, 1), context_dim=768, context_tokens=77),
    "sdxl": dict(channels=(320, 640, 1280), cross=(False, True, True), layers_per_block=2,
                 transformer_layers=(1, 2, 10), context_dim=2048, context_tokens=77),
}
# SD3 (MMDiT): 24 joint blocks of width 1536 (24 heads x 64); the context stream (77 CLIP + 256 T5
# tokens, 4096 wide, projected to 1536 by context_embedder) has its own K/V projections
# (add_k_proj/add_v_proj, 1536 -> 1536) in every block. Only block 0's context input is the same on
# all unconditional rows (norm1_context is modulated by timestep + pooled text, both shared); from
# block 1 on the context tokens have attended to the (different) image tokens, so only block 0's
# context K/V can be shared.
_SD3 = dict(layers=24, width=1536, context_tokens=77 + 256, shareable_layers=1)
SAVINGS_MODELS = ("sd1.5", "sdxl", "sd3")


def unet_cross_attention_dims(model: str) -> list[tuple[int, int]]:
    """(context_dim, inner_dim) of every cross-attention layer of a published UNet."""
    c = _UNETS[model]
    levels = len(c["channels"])
    dims = []
    for i in range(levels):  # down blocks
        if c["cross"][i]:
            dims += [c["channels"][i]] * (c["layers_per_block"] * c["transformer_layers"][i])
    dims += [c["channels"][-1]] * c["transformer_layers"][-1]  # mid block
    for i in reversed(range(levels)):  # up blocks
        if c["cross"][i]:
            dims += [c["channels"][i]] * ((c["layers_per_block"] + 1) * c["transformer_layers"][i])
    return [(c["context_dim"], d) for d in dims]


def kv_savings(model: str, batch: int, bytes_per_element: int = 2) -> dict[str, Any]:
    """Cross-attention K/V projection FLOPs and K/V activation bytes per denoising step of CFG on
    ``batch`` images (2 x batch rows: the conditional rows, assumed all different, and the
    unconditional rows, which share one context), without and with sharing.

    FLOPs count 2 per multiply-add (biases ignored); bytes are the K and V tensors written
    (``bytes_per_element`` 2: fp16/bf16). Exact integers, no timing: machine independent.
    """
    if model not in SAVINGS_MODELS:
        raise ValueError(f"model: accepted names are {list(SAVINGS_MODELS)}, got {model!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: a positive integer, got {batch!r}")
    rows, distinct = 2 * batch, batch + 1
    if model == "sd3":
        tokens, layers = _SD3["context_tokens"], [(_SD3["width"], _SD3["width"])] * _SD3["layers"]
        shareable = layers[:_SD3["shareable_layers"]]
    else:
        tokens, layers = _UNETS[model]["context_tokens"], unet_cross_attention_dims(model)
        shareable = layers
    flops_row = lambda dims: sum(2 * 2 * tokens * i * o for i, o in dims)  # noqa: E731 (K and V)
    bytes_row = lambda dims: sum(2 * tokens * o * bytes_per_element for _, o in dims)  # noqa: E731
    flops, saved_flops = rows * flops_row(layers), (rows - distinct) * flops_row(shareable)
    nbytes, saved_bytes = rows * bytes_row(layers), (rows - distinct) * bytes_row(shareable)
    return {"model": model, "batch": batch, "rows": rows, "distinct_contexts": distinct,
            "context_tokens": tokens, "kv_layers": len(layers), "shared_layers": len(shareable),
            "kv_flops": flops, "kv_flops_saved": saved_flops, "kv_bytes": nbytes, "kv_bytes_saved": saved_bytes,
            "saved_fraction": saved_flops / flops}
