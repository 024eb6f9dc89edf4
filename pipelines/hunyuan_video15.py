"""``GuidedHunyuanVideo15Pipeline``: the stock HunyuanVideo 1.5 text-to-video pipeline (flow matching;
a dual-stream video DiT, ``HunyuanVideo15Transformer3DModel``, on 5-D latents (videos, channels,
frames, height, width) patchified inside the model, with zero condition latents and a zero mask
concatenated on the channels for text-to-video; Qwen2.5-VL embeddings of the prompt in a chat
template and ByT5 embeddings of its quoted texts, each with its padding mask; HunyuanVideo 1.5's
VAE) with the engine's sampler core.

The stock recipe (diffusers 0.42.1 ``HunyuanVideo15Pipeline.__call__``), reproduced bit for bit by
``guidance=None``: its CFG is its ``guider`` component, diffusers' ``ClassifierFreeGuidance``
(:class:`GuiderCFG` here, read from the guider's config): the conditional and unconditional
(negative or empty prompt) predictions in separate forwards, the conditional first, combined as
``u + s (c - u)`` (``c + s (c - u)`` with ``use_original_formulation``) where the guider is on
(``int(start n) <= i < int(stop n)`` and s not the neutral 1, resp. 0), the conditional alone
elsewhere, then Lin et al.'s rescale at the guider's ``guidance_rescale`` (which the guider
applies even where CFG is off); latents drawn and stepped in the transformer's dtype, the
timestep per row in that dtype; ``sigmas = linspace(1, 0, n + 1)[:-1]`` (or the given ones) on
the pipeline's scheduler, stepped with ``scheduler.step``; decoding ``z / scaling_factor``.

Layer methods alter HunyuanVideo 1.5's blocks through :mod:`.hunyuan_video15_attention`: SLG's
skipped blocks (both streams) or, named ``transformer_blocks.<i>.attn``, a block's joint attention
passed through (Hyung et al.'s STG-R on HunyuanVideo), PAG's identity on the video tokens of the
joint attention (STG-A), TSG's noise on the time-step MLP (``time_embed.timestep_embedder``). SEG,
NAG (joint attention: no separate cross-attention to carry a second context) and SAG are refused
before any model call.

Deviations from the stock pipeline, each where the stock call fails: the zero image embeddings
of text-to-video have one row per video (the stock call makes one per prompt and fails with
``num_videos_per_prompt > 1``); a string ``negative_prompt`` is repeated for every prompt (the
stock encoder fails with several prompts); the videos are decoded one at a time (the VAE's
mid-block attention, diffusers 0.42.1, builds a (videos, tokens, tokens) causal mask that does
not broadcast against its (videos, 1, tokens, tokens) scores, so the stock decode fails for more
than one video). The stock pipeline has no ``callback_on_step_end``;
``guidance_scale`` is an engine argument (the stock scale lives in the guider). The stock
per-call attributes (``pipe.num_timesteps``, ``current_timestep``) are each call's own
(:class:`~.common.CallAttribute`); the guider's step state (``guider.set_state``) is not touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch
from diffusers import HunyuanVideo15Pipeline
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import rescale_noise_cfg

from guidance_engine.guidance import Guidance, GuidedPrediction, StepInfo, param
from guidance_engine.prediction import Prediction

from . import conditions
from .common import GuidanceSpec, GuidedPipelineMixin
from .flow_transformer import negative_prompt_texts
from .hunyuan_video15_attention import install_dispatcher, resolve_hunyuan_layers
from .video_branches import GuidedVideoPipelineOutput, VideoTransformerBranches

__all__ = ["GuidedHunyuanVideo15Pipeline", "GuidedHunyuanVideo15PipelineOutput", "GuiderCFG",
           "HunyuanVideo15Branches"]

#: A branch condition's keys: the Qwen2.5-VL embeddings, the ByT5 glyph embeddings, their masks.
CONDITION_KEYS = ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2",
                  "encoder_attention_mask_2")


@dataclass(frozen=True, kw_only=True)
class GuiderCFG(Guidance):
    """diffusers' ``ClassifierFreeGuidance`` guider, the stock CFG of this pipeline: where
    :meth:`on` holds, ``u + s (c - u)`` (``c + s (c - u)`` with ``original``), else ``c``; then,
    when ``rescale`` > 0, Lin et al.'s rescale towards ``c`` (the guider applies it at every step,
    also where CFG is off). Both forwards only where CFG is on, as the guider asks for them. Not a
    registered method: the recipe of this pipeline (so it lives here, importing no method). It
    differs from CFG with ``start``/``stop`` by the guider's window rule and its neutral scale 0
    under the original formulation."""

    name: ClassVar[str] = "hunyuan_video15_guider_cfg"
    paper: ClassVar[str] = "Ho & Salimans 2022 (arXiv 2207.12598); diffusers' ClassifierFreeGuidance guider"

    scale: float = param(7.5, low=0.0, high=100.0, doc="the guider's guidance_scale s (ClassifierFreeGuidance's default)")
    rescale: float = param(0.0, low=0.0, high=1.0, doc="the guider's guidance_rescale phi (0 = off)")
    original: bool = param(False, choices=(False, True),
                           doc="the guider's use_original_formulation: c + s (c - u) instead of u + s (c - u)")
    guider_start: float = param(0.0, low=0.0, high=1.0, doc="the guider's start: CFG from step int(start n)")
    guider_stop: float = param(1.0, low=0.0, high=1.0, doc="the guider's stop: CFG before step int(stop n)")
    enabled: bool = param(True, choices=(False, True), doc="the guider's enabled flag (False: the conditional alone)")

    @classmethod
    def of(cls, guider: ClassifierFreeGuidance, scale: float | None = None) -> GuiderCFG:
        """The recipe of ``guider`` (its config), at ``scale`` instead of its own when given."""
        config = guider.config
        return cls(scale=config.guidance_scale if scale is None else scale, rescale=config.guidance_rescale,
                   original=config.use_original_formulation, guider_start=config.start, guider_stop=config.stop,
                   enabled=config.enabled)

    def on(self, step: StepInfo) -> bool:
        """Whether the guider runs CFG at this step (its ``_is_cfg_enabled``)."""
        window = int(self.guider_start * step.num_steps) <= step.index < int(self.guider_stop * step.num_steps)
        return self.enabled and window and not math.isclose(self.scale, 0.0 if self.original else 1.0)

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        return ("uncond", "cond") if self.on(step) else ("cond",)

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        guided = cond.output
        if "uncond" in preds:  # the guider's operation order
            shift = cond.output - preds["uncond"].output
            guided = (cond.output if self.original else preds["uncond"].output) + self.scale * shift
        if self.rescale > 0:
            guided = rescale_noise_cfg(guided, cond.output, self.rescale)
        return GuidedPrediction.single(cond if guided is cond.output else cond.with_output(guided))


class HunyuanVideo15Branches(VideoTransformerBranches):
    """The branch model over HunyuanVideo 1.5's transformer. ``conditions[b]`` holds branch ``b``'s
    Qwen2.5-VL and ByT5 embeddings and masks (:data:`CONDITION_KEYS`), in the transformer's dtype.
    Branches run in separate forwards, the conditional first (:class:`TransformerBranches`), as
    the stock guider batches them; each forward gets the text-to-video inputs the stock loop
    makes: zero condition latents and a zero mask on the channels, zero image embeddings of
    ``image_tokens`` x ``image_width`` per row."""

    family = "GuidedHunyuanVideo15Pipeline"
    # SLG's skipped blocks or joint attentions, PAG's identity on the video tokens
    # (.hunyuan_video15_attention); TSG's noise on the time-step MLP; SAG's attention map is refused.
    perturbations = frozenset({"identity", "skip"})
    time_noise = True
    resolve_layers = staticmethod(resolve_hunyuan_layers)
    install_dispatcher = staticmethod(install_dispatcher)

    def __init__(self, model, conditions: dict[str, dict[str, torch.Tensor]], *, image_tokens: int,
                 attention_kwargs: dict[str, Any] | None = None, providers: Any = None, networks: Any = None) -> None:
        super().__init__(model, conditions, attention_kwargs, providers=providers, networks=networks)
        self.image_tokens = image_tokens

    @classmethod
    def refusal(cls, branch, owner: str = "guidance") -> str | None:
        if branch.perturb is not None and branch.perturb.kind == "extrapolate":
            return (f"guidance: method {owner!r} alters cross-attention, which {cls.family} does not have (its "
                    "dual-stream blocks attend over the video and text tokens jointly)")
        return super().refusal(branch, owner)

    def time_embeddings(self, model) -> list[Any]:
        """TSG's noise goes on the time-step MLP's output (the embedding every block's and the output
        norm's modulation reads; the token refiner embeds the timestep apart, unperturbed)."""
        return [model.time_embed.timestep_embedder]

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        model = self.model if model is None else model
        for _, _, branch in spans:
            self.check_alterations(branch)
        rows, _, frames, height, width = x_in.shape
        zeros = x_in.new_zeros((rows, x_in.shape[1] + 1, frames, height, width))  # condition latents and mask
        image_embeds = x_in.new_zeros((rows, self.image_tokens, model.config.image_embed_dim))
        with self.altered(model, x_in, spans):
            return model(hidden_states=torch.cat([x_in, zeros], dim=1), image_embeds=image_embeds,
                         timestep=timestep.expand(rows).to(x_in.dtype), attention_kwargs=self.cross_attention_kwargs,
                         return_dict=False, **{key: stacked(key) for key in CONDITION_KEYS})[0]


#: The output of :class:`GuidedHunyuanVideo15Pipeline` (the video families' one class, under its earlier name).
GuidedHunyuanVideo15PipelineOutput = GuidedVideoPipelineOutput


class GuidedHunyuanVideo15Pipeline(GuidedPipelineMixin, HunyuanVideo15Pipeline):
    """HunyuanVideo 1.5 text-to-video with any guidance method of the engine.

    ``guidance=None`` is the stock recipe: the pipeline's guider (diffusers'
    ``ClassifierFreeGuidance``, its scale, rescale, formulation and window), at ``guidance_scale``
    instead of the guider's scale when given. With a method (``guidance="apg"``, a dict or an
    object), ``guidance_scale`` (when given) is its ``scale``; its unconditional branch is the
    negative prompt, else the empty prompt."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int = 121,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        prompt_embeds_2: torch.Tensor | None = None,
        prompt_embeds_mask_2: torch.Tensor | None = None,
        negative_prompt_embeds_2: torch.Tensor | None = None,
        negative_prompt_embeds_mask_2: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        guidance_scale: float | None = None,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        eta: float | None = None,
        particle_output: str = "draw",
        **kwargs: Any,
    ) -> GuidedHunyuanVideo15PipelineOutput | tuple:
        """Generate videos. Arguments are the stock HunyuanVideo 1.5 pipeline's plus
        ``guidance_scale``, ``guidance``, ``sampler``, ``eta`` and ``particle_output`` as in
        :meth:`GuidedStableDiffusionPipeline.__call__`.

        Args:
            height, width: pixels (None, both: the stock default for the transformer's
                ``target_size`` at 16:9); multiples of the VAE's spatial factor times the patch.
            num_frames: frames of each video, an integer >= 1 (the latent video has
                ``(num_frames - 1) // temporal factor + 1`` frames).
            sigmas: the schedule's noise levels (None: the stock ``linspace(1, 0, n + 1)[:-1]``).
            num_videos_per_prompt: videos per prompt, an integer >= 1.
            latents: noise in the transformer's dtype, (videos, channels, latent frames, height /
                factor, width / factor).
            guidance_scale: with ``guidance=None``, the CFG scale in [0, 100] instead of the guider's
                (None: the guider's); with a method name or dict, that method's ``scale`` (None: the
                method's default). Must not be set with a guidance object.
            reference_unet: (keyword) autoguidance's reference network, a weaker HunyuanVideo 1.5
                transformer taking the same embeddings.

        Returns:
            :class:`GuidedHunyuanVideo15PipelineOutput` (its ``frames`` as the stock output's), or ``(video,)``.
        """
        reference = kwargs.pop("reference_unet", None)
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {unsupported}")
        self.check_inputs(prompt=prompt, height=height, width=width, negative_prompt=negative_prompt,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          prompt_embeds_mask=prompt_embeds_mask,
                          negative_prompt_embeds_mask=negative_prompt_embeds_mask,
                          prompt_embeds_2=prompt_embeds_2, prompt_embeds_mask_2=prompt_embeds_mask_2,
                          negative_prompt_embeds_2=negative_prompt_embeds_2,
                          negative_prompt_embeds_mask_2=negative_prompt_embeds_mask_2)
        if height is None and width is None:
            height, width = self.video_processor.calculate_default_height_width(
                self.default_aspect_ratio[1], self.default_aspect_ratio[0], self.target_size)
        for name, value in (("num_videos_per_prompt", num_videos_per_prompt), ("num_frames", num_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        particle_output = self.check_particle_output(particle_output)
        guide = self.for_prompts(self.call_guidance(guidance, guidance_scale), negative_prompt, negative_prompt_embeds)
        HunyuanVideo15Branches.check_method(guide)
        if sigmas is None:
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        spatial = self.vae_scale_factor_spatial
        latent_shape = (self.num_channels_latents, (num_frames - 1) // self.vae_scale_factor_temporal + 1,
                        int(height) // spatial, int(width) // spatial)
        batch_size, shape = self.check_prompted_call(
            guide, prompt, prompt_embeds, latent_shape, num_images_per_prompt=num_videos_per_prompt,
            num_inference_steps=len(sigmas), sigmas=sigmas, sampler=sampler, eta=eta, generator=generator,
            latents=latents, output_type=output_type)
        own_negative = conditions.negative_branch_inputs(guide, negative_prompt, negative_prompt_embeds, batch_size)
        negative_inputs = (negative_prompt_embeds, negative_prompt_embeds_mask, negative_prompt_embeds_2,
                           negative_prompt_embeds_mask_2)
        if own_negative is not None:  # the negative prompt gets a branch of its own; "uncond" stays empty
            own_negative = (own_negative[0], *negative_inputs)
            negative_prompt, negative_inputs = None, (None,) * 4
        negative = negative_prompt_texts(negative_prompt, negative_inputs[0], batch_size)

        def encode(texts, *given: torch.Tensor | None) -> dict[str, torch.Tensor]:
            return self.prompt_condition(texts, given, batch_size, num_videos_per_prompt)

        by_branch = {"cond": encode(prompt, prompt_embeds, prompt_embeds_mask, prompt_embeds_2, prompt_embeds_mask_2),
                     "uncond": encode(negative, *negative_inputs)}
        branches = HunyuanVideo15Branches(
            self.transformer, by_branch, image_tokens=self.vision_num_semantic_tokens,
            attention_kwargs=attention_kwargs, networks={"reference": self.reference_network(guide, reference)})
        if own_negative is not None:
            conditions.add_negative_branch(branches, encode(*own_negative))
        conditions.add_text_branches(self, branches, guide, encode, batch_size=batch_size,
                                     generator=generator)  # a method's own prompts; ICG's random ones
        video, nfe_per_image, state = self.denoise(
            branches, guide, shape, dtype=self.transformer.dtype, device=self._execution_device, generator=generator,
            latents=latents, particle_output=particle_output, sampler=sampler, num_inference_steps=len(sigmas),
            timesteps=None, sigmas=sigmas, eta=eta, callback_on_step_end=None, callback_on_step_end_tensor_inputs=[],
            callback_tensors={})
        if output_type != "latent":
            video = self.decode_video(video, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return GuidedVideoPipelineOutput.of(self.guided_output(video, nfe_per_image, state, guide, sampler))

    def decode_video(self, latents: torch.Tensor, output_type: str) -> Any:
        """The stock decoding, ``z / scaling_factor`` through the VAE, one video at a time (the
        VAE's causal attention mask does not broadcast over a batch of several), then the video
        processor."""
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        video = torch.cat([self.vae.decode(latents[i:i + 1], return_dict=False)[0] for i in range(latents.shape[0])])
        return self.video_processor.postprocess_video(video, output_type=output_type)

    def call_guidance(self, guidance: GuidanceSpec, guidance_scale: float | None) -> Guidance:
        """The call's method: the guider's recipe for ``guidance=None`` (at ``guidance_scale`` when
        given), or the named one at ``guidance_scale``."""
        if guidance is not None:
            return self.resolve_guidance(guidance, guidance_scale)
        if not isinstance(self.guider, ClassifierFreeGuidance):
            raise ValueError(f"guider: guidance=None runs the stock guider, which the engine reproduces for "
                             f"ClassifierFreeGuidance only, got {type(self.guider).__name__}; pass guidance= (a "
                             "method of the engine) instead")
        return GuiderCFG.of(self.guider, guidance_scale)

    def prompt_condition(self, texts: list[str] | str | None, given: tuple[torch.Tensor | None, ...], batch_size: int,
                         num_videos_per_prompt: int) -> dict[str, torch.Tensor]:
        """One branch's conditioning, one row per video, in the transformer's dtype: the stock
        encoding of ``texts`` (Qwen2.5-VL in the chat template, ByT5 on the quoted texts), or the
        given embeddings and masks (``given``, in :data:`CONDITION_KEYS` order), repeated per video
        by the stock encoder."""
        embeds, mask, embeds_2, mask_2 = (given + (None,) * 4)[:4]
        encoded = self.encode_prompt(prompt=texts, device=self._execution_device, dtype=self.transformer.dtype,
                                     batch_size=batch_size, num_videos_per_prompt=num_videos_per_prompt,
                                     prompt_embeds=embeds, prompt_embeds_mask=mask, prompt_embeds_2=embeds_2,
                                     prompt_embeds_mask_2=mask_2)
        return dict(zip(CONDITION_KEYS, encoded))
