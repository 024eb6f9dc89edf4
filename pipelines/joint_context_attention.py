"""Joint attention under a second text stream, for a :class:`~guidance_engine.guidance.ContextExtrapolation`
(NAG) on SD3 and the flow transformers (Flux.1, Chroma, Flux.2, Qwen-Image, Z-Image).

In joint attention the text tokens are a stream of the network: every block updates them as it
updates the image tokens, so a second context is not a tensor the layers can attend to but a
second text stream, to be carried through the blocks. The authors (Normalized-Attention-Guidance,
``src/attention_joint_nag.py`` and ``src/pipeline_sd3_nag.py``; ``src/attention_flux_nag.py``,
``src/transformer_flux.py`` and ``src/pipeline_flux_nag.py``) carry it as extra batch rows of the
text stream: B more rows [negative prompt] in ``encoder_hidden_states``, the image stream left at
its B (or 2B under CFG) rows. Per joint-attention layer the conditional rows' image queries, keys
and values are used twice, with the prompt's text stream (Z+) and with the negative one (Z-); the
negative rows' text output updates their stream; the image tokens get NAG's Z from Z+ and Z-. In
Flux's single-stream blocks (one joint sequence per row) both halves are whole rows and both get
the guided image output. Their modulation of the extra rows: the prompt's pooled text (SD3: they
repeat the positive pooled projections) or the negative's (Flux.1: the negative's pooled
projections), the same time step; the image stream's norms and the output norm read the first
rows only (their ``Trunc*`` norms).

The engine's form: the same extra rows, as rows of the one forward. The family's branch model
(:meth:`JointContextBranches.carry_negative_text`) appends, for the NAG rows, partner rows that
repeat the NAG rows' latents with the negative branch's conditioning (SD3: their own pooled
projections, as the authors), and drops the partner rows' output. In that forward:

- every joint-attention layer (:func:`joint_attention_layers`) runs the NAG rows twice through the
  layer's own processor, on the NAG rows' image stream with the prompt's text stream (Z+) and with
  the partner rows' text stream (Z-, the partner rows' text output), and NAG's rule (the spec's
  ``extrapolate``, in the layers NAG guides) makes the image output from the two before the output
  projection; a single-stream layer runs the partner rows as the whole rows they are, and both
  rows get the guided image tokens (the authors' Flux rule);
- after every double-stream block (``transformer_blocks``) the partner rows' image stream is
  replaced by the NAG rows' (the authors have one image stream there), so that Z- always reads the
  NAG rows' image tokens and the partner rows enter the single-stream blocks with them.

The image tokens NAG combines: the whole image stream of a double-stream layer, and in a
single-stream layer's sequence the tokens the family names (``image``: after the text in Flux.1,
Chroma and Flux.2, whose reference-image tokens are included, as the authors' Flux processor
takes everything after the text; first in Z-Image, its padding included). NAG's ``layers`` choose
where the rule acts (block indices, as PAG's); the partner rows are carried through every layer.

Cost (NFE: none; NAG alone is one forward per step): the partner rows run the whole network with
the NAG rows, so the NAG rows cost about twice their plain cost (a CFG step's second forward,
batched into the first; on the tests' tiny models, on a loaded 2-core CPU, 1.5 to 2.3 times the
plain transformer time, not a GPU figure); the authors' SD3 form runs the image stream once (its double blocks
update only the extra text rows), so ours spends in addition one image-stream pass of the NAG rows
per double block (norms, feed-forward, projections), a price of reusing each family's own blocks
unchanged. Single-stream blocks cost what the authors' cost.

Deviations: under true CFG the authors' Flux pipeline cannot run (its negative forward meets
their processor's assertion that the image rows are half the text rows); ours runs the
unconditional rows plain, as their SD3 pipeline does. Qwen-Image's prompt and negative embeddings
may differ in length: both are zero-padded to the longer and the padding masked (the families
with fixed-length text refuse a mismatch). The authors have no diffusers pipeline for Chroma,
Flux.2, Qwen-Image and Z-Image; there the same rule is applied (their ComfyUI nodes carry the
negative text the same way on Chroma).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterator, Sequence

import torch
from torch import nn

from guidance_engine.guidance import Branch, ContextExtrapolation, Perturbation

from .context_attention import BoundContext
from .flow_attention import call_processor, flow_layout
from .perturbation import merge_rows, plain_rows, block_stacks, resolve_layers, take_rows
from .row_plan import (UNSET, PlanProcessor, ThreadSlot, current, dispatcher_class, original_processor, passed_plan,
                       unwrapped)

__all__ = ["JointContextBranches", "NegativeRows", "joint_attention_layers"]

#: The NAG rows of the forward running in this thread and their partner rows (empty outside one).
_STREAMS = ThreadSlot(())
_INSTALL = threading.Lock()
# Forwards carrying NAG rows, over all threads: while none is, the dispatchers and hooks skip the
# thread's slot.
_CARRIED = 0
_SYNCED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass(frozen=True, eq=False)
class NegativeRows:
    """A :class:`ContextExtrapolation` on the rows [``start``, ``end``) of one forward, whose
    negative text stream rides in the partner rows from ``partner`` on (as many rows). ``attention``
    names the layers' kind for the spec's formula (``nag.DEFAULT_ALPHA``'s keys); ``image``: where
    the image stream sits in a single-stream layer's joint sequence (None: the model has none)."""

    spec: ContextExtrapolation
    start: int
    end: int
    partner: int
    attention: str
    image: slice | None = None

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def layers(self):
        return self.spec.layers

    @property
    def rows(self) -> slice:
        return slice(self.start, self.end)

    @property
    def partner_rows(self) -> slice:
        return slice(self.partner, self.partner + self.end - self.start)


# --------------------------------------------------------------------------- the model's layers
def _is_joint(module: nn.Module) -> bool:
    """A joint-attention layer: a flow transformer's (:func:`flow_layout`) or SD3's (text keys
    and values added to the image's, ``context_pre_only`` set)."""
    if not hasattr(module, "processor"):
        return False
    if flow_layout(module) is not None:
        return True
    return getattr(module, "add_k_proj", None) is not None and getattr(module, "context_pre_only", None) is not None


def joint_attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The joint-attention layers of a transformer's main and single-stream stacks (not Z-Image's
    refiners: each sees the image or the caption alone), by module path."""
    stacks = block_stacks(model)
    found = []
    for head in ("", "single"):
        if head in stacks:
            found += [(name, m) for name, m in getattr(model, stacks[head]).named_modules(prefix=stacks[head])
                      if _is_joint(m)]
    return found


def _double_blocks(model: nn.Module) -> list[nn.Module]:
    """The double-stream blocks (image and text streams apart), ``transformer_blocks`` in every
    family here; Z-Image has none."""
    blocks = getattr(model, "transformer_blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


# --------------------------------------------------------------------------- dispatchers
class JointContextProcessor(PlanProcessor):
    """A joint-attention layer's processor behind the row plan: with NAG rows in the forward, they
    and their partner rows go through :func:`_paired_attention`, the other rows through the layer's
    own processor; without, the shared :class:`PlanProcessor` (PAG, SEG, or the processor itself)."""

    def dispatch(self, attn: nn.Module, hidden_states: torch.Tensor, *args: Any, row_plan: Any = UNSET,
                 **kwargs: Any) -> Any:
        # The streams come with a plan passed as an argument (traced by a compiled forward); else
        # from the thread's slot, read only while a NAG forward runs somewhere.
        pairs = _negative_streams(row_plan)
        if not pairs:
            return super().dispatch(attn, hidden_states, *args, row_plan=row_plan, **kwargs)
        kwargs = {**dict(zip(self.positional, args)), **kwargs}
        encoder_hidden_states = kwargs.pop("encoder_hidden_states", None)
        attention_mask = kwargs.pop("attention_mask", None)
        plan = current() if row_plan is UNSET else row_plan
        segments = plan.attention.get(attn, []) if plan is not None else []
        if any(not isinstance(what, NegativeRows) for _, _, what in segments):
            raise ValueError("guidance: a second text stream (NAG) cannot share a forward with other attention "
                             "alterations")
        guided = {what.start for _, _, what in segments}
        return _paired_attention(self.original, attn, hidden_states, encoder_hidden_states, attention_mask, kwargs,
                                 pairs, guided)


_CLASSES: dict[type, type] = {}


def _joint_dispatcher_class(original: Callable) -> type:
    """A JointContextProcessor whose ``__call__`` has the original's signature (diffusers passes a
    processor only the keyword arguments its signature names): the row plan's dispatcher class
    for ``original``, with this dispatch."""
    kind = type(original)
    if kind not in _CLASSES:
        plain = dispatcher_class(original)
        _CLASSES[kind] = type(f"JointContext{kind.__name__}", (JointContextProcessor, plain), {})
    return _CLASSES[kind]


def _negative_streams(plan: Any) -> tuple["NegativeRows", ...]:
    """The NAG streams of a forward: those of ``plan`` if one was passed (None: none), else the
    thread's (not read while no NAG forward runs anywhere)."""
    if plan is UNSET:
        return _STREAMS.get() if _CARRIED else ()
    return plan.negative if plan is not None else ()


