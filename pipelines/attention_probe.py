"""Self-attention maps read inside the one batched forward (SAG).

When the forward's row plan (:mod:`.row_plan`) probes a layer, its dispatcher calls
:func:`record_attention` before the layer's own processor: every row still goes through that
processor (outputs unchanged), and for the rows of a probed branch the attention map
softmax(Q K^T * scale) is computed as well and handed to the probe as the attention each token
receives (averaged over heads, summed over queries).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .perturbation import self_attention_tokens, take_rows
from .query_blur import token_grid

__all__ = ["record_attention"]


def _attention_mass(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None, latent_hw: tuple[int, int]
                    ) -> tuple[torch.Tensor, tuple[int, int]]:
    """How much attention each token receives in ``attn``'s self-attention on these rows:
    softmax(Q K^T * scale) averaged over heads and summed over queries ([rows, tokens]; 1 on
    average), and the token grid."""
    grid = tuple(hidden_states.shape[-2:]) if hidden_states.ndim == 4 else token_grid(hidden_states.shape[1], latent_hw)
    hidden_states = self_attention_tokens(attn, hidden_states, temb)
    query, key = attn.to_q(hidden_states), attn.to_k(hidden_states)
    batch, head_dim = query.shape[0], key.shape[-1] // attn.heads
    query, key = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    probs = (query.float() @ key.float().transpose(-1, -2) * attn.scale).softmax(dim=-1)
    return probs.mean(dim=1).sum(dim=1), grid


def record_attention(attn, hidden_states: torch.Tensor, kwargs: dict[str, Any], segments: Sequence[tuple[int, int, Any]],
                     latent_hw: tuple[int, int]) -> None:
    """For the rows of each segment (start, end, probe), compute ``attn``'s self-attention map
    and hand it to ``probe.record(mass, grid)``; the layer's output is computed as usual."""
    for start, end, probe in segments:
        rows = slice(start, end)
        probe.record(*_attention_mass(attn, hidden_states[rows], take_rows(kwargs.get("temb"), rows, hidden_states.shape[0]),
                                      latent_hw))
