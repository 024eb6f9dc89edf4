"""``GuidedWanPipeline``: the stock Wan 2.1 / 2.2 text-to-video pipeline (flow matching; a video
DiT, ``WanTransformer3DModel``, on 5-D latents (batch, channels, frames, height, width) patchified
inside the model, UMT5 embeddings of the prompt, Wan's 3-D causal VAE) with the engine's sampler core.

The stock recipe (diffusers 0.42.1 ``WanPipeline.__call__``), reproduced bit for bit by
``guidance=None``: the conditional and unconditional (negative or empty prompt) predictions in
separate forwards, the conditional first, combined as ``u + s (c - u)`` when ``guidance_scale`` s
> 1 (else the conditional forward alone); latents drawn in float32 and cast to the transformer's
dtype for each forward, the timestep broadcast per row (per token with Wan 2.2 TI2V's
``expand_timesteps``); the pipeline's scheduler stepped with ``scheduler.step`` (Wan's
``UniPCMultistepScheduler`` with flow sigmas, which the core reads as a flow schedule,
x = (1 - s) x0 + s eps); decoding ``z * std + mean`` per channel through the VAE.

Wan 2.2 A14B has two experts: ``transformer`` on the high-noise steps (t >= ``boundary_ratio`` x
the scheduler's training steps) and ``transformer_2`` below, where the stock CFG uses
``guidance_scale_2`` (default: ``guidance_scale``). The branch model picks the expert per step
from the timestep, as the stock loop; the stock two-scale CFG is :class:`TwoExpertCFG`. A method
(``guidance="apg"``, ...) runs with its own scale on both experts, or per expert with a ``phases``
schedule (``schedule="phases(timesteps=[875], values=[3.0])"``); ``guidance_scale_2`` goes with
``guidance=None`` only.

Layer methods alter Wan's blocks through :mod:`.wan_attention`: SLG/STG's skipped blocks, PAG's
identity and SEG's per-frame blurred queries on the video self-attention, NAG on the
cross-attention, TSG's noise on the time-step MLP (``condition_embedder.time_embedder``); SAG is
refused. Deviations from the stock pipeline: given ``prompt_embeds`` / ``negative_prompt_embeds``
are repeated per video (the stock call fails with ``num_videos_per_prompt > 1`` there). The stock
per-call attributes (``pipe.guidance_scale``, ``pipe.num_timesteps``, ``interrupt``) are each
call's own (:class:`~.common.CallAttribute`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
from diffusers import WanPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils import logging
from diffusers.utils.torch_utils import get_module_execution_device

from guidance_engine.guidance import Branch, Guidance, GuidedPrediction, StepInfo, param
from guidance_engine.prediction import Prediction

from . import conditions
from .common import TEXT_LOCK, GuidanceSpec, GuidedPipelineMixin
from .context_attention import BoundContext
from .flow_transformer import negative_prompt_texts
from .messages import PromptTruncatedWarning
from .video_branches import GuidedVideoPipelineOutput, VideoTransformerBranches
from .wan_attention import VideoTokens, install_dispatcher, resolve_wan_layers, video_tokens

__all__ = ["ExpertBoundary", "GuidedWanPipeline", "GuidedWanPipelineOutput", "TwoExpertCFG", "WanBranches"]

logger = logging.get_logger(__name__)

#: The stock ``guidance_scale`` (what ``guidance=None`` uses when it is not given).
STOCK_GUIDANCE_SCALE = 5.0
#: The callback names of the branch embeddings, as the stock pipeline passes them.
CALLBACK_TENSORS = {"prompt_embeds": ("cond", "encoder_hidden_states"),
                    "negative_prompt_embeds": ("uncond", "encoder_hidden_states")}


def check_embeddings(prompts: int, **embeddings: torch.Tensor | None) -> None:
    """ValueError (before any model call) unless each given embedding is a (prompts, tokens, width) tensor."""
    for name, embeds in embeddings.items():
        if embeds is not None and (not isinstance(embeds, torch.Tensor) or embeds.ndim != 3
                                   or embeds.shape[0] != prompts):
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{name}: expected a (prompts, tokens, width) tensor with {prompts} rows (one per "
                             f"prompt), got {got}")


@dataclass(frozen=True)
class ExpertBoundary:
    """Where Wan 2.2's experts switch: the high-noise expert while the step's timestep t >=
    ``timestep``, the low-noise one below; None: one expert (Wan 2.1). ``timestep`` is
    ``boundary_ratio * num_train_timesteps`` rounded to float32, the precision in which the stock
    ``t >= boundary`` compares a UniPC (int64) or FlowMatch (float32) timestep tensor with it."""

    timestep: float | None = None

    @classmethod
    def of(cls, boundary_ratio: float | None, num_train_timesteps: int) -> ExpertBoundary:
        if boundary_ratio is None:
            return cls()
        return cls(float(torch.tensor(boundary_ratio * num_train_timesteps, dtype=torch.float32)))

    def high_noise(self, t: float) -> bool:
        """Whether step timestep ``t`` (a Python number) belongs to the high-noise expert."""
        return self.timestep is None or t >= self.timestep


@dataclass(frozen=True, kw_only=True)
class TwoExpertCFG(Guidance):
    """Wan 2.2's stock CFG: ``u + s (c - u)`` (CFG's lerp, :meth:`Guidance.away_from`) with s =
    ``scale`` on the high-noise expert's steps and ``scale_2`` on the low-noise expert's, both
    forwards at every step (as the stock loop, which also runs them where a scale is 1). The stock
    recipe of this pipeline, not a registered method (so it lives here, importing no method).
    CFG with ``schedule="phases(timesteps=[boundary], values=[scale_2])"`` equals it except at
    ``scale_2`` = 1, where CFG runs the conditional forward alone (c, not the stock u + 1 (c - u))."""

    name: ClassVar[str] = "wan_two_expert_cfg"
    paper: ClassVar[str] = "Ho & Salimans 2022 (arXiv 2207.12598); Wan 2.2's per-expert scales (diffusers WanPipeline)"

    scale: float = param(STOCK_GUIDANCE_SCALE, low=0.0, high=100.0,
                         doc="CFG scale on the high-noise expert's steps (the stock guidance_scale)")
    scale_2: float = param(STOCK_GUIDANCE_SCALE, low=0.0, high=100.0,
                           doc="CFG scale on the low-noise expert's steps (the stock guidance_scale_2)")
    boundary: float = param(875.0, low=0.0, doc="the timestep from which the low-noise expert runs (t < boundary)")

    def scale_at(self, step: StepInfo) -> float:
        """The step's expert's scale (``schedule`` is not applied: the stock scales are constant)."""
        if not self.active(step):
            return self.neutral_scale
        return self.scale if ExpertBoundary(self.boundary).high_noise(step.timestep) else self.scale_2

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        return ("uncond", "cond") if self.active(step) else ("cond",)

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        return GuidedPrediction.single(self.away_from(preds, "uncond", step))


class WanBranches(VideoTransformerBranches):
    """The branch model over Wan's transformer(s). ``conditions[b]`` holds branch ``b``'s UMT5
    embeddings (``encoder_hidden_states``, already in the transformers' dtype ``dtype``, padded
    to the call's ``max_sequence_length``). Branches run in separate forwards, the conditional
    first (:class:`TransformerBranches`), each on the expert of the step's timestep: ``model``, or
    ``model_2`` below ``boundary``. Latents (float32 in the core) are cast to ``dtype`` as the
    stock loop casts them; ``expand_timesteps``: Wan 2.2 TI2V's per-token timesteps."""

    family = "GuidedWanPipeline"
    # SLG's skipped blocks, PAG's identity and SEG's blur on attn1, NAG on attn2 (.wan_attention);
    # TSG's noise on the time-step MLP; SAG's attention map is refused (VideoTransformerBranches).
    evaluates_crops = False  # its token layout (packing, positions) is the whole latent's
    perturbations = frozenset({"identity", "blur", "skip", "extrapolate"})
    time_noise = True
    resolve_layers = staticmethod(resolve_wan_layers)
    install_dispatcher = staticmethod(install_dispatcher)

    def __init__(self, model, conditions: dict[str, dict[str, torch.Tensor]], *, dtype: torch.dtype,
                 boundary: ExpertBoundary = ExpertBoundary(), model_2=None, expand_timesteps: bool = False,
                 attention_kwargs: dict[str, Any] | None = None, providers: Any = None, networks: Any = None) -> None:
        super().__init__(model, conditions, attention_kwargs, providers=providers, networks=networks)
        self.model_2 = model_2 if boundary.timestep is not None else None
        self.boundary = boundary
        self.dtype = dtype
        self.expand_timesteps = expand_timesteps

    def check_supports(self, guide: Guidance) -> None:
        super().check_supports(guide)
        if self.model_2 is None:
            return
        for branch in guide.altered_branches():  # the low-noise expert must have the layers too
            if branch.perturb is not None and branch.network is None:
                self.layers(self.model_2, branch.perturb, guide.name)

    def time_embeddings(self, model) -> list[Any]:
        """TSG's noise goes on the time-step MLP's output (the embedding before Wan projects it into
        the blocks' six modulation vectors and the output norm's shift and scale)."""
        return [model.condition_embedder.time_embedder]

    def time_noise_shape(self, model) -> tuple[int, ...] | None:
        """Wan 2.2 TI2V embeds each token's timestep (``expand_timesteps``): a row's shape is known
        in the forward only."""
        return None if self.expand_timesteps else super().time_noise_shape(model)

    def _evaluate(self, model, x: torch.Tensor, timestep: torch.Tensor, requests, probes=(),
                  plain: bool = False) -> dict[str, torch.Tensor]:
        if model is self.model and self.model_2 is not None and not self.boundary.high_noise(float(timestep)):
            model = self.model_2  # the stock choice of expert, once per step (one host read of t)
        return super()._evaluate(model, x, timestep, requests, probes, plain)

    def model_timesteps(self, timestep: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input, as the stock loop makes it: t per row, or (TI2V) t per
        token of the 2 x 2-subsampled latent grid."""
        rows = x_in.shape[0]
        if not self.expand_timesteps:
            return timestep.expand(rows)
        grid = torch.ones(x_in.shape[2:], dtype=torch.float32, device=x_in.device)[:, ::2, ::2]
        return (grid * timestep).flatten().unsqueeze(0).expand(rows, -1)

    def projected_context(self, model, branch):
        """``branch`` with a bound second context (NAG's negative prompt) projected by ``model``'s
        text embedding, as the layers it alters see their own context."""
        bound = branch.perturb
        if not isinstance(bound, BoundContext):
            return branch
        text = model.condition_embedder.text_embedder(bound.context["encoder_hidden_states"].to(self.dtype))
        return Branch(branch, base=branch.base, time_noise=branch.time_noise, generator=branch.generator,
                      perturb=BoundContext(bound.spec, {"encoder_hidden_states": text}), network=branch.network,
                      probe=branch.probe)

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        model = self.model if model is None else model
        for _, _, branch in spans:
            self.check_alterations(branch)
        spans = [(start, end, self.projected_context(model, branch)) for start, end, branch in spans]
        patch = model.config.patch_size
        layout = VideoTokens(*(size // p for size, p in zip(x_in.shape[2:], patch)))
        with self.altered(model, x_in, spans), video_tokens(layout):
            return model(hidden_states=x_in.to(self.dtype), timestep=self.model_timesteps(timestep, x_in),
                         encoder_hidden_states=stacked("encoder_hidden_states"),
                         attention_kwargs=self.cross_attention_kwargs, return_dict=False)[0]


#: The output of :class:`GuidedWanPipeline` (the video families' one class, under its earlier name).
GuidedWanPipelineOutput = GuidedVideoPipelineOutput


class GuidedWanPipeline(GuidedPipelineMixin, WanPipeline):
    """Wan 2.1 / 2.2 text-to-video with any guidance method of the engine.

    ``guidance=None`` is the stock recipe: CFG at ``guidance_scale`` (default 5.0; the conditional
    forward alone when <= 1), on Wan 2.2 A14B at ``guidance_scale_2`` on the low-noise expert's
    steps. With a method (``guidance="apg"``, a dict or an object), ``guidance_scale`` (when
    given) is its ``scale``; its unconditional branch is the negative prompt, else the empty prompt."""

    default_guidance_scale = STOCK_GUIDANCE_SCALE  # the stock default

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        max_sequence_length: int = 512,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        eta: float | None = None,
        particle_output: str = "draw",
        **kwargs: Any,
    ) -> GuidedWanPipelineOutput | tuple:
        """Generate videos. Arguments are the stock Wan pipeline's plus ``guidance``, ``sampler``,
        ``eta`` and ``particle_output`` as in :meth:`GuidedStableDiffusionPipeline.__call__`.

        Args:
            num_frames: frames of each video, an integer >= 1; rounded to ``4 k + 1`` (the VAE's
                temporal factor), with ``height`` / ``width`` rounded down to multiples of the
                VAE's spatial factor times the patch size, with the stock warnings.
            guidance_scale: with ``guidance=None``, the stock CFG scale in [0, 100] (None: the stock
                5.0; it guides only when > 1); with a method name or dict, that method's ``scale``
                (None: the method's default). Must not be set with a guidance object.
            guidance_scale_2: Wan 2.2 A14B's CFG scale on the low-noise expert's steps, in [0, 100]
                (None: ``guidance_scale``); only with ``guidance=None`` and a ``boundary_ratio`` (a
                method takes it as ``schedule="phases(timesteps=[boundary], values=[scale])"``).
            num_videos_per_prompt: videos per prompt, an integer >= 1.
            latents: float32 noise of shape (videos, channels, latent frames, height / 8, width / 8)
                at the real VAE's factors; ``callback_on_step_end`` sees and returns this shape.
            max_sequence_length: UMT5 tokens per prompt (padded with zeros to it, as stock), an
                integer >= 1; a longer prompt is cut, with a :class:`PromptTruncatedWarning`.
            reference_unet: (keyword) autoguidance's reference network, a weaker Wan transformer
                taking the same embeddings.

        Returns:
            :class:`GuidedWanPipelineOutput` (its ``frames`` as the stock output's), or ``(video,)``.
        """
        reference = kwargs.pop("reference_unet", None)
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {unsupported}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs, guidance_scale_2)
        boundary = self.check_video_call(num_videos_per_prompt=num_videos_per_prompt,
                                         max_sequence_length=max_sequence_length, num_frames=num_frames)
        num_frames, height, width = self.video_size(num_frames, height, width)
        particle_output = self.check_particle_output(particle_output)
        guide = self.for_prompts(self.call_guidance(guidance, guidance_scale, guidance_scale_2, boundary),
                                 negative_prompt, negative_prompt_embeds)
        WanBranches.check_method(guide)
        channels = self.transformer.config.in_channels
        latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        spatial = self.vae_scale_factor_spatial
        batch_size, shape = self.check_prompted_call(
            guide, prompt, prompt_embeds, (channels, latent_frames, height // spatial, width // spatial),
            num_images_per_prompt=num_videos_per_prompt, num_inference_steps=num_inference_steps, sampler=sampler,
            eta=eta, generator=generator, latents=latents, output_type=output_type)
        check_embeddings(batch_size, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        own_negative = conditions.negative_branch_inputs(guide, negative_prompt, negative_prompt_embeds, batch_size)
        if own_negative is not None:  # the negative prompt gets a branch of its own; "uncond" stays empty
            negative_prompt = negative_prompt_embeds = None
        negative = negative_prompt_texts(negative_prompt, negative_prompt_embeds, batch_size)
        cut = self.truncated_wan_prompts(max_sequence_length, prompt=prompt, negative_prompt=negative)

        def encode(texts, embeds) -> dict[str, torch.Tensor]:
            return self.prompt_condition(texts, embeds, num_videos_per_prompt, max_sequence_length)

        by_branch = {"cond": encode(prompt, prompt_embeds), "uncond": encode(negative, negative_prompt_embeds)}
        branches = WanBranches(
            self.transformer, by_branch, dtype=self.transformer.dtype, boundary=boundary, model_2=self.transformer_2,
            expand_timesteps=bool(self.config.expand_timesteps), attention_kwargs=attention_kwargs,
            networks={"reference": self.reference_network(guide, reference)})
        if own_negative is not None:
            conditions.add_negative_branch(branches, encode(*own_negative))
        conditions.add_text_branches(self, branches, guide, lambda texts: encode(texts, None), batch_size=batch_size,
                                     generator=generator)  # a method's own prompts; ICG's random ones
        video, nfe_per_image, state = self.denoise(
            branches, guide, shape, dtype=torch.float32, device=self._execution_device, generator=generator,
            latents=latents, particle_output=particle_output, sampler=sampler, num_inference_steps=num_inference_steps,
            timesteps=None, sigmas=None, eta=eta, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, callback_tensors=CALLBACK_TENSORS,
            call_attributes={"_guidance_scale_2": getattr(guide, "scale_2", None)})  # Wan 2.2's stock recipe
        if output_type != "latent":
            video = self.decode_video(video, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return GuidedVideoPipelineOutput.of(self.guided_output(video, nfe_per_image, state, guide, sampler,
                                                               warnings=cut))

    def check_video_call(self, **counts: Any) -> ExpertBoundary:
        """The expert boundary of this pipeline, after the checks the stock call lacks (before any
        model call): each of ``counts`` an integer >= 1, a high-noise transformer, and a low-noise
        one when ``boundary_ratio`` is set."""
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if self.transformer is None:
            raise ValueError("transformer: this pipeline has no high-noise transformer (only transformer_2); "
                             "the stock loop runs `transformer` on every step above the expert boundary")
        boundary = ExpertBoundary.of(self.config.boundary_ratio, self.scheduler.config.num_train_timesteps)
        if boundary.timestep is not None and self.transformer_2 is None:
            raise ValueError(f"transformer_2: boundary_ratio is {self.config.boundary_ratio} (two experts), but this "
                             "pipeline has no low-noise transformer_2 for the steps below the boundary")
        return boundary

    def call_guidance(self, guidance: GuidanceSpec, guidance_scale: float | None, guidance_scale_2: float | None,
                      boundary: ExpertBoundary) -> Guidance:
        """The call's method: the stock recipe for ``guidance=None`` (CFG when the scale is > 1,
        with the second scale on Wan 2.2's low-noise steps; else the conditional alone), or the
        named one at ``guidance_scale``."""
        if guidance is not None:
            if guidance_scale_2 is not None:
                where = "" if boundary.timestep is None else \
                    f" (here: schedule='phases(timesteps=[{boundary.timestep:g}], values=[{guidance_scale_2!r}])')"
                raise ValueError("guidance_scale_2: the low-noise expert's scale goes with guidance=None (the stock "
                                 "CFG); a method takes it in its own schedule" + where + f", got guidance={guidance!r} "
                                 f"and guidance_scale_2={guidance_scale_2!r}")
            return self.resolve_guidance(guidance, guidance_scale)
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale <= 1:
            return self.resolve_guidance(None, 1.0)  # the stock loop's do_classifier_free_guidance is off
        if boundary.timestep is None:
            return self.resolve_guidance(None, scale)
        scale_2 = scale if guidance_scale_2 is None else guidance_scale_2
        if isinstance(scale_2, bool) or not isinstance(scale_2, (int, float)) or not 0.0 <= scale_2 <= 100.0:
            raise ValueError(f"guidance_scale_2: must be a number in [0, 100], got {guidance_scale_2!r}")
        return TwoExpertCFG(scale=scale, scale_2=scale_2, boundary=boundary.timestep)

    def video_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(frames, height, width) as the stock call rounds them: ``4 k + 1`` frames (the VAE's
        temporal factor), height and width down to multiples of the VAE's spatial factor times the
        transformer's patch, each rounding with the stock warning."""
        temporal = self.vae_scale_factor_temporal
        if num_frames % temporal != 1:
            logger.warning(f"`num_frames - 1` has to be divisible by {temporal}. Rounding to the nearest number.")
            num_frames = num_frames // temporal * temporal + 1
        _, patch_h, patch_w = self.transformer.config.patch_size
        multiple_h, multiple_w = self.vae_scale_factor_spatial * patch_h, self.vae_scale_factor_spatial * patch_w
        rounded = (height // multiple_h * multiple_h, width // multiple_w * multiple_w)
        if rounded != (height, width):
            logger.warning(f"`height` and `width` must be multiples of ({multiple_h}, {multiple_w}) for proper "
                           f"patchification. Adjusting ({height}, {width}) -> {rounded}.")
        return (num_frames, *rounded)

    def prompt_condition(self, texts: list[str] | str | None, embeds: torch.Tensor | None, num_videos_per_prompt: int,
                         max_sequence_length: int) -> dict[str, torch.Tensor]:
        """One branch's conditioning, one row per video, in the transformer's dtype: the stock
        encoding of ``texts`` (repeated per video by the stock encoder), or the given ``embeds``
        repeated per video alike."""
        if embeds is None:
            embeds, _ = self.encode_prompt(prompt=texts, do_classifier_free_guidance=False,
                                           num_videos_per_prompt=num_videos_per_prompt,
                                           max_sequence_length=max_sequence_length, device=self._execution_device)
        else:
            embeds = embeds.to(self._execution_device).repeat_interleave(num_videos_per_prompt, dim=0)
        return {"encoder_hidden_states": embeds.to(self.transformer.dtype)}

    def truncated_wan_prompts(self, max_sequence_length: int, **texts: str | list[str] | None) -> list[str]:
        """One sentence per prompt whose UMT5 tokens (cleaned as the stock encoder cleans it, with
        its end token) exceed ``max_sequence_length`` (the stock pipeline cuts them silently), each
        also issued as a :class:`PromptTruncatedWarning`."""
        messages = []
        for name, value in texts.items():
            for text in [value] if isinstance(value, str) else value or []:
                with TEXT_LOCK:
                    ids = self.tokenizer(prompt_clean(text), add_special_tokens=True)["input_ids"]
                    if len(ids) > max_sequence_length:
                        cut = self.tokenizer.decode(ids[max_sequence_length - 1:], skip_special_tokens=True)
                        messages.append(f"{name}: {text!r} is {len(ids)} tokens with the end token, the text encoder "
                                        f"reads {max_sequence_length} (max_sequence_length); cut: {cut!r}")
        for message in messages:  # at the caller of pipe(...) (through torch's no_grad wrapper)
            warnings.warn(message, PromptTruncatedWarning, stacklevel=4)
        return messages

    def decode_video(self, latents: torch.Tensor, output_type: str) -> Any:
        """The stock decoding: ``z * std + mean`` per latent channel, the VAE, the video processor."""
        config = self.vae.config
        latents = latents.to(get_module_execution_device(self.vae), dtype=self.vae.dtype)
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        video = self.vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)