def _sync_image_stream(block: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
    """After a double-stream block: the partner rows' image stream := the NAG rows' (the authors
    keep one image stream through these blocks). Without NAG rows the output is left as it is."""
    pairs = _negative_streams(passed_plan(kwargs))
    if not pairs:
        return None
    context, image = output
    image = image.clone()
    for pair in pairs:
        image[pair.partner_rows] = image[pair.rows]
    return context, image


def _install(model: nn.Module) -> None:
    """Dispatchers on every joint-attention layer (again where the processor was replaced since)
    and the image-stream hook on every double-stream block, once."""
    with _INSTALL:
        for _, module in joint_attention_layers(model):
            if not isinstance(module.processor, JointContextProcessor):
                original = unwrapped(module.processor)
                module.processor = _joint_dispatcher_class(original)(original)
        for block in _double_blocks(model):
            if block not in _SYNCED:
                block.register_forward_hook(_sync_image_stream, with_kwargs=True)
                _SYNCED.add(block)


@contextlib.contextmanager
def _carrying(model: nn.Module, pairs: tuple[NegativeRows, ...]) -> Iterator[None]:
    """``pairs`` in force for the forward run inside (this thread only; reset on exit)."""
    global _CARRIED
    _install(model)
    token = _STREAMS.set(pairs)
    with _INSTALL:
        _CARRIED += 1
    try:
        yield
    finally:
        _STREAMS.reset(token)
        with _INSTALL:
            _CARRIED -= 1


@contextlib.contextmanager
def _carrying_streams(context: Any, pairs: tuple[NegativeRows, ...]) -> Iterator[Any]:
    """``context`` (a row plan's), with ``pairs`` set on the plan it gives."""
    with context as plan:
        if plan is not None:
            plan.negative = pairs
        yield plan


# --------------------------------------------------------------------------- one layer's rows
class _Unprojected:
    """An attention layer seen without its output projection: its processor then returns the
    attention output itself (heads merged; Flux.2's fused single-stream layer: followed by its MLP
    features), the Z that NAG combines. The projection the processor applied is recorded, to be
    replayed on the combined output by :meth:`project`."""

    def __init__(self, attn: nn.Module) -> None:
        self._attn = attn
        self._steps: list[int | None] = []  # to_out[i] by index, None: to_out called itself

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)

    @property
    def to_out(self) -> "_Recorder":
        return _Recorder(self._steps, len(self._attn.to_out) if hasattr(self._attn.to_out, "__len__") else 1)

    def project(self, states: torch.Tensor) -> torch.Tensor:
        for step in self._steps:
            states = self._attn.to_out(states) if step is None else self._attn.to_out[step](states)
        return states


