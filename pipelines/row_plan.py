"""Row plans: what one batched forward alters, and for which rows, without touching the shared model.

PAG, SEG, SLG, SAG and TSG alter some rows of one forward (identity or blurred attention, skipped
blocks, an attention map read, noise on the time embedding). That alteration is a
:class:`RowPlan`, an argument of the forward: :func:`active` holds it in a per-thread slot
(:class:`ThreadSlot`) for the forward's duration, so each thread sees its own plan and no other
(an asyncio task cannot interleave with another inside a forward: the forward never yields).

The network carries dispatchers, installed once (under a lock) on the layers a plan first touches:
an attention layer's processor is wrapped by a :class:`PlanProcessor`, a transformer block's forward
by a :class:`PlanBlockForward`, a time-embedding MLP's by a :class:`PlanTimeForward`. Without a plan
naming their layer they call exactly what they wrap, with the same arguments, so every other call (a
plain CFG run, a stock pipeline sharing the components) computes what it computed before; with one
they alter the plan's rows only. Nothing is swapped per call, so there is nothing to restore when a
forward raises, and concurrent calls on one pipeline cannot see each other's alterations.

Where the network hands its attention kwargs on to every block and processor (the UNets'
``cross_attention_kwargs``; SD3's, Flux's, Chroma's, Flux.2's and Qwen-Image's
``joint_attention_kwargs``), the plan also travels there, as ``row_plan``, once a plan has run on
the model (every attention layer then has a pass-through dispatcher that takes it): a compiled
forward traces an argument. TSG's plan reaches a UNet's time-embedding MLP the same way, as its
``timestep_cond`` (:class:`TimeCondition`). Elsewhere (Z-Image and the video families hand no
attention kwargs on) the dispatchers read the slot, which dynamo traces too: a ``threading.local``
attribute, not a ``ContextVar``, whose ``get`` would break a compiled forward's graph at every
dispatcher.

A flow transformer's branch model also says where the generated image's tokens sit in its
sequences (an :class:`~.perturbation.ImageTokens`), when they are not Flux's 2 x 2 latent patches
alone in the image stream: in the plan (``tokens``), or with :func:`image_tokens` for a forward
that reads the plan from the thread's slot.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .attention_probe import record_attention
from .perturbation import ImageTokens, perturbed_rows, skipping_forward
from .shuffle import shuffling_forward

__all__ = ["ATTENTION_KWARGS", "PLAN_ARGUMENT", "PLAN_KWARG", "PlanBlockForward", "PlanProcessor", "PlanTimeForward",
           "RowPlan", "ThreadSlot", "TimeCondition", "UNSET", "active", "current", "dispatcher_class",
           "draw_time_noise", "embedding_width", "image_tokens", "install_block", "install_processor",
           "install_time_hook", "original_processor", "passed_plan", "unwrapped"]

#: (start, end, what to do there): rows [start, end) of the forward's batch.
Segment = tuple[int, int, Any]

#: ``row_plan`` not passed to a dispatcher: it reads the thread's slot
UNSET: Any = object()
#: the keyword under which a caller passes the plan through the forward's attention kwargs
#: (``cross_attention_kwargs`` of a UNet, ``joint_attention_kwargs`` of a flow transformer)
PLAN_KWARG = "row_plan"
#: the forward arguments, by family, that diffusers hands on to every block and attention processor
ATTENTION_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs")


class ThreadSlot(threading.local):
    """A value of the forward running in this thread (``get`` / ``set`` / ``reset``, as a context
    variable's): what the row plan's dispatchers read. Not a ``ContextVar``: dynamo cannot trace
    ``ContextVar.get`` (a graph break at every dispatcher of a compiled forward) but traces the
    attribute of a ``threading.local``, so a transformer whose forward hands no attention kwargs
    on to its layers (Z-Image, the video families) still compiles whole. Per thread, as the
    pipelines' calls are; a forward never yields to another task of its thread."""

    def __init__(self, default: Any = None) -> None:
        self.value = default

    def get(self) -> Any:
        return self.value

    def set(self, value: Any) -> Any:
        """Put ``value`` in force; returns the token (the previous value) for :meth:`reset`."""
        previous, self.value = self.value, value
        return previous

    def reset(self, token: Any) -> None:
        self.value = token


_PLAN = ThreadSlot(None)
_TOKENS = ThreadSlot(None)
_INSTALL = threading.Lock()
# Plans with TSG's time noise in force, over all threads: while none is, the time-embedding dispatcher
# returns at once, without reading the slot; while one is, each forward's dispatcher reads its
# own thread's plan (or the one passed to it).
_TIME_PLANS = 0
_COUNT = threading.Lock()


@dataclass
class RowPlan:
    """The alterations of one forward. ``attention``: attention layer -> segments of Perturbations
    (PAG's identity, SEG's blur); ``probes``: attention layer -> segments of attention probes
    (SAG reads the map); ``blocks``: transformer block -> segments skipped (SLG); ``time``:
    segments of branches with ``time_noise`` (TSG) on the outputs of ``time_modules``.
    ``latent_hw``: the latent size, to place tokens on their grid; ``tokens``: where a flow
    transformer's image tokens sit in its sequences, when not Flux's 2 x 2 patches alone in the
    image stream (what :func:`image_tokens` says to a forward that reads the plan from the context)."""

    latent_hw: tuple[int, int]
    attention: dict[nn.Module, list[Segment]] = field(default_factory=dict)
    probes: dict[nn.Module, list[Segment]] = field(default_factory=dict)
    blocks: dict[nn.Module, list[Segment]] = field(default_factory=dict)
    time: list[Segment] = field(default_factory=list)
    time_modules: set[nn.Module] = field(default_factory=set)
    #: TSG's noise, drawn once per forward and span, added wherever the embedding is computed
    drawn: dict[int, torch.Tensor] = field(default_factory=dict)
    #: TSG's strength of each span as a 0-d tensor, where drawn before the forward (:func:`draw_time_noise`)
    strength: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: ImageTokens | None = None
    #: NAG's negative text streams on joint attention (the forward's partner rows, as
    #: :class:`~.joint_context_attention.NegativeRows`), for the layers and block hooks to read
    negative: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.attention or self.probes or self.blocks or self.time)


