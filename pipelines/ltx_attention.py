"""Layer alterations on LTX-Video's transformer (``LTXVideoTransformer3DModel``), for some rows of a
forward: the row plan's alterations (:mod:`.row_plan`) made on LTX's blocks, whose attention
(``LTXAttention`` with ``LTXVideoAttnProcessor``: q/k RMS norms over all heads, rotary positions
given per row, a text mask as an additive bias) the generic processors of :mod:`.perturbation` do
not serve.

Each block of ``transformer_blocks`` is self-attention over the video tokens (``attn1``: the
latent's frames x rows x columns of 1 x 1 x 1 patches, no text), cross-attention to the prompt
(``attn2``, masked to the prompt's tokens) and a feed-forward, modulated by the time embedding.
The alterations:

- "skip" (SLG): the block's output is its input, ``x_{i+1} = x_i``, for the altered rows. Named
  ``"transformer_blocks.<i>.attn1"``, the skip is of block i's self-attention alone: its output is
  its input (the modulated, normalised states), what Hyung et al.'s LTX pipelines do for STG-R
  (junhahyung/stguidance, ``diffusers/ltxvideo/pipeline_stg_ltx.py``, the processor returns the
  perturbed rows' ``hidden_states`` unchanged in ``STG-R`` mode; ``LTX-Video/ltx_video/pipelines/
  pipeline_ltx_video.py``, ``STGResidualProcessor``, the same).
- "identity" (PAG; STG-A): ``attn1``'s map replaced by the identity, each video token attending
  to itself only: the output is ``to_out(to_v(x))``, as their STG-A path computes it (the value
  projection through the output projection).
- "blur" (SEG, Hong 2024): ``attn1``'s queries blurred before the q-norm and rotary positions, by
  a Gaussian of std ``sigma`` tokens over each latent frame's rows x columns grid, frames apart
  (:func:`~.wan_attention.blur_frames`, as on Wan); ``sigma = inf`` is each frame's mean query.
- "extrapolate" (NAG, Chen et al. arXiv 2505.21179): ``attn2``'s attention outputs under the
  prompt (Z+) and under the bound second context (Z-, the negative prompt's T5 embeddings through
  the same model's caption projection, masked by the negative prompt's own mask) with the same
  queries, both by LTX's own processor, combined by the method's rule before ``attn2``'s output
  projection. Alpha defaults to the authors' video value (``nag.DEFAULT_ALPHA["video_cross"]``,
  0.25, their Wan processor's: their LTX processor is not among the files read here).

Layer names are block indices 0..N-1 of ``transformer_blocks`` (or ``"transformer_blocks.<i>"``);
None is :data:`LTX_DEFAULT_LAYERS` (block 19: STG's LTX-Video recipe, ``stg_applied_layers_idx =
[19]`` in their ``diffusers/ltxvideo/test.py`` and ``--stg_block_idx 19`` in their README; their
``LTX-Video/inference.py`` defaults to 20), and for NAG every block's cross-attention.
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Any, Iterator

import torch
from torch import nn

from guidance_engine.guidance import Perturbation

from .context_attention import BoundContext
from .perturbation import merge_rows, row_groups
from .row_plan import PlanBlockForward, PlanProcessor, ThreadSlot, current, original_processor
from .wan_attention import AttentionOutput, BlurredQueries, VideoTokens

__all__ = ["LTX_DEFAULT_LAYERS", "install_dispatcher", "ltx_video_tokens", "resolve_ltx_layers", "text_mask_bias"]

#: The family's default layers (block indices) for "identity", "blur" and "skip".
LTX_DEFAULT_LAYERS: tuple[int, ...] = (19,)
#: The part of a block each perturbation kind alters (None: the whole block).
_PARTS: dict[str, str | None] = {"skip": None, "identity": "attn1", "blur": "attn1", "extrapolate": "attn2"}
_NAMED = re.compile(r"^transformer_blocks\.(\d+)(\.attn1)?$")

#: (start, end, what to do there): rows [start, end) of the forward's batch.
Segment = tuple[int, int, Any]

_TOKENS = ThreadSlot(None)  # VideoTokens of the forward running in this thread
_INSTALL = threading.Lock()  # two calls installing at once must not wrap a dispatcher in another


@contextlib.contextmanager
def ltx_video_tokens(layout: VideoTokens) -> Iterator[VideoTokens]:
    """``layout``: the token grid of the forward run inside (this thread only)."""
    token = _TOKENS.set(layout)
    try:
        yield layout
    finally:
        _TOKENS.reset(token)


def text_mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, tokens) text mask as the additive bias LTX's transformer makes of it: 0 on the
    prompt's tokens, -10000 on padding, shape (rows, 1, tokens)."""
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


