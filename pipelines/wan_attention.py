"""Layer alterations on Wan's transformer (``WanTransformer3DModel``, Wan 2.1 / 2.2), for some rows
of a forward: the row plan's alterations (:mod:`.row_plan`) made on Wan's blocks, whose attention
(``WanAttention`` with ``WanAttnProcessor``: q/k RMS norms over all heads, 3-D rotary positions)
the generic processors of :mod:`.perturbation` do not serve.

Each block of the model's ``blocks`` list is self-attention over the video tokens (``attn1``: the
latent's frames x rows x columns of 1 x 2 x 2 patches, no text), cross-attention to the prompt
(``attn2``) and a feed-forward, each modulated by the time embedding. The alterations:

- "skip" (SLG; STG's residual skip, Hyung et al. arXiv 2411.18664): the block's output is its
  input, ``x_{i+1} = x_i``, for the altered rows.
- "identity" (PAG; STG's attention skip): ``attn1``'s map softmax(q k^T / sqrt(d)) replaced by the
  identity, so each video token attends to itself only: the output is ``to_out(to_v(x))`` (the
  spatio-temporal map as a whole, as STG-A does on video DiTs).
- "blur" (SEG, Hong 2024): ``attn1``'s queries blurred before its q-norm and rotary positions
  (where SEG blurs on plain self-attention), by a Gaussian of std ``sigma`` tokens over each latent
  frame's rows x columns grid, channel by channel (reflect padding, the shared
  :func:`~.query_blur.gaussian_blur_queries`); frames are not mixed (SEG is a spatial blur; time is
  not a token axis of the same scale), and ``sigma = inf`` is each frame's mean query. The rest of
  the layer is Wan's own processor.
- "extrapolate" (NAG, Chen et al. arXiv 2505.21179): ``attn2``'s attention outputs under the
  prompt (Z+) and under the bound second context (Z-, the negative prompt's UMT5 embeddings through
  the same model's text projection) with the same queries, both by Wan's own processor, combined
  by the method's rule before ``attn2``'s output projection, as the authors' Wan processor does.

Layer names are block indices 0..N-1 of ``blocks``; None is :data:`WAN_DEFAULT_LAYERS` (block 9,
Wan2GP's default ``perturbation_layers``, ``models/_settings.json``; its skip-layer guidance skips
that block in the unconditional forward, between 10 % and 90 % of the steps, where the engine's
SLG adds the skipped conditional prediction as a third branch, SD 3.5's rule), and for NAG every
block's cross-attention (the authors' processor sits on every ``attn2``).

NAG's alpha defaults to the authors' Wan processor's 0.25 (``nag.DEFAULT_ALPHA["video_cross"]``;
UNet cross-attention: 0.5). Image-conditioned (I2V) cross-attention is refused.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from guidance_engine.guidance import Perturbation

from .context_attention import BoundContext
from .perturbation import merge_rows, row_groups, take_rows
from .query_blur import gaussian_blur_queries
from .row_plan import PlanBlockForward, PlanProcessor, ThreadSlot, current, original_processor

__all__ = ["WAN_DEFAULT_LAYERS", "AttentionOutput", "BlurredQueries", "VideoTokens", "install_dispatcher",
           "resolve_wan_layers", "video_tokens"]

#: The family's default layers (block indices) for "identity", "blur" and "skip".
WAN_DEFAULT_LAYERS: tuple[int, ...] = (9,)
#: The part of a block each perturbation kind alters (None: the whole block).
_PARTS: dict[str, str | None] = {"skip": None, "identity": "attn1", "blur": "attn1", "extrapolate": "attn2"}

#: (start, end, what to do there): rows [start, end) of the forward's batch.
Segment = tuple[int, int, Any]


@dataclass(frozen=True)
class VideoTokens:
    """The video tokens of one forward: ``frames`` x ``rows`` x ``columns`` patches, in that
    (raster) order, the order of the model's flattened patch embedding."""

    frames: int
    rows: int
    columns: int

    @property
    def count(self) -> int:
        return self.frames * self.rows * self.columns


