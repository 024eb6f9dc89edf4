"""Perturbation guidance inside the one batched forward: alter a network for some rows only.

PAG, SEG and SLG guide away from a prediction of the same network with an altered inner
computation. Here that prediction is one more slice of the batch: the forward's row plan
(:mod:`.row_plan`) names the perturbed rows, and the dispatchers installed once on the chosen
layers call :func:`perturbed_rows` (identity attention or blurred queries on the perturbed rows,
the layer's own processor on the others) or :func:`skipping_forward` (the perturbed rows pass a
transformer block unchanged). Nothing on the model changes per call, so concurrent calls on one
pipeline never see each other's perturbations, and a stock pipeline sharing the components
computes what it computed before.

Layer names (``Perturbation.layers``), resolved by :func:`resolve_layers` before any model call:
    UNets: "mid", "down", "up" (every self-attention layer of that part), "down.1" (down block 1),
    "up.0.attentions.1", or any prefix of a module path ("mid_block.attentions.0"); the family
    default is "mid" (diffusers' PAG pipelines use ``pag_applied_layers=["mid"]``).
    Transformers: block indices 7, 8, 9 (the default, the stock SD 3.5 skip-layer choice) of the
    main stack (:func:`block_stacks`): ``transformer_blocks`` (SD3, DiT, Flux.1, Chroma, Flux.2,
    Qwen-Image) or Z-Image's ``layers``. A second stack is named: "single.<i>" the single-stream
    blocks of Flux.1, Chroma and Flux.2 (ComfyUI's SkipLayerGuidanceDiT names the two
    double_layers and single_layers; "double.<i>" is the integer <i> there), "refiner.<i>"
    Z-Image's image-token refiner (``noise_refiner``; its caption refiner holds no image token).

The flow transformers' attention (Flux.1, Chroma, Flux.2, Qwen-Image, Z-Image) is perturbed on
the generated image's tokens, placed by :class:`ImageTokens` (the forward's layout, set by the
family's branch model with :func:`.row_plan.image_tokens`; Flux's 2 x 2 latent patches by
default): "identity" keeps, for each image token, attention to itself and to every other token
(text, reference images) and removes it to the other image tokens; the other tokens attend as
the model makes them (the rule of diffusers' SD3 PAG pipeline on joint attention), combined
with the model's own attention mask. "blur" blurs the image tokens' queries over their grid.
Those two live in :mod:`.flow_attention`, the query blur in :mod:`.query_blur`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from guidance_engine.guidance import Perturbation

from .context_attention import BoundContext, extrapolated_cross_attention, is_cross_attention
from .flow_attention import (ImageTokens, call_processor, flow_layout, flux_identity_mask, identity_mask,
                             packed_tokens, perturbed_flow_attention)
from .query_blur import gaussian_blur_queries, token_grid
from .shuffle import BLOCK_KINDS, check_shuffled_blocks

__all__ = ["DEFAULT_LAYERS", "ImageTokens", "block_stacks", "flux_identity_mask", "gaussian_blur_queries",
           "identity_mask", "merge_rows", "model_family", "packed_tokens", "perturbed_rows", "plain_rows",
           "resolve_layers", "row_groups", "skipping_forward"]

DEFAULT_LAYERS: dict[str, tuple[str | int, ...]] = {"unet": ("mid",), "transformer": (7, 8, 9)}
_SHORT = {"mid": "mid_block", "down": "down_blocks", "up": "up_blocks"}
# What a skipped block returns, by class: its inputs under these names, in its output order.
_SKIP_OUTPUTS = {"BasicTransformerBlock": ("hidden_states",),
                 "JointTransformerBlock": ("encoder_hidden_states", "hidden_states"),
                 "FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
                 "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
                 "ChromaTransformerBlock": ("encoder_hidden_states", "hidden_states"),
                 "ChromaSingleTransformerBlock": ("hidden_states",),  # the joint text-then-image sequence
                 "Flux2TransformerBlock": ("encoder_hidden_states", "hidden_states"),
                 "Flux2SingleTransformerBlock": ("hidden_states",),  # (see _ONE_STREAM)
                 "QwenImageTransformerBlock": ("encoder_hidden_states", "hidden_states"),
                 "ZImageTransformerBlock": ("x",)}
# Blocks that may take a second stream but return it joined to the first: skipped, they are the
# identity only when called on the one joint sequence, as Flux2Transformer2DModel calls them.
_ONE_STREAM = {"Flux2SingleTransformerBlock": "encoder_hidden_states"}
# The named second stacks: attribute -> (the name's head, what the stack is).
_NAMED_STACKS = {"single_transformer_blocks": ("single", "single-stream"),
                 "noise_refiner": ("refiner", "image-token refiner")}


def block_stacks(model: nn.Module) -> dict[str, str]:
    """The transformer block stacks a layer name selects: "" (integer names) -> the main stack's
    attribute, then each named stack ("single" -> "single_transformer_blocks"). Empty for a UNet."""
    if isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList):
        main = "transformer_blocks"
    elif isinstance(getattr(model, "layers", None), nn.ModuleList) and \
            isinstance(getattr(model, "noise_refiner", None), nn.ModuleList):
        main = "layers"  # Z-Image: the main layers over [image, caption], after the two refiners
    else:
        return {}
    stacks = {"": main}
    for attribute, (head, _) in _NAMED_STACKS.items():
        if isinstance(getattr(model, attribute, None), nn.ModuleList) and len(getattr(model, attribute)):
            stacks[head] = attribute
    return stacks


def model_family(model: nn.Module) -> str:
    """"transformer" for a DiT-style model with a block stack (:func:`block_stacks`), else "unet"."""
    return "transformer" if block_stacks(model) else "unet"


def _prefix(layer: str | int, model: nn.Module) -> str:
    stacks = block_stacks(model)
    if isinstance(layer, int):
        return f"{stacks['']}.{layer}" if stacks else str(layer)
    head, _, rest = layer.partition(".")
    if stacks and head.isdigit():
        return f"{stacks['']}.{layer}"
    if head == "double" and "single" in stacks:
        head = ""
    if stacks and head in stacks:
        return stacks[head] + (f".{rest}" if rest else "")
    return _SHORT.get(head, head) + (f".{rest}" if rest else "")


def _is_plain_self_attention(module: nn.Module) -> bool:
    return (hasattr(module, "processor") and hasattr(module, "to_v") and not getattr(module, "is_cross_attention", True)
            and getattr(module, "add_k_proj", None) is None and flow_layout(module) is None)


def _is_joint_attention(module: nn.Module) -> bool:
    """SD3-style joint attention: image and text tokens attend together (``add_k_proj`` set)."""
    return (hasattr(module, "processor") and hasattr(module, "to_v") and flow_layout(module) is None
            and getattr(module, "add_k_proj", None) is not None and getattr(module, "context_pre_only", None) is not None)


def _candidates(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    stacks = tuple(block_stacks(model).values())
    if kind == "extrapolate":  # cross-attention to the text context (a UNet's attn2)
        return [(name, module) for name, module in model.named_modules() if is_cross_attention(module)]
    if kind in BLOCK_KINDS:  # the members of every `transformer_blocks` stack and of the model's block stacks
        members = []
        for name, module in model.named_modules():
            stack, _, index = name.rpartition(".")
            if (stack.endswith("transformer_blocks") or stack in stacks) and index.isdigit():
                members.append((name, module))
        return members
    layers = [(name, module) for name, module in model.named_modules()
              if _is_plain_self_attention(module) or (kind in ("identity", "blur") and _is_joint_attention(module))
              or (kind in ("identity", "blur") and flow_layout(module) is not None)]
    if stacks:  # a transformer's attention inside its stacks (not Z-Image's caption refiner)
        layers = [(name, module) for name, module in layers if name.split(".")[0] in stacks]
    return layers


def _accepted(model: nn.Module, family: str, candidates: list[tuple[str, nn.Module]]) -> str:
    if family == "transformer":
        stacks = block_stacks(model)
        main = getattr(model, stacks[""])
        accepted = f"transformer block indices 0..{len(main) - 1}"
        named = [(head, attribute) for head, attribute in stacks.items() if head]
        if named:
            accepted += " (double-stream)" if "single" in stacks else " (main layers)"
        for head, attribute in named:
            accepted += (f" or '{head}.0'..'{head}.{len(getattr(model, attribute)) - 1}' "
                         f"({_NAMED_STACKS[attribute][1]})")
        return accepted
    heads = sorted({name.split(".attentions")[0].replace("_blocks", "").replace("_block", "")
                    for name, _ in candidates})
    return "'mid', 'down', 'up', 'down.<i>', 'up.<i>.attentions.<j>' or a module path prefix (this model has " \
           f"layers under {', '.join(heads) or 'none'})"


def resolve_layers(model: nn.Module, perturbation: Perturbation, owner: str = "guidance"
                   ) -> list[tuple[str, nn.Module]]:
    """The modules a perturbation alters: self-attention layers ("identity", "blur") or
    transformer blocks ("skip"). ValueError naming ``layers``, what is accepted and what was
    received when a name selects nothing or the layers cannot take the perturbation. A
    ``torch.compile``d model is resolved on the module it wraps (its layers' names, its modules)."""
    model = getattr(model, "_orig_mod", model)
    family = model_family(model)
    candidates = _candidates(model, perturbation.kind)
    if not candidates:
        what = {"skip": "transformer blocks", "shuffle": "transformer blocks",
                "extrapolate": "cross-attention layers (text keys and values)"}.get(
            perturbation.kind, "self-attention or joint-attention layers")
        raise ValueError(f"{owner}: perturbation {perturbation.kind!r} needs {what}; "
                         f"{type(model).__name__} has none")
    if perturbation.layers is None and perturbation.kind == "extrapolate":
        return candidates  # every cross-attention layer, as the authors' pipelines
    layers = perturbation.layers if perturbation.layers is not None else DEFAULT_LAYERS[family]
    chosen: dict[str, nn.Module] = {}
    for layer in layers:
        if isinstance(layer, int) and family != "transformer":
            raise ValueError(f"{owner}: parameter 'layers' must be {_accepted(model, family, candidates)} for a UNet, "
                             f"got {layer!r}")
        prefix = _prefix(layer, model)
        matched = [(name, m) for name, m in candidates if name == prefix or name.startswith(prefix + ".")]
        if not matched:
            raise ValueError(f"{owner}: parameter 'layers' must be {_accepted(model, family, candidates)}; "
                             f"{layer!r} selects nothing")
        chosen.update(matched)
    for name, module in chosen.items():
        if perturbation.kind == "skip" and type(module).__name__ not in _SKIP_OUTPUTS:
            raise ValueError(f"{owner}: cannot skip block {name} of type {type(module).__name__} "
                             f"(supported: {', '.join(_SKIP_OUTPUTS)})")
    if perturbation.kind == "shuffle":
        check_shuffled_blocks(chosen.items(), owner)
    if perturbation.kind == "skip" and getattr(getattr(model, "config", None), "zero_cond_t", False):
        # Qwen-Image's zero_cond_t doubles the time embedding's rows: a block's rows cannot be cut out
        raise ValueError(f"{owner}: cannot skip blocks of a {type(model).__name__} with zero_cond_t=True "
                         "(its blocks take two time embeddings per row)")
    return list(chosen.items())


# --------------------------------------------------------------------------- perturbed attention
def self_attention_tokens(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
    """The input of a self-attention layer as ``AttnProcessor2_0`` prepares it: spatial norm,
    [batch, channels, h, w] -> [batch, tokens, channels], group norm."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states


def _perturbed_attention(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None, perturbation: Perturbation,
                         latent_hw: tuple[int, int]) -> torch.Tensor:
    """Self-attention of ``attn`` on these rows with identity attention ("identity": the output is
    the value projection) or blurred queries ("blur"); the rest is ``AttnProcessor2_0``'s."""
    residual = hidden_states
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch, channel, height, width = hidden_states.shape
    hidden_states = self_attention_tokens(attn, hidden_states, temb)
    if perturbation.kind == "identity":
        out = attn.to_v(hidden_states)  # softmax(QK^T) replaced by the identity matrix
    else:
        batch, tokens, _ = hidden_states.shape
        grid = (height, width) if input_ndim == 4 else token_grid(tokens, latent_hw)
        query = gaussian_blur_queries(attn.to_q(hidden_states), *grid, perturbation.sigma)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if input_ndim == 4:
        out = out.transpose(-1, -2).reshape(batch, channel, height, width)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _perturbed_joint_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                               perturbation: Perturbation, latent_hw: tuple[int, int]
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint attention (SD3) of these rows, perturbed. "identity" (PAG): the image-to-image block of
    the attention map replaced by the identity, so every image token attends to itself and to the
    text tokens, the text tokens to everything (the rule of diffusers' SD3 PAG pipeline). "blur"
    (SEG): the image tokens' queries blurred over their grid (the query projection, before the
    q-norm, as SEG does on plain self-attention); the text queries are left alone, the map is
    otherwise the model's. Unlike diffusers' PAG processors, the model's query / key norms (SD 3.5)
    are applied, as in its own processor."""
    batch, image_tokens = hidden_states.shape[0], hidden_states.shape[1]
    heads = attn.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if perturbation.kind == "blur":
        query = gaussian_blur_queries(query, *token_grid(image_tokens, latent_hw), perturbation.sigma)
    query, key, value = split(query), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    context_query = split(attn.add_q_proj(encoder_hidden_states))
    context_key = split(attn.add_k_proj(encoder_hidden_states))
    context_value = split(attn.add_v_proj(encoder_hidden_states))
    if attn.norm_added_q is not None:
        context_query = attn.norm_added_q(context_query)
    if attn.norm_added_k is not None:
        context_key = attn.norm_added_k(context_key)
    query, key, value = (torch.cat(pair, dim=2) for pair in ((query, context_query), (key, context_key),
                                                               (value, context_value)))
    mask = None
    if perturbation.kind == "identity":
        tokens = query.shape[2]
        mask = torch.zeros((tokens, tokens), device=query.device, dtype=query.dtype)
        mask[:image_tokens, :image_tokens] = float("-inf")
        mask[:image_tokens, :image_tokens].fill_diagonal_(0)
        mask = mask[None, None]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    out = out.transpose(1, 2).reshape(batch, -1, heads * query.shape[-1]).to(query.dtype)
    out, context = out[:, :image_tokens], out[:, image_tokens:]
    if not attn.context_pre_only:
        context = attn.to_add_out(context)
    return attn.to_out[1](attn.to_out[0](out)), context


def take_rows(value: Any, rows: torch.Tensor | slice, batch: int) -> Any:
    """``value`` restricted to ``rows`` when it is a per-row tensor (or a dict of them)."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):
        return {k: take_rows(v, rows, batch) for k, v in value.items()}
    return value


def plain_rows(batch: int, segments: Sequence[tuple[int, int, Any]]) -> torch.Tensor | slice | None:
    """The rows outside every segment: a slice when contiguous, an index, or None when none.
    Worked out on Python ints (the segments' bounds), so a compiled forward traces it without a
    data-dependent op (no ``nonzero``, no ``.item()``)."""
    taken = [False] * batch
    for start, end, _ in segments:
        for i in range(batch)[start:end]:
            taken[i] = True
    rows = [i for i, in_segment in enumerate(taken) if not in_segment]
    if not rows:
        return None
    if rows[-1] - rows[0] + 1 == len(rows):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows)


def row_groups(batch: int, segments: Sequence[tuple[int, int, Any]]
               ) -> tuple[torch.Tensor | slice | None, list[tuple[slice, Any]]]:
    """The rows outside every segment (:func:`plain_rows`) and each segment's rows with what to do there."""
    return plain_rows(batch, segments), [(slice(start, end), what) for start, end, what in segments]


def perturbed_rows(original: Callable, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                   attention_mask: torch.Tensor | None, kwargs: dict[str, Any],
                   segments: Sequence[tuple[int, int, Perturbation]], latent_hw: tuple[int, int],
                   tokens: ImageTokens | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """One attention layer's call on a batch whose rows in ``segments`` (start, end, perturbation)
    get the perturbed self-attention; all other rows go through the ``original`` processor in one
    call on their rows, so the unperturbed branches compute exactly what they would alone.
    ``tokens``: a flow transformer's image-token layout (None: :func:`packed_tokens` of ``latent_hw``)."""
    batch = hidden_states.shape[0]
    parts: list[tuple[torch.Tensor | slice, torch.Tensor]] = []
    plain = plain_rows(batch, segments)
    if plain is not None:
        parts.append((plain, call_processor(original, attn, hidden_states[plain],
                                   take_rows(encoder_hidden_states, plain, batch),
                                   take_rows(attention_mask, plain, batch), take_rows(kwargs, plain, batch))))
    flow = flow_layout(attn) is not None
    joint = encoder_hidden_states is not None and (_is_joint_attention(attn) or flow)
    for start, end, perturbation in segments:
        rows = slice(start, end)
        if isinstance(perturbation, BoundContext):
            parts.append((rows, extrapolated_cross_attention(
                attn, hidden_states[rows], encoder_hidden_states[rows], perturbation,
                take_rows(attention_mask, rows, batch), take_rows(kwargs.get("temb"), rows, batch))))
        elif flow:
            parts.append((rows, perturbed_flow_attention(
                original, attn, hidden_states[rows], take_rows(encoder_hidden_states, rows, batch),
                take_rows(attention_mask, rows, batch), take_rows(kwargs, rows, batch), perturbation,
                tokens or packed_tokens(latent_hw))))
        elif joint:  # (image, text) streams; "identity" and "blur" resolve to joint layers
            parts.append((rows, _perturbed_joint_attention(attn, hidden_states[rows], encoder_hidden_states[rows],
                                                           perturbation, latent_hw)))
        else:
            parts.append((rows, _perturbed_attention(attn, hidden_states[rows], take_rows(kwargs.get("temb"), rows, batch),
                                                     perturbation, latent_hw)))
    if joint:
        return tuple(merge_rows([(rows, value[k]) for rows, value in parts], batch) for k in range(2))
    return merge_rows(parts, batch)


def merge_rows(parts: Sequence[tuple[torch.Tensor | slice, torch.Tensor]], batch: int) -> torch.Tensor:
    """One tensor of ``batch`` rows from the row groups' results."""
    out: torch.Tensor | None = None
    for rows, value in parts:
        if out is None:
            out = value.new_empty((batch, *value.shape[1:]))
        out[rows] = value
    return out


def skipping_forward(block: nn.Module, forward: Callable, segments: Sequence[tuple[int, int, Any]]) -> Callable:
    """``block.forward`` for one call: rows in ``segments`` leave the block unchanged (their inputs
    are its outputs), the others go through the original forward on their rows only."""
    names = _SKIP_OUTPUTS[type(block).__name__]
    joined = _ONE_STREAM.get(type(block).__name__)
    signature = inspect.signature(forward)

    def skipping(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        inputs = bound.arguments
        if joined is not None and inputs.get(joined) is not None:
            raise ValueError(f"perturbation 'skip': a {type(block).__name__} given {joined} returns it joined to "
                             "its input, not supported (its transformer passes one joint sequence)")
        batch = inputs[names[-1]].shape[0]  # the image stream (or the joint sequence)
        plain = plain_rows(batch, segments)
        passed = tuple(inputs.get(name) for name in names)
        if plain is None:
            return passed[0] if len(names) == 1 else passed
        result = forward(**{k: take_rows(v, plain, batch) for k, v in inputs.items()})
        result_tuple = (result,) if len(names) == 1 else tuple(result)
        merged = []
        for computed, original in zip(result_tuple, passed):
            if computed is None:  # e.g. SD3's last block returns no context stream
                merged.append(None)
                continue
            full = computed.new_empty((batch, *computed.shape[1:]))
            full[plain] = computed
            for start, end, _ in segments:
                full[start:end] = original[start:end]
            merged.append(full)
        return merged[0] if len(names) == 1 else tuple(merged)

    return skipping
