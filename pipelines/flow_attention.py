"""Perturbed attention on the flow transformers (Flux.1, Chroma, Flux.2, Qwen-Image, Z-Image):
where each layer keeps its image tokens (:class:`ImageTokens`), PAG's identity mask on their
sequence (combined with the model's own padding mask) and SEG's blurred queries, both run
through the layer's own processor so that its rotary positions and norms are the model's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from torch import nn

from guidance_engine.guidance import Perturbation

from .query_blur import gaussian_blur_queries

__all__ = ["ImageTokens", "call_processor", "flow_layout", "flux_identity_mask", "identity_mask", "packed_tokens",
           "perturbed_flow_attention"]


#: Flow-transformer attention classes whose processor takes the text first, then the image stream.
_TEXT_FIRST = ("FluxAttention", "Flux2Attention", "Flux2ParallelSelfAttention")
#: Flow-transformer attention told apart by its processor (the layer is diffusers' generic Attention).
_BY_PROCESSOR = {"QwenDoubleStreamAttnProcessor2_0": "qwen", "ZSingleStreamAttnProcessor": "image_first"}


def flow_layout(module: nn.Module) -> str | None:
    """How a flow transformer's attention layer orders its tokens, or None for other layers:
    "text_first" (Flux.1 and Chroma's ``FluxAttention``, Flux.2's attention: the text, then the
    image stream; a single-stream layer gets them as one sequence), "qwen" (Qwen-Image's joint
    attention: image and text streams, joined text first inside its processor) or
    "image_first" (Z-Image: one sequence, the image tokens first, then the caption)."""
    if not hasattr(module, "processor"):
        return None
    if type(module).__name__ in _TEXT_FIRST:
        return "text_first"
    processor = getattr(module.processor, "original", module.processor)  # under a row-plan dispatcher
    return _BY_PROCESSOR.get(type(processor).__name__)


@dataclass(frozen=True)
class ImageTokens:
    """Where the generated image's tokens sit in a flow transformer's image stream: first a grid
    of ``rows`` x ``columns`` tokens in raster order, then ``padding`` tokens that belong to the
    image (Z-Image pads it to a multiple of 32 tokens), then ``context`` tokens that condition it
    (Flux.2's reference images). All counts >= 0; the grid is at least 1 x 1."""

    rows: int
    columns: int
    padding: int = 0
    context: int = 0

    @property
    def grid(self) -> int:
        """The grid's tokens (the ones SEG blurs)."""
        return self.rows * self.columns

    @property
    def image(self) -> int:
        """The image's tokens, padding included (the ones PAG's identity applies to)."""
        return self.grid + self.padding

    @property
    def stream(self) -> int:
        """Every token of the image stream."""
        return self.image + self.context


def packed_tokens(latent_hw: tuple[int, int]) -> ImageTokens:
    """The image tokens of Flux.1, Chroma and Qwen-Image: the latent's 2 x 2 patches, alone in
    the image stream (the default layout)."""
    return ImageTokens(-(-latent_hw[0] // 2), -(-latent_hw[1] // 2))


def identity_mask(tokens: int, image: slice, like: torch.Tensor) -> torch.Tensor:
    """PAG's additive attention mask (1, 1, tokens, tokens) on a sequence whose image tokens are
    ``image``: each image token attends to itself and to every other token, the other tokens
    to everything (the image-to-image block of the map replaced by the identity, the rule of
    diffusers' SD3 PAG pipeline on joint attention). 0 where attention is kept, -inf where removed."""
    mask = torch.zeros((tokens, tokens), device=like.device, dtype=like.dtype)
    mask[image, image] = float("-inf")
    mask[image, image].fill_diagonal_(0)
    return mask[None, None]


def flux_identity_mask(tokens: int, image_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """:func:`identity_mask` on a Flux sequence of ``tokens``: the text first, then ``image_tokens``
    image tokens."""
    return identity_mask(tokens, slice(tokens - image_tokens, tokens), like)


def _with_model_mask(identity: torch.Tensor, model_mask: torch.Tensor | None) -> torch.Tensor:
    """PAG's additive mask on top of the mask the model passes: a boolean mask (True = attend)
    becomes 0 / -inf, a float mask is additive as SDPA reads it (Chroma's 0 / 1 mask is added as
    it is), a (batch, keys) mask is broadcast over the queries as the model's processors do."""
    if model_mask is None:
        return identity
    if model_mask.ndim == 2:
        model_mask = model_mask[:, None, None, :]
    if model_mask.dtype == torch.bool:
        return torch.zeros_like(model_mask, dtype=identity.dtype).masked_fill(~model_mask, float("-inf")) + identity
    return model_mask + identity.to(model_mask.dtype)


def _query_columns(attn: nn.Module, width: int) -> int | None:
    """Flux.2's single-stream layers project queries, keys, values and the MLP input in one
    matrix: the number of its ``width`` output columns that are queries, split as its processor
    splits them (None for a layer with its own query projection)."""
    if not hasattr(attn, "to_qkv_mlp_proj"):
        return None
    qkv = 3 * attn.inner_dim
    return width * qkv // (qkv + attn.mlp_hidden_dim * attn.mlp_mult_factor) // 3


class _BlurredQueries:
    """An attention layer seen through SEG: its query projection (``to_q``, or the query columns
    of Flux.2's fused ``to_qkv_mlp_proj``) blurs the image grid's queries, which start at token
    ``start`` of the states it projects; every other token and everything else is the layer's
    own. One per call, so nothing on the shared layer changes."""

    def __init__(self, attn: nn.Module, start: int, tokens: ImageTokens, sigma: float) -> None:
        self._attn, self._start, self._tokens, self._sigma = attn, start, tokens, sigma

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._attn, name)
        if name in ("to_q", "to_qkv_mlp_proj"):
            return lambda states: self._blurred(attribute(states))
        return attribute

    def _blurred(self, projected: torch.Tensor) -> torch.Tensor:
        start, end = self._start, self._start + self._tokens.grid
        grid = projected[:, start:end]
        columns = _query_columns(self._attn, projected.shape[-1])
        queries = grid if columns is None else grid[..., :columns]
        blurred = gaussian_blur_queries(queries, self._tokens.rows, self._tokens.columns, self._sigma)
        if columns is not None:
            blurred = torch.cat([blurred, grid[..., columns:]], dim=-1)
        return torch.cat([projected[:, :start], blurred, projected[:, end:]], dim=1)


def call_processor(processor: Callable, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
          attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> Any:
    """``processor`` called as its layer calls it (single-stream processors such as Flux.2's take
    no ``encoder_hidden_states``)."""
    if encoder_hidden_states is not None:
        kwargs = {**kwargs, "encoder_hidden_states": encoder_hidden_states}
    return processor(attn, hidden_states, attention_mask=attention_mask, **kwargs)


def _qwen_identity_attention(processor: Callable, attn, hidden_states: torch.Tensor,
                             encoder_hidden_states: torch.Tensor, identity: torch.Tensor,
                             encoder_hidden_states_mask: torch.Tensor | None = None,
                             image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-Image's joint attention with PAG's mask. Its processor refuses an attention mask (it
    builds the text padding mask itself), so its steps are written out here, in its order and
    with its functions: projections, q/k norms, rotary positions (``apply_rotary_emb_qwen``),
    the [text, image] join, the processor's attention backend, output projections."""
    head_dim = attn.inner_dim // attn.heads

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (-1, head_dim))

    query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
    value = heads(attn.to_v(hidden_states))
    text_query, text_key = heads(attn.add_q_proj(encoder_hidden_states)), heads(attn.add_k_proj(encoder_hidden_states))
    text_value = heads(attn.add_v_proj(encoder_hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if attn.norm_added_q is not None:
        text_query = attn.norm_added_q(text_query)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    if image_rotary_emb is not None:
        image_freqs, text_freqs = image_rotary_emb
        query, key = (apply_rotary_emb_qwen(t, image_freqs, use_real=False) for t in (query, key))
        text_query, text_key = (apply_rotary_emb_qwen(t, text_freqs, use_real=False) for t in (text_query, text_key))
    mask = identity
    if encoder_hidden_states_mask is not None:  # the processor's key mask: text padding hidden
        image_keys = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        mask = _with_model_mask(identity, torch.cat([encoder_hidden_states_mask, image_keys], dim=1))
    joint = dispatch_attention_fn(torch.cat([text_query, query], dim=1), torch.cat([text_key, key], dim=1),
                                  torch.cat([text_value, value], dim=1), attn_mask=mask, dropout_p=0.0,
                                  is_causal=False, backend=getattr(processor, "_attention_backend", None),
                                  parallel_config=getattr(processor, "_parallel_config", None))
    joint = joint.flatten(2, 3).to(query.dtype)
    text = encoder_hidden_states.shape[1]
    image_out = attn.to_out[0](joint[:, text:].contiguous())
    if len(attn.to_out) > 1:
        image_out = attn.to_out[1](image_out)
    return image_out, attn.to_add_out(joint[:, :text].contiguous())


def perturbed_flow_attention(original: Callable, attn, hidden_states: torch.Tensor,
                              encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
                              kwargs: dict[str, Any], perturbation: Perturbation, tokens: ImageTokens):
    """A flow transformer's attention on these rows, perturbed, through the layer's own processor
    (so its rotary positions, q/k norms, projections and attention backend are the model's):
    "identity" (PAG) with :func:`identity_mask` added to the model's mask, "blur" (SEG) with the
    image grid's queries blurred before the q-norm, as SEG does on plain self-attention.
    Qwen-Image's processor takes no mask: its "identity" is :func:`_qwen_identity_attention`."""
    layout = flow_layout(attn)
    length = hidden_states.shape[1]
    # Where the image stream starts in the states the layer projects: first in an image stream
    # of its own (double-stream layers) and in Z-Image's sequence, after the text otherwise.
    start = 0 if encoder_hidden_states is not None or layout == "image_first" else length - tokens.stream
    if start < 0 or start + tokens.stream > length:
        raise ValueError(f"perturbation {perturbation.kind!r}: an attention layer's {length} tokens cannot hold the "
                         f"image's {tokens.stream} (a {tokens.rows} x {tokens.columns} grid, {tokens.padding} "
                         f"padding, {tokens.context} context tokens)")
    if perturbation.kind == "blur":
        if getattr(attn, "fused_projections", False):
            raise ValueError("perturbation 'blur' on an attention layer with fused projections is not supported "
                             "(call transformer.unfuse_qkv_projections())")
        return call_processor(original, _BlurredQueries(attn, start, tokens, perturbation.sigma), hidden_states,
                     encoder_hidden_states, attention_mask, kwargs)
    text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    first = text + start  # the image in the joint sequence (text first where the text is a stream)
    identity = identity_mask(text + length, slice(first, first + tokens.image), hidden_states)
    if layout == "qwen":
        return _qwen_identity_attention(original, attn, hidden_states, encoder_hidden_states, identity, **kwargs)
    return call_processor(original, attn, hidden_states, encoder_hidden_states, _with_model_mask(identity, attention_mask),
                 kwargs)