_TOKENS = ThreadSlot(None)  # VideoTokens of the forward running in this thread
_INSTALL = threading.Lock()  # two calls installing at once must not wrap a dispatcher in another


@contextlib.contextmanager
def video_tokens(layout: VideoTokens) -> Iterator[VideoTokens]:
    """``layout``: the token grid of the forward run inside (this thread only)."""
    token = _TOKENS.set(layout)
    try:
        yield layout
    finally:
        _TOKENS.reset(token)


# --------------------------------------------------------------------------- layer names
def resolve_wan_layers(model: nn.Module, perturbation: Perturbation, owner: str = "guidance"
                       ) -> list[tuple[str, nn.Module]]:
    """The modules of a Wan transformer a perturbation alters: whole blocks ("skip"), their
    self-attention ("identity", "blur") or cross-attention ("extrapolate"). ValueError naming
    ``layers``, the accepted indices and the value received, or the reason a layer cannot be altered."""
    blocks = model.blocks
    accepted = f"Wan transformer block indices 0..{len(blocks) - 1}"
    layers = perturbation.layers
    if layers is None:
        layers = tuple(range(len(blocks))) if perturbation.kind == "extrapolate" else WAN_DEFAULT_LAYERS
        if any(i >= len(blocks) for i in layers):
            raise ValueError(f"{owner}: the default layers {list(layers)} are not all among this model's "
                             f"{accepted}; pass layers=[...]")
    chosen: dict[str, nn.Module] = {}
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(blocks):
            raise ValueError(f"{owner}: parameter 'layers' must be {accepted}, got {layer!r}")
        part = _PARTS[perturbation.kind]
        name = f"blocks.{layer}" + (f".{part}" if part else "")
        chosen[name] = blocks[layer] if part is None else getattr(blocks[layer], part)
    for name, module in chosen.items():
        _check_alterable(name, module, perturbation.kind, owner)
    return list(chosen.items())


def _check_alterable(name: str, module: nn.Module, kind: str, owner: str) -> None:
    if kind == "skip":
        return
    if isinstance(original_processor(module), nn.Module):
        raise ValueError(f"{owner}: layer {name} has a trainable processor "
                         f"({type(original_processor(module)).__name__}); perturbing it is not supported")
    if kind == "blur" and getattr(module, "fused_projections", False):
        raise ValueError(f"{owner}: perturbation 'blur' on layer {name} with fused projections is not supported "
                         "(call transformer.unfuse_qkv_projections())")
    if kind == "extrapolate" and module.add_k_proj is not None:
        raise ValueError(f"{owner}: perturbation 'extrapolate' on layer {name}, an image-conditioned (I2V) "
                         "cross-attention, is not supported")


def install_dispatcher(module: nn.Module, kind: str) -> None:
    """Put Wan's row-plan dispatcher in front of a block's forward (``kind`` "skip": Wan skips whole
    blocks only) or an attention layer's processor (the other kinds), once (again when the
    processor was replaced since). The shared installers of :mod:`.row_plan` then leave it in
    place: it is one of theirs."""
    with _INSTALL:
        if kind != "skip":
            if not isinstance(module.processor, WanPlanProcessor):
                module.processor = WanPlanProcessor(module.processor)
        elif not isinstance(vars(module).get("forward"), WanBlockForward):
            module.forward = WanBlockForward(module, module.forward)


# --------------------------------------------------------------------------- rows of a forward
class WanBlockForward(PlanBlockForward):
    """A Wan block's forward behind the row plan: the rows the plan skips leave the block unchanged,
    the others go through the block's own forward on their rows only."""

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                 rotary_emb: Any) -> torch.Tensor:
        plan = current()
        if plan is None or self.block not in plan.blocks:
            return self.forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        batch = hidden_states.shape[0]
        plain, skipped = row_groups(batch, plan.blocks[self.block])
        parts = [(rows, hidden_states[rows]) for rows, _ in skipped]
        if plain is not None:  # rotary positions are shared by the rows (batch dimension 1)
            parts.append((plain, self.forward(hidden_states[plain], encoder_hidden_states[plain], temb[plain],
                                              rotary_emb)))
        return merge_rows(parts, batch)


