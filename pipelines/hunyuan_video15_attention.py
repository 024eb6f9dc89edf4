"""Layer alterations on HunyuanVideo 1.5's transformer (``HunyuanVideo15Transformer3DModel``), for
some rows of a forward: the row plan's alterations (:mod:`.row_plan`) made on its dual-stream
blocks, whose joint attention (``HunyuanVideo15AttnProcessor2_0``: the video tokens first, then the
text tokens (image, ByT5 and Qwen2.5-VL embeddings, valid ones first), a pairwise padding mask built
inside the processor, rotary positions shared by the rows) the generic processors of
:mod:`.perturbation` do not serve.

- "skip" (SLG): the block's outputs are its inputs (both streams), ``x_{i+1} = x_i``, for the
  altered rows. Named ``"transformer_blocks.<i>.attn"``, the skip is of block i's joint attention
  alone: its outputs are its inputs (the modulated, normalised video and text states), what
  Hyung et al.'s STG-R processor does on HunyuanVideo (junhahyung/stguidance,
  ``diffusers/hunyuanvideo/pipeline_stg_hunyuan.py``: ``return hidden_states,
  encoder_hidden_states`` in ``STG-R`` mode).
- "identity" (PAG; STG-A): in the joint attention, each video token attends to itself among the
  video tokens and to every valid text token; text tokens attend as the model makes them (the
  video-to-video block of the map replaced by the identity, their STG-A mask on HunyuanVideo and
  diffusers' SD3 PAG rule on joint attention), within the model's padding mask. The processor
  builds that mask itself, so its steps are written out here in its order with its functions.

Layer names are block indices 0..N-1 of ``transformer_blocks`` (or ``"transformer_blocks.<i>"``);
None is :data:`HUNYUAN_DEFAULT_LAYERS` (block 2: STG's HunyuanVideo recipe, ``--stg-block-idx 2``
in their README; HunyuanVideo 1.5's 54 blocks are not the 20 + 40 of the model they ran).
"""

from __future__ import annotations

import re
import threading
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from guidance_engine.guidance import Perturbation

from .perturbation import row_groups
from .row_plan import PlanBlockForward, PlanProcessor, current, original_processor

__all__ = ["HUNYUAN_DEFAULT_LAYERS", "identity_attention", "install_dispatcher", "resolve_hunyuan_layers"]

#: The family's default layers (block indices) for "identity" and "skip".
HUNYUAN_DEFAULT_LAYERS: tuple[int, ...] = (2,)
_NAMED = re.compile(r"^transformer_blocks\.(\d+)(\.attn)?$")

#: (start, end, what to do there): rows [start, end) of the forward's batch.
Segment = tuple[int, int, Any]

_INSTALL = threading.Lock()  # two calls installing at once must not wrap a dispatcher in another


# --------------------------------------------------------------------------- layer names
def resolve_hunyuan_layers(model: nn.Module, perturbation: Perturbation, owner: str = "guidance"
                           ) -> list[tuple[str, nn.Module]]:
    """The modules of a HunyuanVideo 1.5 transformer a perturbation alters: whole blocks or (named
    ``transformer_blocks.<i>.attn``) a block's joint attention ("skip"), the joint attention
    ("identity"). ValueError naming ``layers``, the accepted names and the value received."""
    blocks = model.transformer_blocks
    skip = perturbation.kind == "skip"
    accepted = f"HunyuanVideo 1.5 transformer block indices 0..{len(blocks) - 1} (or 'transformer_blocks.<i>'" + \
        (", 'transformer_blocks.<i>.attn': that block's joint attention skipped, STG-R)" if skip else ")")
    layers = perturbation.layers
    if layers is None:
        layers = HUNYUAN_DEFAULT_LAYERS
        if any(i >= len(blocks) for i in layers):
            raise ValueError(f"{owner}: the default layers {list(layers)} are not all among this model's "
                             f"{accepted}; pass layers=[...]")
    chosen: dict[str, nn.Module] = {}
    for layer in layers:
        index, attention = _block(layer, skip, len(blocks))
        if index is None:
            raise ValueError(f"{owner}: parameter 'layers' must be {accepted}, got {layer!r}")
        whole = skip and not attention
        name = f"transformer_blocks.{index}" + ("" if whole else ".attn")
        chosen[name] = blocks[index] if whole else blocks[index].attn
    for name, module in chosen.items():
        if not skip and isinstance(original_processor(module), nn.Module):
            raise ValueError(f"{owner}: layer {name} has a trainable processor "
                             f"({type(original_processor(module)).__name__}); perturbing it is not supported")
    return list(chosen.items())


def _block(layer: Any, skip: bool, count: int) -> tuple[int | None, bool]:
    """(block index, whether the name is the block's attention) of one layer name; (None, False)
    when the name is not accepted (a named attention is a skip's only)."""
    attention = False
    if isinstance(layer, str):
        match = _NAMED.match(layer)
        if match is None or (match.group(2) and not skip):
            return None, False
        layer, attention = int(match.group(1)), bool(match.group(2))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < count:
        return None, False
    return layer, attention


def install_dispatcher(module: nn.Module, kind: str) -> None:
    """Put the family's row-plan dispatcher in front of a joint attention's processor, or (``kind``
    "skip") in front of a block's or a joint attention's forward, once. The shared installers of
    :mod:`.row_plan` then leave it in place: it is one of theirs."""
    with _INSTALL:
        if kind != "skip":
            if not isinstance(module.processor, HunyuanPlanProcessor):
                module.processor = HunyuanPlanProcessor(module.processor)
        elif not isinstance(vars(module).get("forward"), TwoStreamPassThrough):
            module.forward = TwoStreamPassThrough(module, module.forward)


# --------------------------------------------------------------------------- rows of a forward
def _merged(parts: Sequence[tuple[torch.Tensor | slice, tuple[torch.Tensor, torch.Tensor]]], batch: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two streams of ``batch`` rows from the row groups' (video, text) results."""
    merged = []
    for stream in range(2):
        out = parts[0][1][stream].new_empty((batch, *parts[0][1][stream].shape[1:]))
        for rows, values in parts:
            out[rows] = values[stream]
        merged.append(out)
    return merged[0], merged[1]


class TwoStreamPassThrough(PlanBlockForward):
    """A dual-stream block's (or its joint attention's) forward behind the row plan: the rows the
    plan skips get their (video, text) inputs back, the others go through the module's own forward
    on their rows only. Per-row inputs: the two streams, the time embedding, the text mask; the
    rotary positions are shared by the rows."""

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, *args: Any,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        plan = current()
        if plan is None or self.block not in plan.blocks:
            return self.forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        batch = hidden_states.shape[0]
        plain, skipped = row_groups(batch, plan.blocks[self.block])
        parts = [(rows, (hidden_states[rows], encoder_hidden_states[rows])) for rows, _ in skipped]
        if plain is not None:
            parts.append((plain, self.forward(hidden_states[plain], encoder_hidden_states[plain],
                                              *self._rows_of(args, plain),
                                              **{k: self._row_value(k, v, plain) for k, v in kwargs.items()})))
        return _merged(parts, batch)

    def _rows_of(self, args: tuple, rows: torch.Tensor) -> tuple:
        """A block's positional (temb, attention_mask, freqs_cis): the first two per row."""
        return tuple(arg[rows] if i < 2 and isinstance(arg, torch.Tensor) else arg for i, arg in enumerate(args))

    @staticmethod
    def _row_value(name: str, value: Any, rows: torch.Tensor) -> Any:
        if name in ("temb", "attention_mask") and isinstance(value, torch.Tensor):
            return value[rows]
        return value


class HunyuanPlanProcessor(PlanProcessor):
    """A joint attention's processor behind the row plan: the layer's own processor unless the
    current plan alters some rows of this layer (PAG's identity on the video tokens)."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = current()
        if plan is None or attn not in plan.attention:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        batch = hidden_states.shape[0]
        plain, altered = row_groups(batch, plan.attention[attn])
        parts = []
        if plain is not None:
            parts.append((plain, self.original(attn, hidden_states[plain], encoder_hidden_states[plain],
                                               attention_mask[plain], image_rotary_emb)))
        for rows, _ in altered:  # "identity": the only kind this family's attention takes
            parts.append((rows, identity_attention(self.original, attn, hidden_states[rows],
                                                   encoder_hidden_states[rows], attention_mask[rows],
                                                   image_rotary_emb)))
        return _merged(parts, batch)


def identity_attention(processor: Any, attn: nn.Module, hidden_states: torch.Tensor,
                       encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                       image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """HunyuanVideo 1.5's joint attention with PAG's identity on the video tokens: the
    processor's steps (projections, per-head q/k norms, rotary positions on the video tokens, the
    [video, text] join, its pairwise padding mask, its attention backend, output projections),
    the video-to-video block of the boolean mask kept on its diagonal only."""
    def heads(states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(2, (attn.heads, -1))

    query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
    value = heads(attn.to_v(hidden_states))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    text_query = heads(attn.add_q_proj(encoder_hidden_states))
    text_key, text_value = heads(attn.add_k_proj(encoder_hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))
    if attn.norm_added_q is not None:
        text_query = attn.norm_added_q(text_query)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    query, key = torch.cat([query, text_query], dim=1), torch.cat([key, text_key], dim=1)
    value = torch.cat([value, text_value], dim=1)
    video = hidden_states.shape[1]
    valid = F.pad(attention_mask, (video, 0), value=True).bool()  # the video tokens are always valid
    mask = valid[:, None, :, None] & valid[:, None, None, :]
    mask[:, :, :video, :video] &= torch.eye(video, dtype=torch.bool, device=mask.device)
    out = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                backend=getattr(processor, "_attention_backend", None),
                                parallel_config=getattr(processor, "_parallel_config", None))
    out = out.flatten(2, 3).to(query.dtype)
    video_out, text_out = out[:, :video], out[:, video:]
    return attn.to_out[1](attn.to_out[0](video_out)), attn.to_add_out(text_out)