def current() -> RowPlan | None:
    """The plan of the forward running in this thread (None outside one)."""
    return _PLAN.get()


@contextlib.contextmanager
def active(plan: RowPlan) -> Iterator[RowPlan]:
    """``plan`` in force for the forward run inside; reset on exit, whatever happens."""
    global _TIME_PLANS
    token = _PLAN.set(plan if plan else None)
    timed = bool(plan.time)
    if timed:
        with _COUNT:
            _TIME_PLANS += 1
    try:
        yield plan
    finally:
        _PLAN.reset(token)
        if timed:
            with _COUNT:
                _TIME_PLANS -= 1


@contextlib.contextmanager
def image_tokens(layout: ImageTokens) -> Iterator[ImageTokens]:
    """``layout``: where the image tokens sit in the sequences of the forward run inside (this
    context only; reset on exit)."""
    token = _TOKENS.set(layout)
    try:
        yield layout
    finally:
        _TOKENS.reset(token)


# --------------------------------------------------------------------------- attention layers
class PlanProcessor:
    """An attention layer's processor behind a dispatcher: the layer's own processor
    (``original``) unless the current plan names this layer. Its call signature is the
    original's, so diffusers passes it exactly the keyword arguments the original accepts."""

    def __init__(self, original: Callable) -> None:
        self.original = original
        # The names of the arguments after (attn, hidden_states), for callers that pass them by
        # position (Flux's attention passes encoder states, mask and rotary embedding so).
        try:
            self.positional = tuple(inspect.signature(original).parameters)[2:]
        except (TypeError, ValueError):
            self.positional = ("encoder_hidden_states", "attention_mask")

    def dispatch(self, attn: nn.Module, hidden_states: torch.Tensor, *args: Any, row_plan: Any = UNSET,
                 **kwargs: Any) -> Any:
        # The plan comes as a forward argument where the caller passes one (the UNet families and
        # the flow transformers that hand attention kwargs on, so that a compiled forward traces
        # it), else from the thread's slot.
        plan = _PLAN.get() if row_plan is UNSET else row_plan
        if plan is not None and (attn in plan.probes or attn in plan.attention):
            kwargs = {**dict(zip(self.positional, args)), **kwargs}
            encoder_hidden_states = kwargs.pop("encoder_hidden_states", None)
            attention_mask = kwargs.pop("attention_mask", None)
            if attn in plan.probes:
                record_attention(attn, hidden_states, kwargs, plan.probes[attn], plan.latent_hw)
            if attn in plan.attention:
                # a plan passed as an argument carries its token layout (a forward argument too)
                tokens = _TOKENS.get() if row_plan is UNSET else plan.tokens
                return perturbed_rows(self.original, attn, hidden_states, encoder_hidden_states, attention_mask,
                                      kwargs, plan.attention[attn], plan.latent_hw, tokens)
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **kwargs)
        return self.original(attn, hidden_states, *args, **kwargs)


