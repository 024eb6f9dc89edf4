"""What the guided pipelines share: resolving ``guidance=``, the per-call attributes and the
callback adapter, and the call into the sampler core (the batched branch model is
:mod:`.branches`). Pipelines stay thin adapters."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from guidance_engine.guidance import Guidance, GuidedPrediction, StepInfo
from guidance_engine.interop import from_diffusers_guider, is_diffusers_guider
from guidance_engine.prediction import Prediction
from guidance_engine.registry import resolve_guidance
from guidance_engine.samplers import SampleResult, StartImage, StepRecord, sample
from guidance_engine.samplers.loop import check_run, normalize_requests
from guidance_engine.samplers.schedule import is_flow_scheduler

if TYPE_CHECKING:
    from .image_input import ImageInput

from . import conditions
from .branches import NetworkBranches
from .distilled import is_guidance_distilled
from .messages import PromptTruncatedWarning

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



#: The calls running in this context (a thread, or an asyncio task): pipeline id -> that call's
#: per-call attributes (:class:`CallAttribute`). A call adds its own for its duration and takes
#: them out at its end, so calls in two threads, or a call made inside another's callback, stay apart.
_RUNNING_CALLS: ContextVar[Mapping[int, dict[str, Any]] | None] = ContextVar("guidance_engine_calls", default=None)


def call_values(pipe: Any) -> dict[str, Any]:
    """The per-call attributes that ``pipe`` shows in this context: those of its call running
    here, else those its last finished call left (and what was assigned outside calls)."""
    running = _RUNNING_CALLS.get()
    if running is not None and id(pipe) in running:
        return running[id(pipe)]
    return pipe.__dict__.setdefault("_last_call_attributes", {})


class CallAttribute:
    """One of the stock pipelines' per-call attributes (``pipe._guidance_scale``, read by the
    stock ``guidance_scale`` and ``do_classifier_free_guidance`` properties and written by
    diffusers' cutoff callbacks; ``_num_timesteps``, ``_interrupt``, ...), held per call instead of
    on the shared pipeline object (the stock design, which two threads calling one pipeline break).

    During a call, reads and writes in that call's context (its callbacks run there) see that
    call's own values; outside calls, those of the call that finished last, as a stock pipeline
    keeps them (a thread that reads them after its own call, while another thread's call finishes,
    may see that one's: read them in a callback, or use the output). A write from another thread
    does not reach a running call: interrupt a run from its callback (``pipe._interrupt = True``).
    A name that no call has set raises AttributeError, as on the stock pipeline."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, pipe: Any, owner: type | None = None) -> Any:
        if pipe is None:
            return self
        values = call_values(pipe)
        if self.name not in values:
            raise AttributeError(f"'{type(pipe).__name__}' object has no attribute '{self.name}'")
        return values[self.name]

    def __set__(self, pipe: Any, value: Any) -> None:
        call_values(pipe)[self.name] = value


class RunGuidance:
    """The method of one run as the core sees it (a per-run object, never shared): the call's
    method until a callback switches it (:meth:`GuidedPipelineMixin.guidance_after_write`: the
    cutoff callbacks' ``_guidance_scale = 0``), then the switched one for the remaining steps; the
    frozen method objects are never changed. It notes what the core keeps in its loop and a run
    stopped by ``_interrupt`` must return: the method's per-run state (created, and selected after
    particle resampling) and each sample's network evaluations, counted as the core counts them
    (one per requested branch and row); and, at the first step, the steps the run takes
    (``_num_timesteps``, as the stock ``len(timesteps)`` after img2img's truncation)."""

    def __init__(self, method: Guidance, values: dict[str, Any]) -> None:
        self.call_method = method  # what the call asked for: switches are derived from it
        self.method = method  # in force for the coming steps
        self.values = values  # the call's per-call attributes
        self.state: Any = None
        self._row_nfe: torch.Tensor | None = None  # evaluations of some rows, per sample
        self._all_nfe = 0  # evaluations of every row: a Python count, no tensor op per step

    def __getattr__(self, name: str) -> Any:  # renoise_split, check_steps, combine, after_step, ...
        method = self.__dict__.get("method")
        if method is None:  # not yet initialised (a copy being made)
            raise AttributeError(name)
        return getattr(method, name)

    @property
    def name(self) -> str:
        """The call's method (error messages name what the user asked for)."""
        return self.call_method.name

    @property
    def nfe(self) -> torch.Tensor:
        """Each sample's network evaluations so far."""
        return self._row_nfe + self._all_nfe

    def init_state(self, batch_size: int, device: torch.device) -> Any:
        self._row_nfe = torch.zeros(batch_size, dtype=torch.long, device=device)  # on the rows' device: no sync
        self._all_nfe = 0
        self.state = self.method.init_state(batch_size, device)
        return self.state

    # the per-step calls, defined here rather than found through __getattr__ at every step
    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        return self.method.combine(preds, step, state)

    def after_step(self, x: torch.Tensor, preds: Mapping[str, Prediction], guided: GuidedPrediction,
                   step: StepInfo, state: Any) -> torch.Tensor | None:
        return self.method.after_step(x, preds, guided, step, state)

    def branches(self, step: StepInfo, state: Any) -> Any:
        self.values.setdefault("_num_timesteps", step.num_steps - step.index)  # set at the first step taken
        requests = self.method.branches(step, state)
        if isinstance(requests, tuple):  # names: every row of each
            self._all_nfe += len(requests)
            return requests
        for _, rows in normalize_requests(requests):
            if rows is None:
                self._all_nfe += 1
            else:
                self._row_nfe[rows] += 1
        return requests

    def select_state(self, state: Any, keep: torch.Tensor) -> Any:
        self._row_nfe, self._all_nfe = self.nfe[keep], 0
        self.state = self.method.select_state(state, keep)
        return self.state


class RunInterrupted(Exception):
    """A callback set ``_interrupt``: the stock loops skip the remaining steps (``continue``) and
    decode the latents as they are, which the core's run then returns (``x``: the latents after the
    step, or what the callback replaced them with; ``denoised``: that step's guided x0)."""

    def __init__(self, x: torch.Tensor, denoised: torch.Tensor) -> None:
        super().__init__("interrupted by a callback (_interrupt = True)")
        self.x, self.denoised = x, denoised


def written_condition(given: torch.Tensor, written: Any) -> Any:
    """The conditioning a branch keeps after a callback returned ``written`` for ``given``.

    The engine hands a callback each branch's own rows (``prompt_embeds``: the conditional rows),
    which in the stock CFG layout ``[uncond; cond]`` are its last rows; the stock cutoff callbacks
    cut that layout to its last rows (``prompt_embeds[-1:]``) to keep the conditional ones. A
    cut of ``given`` to its own last rows therefore keeps all of ``given``: with one image, what
    stock keeps; with several, every image's own prompt (where stock keeps one row, which fits no
    batch). Anything else (and any value of a conditioning that is no tensor) replaces it as it is."""
    if not isinstance(given, torch.Tensor) or not isinstance(written, torch.Tensor) or \
            written.dim() != given.dim() or written.shape[1:] != given.shape[1:]:
        return written
    rows = written.shape[0]
    if 0 < rows < given.shape[0] and torch.equal(written, given[-rows:]):  # one host read, at the cut only
        return given
    return written


class GuidedPipelineMixin:
    """Shared call logic of the guided pipelines (mixed into subclasses of the stock ones).

    The stock per-call attributes that the stock properties and diffusers' callbacks read
    (``guidance_scale``, ``do_classifier_free_guidance``, ``num_timesteps``, ``interrupt``, ...)
    are each call's own (:class:`CallAttribute`), set when its run starts
    (:meth:`call_attributes`); the writes the stock callbacks make act as in stock
    (:meth:`_run_core`)."""

    # The stock per-call attributes, each call's own (read and written through CallAttribute).
    _guidance_scale = CallAttribute()
    _guidance_scale_2 = CallAttribute()  # Wan 2.2's second expert
    _image_guidance_scale = CallAttribute()  # InstructPix2Pix
    _guidance_rescale = CallAttribute()
    _clip_skip = CallAttribute()
    _cross_attention_kwargs = CallAttribute()
    _joint_attention_kwargs = CallAttribute()
    _attention_kwargs = CallAttribute()
    _interrupt = CallAttribute()
    _num_timesteps = CallAttribute()
    _current_timestep = CallAttribute()
    _denoising_start = CallAttribute()  # SDXL
    _denoising_end = CallAttribute()
    _skip_layer_guidance_scale = CallAttribute()  # SD3
    _cfg_normalization = CallAttribute()  # Z-Image
    _cfg_truncation = CallAttribute()

    default_guidance_scale: float = 7.5
    #: The method's scale minus the stock ``guidance_scale`` that ``_guidance_scale`` holds (0; Z-Image's
    #: stock s is the engine's w - 1).
    stock_scale_offset: float = 0.0
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

    def set_max_batch_rows(self, max_batch_rows: int | None) -> None:
        """Run each step's branches in network calls of at most ``max_batch_rows`` rows (None, the
        default: every branch of a step in one batched call, or the family's stock layout). A
        3-branch method then fits where CFG fits: e.g. 2 for one image. The results equal the
        one-call run within float32 rounding (a network's rows may round differently in another
        batch size; bit for bit where the layout does not change). ValueError for anything but
        None or an integer >= 1."""
        if max_batch_rows is not None and (isinstance(max_batch_rows, bool) or not isinstance(max_batch_rows, int)
                                           or max_batch_rows < 1):
            raise ValueError(f"max_batch_rows: must be None or an integer >= 1, got {max_batch_rows!r}")
        self._max_batch_rows = max_batch_rows

    def _checked_batch_rows(self, guidance: Guidance, rows: int) -> int | None:
        """The pipeline's ``max_batch_rows`` for a run of ``rows`` samples, refused before any
        model call where the method's branches cannot be split: TSG's time noise (scaled by the std
        over a branch's rows) on more rows than the limit; SAG's probe (it reads one attention map
        over the whole batch)."""
        limit = getattr(self, "_max_batch_rows", None)
        if limit is None:
            return None
        for branch in guidance.altered_branches():
            if branch.time_noise > 0 and rows > limit:
                raise ValueError(f"max_batch_rows: {guidance.name!r} adds noise to branch {str(branch)!r} scaled by "
                                 f"the std over its {rows} rows, which cannot be split into calls of {limit}; raise "
                                 f"max_batch_rows to at least {rows}")
            if branch.probe is not None and rows * len(guidance.required_branches()) > limit:
                raise ValueError(f"max_batch_rows: {guidance.name!r} reads an attention map over all of a step's rows "
                                 f"(up to {rows * len(guidance.required_branches())}), which cannot be split into "
                                 f"calls of {limit}; raise max_batch_rows or set it to None")
        return limit

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
        dict takes ``guidance_scale`` as its ``scale`` when given; an object (the engine's, or a
        diffusers guider, mapped exactly: :mod:`guidance_engine.interop`) must carry its own."""
        if guidance is None:
            scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
            return conditions.stock_guidance(scale, guidance_rescale)
        if isinstance(guidance, Guidance):
            if guidance_scale is not None or guidance_rescale:
                raise ValueError("guidance_scale/guidance_rescale: set them on the guidance object itself, "
                                 f"got guidance={guidance!r} and guidance_scale={guidance_scale!r}")
            return guidance
        if is_diffusers_guider(guidance):  # a diffusers guider object (diffusers.guiders): its exact engine mapping
            if guidance_scale is not None or guidance_rescale:
                raise ValueError("guidance_scale/guidance_rescale: set them on the diffusers guider itself, "
                                 f"got guidance={type(guidance).__name__} and guidance_scale={guidance_scale!r}")
            prediction_type = "flow" if is_flow_scheduler(self.scheduler) else \
                self.scheduler.config.get("prediction_type", "epsilon")
            return from_diffusers_guider(guidance, prediction_type=prediction_type)
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
                    image: StartImage | None = None, call_attributes: Mapping[str, Any] | None = None
                    ) -> SampleResult:
        """Run the core on this pipeline's scheduler, adapting ``callback_on_step_end``.

        ``callback_tensors`` maps a callback tensor name to (branch, conditioning key) so that a
        callback can read and replace conditioning tensors, as with the stock pipelines.
        ``call_attributes``: the family's own per-call attribute values (:meth:`call_attributes`).
        The run is one call's scope of per-call attributes; a callback that sets ``_interrupt``
        ends it after that step (the latents as they are), as the stock loops skip the rest.
        """
        values = self.call_attributes(guidance, branches, call_attributes)
        run = RunGuidance(guidance, values)
        callback = None
        if callback_on_step_end is not None:
            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
            callback = self._step_end_adapter(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                              callback_tensors, branches, run)
        branches.check_supports(guidance)
        branches.max_batch_rows = self._checked_batch_rows(guidance, noise.shape[0])
        progress = {**getattr(self, "_progress_bar_config", {})}
        prediction_type = "flow" if is_flow_scheduler(self.scheduler) else \
            self.scheduler.config.get("prediction_type", "epsilon")
        with self.call_scope(values):
            try:
                result = sample(branches, noise, run, scheduler=self.scheduler, num_steps=num_inference_steps,
                                prediction_type=prediction_type, sampler=sampler,
                                set_timesteps_kwargs=set_timesteps_kwargs, eta=eta, generator=generator,
                                timesteps=timesteps, sigmas=sigmas, callback=callback, progress=progress or True,
                                image=image)
            except RunInterrupted as stop:
                result = SampleResult(x=stop.x, denoised=stop.denoised, nfe=float(run.nfe.float().mean()),
                                      nfe_per_sample=run.nfe.tolist(), state=run.state)
            values["_current_timestep"] = None  # as the stock loops leave it
        return result

    def call_attributes(self, guidance: Guidance, branches: NetworkBranches,
                        family: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The per-call attributes a run starts with, as the stock ``__call__`` sets them before its
        loop: ``_guidance_scale`` is the method's ``scale`` less :attr:`stock_scale_offset`
        (``guidance=None``: the stock CFG scale, ``guidance_scale``; a named method: its scale),
        ``_interrupt`` False, the attention kwargs under the name this stock class reads them, then
        the family's own values (``family``: ``_clip_skip``, ``_guidance_rescale``, Flux's embedded
        ``_guidance_scale``, ...), which replace these.
        ``_num_timesteps`` is set at the first step (:class:`RunGuidance`), ``_current_timestep`` at
        each callback (None after the run)."""
        scale = guidance.scale if guidance.scale is None else guidance.scale - self.stock_scale_offset
        values: dict[str, Any] = {"_guidance_scale": scale, "_interrupt": False, "_current_timestep": None}
        for name in ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs"):
            if isinstance(getattr(type(self), name, None), property):
                values[f"_{name}"] = branches.cross_attention_kwargs
        return {**values, **(family or {})}

    @contextlib.contextmanager
    def call_scope(self, values: dict[str, Any]):
        """``values`` are this pipeline's per-call attributes in this context for the duration (a
        call made inside it, e.g. from a callback, has its own scope and restores these after);
        afterwards they are what the pipeline shows outside calls (:class:`CallAttribute`)."""
        token = _RUNNING_CALLS.set({**(_RUNNING_CALLS.get() or {}), id(self): values})
        try:
            yield values
        finally:
            _RUNNING_CALLS.reset(token)
            self.__dict__["_last_call_attributes"] = values

    def guidance_after_write(self, guide: Guidance, written: Any) -> Guidance | None:
        """The method for the remaining steps after a callback set ``_guidance_scale`` to
        ``written`` (``guide``: the call's method), as the stock loop reads that value at each step.
        Where the stock class decides by ``do_classifier_free_guidance`` (SD, SDXL, SD3, Z-Image,
        Wan, ...): the conditional prediction alone (CFG at 1, one forward per step) once it reads
        false (the cutoff callbacks' ``0.0``), whatever the method (its guidance is off, as outside
        its interval); else ``guide`` at scale ``written`` plus :attr:`stock_scale_offset` (stock:
        CFG at the new scale; ValueError outside the method's range). None (no change) where the
        stock class has no such property (Flux, Flux.2 dev, Qwen-Image embed the value before their
        loop: writing it changes nothing), and on a guidance-distilled UNet (:mod:`.distilled`)."""
        if not isinstance(getattr(type(self), "do_classifier_free_guidance", None), property):
            return None
        if getattr(self, "unet", None) is not None and is_guidance_distilled(self.unet):
            return None  # stock embeds the scale before its loop and never guides: a write changes nothing
        if not self.do_classifier_free_guidance:
            return conditions.stock_guidance(1.0)
        return guide.new(scale=written + self.stock_scale_offset)

    def _step_end_adapter(self, callback_on_step_end: Callable[..., Mapping[str, Any] | None],
                          tensor_inputs: Sequence[str], callback_tensors: Mapping[str, tuple[str, str]],
                          branches: NetworkBranches, run: RunGuidance) -> Callable[[StepRecord], torch.Tensor | None]:
        """The core's callback for ``callback_on_step_end(pipe, step, timestep, tensors)``: hands it
        ``tensor_inputs`` (``latents``, each conditioning name through ``callback_tensors``), keeps
        what it returns (:func:`written_condition`), and applies its writes: ``_guidance_scale``
        (:meth:`guidance_after_write`), ``_interrupt`` (:class:`RunInterrupted`)."""
        values = run.values

        def conditioning(name: str) -> torch.Tensor:
            branch, key = callback_tensors[name]
            return branches.conditions[branch][key]

        def callback(record: StepRecord) -> torch.Tensor | None:
            values["_current_timestep"] = record.timestep  # the stock loops set it as a step starts
            given = {name: record.x if name == "latents" else conditioning(name) for name in tensor_inputs}
            scale = values.get("_guidance_scale")
            # the stock pipelines number the steps they take (from 0 after img2img's truncation); the
            # stock callbacks change the dict they are given and return it: theirs is a copy
            outputs = callback_on_step_end(self, record.index - record.first, record.timestep, dict(given)) or {}
            for name, (branch, key) in callback_tensors.items():
                if name in outputs:
                    condition = branches.conditions[branch]
                    condition[key] = written_condition(condition[key], outputs[name])
            if values.get("_guidance_scale") != scale:
                switched = self.guidance_after_write(run.call_method, values["_guidance_scale"])
                run.method = run.method if switched is None else switched
            latents = outputs.get("latents")
            if values.get("_interrupt"):
                raise RunInterrupted(record.x if latents is None else latents, record.denoised)
            return latents
        return callback

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