# --------------------------------------------------------------------------- layer names
def resolve_ltx_layers(model: nn.Module, perturbation: Perturbation, owner: str = "guidance"
                       ) -> list[tuple[str, nn.Module]]:
    """The modules of an LTX transformer a perturbation alters: whole blocks or (named
    ``transformer_blocks.<i>.attn1``) a block's self-attention ("skip"), the self-attention
    ("identity", "blur") or the cross-attention ("extrapolate"). ValueError naming ``layers``, the
    accepted names and the value received, or the reason a layer cannot be altered."""
    blocks = model.transformer_blocks
    accepted = f"LTX transformer block indices 0..{len(blocks) - 1} (or 'transformer_blocks.<i>'" + \
        (", 'transformer_blocks.<i>.attn1': that block's self-attention skipped, STG-R)" if perturbation.kind == "skip"
         else ")")
    layers = perturbation.layers
    if layers is None:
        layers = tuple(range(len(blocks))) if perturbation.kind == "extrapolate" else LTX_DEFAULT_LAYERS
        if any(i >= len(blocks) for i in layers):
            raise ValueError(f"{owner}: the default layers {list(layers)} are not all among this model's "
                             f"{accepted}; pass layers=[...]")
    chosen: dict[str, nn.Module] = {}
    for layer in layers:
        index, part = _block_and_part(layer, perturbation.kind, len(blocks))
        if index is None:
            raise ValueError(f"{owner}: parameter 'layers' must be {accepted}, got {layer!r}")
        name = f"transformer_blocks.{index}" + (f".{part}" if part else "")
        chosen[name] = blocks[index] if part is None else getattr(blocks[index], part)
    for name, module in chosen.items():
        _check_alterable(name, module, perturbation.kind, owner)
    return list(chosen.items())


def _block_and_part(layer: Any, kind: str, count: int) -> tuple[int | None, str | None]:
    """(block index, altered part) of one layer name; (None, None) when the name is not accepted."""
    part = _PARTS[kind]
    if isinstance(layer, str):
        match = _NAMED.match(layer)
        if match is None or (match.group(2) and kind != "skip"):
            return None, None
        layer, part = int(match.group(1)), "attn1" if match.group(2) else part
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < count:
        return None, None
    return layer, part


def _check_alterable(name: str, module: nn.Module, kind: str, owner: str) -> None:
    if kind == "skip":
        return
    if isinstance(original_processor(module), nn.Module):
        raise ValueError(f"{owner}: layer {name} has a trainable processor "
                         f"({type(original_processor(module)).__name__}); perturbing it is not supported")
    if kind == "blur" and getattr(module, "fused_projections", False):
        raise ValueError(f"{owner}: perturbation 'blur' on layer {name} with fused projections is not supported "
                         "(call transformer.unfuse_qkv_projections())")


