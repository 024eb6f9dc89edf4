"""Cross-attention under two contexts, for a :class:`~guidance_engine.guidance.ContextExtrapolation`.

NAG's altered rows attend, in each chosen cross-attention layer, to their own text context and to
a second one (the negative prompt's); the method's formula makes the layer's output from the two
outputs, before the output projection, as the authors' processors do. The second context is data
of the forward, not of the method: the branch model binds the rows' tensors to the spec for that
forward (:class:`BoundContext`), and the row plan carries it to the layers.

Cost: one more attention (keys, values and the softmax product) per chosen layer for the altered
rows; every other part of the network runs once, so a NAG step costs far less than a CFG step's
second forward on a UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from guidance_engine.guidance import ContextExtrapolation

__all__ = ["BoundContext", "extrapolated_cross_attention", "is_cross_attention"]


@dataclass(frozen=True, eq=False)
class BoundContext:
    """A :class:`ContextExtrapolation` with the second context of the rows it alters in one forward
    (``context``: that branch's conditioning tensors, restricted to those rows)."""

    spec: ContextExtrapolation
    context: Mapping[str, torch.Tensor]

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def layers(self):
        return self.spec.layers


def is_cross_attention(module: torch.nn.Module) -> bool:
    """A UNet-style cross-attention layer: text keys and values, image queries, no joint stream."""
    return (hasattr(module, "processor") and hasattr(module, "to_k") and bool(getattr(module, "is_cross_attention", False))
            and getattr(module, "add_k_proj", None) is None)


def _attend(attn, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` of ``attn`` with keys and values from ``context``, heads merged
    (the computation of diffusers' ``AttnProcessor2_0``)."""
    batch = query.shape[0]
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key, value = attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


def extrapolated_cross_attention(attn, hidden_states: torch.Tensor, context: torch.Tensor,
                                 bound: BoundContext, attention_mask: torch.Tensor | None = None,
                                 temb: torch.Tensor | None = None) -> torch.Tensor:
    """A cross-attention layer's output on these rows: the attention outputs under ``context`` (Z+)
    and under the bound second context (Z-) combined by the spec's formula, then the layer's output
    projection, residual and rescale as ``AttnProcessor2_0``. An attention mask (rare on
    cross-attention) masks both contexts alike: they have the same token count."""
    negative = bound.context["encoder_hidden_states"]
    if negative.shape != context.shape:
        raise ValueError(f"guidance: the second context has shape {tuple(negative.shape)}, the layer's own "
                         f"{tuple(context.shape)}; both must be encoded to the same length")
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch, length = context.shape[0], context.shape[1]
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    positive = _attend(attn, query, context, attention_mask)
    out = bound.spec.extrapolate(positive, _attend(attn, query, negative, attention_mask), "cross")
    out = attn.to_out[1](attn.to_out[0](out.to(positive.dtype)))
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor
