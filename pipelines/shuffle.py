"""Token shuffling inside the one batched forward (TPG): the "shuffle" alteration of transformer blocks.

Token Perturbation Guidance (Rajabi et al., arXiv 2506.10036, Algorithm 1) perturbs a branch by
``H_k <- S_{k,t} H_k`` in chosen layers k: the tokens of the hidden states entering layer k are
reordered by a permutation matrix S_{k,t}, drawn afresh for every layer and step. The authors'
code (TaatiTeam/Token-Perturbation-Guidance, ``pipeline_sdxl_tpg.py``) does it at the input of
diffusers' ``BasicTransformerBlock`` (the block of a UNet's ``Transformer2DModel``): one
``torch.randperm`` over the token axis per block call, the same permutation for every row of the
perturbed batch, and the block's output is left in the shuffled order.

Here the perturbed branch is rows of the one forward, as for "skip" (:mod:`.perturbation`): a
block's dispatcher (:class:`~.row_plan.PlanBlockForward`) calls :func:`shuffling_forward` when the
plan shuffles some of its rows (skipped rows stay :func:`~.perturbation.skipping_forward`'s). The
block then runs once on every row, those rows' tokens permuted; a block treats each row alone, so
the other rows compute what they would without them. The permutation comes from the plan's spec
(``spec.permutation(block, tokens, device)``: TPG's
:class:`~guidance_engine.methods.tpg.TokenShuffle`, one per step, which draws one permutation per
block and keeps it, so a branch split over several calls (``max_batch_rows``) sees the same one).

Only blocks whose token sequence carries no position of its own are shuffled: UNets' and DiT's
``BasicTransformerBlock`` (positions are added before the blocks, or there are none). The flow
transformers' blocks (rotary positions applied inside attention) and SD3's joint blocks are
refused by :func:`check_shuffled_blocks` before any model call.

Before the forward. Where every chosen block's token count follows from the latent size (a
UNet's down / mid / up blocks at their resolutions, a DiT's patches: :func:`token_counts`),
:func:`draw_permutations` draws the step's permutations before the forward, in the order the
forward calls the blocks: the same draws from the same stream as the lazy ones, and no
``randperm`` (a generator a compiled forward cannot trace) inside the forward. Elsewhere they are
drawn lazily, in the forward.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["BLOCK_KINDS", "SHUFFLED_BLOCKS", "check_shuffled_blocks", "draw_permutations", "shuffle_tokens",
           "shuffling_forward", "token_counts"]

#: The alteration kinds that act on whole transformer blocks (a block's dispatcher, ``plan.blocks``).
BLOCK_KINDS: tuple[str, ...] = ("skip", "shuffle")
#: The block classes whose hidden-states tokens can be shuffled (argument ``hidden_states``, [B, N, C]).
SHUFFLED_BLOCKS: tuple[str, ...] = ("BasicTransformerBlock",)


def shuffle_tokens(hidden_states: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """``hidden_states`` [B, N, C] with its tokens in the order ``permutation`` (the same for every row)."""
    return hidden_states[:, permutation]


def check_shuffled_blocks(chosen: Iterable[tuple[str, nn.Module]], owner: str = "guidance") -> None:
    """ValueError naming the block and what is supported when a chosen block cannot be shuffled."""
    for name, module in chosen:
        if type(module).__name__ not in SHUFFLED_BLOCKS:
            raise ValueError(f"{owner}: cannot shuffle the tokens of block {name} of type {type(module).__name__} "
                             f"(supported: {', '.join(SHUFFLED_BLOCKS)}, whose tokens carry no position of their own)")


def shuffling_forward(block: nn.Module, forward: Callable, segments: Sequence[tuple[int, int, Any]]) -> Callable:
    """``block.forward`` for one call: the rows of each segment (start, end, spec) enter the block
    with their tokens permuted by ``spec.permutation(block, tokens, device)``; one call on all rows.
    Every segment must shuffle (a method alters a block one way: skipped rows are
    :func:`~.perturbation.skipping_forward`'s)."""
    kinds = sorted({spec.kind for _, _, spec in segments})
    if kinds != ["shuffle"]:
        raise ValueError(f"perturbation: block {type(block).__name__} cannot be shuffled and altered otherwise in "
                         f"one forward (got kinds {kinds})")
    signature = inspect.signature(forward)

    def shuffling(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        hidden_states = bound.arguments["hidden_states"]
        if hidden_states.ndim != 3:
            raise ValueError(f"perturbation 'shuffle': {type(block).__name__} got hidden states of shape "
                             f"{tuple(hidden_states.shape)}, expected [batch, tokens, channels]")
        shuffled = hidden_states.clone()
        for start, end, spec in segments:
            permutation = spec.permutation(block, hidden_states.shape[1], hidden_states.device)
            shuffled[start:end] = shuffle_tokens(hidden_states[start:end], permutation)
        bound.arguments["hidden_states"] = shuffled
        return forward(*bound.args, **bound.kwargs)

    return shuffling


#: a UNet's sections in the order its forward runs them (not their registration order: down, up, mid)
_SECTIONS = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _downsampled(size: tuple[int, int], downsampler: nn.Module) -> tuple[int, int] | None:
    """The spatial size after a diffusers ``Downsample2D`` (a stride-2 convolution, with the extra
    right / bottom zero row of ``padding=0``, or a 2 x 2 average pool); None for another module."""
    conv = getattr(downsampler, "conv", None)
    if isinstance(conv, nn.Conv2d):
        extra = 1 if getattr(downsampler, "padding", None) == 0 else 0
        return tuple((n + 2 * p + extra - k) // s + 1
                     for n, k, s, p in zip(size, conv.kernel_size, conv.stride, conv.padding))
    if isinstance(conv, nn.AvgPool2d) and conv.kernel_size == conv.stride == 2 and conv.padding == 0:
        return tuple((n - 2) // 2 + 1 for n in size)
    return None


def _unet_resolutions(model: nn.Module, latent_hw: tuple[int, int]) -> dict[tuple[str, int], tuple[int, int]] | None:
    """(section, index) -> the spatial size a UNet's block runs at; None if a down-sampler is not
    one :func:`_downsampled` knows or conv_in changes the size."""
    conv_in = getattr(model, "conv_in", None)
    if not (isinstance(conv_in, nn.Conv2d) and conv_in.stride == (1, 1)
            and all(2 * p == k - 1 for p, k in zip(conv_in.padding, conv_in.kernel_size))):
        return None
    size, sizes = tuple(latent_hw), {}
    down_blocks = list(getattr(model, "down_blocks", ()))
    for i, block in enumerate(down_blocks):
        sizes[("down_blocks", i)] = size
        downsamplers = getattr(block, "downsamplers", None)
        if downsamplers:
            size = _downsampled(size, downsamplers[0])
            if size is None:
                return None
    sizes[("mid_block", 0)] = size
    for j in range(len(getattr(model, "up_blocks", ()))):  # up block j runs at down block n-1-j's size (its skip)
        if len(down_blocks) - 1 - j < 0:
            return None
        sizes[("up_blocks", j)] = sizes[("down_blocks", len(down_blocks) - 1 - j)]
    return sizes


def _call_key(name: str) -> tuple:
    """Sort key of a block's name in the order the forward calls it (a UNet's sections, then indices)."""
    parts = name.split(".")
    return (_SECTIONS.get(parts[0], 0), *(int(p) if p.isdigit() else -1 for p in parts[1:]))


def token_counts(model: nn.Module, latent_hw: tuple[int, int], names: Sequence[str]) -> dict[str, int] | None:
    """The number of tokens entering each named ``BasicTransformerBlock`` in a forward on latents
    of spatial size ``latent_hw``: a UNet's (continuous ``Transformer2DModel`` s: one token per
    latent cell at the block's resolution) or a DiT's (one per ``patch_size`` patch); None where a
    count does not follow from the names and the model's layout (the forward draws then)."""
    model = getattr(model, "_orig_mod", model)
    counts: dict[str, int] = {}
    if getattr(model, "down_blocks", None) is not None:
        sizes = _unet_resolutions(model, latent_hw)
        if sizes is None:
            return None
        for name in names:
            parts = name.split(".")
            section = parts[0]
            index = 0 if section == "mid_block" else (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None)
            size = sizes.get((section, index))
            if size is None or ".transformer_blocks." not in name:
                return None
            transformer = model.get_submodule(name.rsplit(".transformer_blocks.", 1)[0])
            if not getattr(transformer, "is_input_continuous", False):
                return None
            counts[name] = size[0] * size[1]
        return counts
    patch = getattr(getattr(model, "config", None), "patch_size", None)
    if not isinstance(patch, int) or getattr(model, "pos_embed", None) is None:  # not a patch-embedding DiT
        return None
    if any(n % patch for n in latent_hw) or not all(name.startswith("transformer_blocks.") for name in names):
        return None
    return {name: (latent_hw[0] // patch) * (latent_hw[1] // patch) for name in names}


def draw_permutations(model: nn.Module, spec: Any, layers: Sequence[tuple[str, nn.Module]], latent_hw: tuple[int, int],
                      device: torch.device) -> None:
    """Draw ``spec``'s permutations of the chosen ``layers`` (name, block) before the forward, in
    the order the forward calls them (``spec.permutation`` keeps them for the step: the forward
    then reads them); nothing where :func:`token_counts` cannot tell their sizes (the forward draws)."""
    counts = token_counts(model, latent_hw, [name for name, _ in layers])
    if counts is None:
        return
    for name, block in sorted(layers, key=lambda layer: _call_key(layer[0])):
        spec.permutation(block, counts[name], device)
