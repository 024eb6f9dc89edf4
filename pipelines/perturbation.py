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
    Transformers (SD3, DiT, Flux): block indices 7, 8, 9 (the default, the stock SD 3.5 skip-layer
    choice); on Flux the integers are its double-stream blocks and "single.<i>" its single-stream
    blocks (ComfyUI's SkipLayerGuidanceDiT names them double_layers and single_layers).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from guidance_engine.guidance import Perturbation

__all__ = ["DEFAULT_LAYERS", "gaussian_blur_queries", "model_family", "perturbed_rows", "resolve_layers",
           "skipping_forward"]

DEFAULT_LAYERS: dict[str, tuple[str | int, ...]] = {"unet": ("mid",), "transformer": (7, 8, 9)}
_SHORT = {"mid": "mid_block", "down": "down_blocks", "up": "up_blocks"}
# What a skipped block returns, by class: its inputs under these names, in its output order.
_SKIP_OUTPUTS = {"BasicTransformerBlock": ("hidden_states",),
                 "JointTransformerBlock": ("encoder_hidden_states", "hidden_states"),
                 "FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
                 "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states")}
#: Flux's single-stream blocks, as a layer name says them ("single.3").
_SINGLE = "single_transformer_blocks"


def model_family(model: nn.Module) -> str:
    """"transformer" for a DiT-style model with a ``transformer_blocks`` stack, else "unet"."""
    if isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList):
        return "transformer"
    return "unet"


def _prefix(layer: str | int, family: str) -> str:
    if isinstance(layer, int):
        return f"transformer_blocks.{layer}"
    head, _, rest = layer.partition(".")
    if family == "transformer" and head.isdigit():
        return f"transformer_blocks.{layer}"
    if family == "transformer" and head in ("single", "double"):
        return f"{_SINGLE if head == 'single' else 'transformer_blocks'}" + (f".{rest}" if rest else "")
    return _SHORT.get(head, head) + (f".{rest}" if rest else "")


def _is_plain_self_attention(module: nn.Module) -> bool:
    return (hasattr(module, "processor") and hasattr(module, "to_v") and not getattr(module, "is_cross_attention", True)
            and getattr(module, "add_k_proj", None) is None)


def _is_flux_attention(module: nn.Module) -> bool:
    """Flux's attention (double- and single-stream blocks): text and image tokens in one sequence,
    text first, with rotary positions applied inside its processor."""
    return type(module).__name__ == "FluxAttention" and hasattr(module, "processor")


def _is_joint_attention(module: nn.Module) -> bool:
    """SD3-style joint attention: image and text tokens attend together (``add_k_proj`` set)."""
    return (hasattr(module, "processor") and hasattr(module, "to_v") and not _is_flux_attention(module)
            and getattr(module, "add_k_proj", None) is not None and getattr(module, "context_pre_only", None) is not None)