_DISPATCHERS: dict[type, type] = {}


def dispatcher_class(original: Callable) -> type:
    """A PlanProcessor subclass whose ``__call__`` has the original class's signature (diffusers
    filters ``cross_attention_kwargs`` by the processor's signature)."""
    kind = type(original)
    if kind not in _DISPATCHERS:
        def __call__(self, attn, hidden_states, *args, **kwargs):  # noqa: N807
            return self.dispatch(attn, hidden_states, *args, **kwargs)

        try:
            signature = inspect.signature(kind.__call__)
        except (TypeError, ValueError):  # a builtin callable: keep the generic signature
            pass
        else:  # ... plus ``row_plan``, so that diffusers passes it on from cross_attention_kwargs
            params = list(signature.parameters.values())
            if PLAN_KWARG not in signature.parameters:
                at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
                params.insert(at, inspect.Parameter(PLAN_KWARG, inspect.Parameter.KEYWORD_ONLY, default=None))
            __call__.__signature__ = signature.replace(parameters=params)
        _DISPATCHERS[kind] = type(f"Plan{kind.__name__}", (PlanProcessor,), {"__call__": __call__})
    return _DISPATCHERS[kind]


def unwrapped(processor: Any) -> Any:
    """``processor`` itself, or the one a dispatcher wraps."""
    return processor.original if isinstance(processor, PlanProcessor) else processor


def original_processor(module: nn.Module) -> Any:
    """The processor a layer has of its own (under a dispatcher, the one it wraps)."""
    return unwrapped(module.processor)


def install_processor(module: nn.Module) -> None:
    """Put a dispatcher in front of ``module``'s processor, once (again if the processor was
    replaced since, e.g. by ``set_attn_processor``)."""
    with _INSTALL:
        if not isinstance(module.processor, PlanProcessor):
            module.processor = dispatcher_class(module.processor)(module.processor)


class PlanArgument:
    """Whether a forward of ``model`` can take the plan as an argument (its attention kwargs),
    which needs a dispatcher on every attention layer: diffusers warns about, and drops, an
    argument a layer's processor does not take. Installed once, checked per forward (a
    ``set_attn_processor`` since replaces dispatchers; they are put back before the plan is passed)."""

    def __init__(self) -> None:
        self._layers: "weakref.WeakKeyDictionary[nn.Module, list[nn.Module]]" = weakref.WeakKeyDictionary()

    def install(self, model: nn.Module) -> None:
        """A dispatcher on every attention layer of ``model`` (pass-through without a plan)."""
        model = _unwrapped_module(model)
        layers = [m for m in model.modules() if callable(getattr(m, "processor", None))]
        for module in layers:
            install_processor(module)
        with _INSTALL:
            self._layers[model] = layers

    def ready(self, model: nn.Module) -> bool:
        """Every attention layer of ``model`` still behind a dispatcher."""
        layers = self._layers.get(_unwrapped_module(model))
        return layers is not None and all(isinstance(m.processor, PlanProcessor) for m in layers)


