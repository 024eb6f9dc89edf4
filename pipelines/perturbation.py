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
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from torch import nn

from guidance_engine.guidance import Perturbation

__all__ = ["DEFAULT_LAYERS", "ImageTokens", "block_stacks", "flux_identity_mask", "gaussian_blur_queries",
           "identity_mask", "model_family", "packed_tokens", "perturbed_rows", "resolve_layers", "skipping_forward"]

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
            and getattr(module, "add_k_proj", None) is None and _flow_layout(module) is None)


#: Flow-transformer attention classes whose processor takes the text first, then the image stream.
_TEXT_FIRST = ("FluxAttention", "Flux2Attention", "Flux2ParallelSelfAttention")
#: Flow-transformer attention told apart by its processor (the layer is diffusers' generic Attention).
_BY_PROCESSOR = {"QwenDoubleStreamAttnProcessor2_0": "qwen", "ZSingleStreamAttnProcessor": "image_first"}


def _flow_layout(module: nn.Module) -> str | None:
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


def _is_joint_attention(module: nn.Module) -> bool:
    """SD3-style joint attention: image and text tokens attend together (``add_k_proj`` set)."""
    return (hasattr(module, "processor") and hasattr(module, "to_v") and _flow_layout(module) is None
            and getattr(module, "add_k_proj", None) is not None and getattr(module, "context_pre_only", None) is not None)


def _candidates(model: nn.Module, kind: str) -> list[tuple[str, nn.Module]]:
    stacks = tuple(block_stacks(model).values())
    if kind == "skip":  # the members of every `transformer_blocks` stack and of the model's block stacks
        members = []
        for name, module in model.named_modules():
            stack, _, index = name.rpartition(".")
            if (stack.endswith("transformer_blocks") or stack in stacks) and index.isdigit():
                members.append((name, module))
        return members
    layers = [(name, module) for name, module in model.named_modules()
              if _is_plain_self_attention(module) or (kind in ("identity", "blur") and _is_joint_attention(module))
              or (kind in ("identity", "blur") and _flow_layout(module) is not None)]
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
    if perturbation.kind == "skip" and getattr(getattr(model, "config", None), "zero_cond_t", False):
        # Qwen-Image's zero_cond_t doubles the time embedding's rows: a block's rows cannot be cut out
        raise ValueError(f"{owner}: cannot skip blocks of a {type(model).__name__} with zero_cond_t=True "
                         "(its blocks take two time embeddings per row)")
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


# --------------------------------------------------------------------------- flow transformers
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


def _call(processor: Callable, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
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


def _perturbed_flow_attention(original: Callable, attn, hidden_states: torch.Tensor,
                              encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
                              kwargs: dict[str, Any], perturbation: Perturbation, tokens: ImageTokens):
    """A flow transformer's attention on these rows, perturbed, through the layer's own processor
    (so its rotary positions, q/k norms, projections and attention backend are the model's):
    "identity" (PAG) with :func:`identity_mask` added to the model's mask, "blur" (SEG) with the
    image grid's queries blurred before the q-norm, as SEG does on plain self-attention.
    Qwen-Image's processor takes no mask: its "identity" is :func:`_qwen_identity_attention`."""
    layout = _flow_layout(attn)
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
        return _call(original, _BlurredQueries(attn, start, tokens, perturbation.sigma), hidden_states,
                     encoder_hidden_states, attention_mask, kwargs)
    text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
    first = text + start  # the image in the joint sequence (text first where the text is a stream)
    identity = identity_mask(text + length, slice(first, first + tokens.image), hidden_states)
    if layout == "qwen":
        return _qwen_identity_attention(original, attn, hidden_states, encoder_hidden_states, identity, **kwargs)
    return _call(original, attn, hidden_states, encoder_hidden_states, _with_model_mask(identity, attention_mask),
                 kwargs)


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
                   segments: Sequence[tuple[int, int, Perturbation]], latent_hw: tuple[int, int],
                   tokens: ImageTokens | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """One attention layer's call on a batch whose rows in ``segments`` (start, end, perturbation)
    get the perturbed self-attention; all other rows go through the ``original`` processor in one
    call on their rows, so the unperturbed branches compute exactly what they would alone.
    ``tokens``: a flow transformer's image-token layout (None: :func:`packed_tokens` of ``latent_hw``)."""
    batch = hidden_states.shape[0]
    parts: list[tuple[torch.Tensor | slice, torch.Tensor]] = []
    plain = _plain_rows(batch, segments)
    if plain is not None:
        parts.append((plain, _call(original, attn, hidden_states[plain],
                                   take_rows(encoder_hidden_states, plain, batch),
                                   take_rows(attention_mask, plain, batch), take_rows(kwargs, plain, batch))))
    flow = _flow_layout(attn) is not None
    joint = encoder_hidden_states is not None and (_is_joint_attention(attn) or flow)
    for start, end, perturbation in segments:
        rows = slice(start, end)
        if flow:
            parts.append((rows, _perturbed_flow_attention(
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
    joined = _ONE_STREAM.get(type(block).__name__)
    signature = inspect.signature(forward)

    def skipping(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        inputs = bound.arguments
        if joined is not None and inputs.get(joined) is not None:
            raise ValueError(f"perturbation 'skip': a {type(block).__name__} given {joined} returns it joined to "
                             "its input, not supported (its transformer passes one joint sequence)")
        batch = inputs[names[-1]].shape[0]  # the image stream (or the joint sequence)
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