def _candidates(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    if kind == "skip":  # the members of every `transformer_blocks` stack
        members = []
        for name, module in model.named_modules():
            stack, _, index = name.rpartition(".")
            if stack.endswith("transformer_blocks") and index.isdigit():
                members.append((name, module))
        return members
    return [(name, module) for name, module in model.named_modules()
            if _is_plain_self_attention(module) or (kind in ("identity", "blur") and _is_joint_attention(module))
            or (kind in ("identity", "blur") and _is_flux_attention(module))]


def _accepted(model: nn.Module, family: str, candidates: list[tuple[str, nn.Module]]) -> str:
    if family == "transformer":
        accepted = f"transformer block indices 0..{len(model.transformer_blocks) - 1}"
        singles = getattr(model, _SINGLE, None)
        if isinstance(singles, nn.ModuleList) and len(singles):
            accepted += f" (double-stream) or 'single.0'..'single.{len(singles) - 1}' (single-stream)"
        return accepted
    heads = sorted({name.split(".attentions")[0].replace("_blocks", "").replace("_block", "")
                    for name, _ in candidates})
    return "'mid', 'down', 'up', 'down.<i>', 'up.<i>.attentions.<j>' or a module path prefix (this model has " \
           f"layers under {', '.join(heads) or 'none'})"


def resolve_layers(model: nn.Module, perturbation: Perturbation, owner: str = "guidance"
                   ) -> list[tuple[str, nn.Module]]:
    """The modules a perturbation alters: self-attention layers ("identity", "blur") or
    transformer blocks ("skip"). ValueError naming ``layers``, what is accepted and what was
    received when a name selects nothing or the layers cannot take the perturbation."""
    family = model_family(model)
    layers = perturbation.layers if perturbation.layers is not None else DEFAULT_LAYERS[family]
    candidates = _candidates(model, perturbation.kind)
    if not candidates:
        what = "transformer blocks" if perturbation.kind == "skip" else "self-attention or joint-attention layers"
        raise ValueError(f"{owner}: perturbation {perturbation.kind!r} needs {what}; "
                         f"{type(model).__name__} has none")
    chosen: dict[str, nn.Module] = {}
    for layer in layers:
        if isinstance(layer, int) and family != "transformer":
            raise ValueError(f"{owner}: parameter 'layers' must be {_accepted(model, family, candidates)} for a UNet, "
                             f"got {layer!r}")
        prefix = _prefix(layer, family)
        matched = [(name, m) for name, m in candidates if name == prefix or name.startswith(prefix + ".")]
        if not matched:
            raise ValueError(f"{owner}: parameter 'layers' must be {_accepted(model, family, candidates)}; "
                             f"{layer!r} selects nothing")
        chosen.update(matched)
    for name, module in chosen.items():
        if perturbation.kind == "skip" and type(module).__name__ not in _SKIP_OUTPUTS:
            raise ValueError(f"{owner}: cannot skip block {name} of type {type(module).__name__} "
                             f"(supported: {', '.join(_SKIP_OUTPUTS)})")

    return list(chosen.items())


# --------------------------------------------------------------------------- query blur (SEG)
def _kernel_1d(sigma: float, length: int, like: torch.Tensor) -> torch.Tensor:
    """A Gaussian truncated at 3 sigma (odd size ceil(6 sigma) + 1, as SEG's code), at most the
    largest odd size whose reflect padding fits ``length``."""
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    size = min(size, length - (length % 2 - 1))
    half = (size - 1) / 2
    x = torch.linspace(-half, half, steps=size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(like)


def gaussian_blur_queries(query: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Blur queries [B, H*W, C] over the H x W token grid, channel by channel, with a Gaussian of
    std ``sigma`` tokens (separable, reflect padding); ``inf`` replaces them by their mean."""
    b, n, c = query.shape
    if n != height * width:
        raise ValueError(f"blur: {n} query tokens do not form a {height} x {width} grid")
    grid = query.transpose(1, 2).reshape(b, c, height, width)
    if math.isinf(sigma):
        grid = grid.mean(dim=(-2, -1), keepdim=True).expand(b, c, height, width)
    else:
        if height > 1:
            k = _kernel_1d(sigma, height, grid)
            grid = F.conv2d(F.pad(grid, (0, 0, k.numel() // 2, k.numel() // 2), mode="reflect"),
                            k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        if width > 1:
            k = _kernel_1d(sigma, width, grid)
            grid = F.conv2d(F.pad(grid, (k.numel() // 2, k.numel() // 2, 0, 0), mode="reflect"),
                            k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return grid.reshape(b, c, n).transpose(1, 2)


def token_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The token grid of a UNet level: the latent size divided by 2^l (rounded up, as the
    stride-2 convolutions do), or a square."""
    height, width = latent_hw
    for level in range(8):
        h, w = -(-height // 2 ** level), -(-width // 2 ** level)
        if h * w == tokens:
            return h, w
    side = math.isqrt(tokens)
    if side * side == tokens:
        return side, side
    raise ValueError(f"blur: cannot place {tokens} tokens on a grid of the {height} x {width} latent")


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


def flux_identity_mask(tokens: int, image_tokens: int, like: torch.Tensor) -> torch.Tensor:
    """PAG's attention mask on a Flux sequence of ``tokens`` (text first, then ``image_tokens``
    image tokens): each image token attends to itself and to the text, the text to everything
    (the image-to-image block of the map replaced by the identity, the rule of diffusers' SD3 PAG
    pipeline on joint attention). Additive: 0 where attention is kept, -inf where removed."""
    mask = torch.zeros((tokens, tokens), device=like.device, dtype=like.dtype)
    text = tokens - image_tokens
    mask[text:, text:] = float("-inf")
    mask[text:, text:].fill_diagonal_(0)
    return mask[None, None]


class _BlurredQueries:
    """An attention layer seen through SEG: its query projection blurs the image tokens' queries
    over their grid (the text tokens, first in a Flux single-stream sequence, are left alone);
    everything else is the layer's own. One per call, so nothing on the shared layer changes."""

    def __init__(self, attn: nn.Module, grid: tuple[int, int], sigma: float) -> None:
        self._attn, self._grid, self._sigma = attn, grid, sigma

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)

    def to_q(self, states: torch.Tensor) -> torch.Tensor:
        query = self._attn.to_q(states)
        text = query.shape[1] - self._grid[0] * self._grid[1]
        image = gaussian_blur_queries(query[:, text:], *self._grid, self._sigma)
        return torch.cat([query[:, :text], image], dim=1) if text else image


def _perturbed_flux_attention(original: Callable, attn, hidden_states: torch.Tensor,
                              encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
                              kwargs: dict[str, Any], perturbation: Perturbation, latent_hw: tuple[int, int]):
    """Flux attention of these rows, perturbed, through the layer's own processor (so its rotary
    positions, q/k norms and projections are the model's): "identity" (PAG) with the identity
    mask, "blur" (SEG) with the image queries blurred before the q-norm, as SEG does on plain
    self-attention. The image tokens are the latent's 2 x 2 patches (Flux packs them so), after
    the text."""
    grid = (-(-latent_hw[0] // 2), -(-latent_hw[1] // 2))
    if perturbation.kind == "blur":
        if getattr(attn, "fused_projections", False):
            raise ValueError("perturbation 'blur' on a Flux attention layer with fused projections is not supported "
                             "(call transformer.unfuse_qkv_projections())")
        return original(_BlurredQueries(attn, grid, perturbation.sigma), hidden_states,
                        encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs)
    if attention_mask is not None:
        raise ValueError("perturbation 'identity' on a Flux attention layer that already has an attention mask "
                         "is not supported")
    tokens = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
    mask = flux_identity_mask(tokens, grid[0] * grid[1], hidden_states)
    return original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=mask, **kwargs)


def take_rows(value: Any, rows: torch.Tensor | slice, batch: int) -> Any:
    """``value`` restricted to ``rows`` when it is a per-row tensor (or a dict of them)."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):
        return {k: take_rows(v, rows, batch) for k, v in value.items()}
    return value


def _plain_rows(batch: int, segments: Sequence[tuple[int, int, Any]]) -> torch.Tensor | slice | None:
    """The rows outside every segment: a slice when contiguous, an index, or None when none."""
    taken = torch.zeros(batch, dtype=torch.bool)
    for start, end, _ in segments:
        taken[start:end] = True
    rows = (~taken).nonzero().flatten()
    if rows.numel() == 0:
        return None
    first, last = int(rows[0]), int(rows[-1])
    if last - first + 1 == rows.numel():
        return slice(first, last + 1)
    return rows


def perturbed_rows(original: Callable, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                   attention_mask: torch.Tensor | None, kwargs: dict[str, Any],
                   segments: Sequence[tuple[int, int, Perturbation]], latent_hw: tuple[int, int]
                   ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """One attention layer's call on a batch whose rows in ``segments`` (start, end, perturbation)
    get the perturbed self-attention; all other rows go through the ``original`` processor in one
    call on their rows, so the unperturbed branches compute exactly what they would alone."""
    batch = hidden_states.shape[0]
    parts: list[tuple[torch.Tensor | slice, torch.Tensor]] = []
    plain = _plain_rows(batch, segments)
    if plain is not None:
        parts.append((plain, original(attn, hidden_states[plain],
                                      encoder_hidden_states=take_rows(encoder_hidden_states, plain, batch),
                                      attention_mask=take_rows(attention_mask, plain, batch),
                                      **take_rows(kwargs, plain, batch))))
    joint = encoder_hidden_states is not None and (_is_joint_attention(attn) or _is_flux_attention(attn))
    for start, end, perturbation in segments:
        rows = slice(start, end)
        if _is_flux_attention(attn):
            parts.append((rows, _perturbed_flux_attention(
                original, attn, hidden_states[rows], take_rows(encoder_hidden_states, rows, batch),
                take_rows(attention_mask, rows, batch), take_rows(kwargs, rows, batch), perturbation, latent_hw)))
        elif joint:  # (image, text) streams; "identity" and "blur" resolve to joint layers
            parts.append((rows, _perturbed_joint_attention(attn, hidden_states[rows], encoder_hidden_states[rows],
                                                           perturbation, latent_hw)))
        else:
            parts.append((rows, _perturbed_attention(attn, hidden_states[rows], take_rows(kwargs.get("temb"), rows, batch),
                                                     perturbation, latent_hw)))
    if joint:
        return tuple(_merge([(rows, value[k]) for rows, value in parts], batch) for k in range(2))
    return _merge(parts, batch)


def _merge(parts: Sequence[tuple[torch.Tensor | slice, torch.Tensor]], batch: int) -> torch.Tensor:
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
    signature = inspect.signature(forward)

    def skipping(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        inputs = bound.arguments
        batch = inputs["hidden_states"].shape[0]
        plain = _plain_rows(batch, segments)
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