class WanPlanProcessor(PlanProcessor):
    """A Wan attention layer's processor behind the row plan: the layer's own processor unless the
    current plan alters some rows of this layer (identity, blurred queries, a second context)."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb: Any = None) -> torch.Tensor:
        plan = current()
        if plan is None or attn not in plan.attention:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        batch = hidden_states.shape[0]
        plain, altered = row_groups(batch, plan.attention[attn])
        parts = []
        if plain is not None:
            parts.append((plain, self.original(attn, hidden_states[plain],
                                               take_rows(encoder_hidden_states, plain, batch),
                                               take_rows(attention_mask, plain, batch), rotary_emb)))
        for rows, alteration in altered:
            parts.append((rows, self._altered(attn, hidden_states[rows], take_rows(encoder_hidden_states, rows, batch),
                                              take_rows(attention_mask, rows, batch), rotary_emb, alteration)))
        return merge_rows(parts, batch)

    def _altered(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, rotary_emb: Any, alteration: Any) -> torch.Tensor:
        if isinstance(alteration, BoundContext):
            return _extrapolated(self.original, attn, hidden_states, encoder_hidden_states, attention_mask, alteration)
        if alteration.kind == "identity":  # softmax(q k^T) = I: every token's output is its value
            return attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
        layout = _TOKENS.get()
        if layout is None:
            raise RuntimeError("perturbation 'blur': the forward did not say where its video tokens are")
        return self.original(BlurredQueries(attn, layout, alteration.sigma), hidden_states, encoder_hidden_states,
                             attention_mask, rotary_emb)


# --------------------------------------------------------------------------- the alterations
def blur_frames(query: torch.Tensor, layout: VideoTokens, sigma: float) -> torch.Tensor:
    """Queries (batch, tokens, channels) blurred over each frame's rows x columns grid (frames apart)."""
    batch, tokens, channels = query.shape
    if tokens != layout.count:
        raise ValueError(f"perturbation 'blur': {tokens} query tokens are not the video's {layout.frames} x "
                         f"{layout.rows} x {layout.columns}")
    frames = query.reshape(batch * layout.frames, layout.rows * layout.columns, channels)
    return gaussian_blur_queries(frames, layout.rows, layout.columns, sigma).reshape(batch, tokens, channels)


class BlurredQueries:
    """An attention layer seen through SEG: its query projection blurs each frame's queries;
    everything else is the layer's own (one view per call: the shared layer is not changed)."""

    def __init__(self, attn: nn.Module, layout: VideoTokens, sigma: float) -> None:
        self._attn, self._layout, self._sigma = attn, layout, sigma

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._attn, name)
        if name == "to_q":
            return lambda states: blur_frames(attribute(states), self._layout, self._sigma)
        return attribute


def _identity(states: torch.Tensor) -> torch.Tensor:
    return states


class AttentionOutput:
    """An attention layer seen without its output projection: its processor then returns the
    attention output itself (heads merged), the Z that NAG combines."""

    to_out = (_identity, _identity)

    def __init__(self, attn: nn.Module) -> None:
        self._attn = attn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)


def _extrapolated(processor: Callable, attn: nn.Module, hidden_states: torch.Tensor, context: torch.Tensor,
                  attention_mask: torch.Tensor | None, bound: BoundContext) -> torch.Tensor:
    """Cross-attention of these rows under their context (Z+) and the bound one (Z-), both through
    the layer's processor, combined by the spec's rule, then the layer's output projection."""
    negative = bound.context["encoder_hidden_states"]
    if negative.shape != context.shape:
        raise ValueError(f"guidance: the second context has shape {tuple(negative.shape)}, the layer's own "
                         f"{tuple(context.shape)}; both must be encoded to the same length")
    view = AttentionOutput(attn)
    positive = processor(view, hidden_states, context, attention_mask, None)
    combined = bound.spec.extrapolate(positive, processor(view, hidden_states, negative, attention_mask, None),
                                      "video_cross")
    return attn.to_out[1](attn.to_out[0](combined.to(positive.dtype)))
