"""What the guided pipelines share: resolving ``guidance=``, the batched branch model over a
UNet, the callback adapter, and the call into the sampler core. Pipelines stay thin adapters."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from guidance_engine.guidance import Branch, ContextExtrapolation, Guidance, Perturbation
from guidance_engine.registry import resolve_guidance
from guidance_engine.samplers import SampleResult, StartImage, StepRecord, sample
from guidance_engine.samplers.loop import check_run
from guidance_engine.samplers.schedule import is_flow_scheduler

if TYPE_CHECKING:
    from .image_input import ImageInput

from . import conditions
from .context_attention import BoundContext
from .messages import PromptTruncatedWarning
from .perturbation import resolve_layers
from .row_plan import RowPlan, active, install_block, install_processor, install_time_hook, original_processor

GuidanceSpec = Guidance | str | Mapping[str, Any] | None
#: What a particle method returns: one image per group drawn by the final weights, or every particle.
PARTICLE_OUTPUTS: tuple[str, ...] = ("draw", "all")
#: Held while a tokenizer runs (prompt encoding, truncation checks): the shared fast tokenizers of
#: transformers are not thread-safe. Re-entrant: SDXL's and SD3's encoders nest.
TEXT_LOCK = threading.RLock()
#: The ``output_type`` values every guided pipeline accepts (the stock ones).
OUTPUT_TYPES: tuple[str, ...] = ("pil", "np", "pt", "latent")


@dataclass
class GuidedPipelineOutput(BaseOutput):
    """Images plus what the run cost and used.

    Attributes:
        images: PIL images, a numpy array or a tensor, as ``output_type`` asks.
        nsfw_content_detected: the safety checker's verdicts (None without a checker).
        nfe: network evaluations per image, mean over the images (a CFG step costs 2).
        nfe_per_image: network evaluations of each image.
        guidance: the method's config (``Guidance.to_dict()``).
        sampler: the sampler that ran.
        guidance_state: the method's final per-run state (FKC's log-weights, AG's switch steps).
        warnings: what the call changed of its input, one sentence each (a prompt longer than the
            text encoder reads, cut); each was also issued as a :class:`PromptTruncatedWarning`.
    """

    images: Any
    nsfw_content_detected: list[bool] | None = None
    nfe: float = 0
    nfe_per_image: list[int] = field(default_factory=list)
    guidance: dict[str, Any] = field(default_factory=dict)
    sampler: str = ""
    guidance_state: Any = None
    warnings: list[str] = field(default_factory=list)


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

    def _condition(self, name: str) -> dict[str, torch.Tensor]:
        if name in self.conditions:
            return self.conditions[name]
        if name in self.providers:
            return self.providers[name]()
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
                if perturbation.kind != "skip" and isinstance(original_processor(module), torch.nn.Module):
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
        groups: dict[str | None, list[tuple[str, torch.Tensor | None]]] = {}
        probed = [(name, rows) for name, rows in requests if getattr(name, "probe", None) is not None]
        for name, rows in requests:  # one call per network, the main network first
            if getattr(name, "probe", None) is None:
                groups.setdefault(getattr(name, "network", None), []).append((name, rows))
        out: dict[str, torch.Tensor] = {}
        for network in sorted(groups, key=lambda n: n is not None):
            probes = [name for name, _ in probed if getattr(name, "network", None) == network]
            out.update(self._evaluate(self.network(network), x, timestep, groups[network], probes))
        for name, rows in probed:  # evaluated later, on the input the method builds (SAG)
            if rows is not None or name.base not in out:
                raise ValueError(f"guidance: branch {name!r} reads the attention map of {name.base!r}, which must be "
                                 "evaluated in the same step for every sample")
            name.probe.evaluate = self._evaluator(self.network(name.network), timestep, name.base)
            out[name] = torch.full_like(out[name.base], float("nan"))  # filled by probe.evaluate
        return out

    def _evaluator(self, model, timestep: torch.Tensor, base: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """A handle that evaluates ``model`` on another input with ``base``'s conditioning."""
        def evaluate(x_new: torch.Tensor) -> torch.Tensor:
            return self._evaluate(model, x_new, timestep, [(base, None)])[base]
        return evaluate

    def _evaluate(self, model, x: torch.Tensor, timestep: torch.Tensor,
                  requests: Sequence[tuple[str, torch.Tensor | None]], probes: Sequence[Any] = ()
                  ) -> dict[str, torch.Tensor]:
        """One network call on the rows of ``requests``; the output split by branch. ``probes``
        record the attention map of their base branch's rows in this call."""
        def rows_of(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            return tensor if rows is None else tensor[rows]

        names = [name for name, _ in requests]
        parts = [(self._condition(name), rows) for name, rows in requests]
        xs = [rows_of(x, rows) for _, rows in parts]
        x_in = torch.cat(xs) if len(xs) > 1 else xs[0]

        def stacked(key: str) -> torch.Tensor | None:
            """Conditioning ``key`` of every branch's rows, in forward order (None if absent)."""
            if key not in parts[0][0]:
                return None
            return torch.cat([rows_of(c[key], rows) for c, rows in parts])

        spans, start = [], 0  # rows that a Branch alters (TSG's time embedding, PAG/SEG/SLG/NAG layers)
        for (name, rows), part in zip(requests, xs):
            if getattr(name, "time_noise", 0.0) > 0 or getattr(name, "perturb", None) is not None:
                spans.append((start, start + len(part), self._bind_context(name, rows)))
            spans += [(start, start + len(part), probe) for probe in probes if probe.base == name]
            start += len(part)
        out = self.forward(x_in, timestep, stacked, spans, model=model)
        if len(parts) == 1:
            return {names[0]: out}
        if all(rows is None for _, rows in parts):
            return dict(zip(names, out.chunk(len(parts))))  # the stock pipelines' split, bit for bit
        return dict(zip(names, out.split([len(part) for part in xs])))

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

    @contextlib.contextmanager
    def altered(self, model, x_in: torch.Tensor, spans: list[tuple[int, int, Any]]):
        """The alterations of ``spans`` as the row plan of one forward of ``model`` (TSG's time
        noise, PAG/SEG/SLG's layers, SAG's probe), in force in this context only."""
        plan = RowPlan(latent_hw=tuple(x_in.shape[-2:]))
        for start, end, branch in spans:
            if branch.probe is not None:
                _, module = self.layers(model, Perturbation("identity", branch.probe.layers))[0]
                install_processor(module)
                plan.probes.setdefault(module, []).append((start, end, branch.probe))
            elif branch.perturb is not None:
                skip = branch.perturb.kind == "skip"
                for _, module in self.layers(model, branch.perturb):
                    if skip:
                        install_block(module)
                    else:
                        install_processor(module)
                    (plan.blocks if skip else plan.attention).setdefault(module, []).append(
                        (start, end, branch.perturb))
            if branch.probe is None and branch.time_noise > 0:
                plan.time.append((start, end, branch))
        if plan.time:
            plan.time_modules = set(self.time_embeddings(model))
            for module in plan.time_modules:
                install_time_hook(module)
        with active(plan):
            yield

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        """One network call on the assembled rows (the UNet's signature; subclasses adapt)."""
        model = self.model if model is None else model
        added = {key: stacked(key) for key in self._ADDED}  # SDXL's text embeddings and time ids
        if any(value is None for value in added.values()):
            added = None
        extra = stacked("inpaint_channels")  # a 9-channel inpainting UNet's mask and masked-image latents
        with self.altered(model, x_in, spans):
            if extra is not None:
                x_in = torch.cat([x_in, extra], dim=1)
            return model(x_in, timestep, encoder_hidden_states=stacked("encoder_hidden_states"),
                         added_cond_kwargs=added, cross_attention_kwargs=self.cross_attention_kwargs,
                         return_dict=False)[0]


#: The former name (it holds transformers too).
UNetBranches = NetworkBranches


class GuidedPipelineMixin:
    """Shared call logic of the guided pipelines (mixed into subclasses of the stock ones)."""

    default_guidance_scale: float = 7.5
    #: subfolder of a model directory holding an autoguidance reference network (loaded on demand)
    reference_subfolder: str = "reference_unet"

    @staticmethod
    def guided_output(images: Any, nfe_per_image: list[float], state: Any, guide: Guidance, sampler: str | None,
                      **extra: Any) -> GuidedPipelineOutput:
        """A call's output: the images, network evaluations per image and their mean, the method's
        config and final state, the sampler (``extra``: e.g. the safety checker's flags)."""
        return GuidedPipelineOutput(images=images, nfe=sum(nfe_per_image) / len(nfe_per_image),
                                    nfe_per_image=nfe_per_image, guidance_state=state, guidance=guide.to_dict(),
                                    sampler=sampler or "auto", **extra)

    @classmethod
    def from_pretrained(cls, *args: Any, reference_unet=None, **kwargs: Any):
        """The stock ``from_pretrained``, plus ``reference_unet=``: the autoguidance reference
        network (a weaker model of the same family taking the same conditioning)."""
        pipe = super().from_pretrained(*args, **kwargs)
        pipe._reference_unet = reference_unet
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, reference_unet=None, **kwargs: Any):
        """The stock ``from_pipe``, plus ``reference_unet=`` as in :meth:`from_pretrained`."""
        pipe = super().from_pipe(pipeline, **kwargs)
        pipe._reference_unet = reference_unet if reference_unet is not None else \
            getattr(pipeline, "_reference_unet", None)
        return pipe

    def reference_network(self, guide: Guidance, reference_unet=None):
        """The reference network an autoguidance method needs (None when it needs none): the
        call's ``reference_unet=``, else the one given to ``from_pretrained``/``from_pipe``, else
        a ``reference_unet/`` subfolder of the loaded model directory (loaded once). Put on the
        main network's device and dtype. None when absent: ``check_supports`` then says so."""
        if not any(branch.network == "reference" for branch in guide.altered_branches()):
            return None
        network = reference_unet if reference_unet is not None else getattr(self, "_reference_unet", None)
        if network is None:
            from pathlib import Path

            folder = Path(str(getattr(self, "name_or_path", "") or "")) / self.reference_subfolder
            if (folder / "config.json").is_file():
                main = self.unet if getattr(self, "unet", None) is not None else self.transformer
                network = type(main).from_pretrained(folder).eval()
                self._reference_unet = network
        if network is None:
            return None
        main = self.unet if getattr(self, "unet", None) is not None else self.transformer
        param = next(main.parameters())
        return network.to(device=param.device, dtype=param.dtype)

    def resolve_guidance(self, guidance: GuidanceSpec, guidance_scale: float | None,
                         guidance_rescale: float = 0.0) -> Guidance:
        """``guidance=None`` is CFG at ``guidance_scale`` (the stock behaviour). A method name or
        dict takes ``guidance_scale`` as its ``scale`` when given; an object must carry its own."""
        if guidance is None:
            scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
            return conditions.stock_guidance(scale, guidance_rescale)
        if isinstance(guidance, Guidance):
            if guidance_scale is not None or guidance_rescale:
                raise ValueError("guidance_scale/guidance_rescale: set them on the guidance object itself, "
                                 f"got guidance={guidance!r} and guidance_scale={guidance_scale!r}")
            return guidance
        overrides: dict[str, Any] = {}
        if guidance_scale is not None:
            overrides["scale"] = guidance_scale
        if guidance_rescale:
            overrides["rescale"] = guidance_rescale
        return resolve_guidance(guidance, **overrides)

    def encode_prompt(self, *args: Any, **kwargs: Any):
        """The stock ``encode_prompt``, one call at a time: transformers' fast tokenizers are not
        thread-safe (a concurrent call can return unpadded ids), and the stock method tokenizes
        twice. The text encoders' forwards are short next to sampling."""
        with TEXT_LOCK:
            return super().encode_prompt(*args, **kwargs)

    def truncated_prompts(self, **texts: str | list[str] | None) -> list[str]:
        """One sentence per prompt longer than the text encoder reads (``texts``: parameter name ->
        prompt(s)), each also issued as a :class:`PromptTruncatedWarning`. The stock pipelines cut
        such prompts with a log line the CLI does not show; this says it where people look."""
        tokenizer = getattr(self, "tokenizer", None)
        limit = getattr(tokenizer, "model_max_length", None)
        if tokenizer is None or not isinstance(limit, int) or limit <= 0:
            return []
        messages = []
        for name, value in texts.items():
            listed = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []
            for text in (item for item in listed if isinstance(item, str)):  # types are checked elsewhere
                with TEXT_LOCK:
                    ids = tokenizer(text, truncation=False)["input_ids"]
                if len(ids) > limit:
                    cut = tokenizer.decode(ids[limit - 1:], skip_special_tokens=True)
                    messages.append(f"{name}: {text!r} is {len(ids)} tokens, the text encoder reads {limit} "
                                    f"(with start and end tokens); cut: {cut!r}")
        for message in messages:  # at the caller of pipe(...) (through torch's no_grad wrapper)
            warnings.warn(message, PromptTruncatedWarning, stacklevel=5)
        return messages

    @staticmethod
    def prompt_batch_size(prompt, prompt_embeds) -> int:
        """The number of prompts of a call: a string is one, a list must hold at least one string
        (checked before any model call); without a prompt, the rows of ``prompt_embeds``."""
        if prompt is None:
            if prompt_embeds is None:
                raise ValueError("prompt: give a prompt (a string or a list of strings) or prompt_embeds=")
            return int(prompt_embeds.shape[0])
        if isinstance(prompt, str):
            return 1
        if not isinstance(prompt, list) or not prompt or not all(isinstance(text, str) for text in prompt):
            raise ValueError(f"prompt: must be a string or a non-empty list of strings, got {prompt!r}")
        return len(prompt)

    def check_prompted_call(self, guide: Guidance, prompt, prompt_embeds, latent_shape: tuple[int, ...], *,
                            num_images_per_prompt: int, **run: Any) -> tuple[int, tuple[int, ...]]:
        """(prompts, output latents' shape) of a text-to-image call, after :meth:`check_call`:
        ``latent_shape`` is one image's (C, H, W); the rows are prompts x images per prompt."""
        batch_size = self.prompt_batch_size(prompt, prompt_embeds)
        rows = batch_size * num_images_per_prompt if isinstance(num_images_per_prompt, int) else 0
        shape = (rows, *latent_shape)
        self.check_call(guide, shape=shape, num_images_per_prompt=num_images_per_prompt, **run)
        return batch_size, shape

    def check_call(self, guide: Guidance, *, shape: tuple[int, ...], num_images_per_prompt: int = 1,
                   num_inference_steps: int, timesteps=None, sigmas=None, sampler: str | None, eta: float | None,
                   generator, latents: torch.Tensor | None, output_type: str,
                   start: ImageInput | None = None) -> None:
        """Every check of a call that needs no network, made before any prompt is encoded:
        images per prompt, output type, the run's settings (steps against the scheduler's training
        steps, sampler, eta, a method's need of a stochastic sampler or of a pure-noise start), one
        generator per image, the shape of ``latents``. ``shape``: the latents of the output images
        (before a particle method's K rows per image)."""
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type: must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
        check_run(guide, self.scheduler, num_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                  sampler=sampler, eta=eta, image_strength=None if start is None else start.noised_strength())
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"generator: a list needs one generator per image ({shape[0]}), got {len(generator)}")
        if latents is not None:
            k = guide.group_size()
            accepted = [tuple(shape)] + ([(shape[0] * k, *shape[1:])] if k > 1 else [])
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) not in accepted:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"latents: expected a tensor of shape {' or '.join(map(str, accepted))}, got {got}")

    @staticmethod
    def for_prompts(guide: Guidance, negative_prompt, negative_prompt_embeds) -> Guidance:
        """The method for this call: LinearAG, fitted on the empty prompt, falls back to AG when
        a negative prompt is given."""
        if negative_prompt is not None or negative_prompt_embeds is not None:
            return guide.with_negative_prompt()
        return guide

    @staticmethod
    def initial_noise(shape: tuple[int, ...], generator, device, dtype, latents: torch.Tensor | None) -> torch.Tensor:
        """Unit Gaussian noise drawn as diffusers' ``prepare_latents`` draws it (or ``latents``)."""
        if latents is not None:
            if tuple(latents.shape) != tuple(shape):
                raise ValueError(f"latents: expected shape {tuple(shape)}, got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=dtype)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def denoise(self, branches: NetworkBranches, guide: Guidance, shape: tuple[int, ...], *, dtype: torch.dtype,
                device: torch.device, generator, latents: torch.Tensor | None, particle_output: str,
                start: ImageInput | None = None, **core_kwargs: Any) -> tuple[torch.Tensor, list[int], Any]:
        """Draw the initial noise and run the core; returns (latents to decode, NFEs per output
        image, the method's final state). With a particle method every image becomes a group of
        K consecutive rows (conditions, noise, generators, the input image), and "draw" keeps one
        per group (the method's ``output_rows``); ``latents`` may then hold one row per image
        (repeated) or one per particle.
        ``start``: the input image of img2img / inpainting, encoded here before the noise is
        drawn (the stock pipelines' order of draws from ``generator``)."""
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"generator: a list needs one generator per image ({shape[0]}), got {len(generator)}")
        particles = self.particle_count(guide)
        image = None
        if start is not None:
            image, latents = start.prepare(self, branches, shape, particles, dtype=dtype, device=device,
                                           generator=generator, latents=latents)
        if particles > 1:
            generator = self.repeat_for_particles(branches, generator, particles)
            if latents is not None and latents.shape[0] == shape[0]:
                latents = latents.repeat_interleave(particles, dim=0)
            if image is not None:
                mask = image.mask
                if mask is not None and mask.shape[0] == shape[0]:
                    mask = mask.repeat_interleave(particles, dim=0)
                image = dataclasses.replace(image, latents=image.latents.repeat_interleave(particles, dim=0),
                                            mask=mask)
            shape = (shape[0] * particles, *shape[1:])
        noise = self.initial_noise(shape, generator, device, dtype, latents)
        result = self._run_core(branches, noise, guide, generator=generator, image=image, **core_kwargs)
        if particles == 1:
            return result.x, result.nfe_per_sample, result.state
        x, nfe_per_image = self.select_particles(result, guide, particle_output)
        return x, nfe_per_image, result.state

    def image_to_latents(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """Scaled latents of [-1, 1] images, as the stock SD img2img pipeline encodes its input."""
        return self.vae.config.scaling_factor * self.posterior_sample(pixels, generator)

    def posterior_sample(self, pixels: torch.Tensor, generator, mean: bool = False) -> torch.Tensor:
        """Unscaled VAE latents of [-1, 1] images, the posterior sampled with ``generator`` (one
        generator per row when a list), or its mean when ``mean``."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

        if mean:
            return retrieve_latents(self.vae.encode(pixels), sample_mode="argmax")
        if isinstance(generator, list):
            return torch.cat([retrieve_latents(self.vae.encode(pixels[i:i + 1]), generator=generator[i])
                              for i in range(pixels.shape[0])])
        return retrieve_latents(self.vae.encode(pixels), generator=generator)

    @staticmethod
    def check_particle_output(particle_output: str) -> str:
        """The output rule of a particle method: "draw" (one image per group, drawn by the final
        normalised weights) or "all" (every particle). "best", the old name, means "draw"."""
        if particle_output == "best":
            warnings.warn("particle_output='best' is now called 'draw': one particle per group drawn by its "
                          "final weight (a fair draw from the weighted population, not an argmax)",
                          FutureWarning, stacklevel=3)
            return "draw"
        if particle_output not in PARTICLE_OUTPUTS:
            raise ValueError(f"particle_output: must be one of {', '.join(map(repr, PARTICLE_OUTPUTS))}, "
                             f"got {particle_output!r}")
        return particle_output

    def _run_core(self, branches: NetworkBranches, noise: torch.Tensor, guidance: Guidance, *, sampler: str | None,
                    num_inference_steps: int, timesteps, sigmas, eta: float | None, generator,
                    callback_on_step_end, callback_on_step_end_tensor_inputs: list[str],
                    callback_tensors: Mapping[str, tuple[str, str]],
                    set_timesteps_kwargs: Mapping[str, Any] | None = None,
                    image: StartImage | None = None) -> SampleResult:
        """Run the core on this pipeline's scheduler, adapting ``callback_on_step_end``.

        ``callback_tensors`` maps a callback tensor name to (branch, conditioning key) so that a
        callback can read and replace conditioning tensors, as with the stock pipelines.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback: Callable[[StepRecord], torch.Tensor | None] | None = None
        if callback_on_step_end is not None:
            def callback(record: StepRecord) -> torch.Tensor | None:
                kwargs = {}
                for name in callback_on_step_end_tensor_inputs:
                    if name == "latents":
                        kwargs[name] = record.x
                    else:
                        branch, key = callback_tensors[name]
                        kwargs[name] = branches.conditions[branch][key]
                # the stock pipelines number the steps they take (from 0 after img2img's truncation)
                outputs = callback_on_step_end(self, record.index - record.first, record.timestep, kwargs) or {}
                for name, (branch, key) in callback_tensors.items():
                    if name in outputs:
                        branches.conditions[branch][key] = outputs[name]
                return outputs.get("latents")
        branches.check_supports(guidance)
        progress = {**getattr(self, "_progress_bar_config", {})}
        prediction_type = "flow" if is_flow_scheduler(self.scheduler) else \
            self.scheduler.config.get("prediction_type", "epsilon")
        return sample(branches, noise, guidance, scheduler=self.scheduler, num_steps=num_inference_steps,
                      prediction_type=prediction_type, sampler=sampler, set_timesteps_kwargs=set_timesteps_kwargs,
                      eta=eta, generator=generator, timesteps=timesteps, sigmas=sigmas, callback=callback,
                      progress=progress or True, image=image)

    def set_attention(self, name: str) -> str:
        """Use attention processor ``name`` ("sdpa", "xformers", "triton") in the UNet; returns
        the one in effect ("sdpa" after a logged fallback when the kernel cannot run here)."""
        from guidance_engine.cuda.processors import set_attention

        return set_attention(self, name)

    @staticmethod
    def particle_count(guide: Guidance) -> int:
        """Rows per image: a particle method's group size (each image is a group of K particles), else 1."""
        return guide.group_size()

    @staticmethod
    def repeat_for_particles(branches: NetworkBranches, generator, k: int):
        """Give every image K consecutive rows (one particle each): conditions repeated in place, a
        generator list repeated so that an image's particles draw from that image's generator."""
        for condition in branches.conditions.values():
            for key, value in condition.items():
                condition[key] = value.repeat_interleave(k, dim=0)
        if isinstance(generator, list):
            return [g for g in generator for _ in range(k)]
        return generator

    @staticmethod
    def select_particles(result: SampleResult, guide: Guidance, particle_output: str
                         ) -> tuple[torch.Tensor, list[int]]:
        """The latents to decode and each output image's NFE count (its whole group's work)."""
        k = guide.group_size()
        per_image = [sum(result.nfe_per_sample[i:i + k]) for i in range(0, len(result.nfe_per_sample), k)]
        if particle_output == "all":
            return result.x, [n for n in per_image for _ in range(k)]
        rows = guide.output_rows(result.state)
        return result.x[rows.to(result.x.device)], per_image