class _Recorder:
    """``to_out`` as a processor uses it (indexed, called, its length asked), recording each use."""

    def __init__(self, steps: list[int | None], length: int) -> None:
        self._steps, self._length = steps, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def identity(states: torch.Tensor) -> torch.Tensor:
            self._steps.append(index)
            return states
        return identity

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        self._steps.append(None)
        return states


def _merged(parts: Sequence[tuple[Any, Any]], batch: int) -> Any:
    """One output of ``batch`` rows from the row groups' (a tensor, or a tuple of them: the image
    and text streams)."""
    if isinstance(parts[0][1], tuple):
        return tuple(merge_rows([(rows, value[k]) for rows, value in parts], batch) for k in range(len(parts[0][1])))
    return merge_rows(parts, batch)


def _paired_attention(original: Callable, attn: nn.Module, hidden_states: torch.Tensor,
                      encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
                      kwargs: dict[str, Any], pairs: Sequence[NegativeRows], guided: Collection[int]) -> Any:
    """One joint-attention layer's call on a batch holding NAG rows and their partner rows: the
    rows of no pair through ``original`` on their rows, each pair by :func:`_pair`."""
    batch = hidden_states.shape[0]
    parts = []
    free = plain_rows(batch, [(p.start, p.end, p) for p in pairs] +
                       [(p.partner_rows.start, p.partner_rows.stop, p) for p in pairs])
    if free is not None:
        parts.append((free, call_processor(original, attn, hidden_states[free],
                                           take_rows(encoder_hidden_states, free, batch),
                                           take_rows(attention_mask, free, batch), take_rows(kwargs, free, batch))))
    for pair in pairs:
        parts += _pair(original, attn, hidden_states, encoder_hidden_states, attention_mask, kwargs, pair,
                       pair.start in guided)
    return _merged(parts, batch)


def _pair(original: Callable, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
          attention_mask: torch.Tensor | None, kwargs: dict[str, Any], pair: NegativeRows, guided: bool
          ) -> list[tuple[slice, Any]]:
    """A pair's outputs. Double-stream (``encoder_hidden_states`` given): the NAG rows' image
    stream with their text (Z+) and with the partner rows' text (Z-), through ``original``; the
    partner rows get the text output of the second. Single-stream: each row group its own joint
    sequence. Where ``guided``, the image tokens' outputs are the spec's combination of Z+ and Z-
    (both row groups), then the layer's output projection; elsewhere each call is the layer's own."""
    batch = hidden_states.shape[0]
    rows, partner = pair.rows, pair.partner_rows
    double = encoder_hidden_states is not None
    seen = (_Unprojected(attn), _Unprojected(attn)) if guided else (attn, attn)
    outputs = []
    for view, own in zip(seen, (rows, partner)):
        states = hidden_states[rows] if double else hidden_states[own]  # double-stream: the NAG rows' image
        outputs.append(call_processor(original, view, states, take_rows(encoder_hidden_states, own, batch),
                                      take_rows(attention_mask, own, batch), take_rows(kwargs, own, batch)))
    positive, negative = outputs
    if not guided:
        return [(rows, positive), (partner, negative)]
    if double:  # (image, text): the guided image for both, each its own text
        image = seen[0].project(pair.spec.extrapolate(positive[0], negative[0], pair.attention).to(positive[0].dtype))
        return [(rows, (image, *positive[1:])), (partner, (image, *negative[1:]))]
    tokens, width = pair.image, attn.inner_dim  # the attention output's channels (Flux.2: then its MLP's)
    guided_tokens = pair.spec.extrapolate(positive[:, tokens, :width], negative[:, tokens, :width], pair.attention)
    results = []
    for view, own, out in zip(seen, (rows, partner), outputs):
        out = out.clone()
        out[:, tokens, :width] = guided_tokens.to(out.dtype)
        results.append((own, view.project(out)))
    return results


