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
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

__all__ = ["BLOCK_KINDS", "SHUFFLED_BLOCKS", "check_shuffled_blocks", "shuffle_tokens", "shuffling_forward"]

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