def install_dispatcher(module: nn.Module, kind: str) -> None:
    """Put LTX's row-plan dispatcher in front of an attention layer's processor, or (``kind``
    "skip") in front of a block's or an attention layer's forward, once (again when replaced
    since). The shared installers of :mod:`.row_plan` then leave it in place: it is one of theirs."""
    with _INSTALL:
        if kind != "skip":
            if not isinstance(module.processor, LTXPlanProcessor):
                module.processor = LTXPlanProcessor(module.processor)
        elif not isinstance(vars(module).get("forward"), PassThroughForward):
            module.forward = PassThroughForward(module, module.forward)


# --------------------------------------------------------------------------- rows of a forward
def _take(value: Any, rows: torch.Tensor | slice, batch: int) -> Any:
    """``value`` restricted to ``rows``: a per-row tensor, or a tuple of them (LTX's rotary
    cosines and sines, one row per sample); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_take(item, rows, batch) for item in value)
    return value


class PassThroughForward(PlanBlockForward):
    """A block's (or an attention layer's) forward behind the row plan: the rows the plan skips
    get their input back, the others go through the module's own forward on their rows only."""

    def __call__(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = current()
        if plan is None or self.block not in plan.blocks:
            return self.forward(hidden_states, *args, **kwargs)
        batch = hidden_states.shape[0]
        plain, skipped = row_groups(batch, plan.blocks[self.block])
        parts = [(rows, hidden_states[rows]) for rows, _ in skipped]
        if plain is not None:
            parts.append((plain, self.forward(hidden_states[plain], *_take(args, plain, batch),
                                              **{k: _take(v, plain, batch) for k, v in kwargs.items()})))
        return merge_rows(parts, batch)


class LTXPlanProcessor(PlanProcessor):
    """An LTX attention layer's processor behind the row plan: the layer's own processor unless the
    current plan alters some rows of this layer (identity, blurred queries, a second context)."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> torch.Tensor:
        plan = current()
        if plan is None or attn not in plan.attention:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        batch = hidden_states.shape[0]
        plain, altered = row_groups(batch, plan.attention[attn])
        parts = []
        for rows, alteration in ([(plain, None)] if plain is not None else []) + altered:
            inputs = (hidden_states[rows],
                      *_take((encoder_hidden_states, attention_mask, image_rotary_emb), rows, batch))
            parts.append((rows, self.original(attn, *inputs) if alteration is None else
                          self._altered(attn, *inputs, alteration)))
        return merge_rows(parts, batch)

    def _altered(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, image_rotary_emb: Any, alteration: Any) -> torch.Tensor:
        if isinstance(alteration, BoundContext):
            return self._extrapolated(attn, hidden_states, encoder_hidden_states, attention_mask, alteration)
        if alteration.kind == "identity":  # softmax(q k^T) = I: every token's output is its value
            return attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
        layout = _TOKENS.get()
        if layout is None:
            raise RuntimeError("perturbation 'blur': the forward did not say where its video tokens are")
        return self.original(BlurredQueries(attn, layout, alteration.sigma), hidden_states, encoder_hidden_states,
                             attention_mask, image_rotary_emb)

    def _extrapolated(self, attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor,
                      attention_mask: torch.Tensor | None, bound: BoundContext) -> torch.Tensor:
        """Cross-attention of these rows under their context (Z+) and the bound one (Z-), each with
        its own text mask, both through the layer's processor, combined by the spec's rule, then
        the layer's output projection."""
        negative, negative_mask = bound.context["encoder_hidden_states"], bound.context.get("encoder_attention_mask")
        if negative.shape != context.shape:
            raise ValueError(f"guidance: the second context has shape {tuple(negative.shape)}, the layer's own "
                             f"{tuple(context.shape)}; both must be encoded to the same length")
        view = AttentionOutput(attn)
        positive = self.original(view, hidden_states, context, attention_mask, None)
        combined = bound.spec.extrapolate(positive, self.original(view, hidden_states, negative, negative_mask, None),
                                          "video_cross")
        return attn.to_out[1](attn.to_out[0](combined.to(positive.dtype)))
