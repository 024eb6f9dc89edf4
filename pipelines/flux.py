"""``GuidedFluxPipeline``: the stock Flux pipeline (flow matching, a Flux transformer on 2 x 2-packed
latent tokens with rotary positions, CLIP's pooled projection, T5 embeddings and, for
guidance-distilled models, an embedded guidance input) with the engine's sampler core.

Prompt encoding, the schedule (``sigmas = linspace(1, 1/n, n)`` with the dynamic shift ``mu``),
input checks and decoding are the stock pipeline's; the loop is the core's. The core keeps the
latents unpacked, (B, C, H, W) as for the other families; the branch model packs them into tokens
for each forward and unpacks the output (a permutation of elements, so the stock pipeline's
arithmetic is unchanged)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from . import conditions
from .common import GuidanceSpec, GuidedPipelineMixin, GuidedPipelineOutput
from .flow_transformer import (TransformerBranches, negative_prompt_texts, pack_latents, packed_callback,
                               unpack_latents)
from .image_input import FlowImageInput, ImageInput, ImageLike, load_image
from .joint_context_attention import JointContextBranches

__all__ = ["FluxBranches", "GuidedFluxImg2ImgPipeline", "GuidedFluxPipeline", "pack_latents", "unpack_latents"]


class FluxBranches(JointContextBranches, TransformerBranches):
    """The branch model over a Flux transformer. ``conditions[b]`` holds branch ``b``'s T5
    embeddings (``encoder_hidden_states``), CLIP's pooled projection (``pooled_projections``) and,
    for a guidance-distilled model, the embedded guidance value per row (``guidance``); the image
    token positions ``img_ids`` are shared, the text positions ``txt_ids`` (zeros, one row per
    text token) follow each branch's embeddings. Branches run in separate forwards, the
    conditional first, as the stock pipeline runs its true CFG (:class:`TransformerBranches`).
    NAG's negative text stream rides in partner rows of the guided forward, modulated by the
    negative's pooled projections as in the authors' Flux pipeline (:mod:`.joint_context_attention`)."""

    family = "GuidedFluxPipeline"
    # PAG's identity attention and SEG's blurred queries (on double- and single-stream attention),
    # skipped blocks (SLG), NAG's second text stream, and TSG's noise on the time-step embedding;
    # SAG's map is not available.
    evaluates_crops = False  # its token layout (packing, positions) is the whole latent's
    perturbations = frozenset({"identity", "blur", "skip", "extrapolate"})
    time_noise = True
    context_attention = "flux"  # NAG: their Flux processor's L2 rule, alpha 0.25

    def __init__(self, model, conditions: dict[str, dict[str, torch.Tensor]], *, img_ids: torch.Tensor,
                 txt_ids: torch.Tensor, joint_attention_kwargs: dict[str, Any] | None = None,
                 providers: Any = None, networks: Any = None) -> None:
        super().__init__(model, conditions, joint_attention_kwargs, providers=providers, networks=networks)
        self.img_ids = img_ids
        self.txt_ids = txt_ids

    def time_embeddings(self, model) -> list[Any]:
        """TSG's noise goes on the time-step MLP's output, before Flux adds the guidance and pooled
        text embeddings to it."""
        return [model.time_text_embed.timestep_embedder]

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        model = self.model if model is None else model
        for _, _, branch in spans:
            self.check_alterations(branch)
        kept = x_in.shape[0]
        x_in, stacked, spans, negative_text = self.carry_negative_text(
            model, x_in, stacked, spans, image=slice(stacked("encoder_hidden_states").shape[1], None))
        rows, _, height, width = x_in.shape
        encoder = stacked("encoder_hidden_states")
        txt_ids = self.txt_ids
        if txt_ids.shape[0] != encoder.shape[1]:
            txt_ids = torch.zeros(encoder.shape[1], 3, device=txt_ids.device, dtype=txt_ids.dtype)
        timestep = timestep.expand(rows).to(x_in.dtype)  # as the stock pipeline broadcasts it
        with negative_text, self.altered(model, x_in, spans) as plan:
            out = model(hidden_states=pack_latents(x_in), timestep=timestep / 1000, guidance=stacked("guidance"),
                        pooled_projections=stacked("pooled_projections"), encoder_hidden_states=encoder,
                        txt_ids=txt_ids, img_ids=self.img_ids,
                        joint_attention_kwargs=self._attention_kwargs(model, plan) or {}, return_dict=False)[0]
        return unpack_latents(out[:kept], height, width)


class GuidedFluxPipeline(GuidedPipelineMixin, FluxPipeline):
    """Flux text-to-image with any guidance method of the engine.

    Two scales, as in the stock pipeline: ``guidance_scale`` is the value embedded into a
    guidance-distilled transformer (default 3.5, in every branch's conditioning), and
    ``true_cfg_scale`` is the scale of guidance between branches. ``guidance=None`` is the stock
    recipe: the conditional forward alone, or, with a negative prompt and ``true_cfg_scale > 1``,
    true CFG ``neg + s (cond - neg)`` (cond and neg in separate forwards, as the stock pipeline).
    With a method (``guidance="apg"``, a dict or an object), ``true_cfg_scale`` (when given) is its
    ``scale``; its unconditional branch is the negative prompt, else the empty prompt."""

    default_guidance_scale = 1.0  # the method's scale without true CFG: the conditional alone

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        max_sequence_length: int = 512,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        eta: float | None = None,
        particle_output: str = "draw",
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Generate images. Arguments are the stock Flux pipeline's (IP-Adapter excepted) plus
        ``guidance``, ``sampler``, ``eta`` and ``particle_output`` as in
        :meth:`GuidedStableDiffusionPipeline.__call__`. ``latents`` are packed, as the stock
        pipeline takes and returns them: (B, H/2 * W/2, C * 4) at latent size H x W.
        ``reference_unet`` (keyword): autoguidance's reference network, a weaker Flux transformer
        taking the same conditioning."""
        return self._generate(
            prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            true_cfg_scale=true_cfg_scale, height=height, width=width, num_inference_steps=num_inference_steps,
            sigmas=sigmas, guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, output_type=output_type,
            return_dict=return_dict, joint_attention_kwargs=joint_attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length, guidance=guidance, sampler=sampler, eta=eta,
            particle_output=particle_output, start=None, **kwargs)

    def _generate(self, *, prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale: float | None,
                  height: int | None, width: int | None, num_inference_steps: int, sigmas, guidance_scale: float,
                  num_images_per_prompt: int, generator, latents: torch.Tensor | None, prompt_embeds,
                  pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds, output_type: str,
                  return_dict: bool, joint_attention_kwargs, callback_on_step_end,
                  callback_on_step_end_tensor_inputs: list[str], max_sequence_length: int, guidance: GuidanceSpec,
                  sampler: str | None, eta: float | None, particle_output: str, start: ImageInput | None,
                  **kwargs: Any) -> GuidedPipelineOutput | tuple:
        """The body of text-to-image and (with ``start``, the input image) image-to-image calls."""
        reference = kwargs.pop("reference_unet", None)
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {unsupported} "
                             "(IP-Adapter is not supported here)")
        if start is not None:
            height, width = start.size(self, height, width)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        particle_output = self.check_particle_output(particle_output)
        has_negative = negative_prompt is not None or (negative_prompt_embeds is not None
                                                       and negative_pooled_prompt_embeds is not None)
        if guidance is None:  # the stock recipe: true CFG only with a negative prompt and a scale > 1
            true_cfg = true_cfg_scale is not None and true_cfg_scale > 1 and has_negative
            guide = self.resolve_guidance(None, true_cfg_scale if true_cfg else 1.0)
        else:
            guide = self.resolve_guidance(guidance, true_cfg_scale)
        guide = self.for_prompts(guide, negative_prompt, negative_prompt_embeds)
        FluxBranches.check_method(guide)
        latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        channels = self.transformer.config.in_channels // 4
        batch_size, packed = self.check_prompted_call(  # latents are checked packed, as the stock call takes them
            guide, prompt, prompt_embeds, ((latent_h // 2) * (latent_w // 2), channels * 4),
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps, sigmas=sigmas,
            sampler=sampler, eta=eta, generator=generator, latents=latents, output_type=output_type, start=start)
        rows = packed[0]
        own_negative = conditions.negative_branch_inputs(guide, negative_prompt, negative_prompt_embeds, batch_size)
        if own_negative is not None:  # the negative prompt gets a branch of its own; "uncond" stays empty
            own_negative = (own_negative[0], negative_prompt_2, own_negative[1], negative_pooled_prompt_embeds)
            negative_prompt = negative_prompt_2 = negative_prompt_embeds = negative_pooled_prompt_embeds = None
        negative = negative_prompt_texts(negative_prompt, negative_prompt_embeds, batch_size)
        cut = self.truncated_prompts(prompt=prompt, negative_prompt=negative_prompt)
        device = self._execution_device
        lora_scale = joint_attention_kwargs.get("scale") if joint_attention_kwargs else None
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=lora_scale)
        negative_prompt_embeds, negative_pooled_prompt_embeds, _ = self.encode_prompt(
            prompt=negative, prompt_2=negative_prompt_2 if negative_prompt_embeds is None else None,
            prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=lora_scale)
        if negative_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
            raise ValueError(f"negative_prompt_embeds: expected {prompt_embeds.shape[0]} rows (one per image), "
                             f"got {negative_prompt_embeds.shape[0]}")

        def embedded(condition: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if self.transformer.config.guidance_embeds:  # the stock value, the same in every branch
                condition["guidance"] = torch.full((rows,), guidance_scale, device=device, dtype=torch.float32)
            return condition

        def encode_texts(texts, texts_2=None, embeds=None, pooled=None) -> dict[str, torch.Tensor]:
            """A branch of other prompts (the negative's own, a method's), encoded as the prompt."""
            embeds, pooled, _ = self.encode_prompt(
                prompt=texts, prompt_2=texts_2, prompt_embeds=embeds, pooled_prompt_embeds=pooled, device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
                lora_scale=lora_scale)
            return embedded({"encoder_hidden_states": embeds, "pooled_projections": pooled})

        cond = embedded({"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds})
        uncond = embedded({"encoder_hidden_states": negative_prompt_embeds,
                           "pooled_projections": negative_pooled_prompt_embeds})
        img_ids = self._prepare_latent_image_ids(rows, latent_h // 2, latent_w // 2, device, prompt_embeds.dtype)
        branches = FluxBranches(self.transformer, {"cond": cond, "uncond": uncond}, img_ids=img_ids,
                                txt_ids=text_ids, joint_attention_kwargs=joint_attention_kwargs,
                                networks={"reference": self.reference_network(guide, reference)})
        if own_negative is not None:
            conditions.add_negative_branch(branches, encode_texts(*own_negative))
        conditions.add_text_branches(self, branches, guide, encode_texts, batch_size=batch_size, generator=generator)

        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        config = self.scheduler.config
        mu = calculate_shift(packed[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        if latents is not None:
            latents = unpack_latents(latents, latent_h, latent_w)
        if callback_on_step_end is not None:
            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
            callback_on_step_end = packed_callback(callback_on_step_end, latent_h, latent_w)
        latents, nfe_per_image, state = self.denoise(
            branches, guide, (rows, channels, latent_h, latent_w), dtype=prompt_embeds.dtype, device=device,
            generator=generator, latents=latents, particle_output=particle_output, sampler=sampler,
            num_inference_steps=num_inference_steps, timesteps=None, sigmas=sigmas, eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={"prompt_embeds": ("cond", "encoder_hidden_states")},
            set_timesteps_kwargs={"mu": mu}, start=start,
            call_attributes={"_guidance_scale": guidance_scale,  # stock: the embedded value
                             "_joint_attention_kwargs": joint_attention_kwargs or {}})
        if output_type == "latent":
            image = pack_latents(latents)
        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(self.vae.device), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return self.guided_output(image, nfe_per_image, state, guide, sampler, warnings=cut)

    def image_to_latents(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """Shifted, scaled latents of [-1, 1] images, as the stock Flux img2img pipeline encodes its input."""
        config = self.vae.config
        return (self.posterior_sample(pixels, generator) - config.shift_factor) * config.scaling_factor


class GuidedFluxImg2ImgPipeline(GuidedFluxPipeline):
    """Flux image-to-image with any guidance method of the engine: the input image is encoded
    (the VAE posterior sampled with ``generator``), noise is drawn, and the core runs the steps
    that the stock ``FluxImg2ImgPipeline`` runs at this ``strength`` (it skips the first
    ``int(n - n * strength)``), from the image noised to the first of their levels, in the stock
    order of draws, so its recipes reproduce the stock pipeline bit for bit. Components are those
    of the text-to-image pipeline (``from_pipe`` from either stock pipeline shares them)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float | None = None,
        image: ImageLike = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.6,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        max_sequence_length: int = 512,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        eta: float | None = None,
        particle_output: str = "draw",
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Transform ``image`` towards ``prompt``. Arguments are the stock Flux img2img pipeline's
        (IP-Adapter excepted) plus those of :meth:`GuidedFluxPipeline.__call__`.

        Args:
            image: the input image (PIL, numpy, a [-1, 1] tensor, latents with the VAE's channels, or
                a path); the output has its size unless ``height`` / ``width`` are given (the image
                is then resized to them, as the stock pipeline does; stock defaults to the model's
                sample size instead).
            strength: in (0, 1]: how much of the schedule is run, 1 = from pure noise; the first
                ``int(n - n * strength)`` of the ``n`` steps are skipped (the stock rule).
            latents: the packed start latents, already noised to the first step's level (the stock
                meaning): the image is then neither encoded nor noised.
        """
        start = FlowImageInput(load_image(image), strength)
        return self._generate(
            prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            true_cfg_scale=true_cfg_scale, height=height, width=width, num_inference_steps=num_inference_steps,
            sigmas=sigmas, guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, output_type=output_type,
            return_dict=return_dict, joint_attention_kwargs=joint_attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length, guidance=guidance, sampler=sampler, eta=eta,
            particle_output=particle_output, start=start, **kwargs)
