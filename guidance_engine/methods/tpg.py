"""Token Perturbation Guidance (Rajabi et al., NeurIPS 2025, arXiv 2506.10036, Algorithm 1).

    g = u + s (c - u) + w (c - p),   p = the conditional prediction with H_k <- S_{k,t} H_k in
                                         chosen layers k: the tokens entering each chosen
                                         transformer block reordered by a random permutation
                                         S_{k,t}, a new one for every layer and step

u, c: unconditional and conditional predictions; s: the CFG scale (1: no unconditional branch),
w: the TPG scale (0: CFG exactly, no extra rows). The authors write the combination
``c + (s - 1)(c - u) + w (c - p)`` (``pipeline_sdxl_tpg.py``); ours is the same sum in the order
of the engine's perturbation methods (:func:`~.perturbed.perturbed_guidance`, raw outputs: the
same in eps, x0, v or flow space), so the two agree to float rounding. Their ``tpg_scale`` is w,
their ``guidance_scale`` is s (CFG runs when it exceeds 1, as here).

Where and how: the authors' code swaps the class of chosen diffusers ``BasicTransformerBlock`` s
for one whose forward runs ``x[:, torch.randperm(n)]`` on the perturbed rows' hidden states
before the block (one permutation per block call, shared by the perturbed rows, from torch's
global RNG). Here the perturbed branch is rows of the one batched forward (the "shuffle"
alteration, :mod:`guidance_engine.pipelines.shuffle`); each step's :class:`TokenShuffle` draws one
permutation per block from a stream seeded by (``seed``, step index): the same draws as theirs in
kind (one per layer and step, shared by the rows), reproducible, and unchanged when the branch is
split over several network calls.

Defaults: the authors' README and pipeline: w = 3.0, no CFG (their ``guidance_scale=0.0``, our
s = 1). Layers: their SDXL default is the down-block transformer blocks 6-23 (``"d6"``..``"d23"``
in network order), :data:`SDXL_LAYERS` here; it selects nothing on other layouts (SD 1.x/2.x have
six, d0-d5), so our default is every transformer block of the UNet's down (encoder) blocks
(``"down"``), which on SDXL also takes blocks 0-5. DiT-style transformers take block indices.
(pamparamm/sd-perturbed-attention's ComfyUI node, scale 3, defaults to its own blocks "d2,d3".)
Deviations: the order of the sum above; the seeded stream instead of the global RNG; the model
is never altered (no class swap to undo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from ..guidance import Branch, Perturbation, StepInfo, param
from ..registry import register
from .perturbed import PerturbedGuidance, layers_param

#: The authors' SDXL layers ``d6``..``d23`` (the 7th to 24th transformer block of the down blocks, in
#: network order) as layer names: SDXL's down_blocks.2 holds d4..d23 (two attentions of ten blocks).
SDXL_LAYERS: tuple[str, ...] = tuple(f"down.2.attentions.0.transformer_blocks.{i}" for i in range(2, 10)) + (
    "down.2.attentions.1",)
#: Our default layers: every transformer block of a UNet's down blocks.
DOWN_BLOCKS: tuple[str, ...] = ("down",)


def step_seed(seed: int, index: int) -> int:
    """The seed of step ``index``'s permutations: (seed, index) mixed, so that no two steps or
    seeds share a stream."""
    return int(np.random.SeedSequence((seed, index)).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class TokenShuffle(Perturbation):
    """The "shuffle" alteration of one step: the tokens of the hidden states entering each chosen
    transformer block are permuted, for the branch's rows. :meth:`permutation` draws a block's
    permutation from the stream ``seed`` the first time the block asks and keeps it for the step
    (every call of the block in this step, e.g. a branch split over two network calls, sees the
    same one)."""

    kind: str = "shuffle"
    seed: int = 0
    _generator: torch.Generator = field(init=False, repr=False, compare=False)
    _drawn: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind != "shuffle":
            raise ValueError(f"perturbation: a TokenShuffle has kind 'shuffle', got {self.kind!r}")
        object.__setattr__(self, "_generator", torch.Generator().manual_seed(self.seed))
        object.__setattr__(self, "_drawn", {})

    def permutation(self, block: Any, tokens: int, device: torch.device) -> torch.Tensor:
        """The permutation of ``tokens`` token positions for ``block`` in this step (a LongTensor)."""
        if block not in self._drawn:
            self._drawn[block] = torch.randperm(tokens, generator=self._generator)
        drawn = self._drawn[block]
        if drawn.shape[0] != tokens:  # drawn before the forward for another size: a wrong count, never reused
            raise RuntimeError(f"tpg: block {type(block).__name__} has {tokens} tokens in this forward, but its "
                               f"permutation of this step was drawn for {drawn.shape[0]}")
        return drawn.to(device)


@register
@dataclass(frozen=True, kw_only=True)
class TPG(PerturbedGuidance):
    """Token perturbation guidance: guide away from the prediction with shuffled tokens in chosen blocks."""

    name: ClassVar[str] = "tpg"
    paper: ClassVar[str] = "Rajabi et al., Token Perturbation Guidance for Diffusion Models (arXiv 2506.10036)"
    branch_name: ClassVar[str] = "tpg"
    perturb_field: ClassVar[str] = "tpg_scale"

    scale: float = param(1.0, low=0.0, high=100.0, doc="CFG scale s (1 = TPG alone, the authors' default)")
    tpg_scale: float = param(3.0, low=0.0, high=100.0, doc="TPG scale w (0 = CFG exactly)")
    layers: Any = layers_param("transformer blocks whose input tokens are shuffled; None = every block of the "
                               "UNet's down blocks ('down'); the authors' SDXL choice is tpg.SDXL_LAYERS")
    seed: int = param(0, low=0, high=2**63 - 1, doc="seed of the permutations (one per block and step)")

    def perturbation(self, step: StepInfo | None = None) -> TokenShuffle:
        """The shuffle of ``step`` (its own permutation stream); without a step, the spec a
        pipeline checks its layers against."""
        layers = self.layers if self.layers is not None else DOWN_BLOCKS
        return TokenShuffle(layers=layers, seed=step_seed(self.seed, 0 if step is None else step.index))

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...] | dict[str, torch.Tensor | None]:
        wanted = super().branches(step, state)
        shuffled = Branch(self.branch_name, base="cond", perturb=self.perturbation(step))
        if isinstance(wanted, Mapping):  # AG's shrinking batch
            return {shuffled if name == self.branch_name else name: rows for name, rows in wanted.items()}
        return tuple(shuffled if name == self.branch_name else name for name in wanted)