def _unwrapped_module(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds (each compile makes a new wrapper)."""
    # a compile wrapper holds it as a submodule; a plain model has no such entry (looked up in
    # the dict: getattr would go through diffusers' __getattr__ and raise, every forward)
    return model._modules.get("_orig_mod", model)


#: the models whose forwards take the plan as an argument (the UNet families; SD3, Flux, Chroma,
#: Flux.2 and Qwen-Image, whose transformers hand their attention kwargs to every processor)
PLAN_ARGUMENT = PlanArgument()


# --------------------------------------------------------------------------- transformer blocks
def passed_plan(kwargs: dict[str, Any]) -> Any:
    """The plan a block's call got through its attention kwargs, or ``UNSET`` (none passed: the
    thread's slot holds it)."""
    passed = UNSET
    for name in ATTENTION_KWARGS:
        passed = (kwargs.get(name) or {}).get(PLAN_KWARG, passed)
    return passed


class PlanBlockForward:
    """A transformer block's forward behind a dispatcher: the block's own forward unless the
    current plan skips some of its rows (those rows then leave the block unchanged)."""

    def __init__(self, block: nn.Module, forward: Callable) -> None:
        self.block = block
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        passed = passed_plan(kwargs)
        plan = _PLAN.get() if passed is UNSET else passed
        if plan is not None and self.block in plan.blocks:
            segments = plan.blocks[self.block]  # one method alters a block one way: skipped or shuffled
            altered = shuffling_forward if segments[0][2].kind == "shuffle" else skipping_forward
            return altered(self.block, self.forward, segments)(*args, **kwargs)
        return self.forward(*args, **kwargs)


def install_block(block: nn.Module) -> None:
    """Put a dispatcher in front of ``block.forward``, once."""
    with _INSTALL:
        if not isinstance(vars(block).get("forward"), PlanBlockForward):
            block.forward = PlanBlockForward(block, block.forward)


# --------------------------------------------------------------------------- time embedding
@dataclass(frozen=True)
class TimeCondition:
    """A UNet's ``timestep_cond`` argument carrying the row plan to its time-embedding MLP, which
    the UNet calls as ``time_embedding(t_emb, timestep_cond)`` and nothing else reads: a compiled
    forward traces an argument without a lookup.
    ``condition``: the real ``timestep_cond`` (a guidance-distilled UNet's embedded scale) or None."""

    plan: RowPlan
    condition: torch.Tensor | None = None


def embedding_width(module: nn.Module) -> int | None:
    """The width of a time-step MLP's output rows: its last linear layer's (``linear_2`` of
    diffusers' ``TimestepEmbedding``, the last of Z-Image's ``mlp``); None where it is not such an MLP."""
    last = getattr(module, "linear_2", None)
    if last is None and isinstance(getattr(module, "mlp", None), nn.Sequential):
        last = module.mlp[-1]
    return last.out_features if isinstance(last, nn.Linear) else None


def draw_time_noise(plan: RowPlan, row_shape: tuple[int, ...]) -> None:
    """Draw each TSG span's noise now, ``[rows, *row_shape]`` (what the time-embedding dispatcher
    would draw at the forward's first embedding, from the same generators in the same order), and
    its strength as a 0-d float32 tensor: a compiled forward can take neither a generator nor a new
    float per step without breaking or recompiling."""
    for i, (start, end, branch) in enumerate(plan.time):
        plan.drawn[i] = torch.randn((end - start, *row_shape), generator=branch.generator, dtype=torch.float32)
        plan.strength[i] = torch.tensor(branch.time_noise, dtype=torch.float32)


def _noised(module: nn.Module, plan: RowPlan | None, emb: torch.Tensor) -> torch.Tensor:
    """Add each TSG span's noise (drawn once per forward, scaled by this embedding's std) to its
    rows of the embedding; without a plan for this module the output is left as it is."""
    if plan is None or not plan.time or module not in plan.time_modules:
        return emb
    emb = emb.clone()
    for i, (start, end, branch) in enumerate(plan.time):
        rows = emb[start:end]
        if i not in plan.drawn:
            plan.drawn[i] = torch.randn(rows.shape, generator=branch.generator, dtype=torch.float32)
        # float32(s) * std, as the Python float s times the float32 std computes it
        strength = plan.strength.get(i, branch.time_noise)
        emb[start:end] = rows + strength * rows.float().std() * plan.drawn[i].to(rows)
    return emb


class PlanTimeForward:
    """A time-embedding MLP's forward behind a dispatcher: the module's own forward, then TSG's
    noise on the rows the plan names. The plan comes as a :class:`TimeCondition` in the second
    argument (a UNet's ``timestep_cond``), else from the thread's slot; while no TSG plan is in
    force anywhere, the output is returned without that lookup."""

    def __init__(self, module: nn.Module, forward: Callable) -> None:
        self.module = module
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > 1 and isinstance(args[1], TimeCondition):
            carried = args[1]
            return _noised(self.module, carried.plan, self.forward(args[0], carried.condition, *args[2:], **kwargs))
        emb = self.forward(*args, **kwargs)
        if _TIME_PLANS == 0:
            return emb
        return _noised(self.module, _PLAN.get(), emb)


def install_time_hook(module: nn.Module) -> None:
    """Put a dispatcher in front of ``module.forward`` (a time-embedding MLP), once."""
    with _INSTALL:
        if not isinstance(vars(module).get("forward"), PlanTimeForward):
            module.forward = PlanTimeForward(module, module.forward)
