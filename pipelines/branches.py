"""The batched branch model: a method's branches evaluated on a conditional network in one
forward (a UNet here; the transformer families subclass it), each branch's rows with its own
conditioning, and the alterations some branches make inside that forward (the row plan:
PAG/SEG/SLG's layers, TSG's time noise, SAG's probe, NAG's second context)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import torch

from guidance_engine.guidance import Branch, ContextExtrapolation, Guidance, Perturbation

from .context_attention import BoundContext
from .perturbation import resolve_layers
from .row_plan import (PLAN_ARGUMENT, PLAN_KWARG, PlanTimeForward, RowPlan, TimeCondition, active, current,
                       draw_time_noise, embedding_width, install_block, install_processor, install_time_hook,
                       original_processor)
from .shuffle import BLOCK_KINDS, draw_permutations

__all__ = ["NetworkBranches", "UNetBranches"]


class NetworkBranches:
    """Evaluates branches on a conditional network (a UNet; transformers in subclasses) in ONE
    forward: the rows of branch ``b`` see that branch's conditioning (text embeddings, SDXL's
    pooled embeddings and time ids).

    ``conditions[b]`` maps UNet keyword names to tensors; ``added_cond_kwargs`` entries are given
    under their own names (``text_embeds``, ``time_ids``); ``inpaint_channels`` (mask and
    masked-image latents of an inpainting UNet) are concatenated to the latents of the rows. Rows are concatenated in the requested
    branch order, which for ("uncond", "cond") is the stock pipelines' order.

    A :class:`~guidance_engine.guidance.Branch` with ``perturb`` (PAG, SEG, SLG) is rows of the
    same forward, altered inside it by row-aware processors (:mod:`.perturbation`); one with
    ``network`` (an autoguidance reference) is evaluated by ``networks[branch.network]`` in a
    separate call after the main one, since different weights cannot share one batched forward.
    """

    _ADDED = ("text_embeds", "time_ids")
    #: Whether the forward takes latents of another spatial size than the call's (SWG's windows).
    evaluates_crops: bool = True

    def __init__(self, model, conditions: dict[str, dict[str, torch.Tensor]],
                 cross_attention_kwargs: dict[str, Any] | None = None,
                 providers: Mapping[str, Callable[[], dict[str, torch.Tensor]]] | None = None,
                 networks: Mapping[str, Any] | None = None) -> None:
        self.model = model  # the main network: a UNet or a transformer
        self.conditions = conditions
        self.cross_attention_kwargs = cross_attention_kwargs
        # Branches whose conditioning is drawn afresh at every step (ICG's independent condition).
        self.providers = dict(providers or {})
        # Other networks taking the same conditioning (autoguidance's reference model), by name.
        self.networks = {name: net for name, net in (networks or {}).items() if net is not None}
        self._layers: dict[tuple, list] = {}  # resolved perturbation layers
        # The family's prompt encoding for branches of other prompts (texts, one per call prompt ->
        # a condition dict like "cond"'s): :func:`.conditions.add_text_branches` fills them with it.
        self.encode_texts: Callable[[list[str]], dict[str, torch.Tensor]] | None = None
        # At most this many rows per network call (None: one call for all of a step's branches);
        # set per run from the pipeline's ``set_max_batch_rows`` (:meth:`GuidedPipelineMixin._run_core`).
        self.max_batch_rows: int | None = None
        # A guidance-distilled UNet's embedded guidance scale (``time_cond_proj_dim``: one row, the
        # stock pipelines' ``timestep_cond``), the same for every row of every branch; None otherwise.
        self.timestep_cond: torch.Tensor | None = None
        self._drawn: dict[str, dict[str, torch.Tensor]] | None = None  # this step's provider draws
        # Conditioning stacked over whole branches, by key: (the tensors stacked, their versions,
        # the stack). Every step of a plain run stacks the same tensors, which the stock pipelines
        # concatenate once per call; a tensor replaced or written in place (a step-end callback)
        # is stacked afresh.
        self._stacks: dict[str, tuple[list[torch.Tensor], list[int], torch.Tensor]] = {}

    def _condition(self, name: str) -> dict[str, torch.Tensor]:
        if name in self.conditions:
            return self.conditions[name]
        if name in self.providers:
            if self._drawn is None:
                return self.providers[name]()
            if name not in self._drawn:  # once per step, however many calls the step's rows take
                self._drawn[name] = self.providers[name]()
            return self._drawn[name]
        return self.conditions[name.base]  # a derived branch (Branch): its base's conditioning

    def available(self) -> set[str]:
        return set(self.conditions) | set(self.providers)

    def network(self, name: str | None):
        """The network that evaluates a branch: the main one, or ``networks[name]``."""
        return self.model if name is None else self.networks[name]

    def layers(self, model, perturbation: Perturbation, owner: str = "guidance") -> list:
        """The modules of ``model`` that ``perturbation`` alters (resolved once per call)."""
        key = (id(model), perturbation.kind, perturbation.layers)  # what resolve_layers reads
        if key not in self._layers:
            layers = resolve_layers(model, perturbation, owner)
            for name, module in layers:
                if perturbation.kind not in BLOCK_KINDS and isinstance(original_processor(module), torch.nn.Module):
                    raise ValueError(f"{owner}: layer {name} has a trainable processor "
                                     f"({type(original_processor(module)).__name__}, e.g. IP-Adapter); perturbing it "
                                     "is not supported")
            self._layers[key] = layers
        return self._layers[key]

    def check_supports(self, guide: Guidance) -> None:
        """ValueError before any model call if the method needs a branch this pipeline lacks, a
        network it was not given, or layers its network does not have."""
        missing = sorted(guide.required_branches() - self.available())
        if missing:
            raise ValueError(f"guidance: method {guide.name!r} needs branch(es) {missing}, which this pipeline "
                             f"does not provide (it has {sorted(self.available())})")
        if guide.evaluates_crops and not self.evaluates_crops:
            raise ValueError(f"guidance: method {guide.name!r} evaluates the network on crops of the latent, which "
                             f"{type(self).__name__} cannot (its token layout is fixed by the whole latent)")
        for branch in guide.altered_branches():
            if branch.network is not None and branch.network not in self.networks:
                raise ValueError(f"guidance: method {guide.name!r} needs a {branch.network!r} network: pass "
                                 f"{branch.network}_unet=... (a model of the same family taking the same conditioning)")
            if branch.perturb is not None:
                self.layers(self.network(branch.network), branch.perturb, owner=guide.name)
            if branch.probe is not None:  # the attention map is read from a self-attention layer
                self.layers(self.network(branch.network), Perturbation("identity", branch.probe.layers),
                            owner=guide.name)
            if branch.time_noise > 0 or branch.perturb is not None or branch.probe is not None:
                self.check_alterations(branch, guide.name)

    def check_alterations(self, branch, owner: str = "guidance") -> None:
        """Refuse alterations this network cannot make (subclasses)."""

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor,
                 requests: Sequence[tuple[str, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
        plain = self.max_batch_rows is None
        for name, _ in requests:  # (loops, not all(...) over a generator, on this per-step path)
            if type(name) is not str:
                plain = False
                break
        if plain:
            # plain branches only (no other network, probe or alteration): the one call that the
            # grouping below would make, without its per-step bookkeeping
            self._drawn = {}
            try:
                return self._evaluate(self.model, x, timestep, requests, plain=True)
            finally:
                self._drawn = None
        groups: dict[str | None, list[tuple[str, torch.Tensor | None]]] = {}
        probed = [(name, rows) for name, rows in requests if getattr(name, "probe", None) is not None]
        for name, rows in requests:  # one call per network, the main network first
            if getattr(name, "probe", None) is None:
                groups.setdefault(getattr(name, "network", None), []).append((name, rows))
        out: dict[str, torch.Tensor] = {}
        self._drawn = {}
        try:
            for network in sorted(groups, key=lambda n: n is not None):
                probes = [name for name, _ in probed if getattr(name, "network", None) == network]
                for chunk in self._chunks(groups[network], x.shape[0], probes):
                    for name, part in self._evaluate(self.network(network), x, timestep, chunk, probes).items():
                        out[name] = part if name not in out else torch.cat([out[name], part])
        finally:
            self._drawn = None
        for name, rows in probed:  # evaluated later, on the input the method builds (SAG)
            if rows is not None or name.base not in out:
                raise ValueError(f"guidance: branch {name!r} reads the attention map of {name.base!r}, which must be "
                                 "evaluated in the same step for every sample")
            name.probe.evaluate = self._evaluator(self.network(name.network), timestep, name.base)
            out[name] = torch.full_like(out[name.base], float("nan"))  # filled by probe.evaluate
        return out

    def _chunks(self, requests: list[tuple[str, torch.Tensor | None]], batch: int, probes: Sequence[Any]
                ) -> list[list[tuple[str, torch.Tensor | None]]]:
        """The requests in network calls of at most ``max_batch_rows`` rows: whole branches while
        they fit, in order, a branch larger than the limit split into consecutive row ranges (its
        outputs concatenate back in row order); for families that run each branch in its own
        forward, each branch's rows alone. One call when there is no limit, or the rows fit."""
        sizes = [batch if rows is None else len(rows) for _, rows in requests]
        limit = self.max_batch_rows
        if limit is None or sum(sizes) <= limit:
            return [requests]
        if probes:
            raise ValueError(f"max_batch_rows: {limit} rows per call, but this step's {sum(sizes)} rows include a "
                             "branch whose attention map the method reads over the whole batch (SAG); raise "
                             "max_batch_rows or set it to None")
        chunks: list[list[tuple[str, torch.Tensor | None]]] = [[]]
        room = limit
        for (name, rows), size in zip(requests, sizes):
            if getattr(self, "separate_forwards", False) and chunks[-1]:
                chunks.append([])  # a family that runs each branch alone: chunks never mix branches
                room = limit
            if size > limit and getattr(name, "time_noise", 0.0) > 0:
                raise ValueError(f"max_batch_rows: branch {str(name)!r} has {size} rows, more than {limit}, and "
                                 "cannot be split (TSG scales its noise by the std over its rows); raise "
                                 f"max_batch_rows to at least {size}")
            index = torch.arange(batch) if rows is None else rows
            start = 0
            while start < size:
                if room == 0:
                    chunks.append([])
                    room = limit
                take = min(room, size - start)
                part = rows if (start == 0 and take == size) else index[start:start + take]
                chunks[-1].append((name, part))
                start, room = start + take, room - take
        return chunks

    def _evaluator(self, model, timestep: torch.Tensor, base: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """A handle that evaluates ``model`` on another input with ``base``'s conditioning."""
        def evaluate(x_new: torch.Tensor) -> torch.Tensor:
            return self._evaluate(model, x_new, timestep, [(base, None)])[base]
        return evaluate

    def _evaluate(self, model, x: torch.Tensor, timestep: torch.Tensor,
                  requests: Sequence[tuple[str, torch.Tensor | None]], probes: Sequence[Any] = (),
                  plain: bool = False) -> dict[str, torch.Tensor]:
        """One network call on the rows of ``requests``; the output split by branch. ``probes``
        record the attention map of their base branch's rows in this call; ``plain``: the caller
        knows every branch is a plain name (nothing to alter)."""
        def rows_of(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            return tensor if rows is None else tensor[rows]

        names = [name for name, _ in requests]
        parts = [(self._condition(name), rows) for name, rows in requests]
        whole = True  # every branch on every row
        for _, rows in requests:
            if rows is not None:
                whole = False
                break
        xs = [x] * len(parts) if whole else [rows_of(x, rows) for _, rows in parts]
        x_in = torch.cat(xs) if len(xs) > 1 else xs[0]

        def stacked(key: str) -> torch.Tensor | None:
            """Conditioning ``key`` of every branch's rows, in forward order (None if absent)."""
            if key not in parts[0][0]:
                return None
            if whole:
                return self._stacked_whole(key, [c[key] for c, _ in parts])
            return torch.cat([rows_of(c[key], rows) for c, rows in parts])

        spans = []  # rows that a Branch alters (TSG's time embedding, PAG/SEG/SLG/NAG layers)
        if not plain and (probes or any(type(name) is not str for name in names)):  # a plain name alters nothing
            start = 0
            for (name, rows), part in zip(requests, xs):
                if getattr(name, "time_noise", 0.0) > 0 or getattr(name, "perturb", None) is not None:
                    spans.append((start, start + len(part), self._bind_context(name, rows)))
                spans += [(start, start + len(part), probe) for probe in probes if probe.base == name]
                start += len(part)
        out = self.forward(x_in, timestep, stacked, spans, model=model)
        if len(parts) == 1:
            return {names[0]: out}
        if whole:
            return dict(zip(names, out.chunk(len(parts))))  # the stock pipelines' split, bit for bit
        return dict(zip(names, out.split([len(part) for part in xs])))

    def _stacked_whole(self, key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``torch.cat(tensors)``, reused while the same tensors, unwritten, are stacked again."""
        kept = self._stacks.get(key)
        if kept is not None and len(kept[0]) == len(tensors):
            for a, b, version in zip(kept[0], tensors, kept[1]):
                if a is not b or a._version != version:
                    break
            else:
                return kept[2]
        stack = torch.cat(tensors)
        self._stacks[key] = (tensors, [t._version for t in tensors], stack)
        return stack

    def _bind_context(self, branch, rows: torch.Tensor | None):
        """``branch``, with a second context bound to its rows when its alteration reads one (a
        :class:`~guidance_engine.guidance.ContextExtrapolation`: that branch's conditioning)."""
        spec = getattr(branch, "perturb", None)
        if not isinstance(spec, ContextExtrapolation):
            return branch
        context = {key: value if rows is None else value[rows] for key, value in self._condition(spec.context).items()
                   if isinstance(value, torch.Tensor)}
        return Branch(branch, base=branch.base, time_noise=branch.time_noise, generator=branch.generator,
                      perturb=BoundContext(spec, context), network=branch.network, probe=branch.probe)

    def time_embeddings(self, model) -> list[Any]:
        """The modules whose output is the time-step embedding TSG perturbs (a UNet's MLP)."""
        return [model.time_embedding]

    def time_noise_shape(self, model) -> tuple[int, ...] | None:
        """One sample's shape of TSG's embedding (``(width,)`` of a time-step MLP's output rows), so
        that its noise is drawn before the forward, which a compiled forward then traces; None where
        it is not known before the forward (the dispatcher draws it there)."""
        widths = {embedding_width(module) for module in self.time_embeddings(model)}
        return (widths.pop(),) if len(widths) == 1 and None not in widths else None

    def altered(self, model, x_in: torch.Tensor, spans: list[tuple[int, int, Any]],
                tokens: Any = None) -> contextlib.AbstractContextManager[RowPlan | None]:
        """The alterations of ``spans`` as the row plan of one forward of ``model`` (TSG's time
        noise, PAG/SEG/SLG's layers, SAG's probe), in force in this thread only; the context
        gives the plan (None: nothing altered). ``tokens``: a flow transformer's image-token layout
        (:class:`~.perturbation.ImageTokens`), if not the default one."""
        if not spans and current() is None:  # nothing altered, no plan to hide: as the plain call
            return _NO_PLAN
        return self._plan_in_force(model, x_in, spans, tokens)

    @contextlib.contextmanager
    def _plan_in_force(self, model, x_in: torch.Tensor, spans: list[tuple[int, int, Any]], tokens: Any):
        plan = RowPlan(latent_hw=tuple(x_in.shape[-2:]), tokens=tokens)
        for start, end, branch in spans:
            if branch.probe is not None:
                _, module = self.layers(model, Perturbation("identity", branch.probe.layers))[0]
                install_processor(module)
                plan.probes.setdefault(module, []).append((start, end, branch.probe))
            elif branch.perturb is not None:
                blocks = branch.perturb.kind in BLOCK_KINDS  # whole blocks: skipped or shuffled
                layers = self.layers(model, branch.perturb)
                if branch.perturb.kind == "shuffle":  # TPG: the step's permutations, before the forward
                    draw_permutations(model, branch.perturb, layers, plan.latent_hw, x_in.device)
                for _, module in layers:
                    if blocks:
                        install_block(module)
                    else:
                        install_processor(module)
                    (plan.blocks if blocks else plan.attention).setdefault(module, []).append(
                        (start, end, branch.perturb))
            if branch.probe is None and branch.time_noise > 0:
                plan.time.append((start, end, branch))
        if plan.time:
            plan.time_modules = set(self.time_embeddings(model))
            for module in plan.time_modules:
                install_time_hook(module)
            row_shape = self.time_noise_shape(model)
            if row_shape is not None:
                draw_time_noise(plan, row_shape)  # before the forward: a compiled one traces it
        with active(plan):
            yield plan if plan else None

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        """One network call on the assembled rows (the UNet's signature; subclasses adapt)."""
        model = self.model if model is None else model
        added = None  # SDXL's text embeddings and time ids (SD has none: one lookup per step)
        text_embeds = stacked(self._ADDED[0])
        if text_embeds is not None:
            added = {self._ADDED[0]: text_embeds, **{key: stacked(key) for key in self._ADDED[1:]}}
            if any(value is None for value in added.values()):
                added = None
        extra = stacked("inpaint_channels")  # a 9-channel inpainting UNet's mask and masked-image latents
        timestep_cond = None
        if self.timestep_cond is not None and getattr(model.config, "time_cond_proj_dim", None) is not None:
            timestep_cond = self.timestep_cond.repeat(x_in.shape[0], 1)  # contiguous rows, as stock's
        with self.altered(model, x_in, spans) as plan:
            if extra is not None:
                x_in = torch.cat([x_in, extra], dim=1)
            if plan is not None and plan.time:
                timestep_cond = self._time_condition(model, plan, timestep_cond)
            return model(x_in, timestep, encoder_hidden_states=stacked("encoder_hidden_states"),
                         timestep_cond=timestep_cond, added_cond_kwargs=added,
                         cross_attention_kwargs=self._attention_kwargs(model, plan), return_dict=False)[0]

    def _time_condition(self, model, plan: RowPlan, timestep_cond: torch.Tensor | None) -> Any:
        """TSG's plan as the UNet's ``timestep_cond`` (:class:`~.row_plan.TimeCondition`, which
        the time-embedding MLP's dispatcher unwraps), its noise drawn before the forward
        (:meth:`_plan_in_force`). Stays ``timestep_cond`` where the noise is drawn in the forward
        (the dispatcher then reads the plan from the thread's slot)."""
        mlp = model.time_embedding  # a compiled wrapper's attribute is its module's
        if not plan.drawn or not isinstance(vars(mlp).get("forward"), PlanTimeForward):
            return timestep_cond
        return TimeCondition(plan, timestep_cond)

    def _attention_kwargs(self, model, plan: RowPlan | None) -> dict[str, Any] | None:
        """The call's attention kwargs (a UNet's ``cross_attention_kwargs``, a flow transformer's
        ``joint_attention_kwargs``), with the row plan as an argument of the forward, which
        diffusers hands on to every block and processor, so the dispatchers read it there rather
        than in the thread's slot (``torch.compile(pipe.unet)`` or ``(pipe.transformer)`` traces
        either). A model that never ran a plan gets exactly the call's kwargs, as the
        stock pipeline passes them."""
        if plan is not None and not PLAN_ARGUMENT.ready(model):
            PLAN_ARGUMENT.install(model)
        if plan is None and not PLAN_ARGUMENT.ready(model):
            return self.cross_attention_kwargs
        return {**(self.cross_attention_kwargs or {}), PLAN_KWARG: plan}


#: The former name (it holds transformers too).
UNetBranches = NetworkBranches
#: A forward that alters nothing: a context giving no plan (reusable, so built once)
_NO_PLAN = contextlib.nullcontext(None)