# --------------------------------------------------------------------------- the branch model
class JointContextBranches:
    """What a branch model over a joint-attention transformer adds for a second context (NAG):
    ``extrapolate`` resolved to the joint-attention layers (block indices as for PAG: 7,
    "single.3"; None: every one), and :meth:`carry_negative_text`, which the family's ``forward``
    calls to append the partner rows. Mixed in before the family's NetworkBranches subclass.
    ``context_attention``: the kind of attention the spec's formula is told ("joint" SD3, "flux"
    Flux.1, "flow" the others)."""

    context_attention: str = "flow"

    def altered(self, model, x_in: torch.Tensor, spans: list[tuple[int, int, Any]], tokens: Any = None):
        """The family's row plan, which also carries the NAG streams of :meth:`carry_negative_text`'s
        context (entered before it), so that a forward given the plan as an argument reads them there."""
        context = super().altered(model, x_in, spans, tokens)
        pairs = _STREAMS.get() if _CARRIED else ()
        return _carrying_streams(context, pairs) if pairs else context

    def layers(self, model, perturbation: Perturbation, owner: str = "guidance") -> list:
        if perturbation.kind != "extrapolate":
            return super().layers(model, perturbation, owner)
        key = (id(model), perturbation.kind, perturbation.layers)
        if key not in self._layers:
            self._layers[key] = _guided_layers(model, perturbation.layers, owner)
        return self._layers[key]

    def carry_negative_text(self, model, x_in: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                            spans: list[tuple[int, int, Any]], *, own: Collection[str] = (),
                            image: slice | None = None, text_mask: tuple[str, str] | None = None
                            ) -> tuple[torch.Tensor, Callable[[str], torch.Tensor | None], list, Any]:
        """The forward's inputs with partner rows for every NAG span: (latents, conditioning,
        spans, a context manager to run the forward in). The partner rows repeat the span's
        latents and take the negative branch's conditioning, except the keys in ``own`` (the NAG
        rows' own: SD3's pooled projections). ``image``: the image stream's tokens in a
        single-stream layer's sequence. ``text_mask``: (text key, mask key) of a family whose text
        lengths may differ between branches (Qwen-Image): both are padded to the longest, the
        padding masked; elsewhere different lengths are a ValueError. Without NAG spans: the inputs
        as they are and a context that does nothing."""
        pairs, contexts, spans_out, total = [], [], [], x_in.shape[0]
        for start, end, branch in spans:
            bound = getattr(branch, "perturb", None)
            if isinstance(bound, BoundContext):
                pair = NegativeRows(bound.spec, start, end, total, self.context_attention, image)
                pairs.append(pair)
                contexts.append(bound.context)
                total += end - start
                branch = Branch(branch, base=branch.base, time_noise=branch.time_noise, generator=branch.generator,
                                perturb=pair, network=branch.network, probe=branch.probe)
            spans_out.append((start, end, branch))
        if not pairs:
            return x_in, stacked, spans, contextlib.nullcontext()
        x_out = torch.cat([x_in] + [x_in[pair.rows] for pair in pairs])
        aligned = _aligned_texts(stacked, pairs, contexts, text_mask) if text_mask is not None else {}

        def extended(key: str) -> torch.Tensor | None:
            if key in aligned:
                return aligned[key]
            mine = stacked(key)
            if mine is None:
                return None
            partners = [mine[pair.rows] if key in own or key not in context else context[key]
                        for pair, context in zip(pairs, contexts)]
            for value in partners:
                if value.shape[1:] != mine.shape[1:]:
                    raise ValueError(f"guidance: the negative branch's {key!r} has shape {tuple(value.shape[1:])} per "
                                     f"row, the guided rows' {tuple(mine.shape[1:])}; both must be encoded to the "
                                     "same length")
            return torch.cat([mine, *partners])

        return x_out, extended, spans_out, _carrying(model, tuple(pairs))


def _aligned_texts(stacked: Callable[[str], torch.Tensor | None], pairs: Sequence[NegativeRows],
                   contexts: Sequence[Any], text_mask: tuple[str, str]) -> dict[str, torch.Tensor]:
    """The text embeddings and their padding mask of the forward's rows then every pair's partner
    rows, each zero-padded to the longest and masked there (a missing mask: every token valid)."""
    text_key, mask_key = text_mask
    texts = [stacked(text_key)] + [context[text_key] for context in contexts]
    masks = [stacked(mask_key)] + [context.get(mask_key) for context in contexts]
    longest = max(t.shape[1] for t in texts)
    if all(t.shape[1] == longest for t in texts) and all(m is None for m in masks):
        return {}
    padded, valid = [], []
    for text, mask in zip(texts, masks):
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if mask is None else mask.bool()
        extra = longest - text.shape[1]
        padded.append(torch.cat([text, text.new_zeros((text.shape[0], extra, *text.shape[2:]))], dim=1))
        valid.append(torch.cat([mask, mask.new_zeros((mask.shape[0], extra))], dim=1))
    return {text_key: torch.cat(padded), mask_key: torch.cat(valid)}


def _guided_layers(model: nn.Module, layers: tuple[str | int, ...] | None, owner: str) -> list[tuple[str, nn.Module]]:
    """The joint-attention layers NAG guides: every one (None), or those of the named blocks.
    ValueError before any model call when there are none, or a layer has a trainable processor."""
    every = joint_attention_layers(model)
    if not every:
        raise ValueError(f"{owner}: perturbation 'extrapolate' needs cross-attention or joint-attention layers; "
                         f"{type(model).__name__} has none")
    chosen = every
    if layers is not None:  # the blocks' attention layers, named as PAG names them
        named = {id(m) for _, m in resolve_layers(model, Perturbation("identity", layers), owner)}
        chosen = [(name, m) for name, m in every if id(m) in named]
    for name, module in chosen:
        if isinstance(original_processor(module), nn.Module):
            raise ValueError(f"{owner}: layer {name} has a trainable processor "
                             f"({type(original_processor(module)).__name__}, e.g. IP-Adapter); NAG on it is not "
                             "supported")
    return chosen
