"""What the flow-matching transformer families (Flux.1, Flux.2, Qwen-Image, Chroma, Z-Image) share:
the branch model that runs each branch in a forward of its own in the stock order, the refusal of
alterations their blocks do not support yet, 2 x 2 token packing, and the helpers their pipelines
use for negative prompts and packed-latent callbacks.

A family adapter subclasses :class:`TransformerBranches`, names itself in ``family`` and writes
``forward`` (its transformer's signature); nothing in it is method-specific."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from .branches import NetworkBranches

__all__ = ["TransformerBranches", "negative_prompt_texts", "pack_latents", "packed_callback", "unpack_latents"]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as 2 x 2 patch tokens (B, H/2 * W/2, C * 4), each token's elements in
    (channel, row, column) order: the stock ``_pack_latents`` of Flux, Chroma and Qwen-Image."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """2 x 2 patch tokens back to (B, C, height, width) latents (latent size): the stock ``_unpack_latents``."""
    b, _, channels = tokens.shape
    tokens = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, channels // 4, height, width)


class TransformerBranches(NetworkBranches):
    """The branch model over a flow-matching transformer.

    ``separate_forwards``: each branch in a forward of its own, ``first`` (the conditional) first,
    as the stock pipelines of these families run their CFG (a batched forward differs from single
    ones by float rounding, ~1e-7 on CPU); False batches the branches into one forward as the
    UNet families do. A family names the alterations its blocks take (``perturbations``,
    ``time_noise``); the others, and attention probes (SAG), are refused before any model call."""

    family: str = "this pipeline"
    separate_forwards: bool = True
    first: str = "cond"
    #: The perturbation kinds (``Perturbation.kind``) this family's blocks take; the others are refused.
    perturbations: frozenset[str] = frozenset()
    #: Whether noise on the time-step embedding (TSG) is supported (``time_embeddings`` names the module).
    time_noise: bool = False

    @classmethod
    def refusal(cls, branch, owner: str = "guidance") -> str | None:
        """Why this branch's alteration cannot be made on this transformer (None: it can)."""
        if branch.time_noise > 0 and not cls.time_noise:
            return (f"guidance: method {owner!r} perturbs the time-step embedding, which {cls.family} does not "
                    "support yet (its transformer embeds time with the other global conditioning)")
        if branch.probe is not None:
            return (f"guidance: method {owner!r} reads a plain self-attention map, which {cls.family} transformers "
                    "do not have (their joint attention mixes text and image tokens)")
        if branch.perturb is not None and branch.perturb.kind not in cls.perturbations:
            if cls.perturbations:
                return (f"guidance: method {owner!r} needs perturbation {branch.perturb.kind!r}, which {cls.family} "
                        f"does not support yet (it supports {', '.join(sorted(cls.perturbations))})")
            return (f"guidance: method {owner!r} alters attention layers or skips blocks, which {cls.family} does "
                    "not support yet on its transformer blocks")
        return None

    @classmethod
    def check_method(cls, guide) -> None:
        """ValueError naming the method if it alters the network in a way this family cannot
        (before any prompt is encoded)."""
        for branch in guide.altered_branches():
            message = cls.refusal(branch, guide.name)
            if message is not None:
                raise ValueError(message)

    def check_alterations(self, branch, owner: str = "guidance") -> None:
        message = self.refusal(branch, owner)
        if message is not None:
            raise ValueError(message)

    def check_supports(self, guide) -> None:
        self.check_method(guide)  # our reason first, before layer names are resolved
        super().check_supports(guide)

    def _evaluate(self, model, x: torch.Tensor, timestep: torch.Tensor,
                  requests: Sequence[tuple[str, torch.Tensor | None]], probes: Sequence[Any] = (),
                  plain: bool = False) -> dict[str, torch.Tensor]:
        if not self.separate_forwards or len(requests) < 2:
            with self.cache_context(model, requests):
                return super()._evaluate(model, x, timestep, requests, probes, plain)
        out: dict[str, torch.Tensor] = {}
        for request in sorted(requests, key=lambda r: r[0] != self.first):  # stable: the stock order
            with self.cache_context(model, [request]):
                out.update(super()._evaluate(model, x, timestep, [request],
                                             [p for p in probes if p.base == request[0]], plain))
        return out

    @staticmethod
    def cache_context(model, requests: Sequence[tuple[str, Any]]):
        """The transformer's cache context named after the branches (the stock "cond" / "uncond"),
        so that a cache hook keeps the branches apart."""
        if not hasattr(model, "cache_context"):
            return contextlib.nullcontext()
        return model.cache_context("+".join(str(name) for name, _ in requests))

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        raise NotImplementedError  # each family's transformer signature


def negative_prompt_texts(negative_prompt, negative_prompt_embeds, batch_size: int) -> list[str] | None:
    """The unconditional branch's prompts: the negative prompt (a string repeated for every
    prompt), else the empty prompt; None when its embeddings are given. Checked before any model
    call."""
    if negative_prompt_embeds is not None:
        return None
    if negative_prompt is None:
        return [""] * batch_size
    texts = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
    if not isinstance(texts, list) or len(texts) != batch_size or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"negative_prompt: expected a string or a list of {batch_size} strings (one per "
                         f"prompt), got {negative_prompt!r}")
    return texts


def packed_callback(callback, height: int, width: int,
                    pack: Callable[[torch.Tensor], torch.Tensor] = pack_latents,
                    unpack: Callable[[torch.Tensor, int, int], torch.Tensor] = unpack_latents):
    """``callback_on_step_end`` seeing and returning packed latents, as with the stock pipeline
    (the core keeps them unpacked, (B, C, height, width))."""
    def packed(pipe, index, timestep, tensors):
        if "latents" in tensors:
            tensors = {**tensors, "latents": pack(tensors["latents"])}
        outputs = callback(pipe, index, timestep, tensors) or {}
        if outputs.get("latents") is not None:
            outputs = {**outputs, "latents": unpack(outputs["latents"], height, width)}
        return outputs
    return packed
