"""``GuidedStableDiffusionXLPipeline``: the stock SDXL pipeline with the engine's sampler core.

Prompt encoding (two text encoders, pooled embeddings), micro-conditioning time ids, input checks
and VAE decoding are the stock pipeline's; the loop is the core's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils.torch_utils import get_module_execution_device

from . import conditions
from .branches import NetworkBranches
from .common import GuidanceSpec, GuidedPipelineMixin, GuidedPipelineOutput
from .distilled import distilled_guidance, embed_scale, embedded_scale, is_guidance_distilled
from .inversion import InversionMixin

if TYPE_CHECKING:
    from .image_input import ImageInput


class GuidedStableDiffusionXLPipeline(GuidedPipelineMixin, InversionMixin, StableDiffusionXLPipeline):
    """Stable Diffusion XL text-to-image with any guidance method of the engine; ``invert`` /
    ``regenerate`` as for SD."""

    default_guidance_scale = 5.0

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        particle_output: str = "draw",
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Generate images. Arguments are the stock SDXL pipeline's (``denoising_end`` and
        IP-Adapter excepted) plus ``guidance``, ``sampler`` and (keyword) ``reference_unet``, as in
        :meth:`GuidedStableDiffusionPipeline.__call__`; the default CFG scale is 5.0."""
        return self._generate(**{name: value for name, value in locals().items()
                                 if name not in ("self", "kwargs", "__class__")}, **kwargs)

    def _generate(self, *, prompt, prompt_2, height, width, num_inference_steps, timesteps, sigmas, guidance_scale,
                  negative_prompt, negative_prompt_2, num_images_per_prompt, eta, generator, latents,
                  prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                  output_type, return_dict, cross_attention_kwargs, guidance_rescale, original_size,
                  crops_coords_top_left, target_size, negative_original_size, negative_crops_coords_top_left,
                  negative_target_size, clip_skip, callback_on_step_end, callback_on_step_end_tensor_inputs,
                  guidance, sampler, particle_output, start: ImageInput | None = None, reference_unet=None,
                  **kwargs: Any):
        """The shared body of text-to-image, img2img and inpainting (``start``: the input image)."""
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {unsupported} "
                             "(IP-Adapter, denoising_start/end and the deprecated `callback` are not supported)")
        distilled = is_guidance_distilled(self.unet)  # the scale is embedded: guidance_scale means that
        embedded = embedded_scale(guidance_scale, self.default_guidance_scale) if distilled else None
        if start is not None:  # the image decides the size (checked: a multiple of the VAE factor)
            height, width = start.size(self, height, width)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        self.check_inputs(prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, None, None,
                          callback_on_step_end_tensor_inputs)
        particle_output = self.check_particle_output(particle_output)
        guide = distilled_guidance(self, guidance, guidance_rescale) if distilled else \
            self.resolve_guidance(guidance, guidance_scale, guidance_rescale)
        guide = self.for_prompts(guide, negative_prompt, negative_prompt_embeds)
        channels = self.unet.config.in_channels if start is None else self.vae.config.latent_channels
        batch_size, shape = self.check_prompted_call(
            guide, prompt, prompt_embeds, (channels, height // self.vae_scale_factor, width // self.vae_scale_factor),
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps, timesteps=timesteps,
            sigmas=sigmas, sampler=sampler, eta=eta, generator=generator, latents=latents, output_type=output_type,
            start=start)
        cut = self.truncated_prompts(prompt=prompt, negative_prompt=negative_prompt)
        device = self._execution_device
        negative_branch = conditions.negative_branch_inputs(guide, negative_prompt, negative_prompt_embeds, batch_size)
        if negative_branch is not None:  # the negative prompt gets a branch of its own; "uncond" stays empty
            negative_branch = (*negative_branch, [negative_prompt_2] * batch_size
                               if isinstance(negative_prompt_2, str) else negative_prompt_2,
                               negative_pooled_prompt_embeds)
            negative_prompt = negative_prompt_2 = negative_prompt_embeds = negative_pooled_prompt_embeds = None
        rows = shape[0]
        branches = self._prompt_branches(
            prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            negative_branch=negative_branch, device=device, rows=rows,
            num_images_per_prompt=num_images_per_prompt, cross_attention_kwargs=cross_attention_kwargs,
            clip_skip=clip_skip, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size, negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size)
        conditions.add_text_branches(self, branches, guide, branches.encode_texts, batch_size=batch_size,
                                     generator=generator)
        reference = self.reference_network(guide, reference_unet)  # autoguidance's weaker UNet
        if reference is not None:
            branches.networks["reference"] = reference
        dtype = branches.conditions["cond"]["encoder_hidden_states"].dtype
        if distilled:
            embed_scale(self, branches, embedded, device, dtype)

        latents, nfe_per_image, state = self.denoise(
            branches, guide, shape, dtype=dtype, device=device, generator=generator, latents=latents,
            start=start, particle_output=particle_output, sampler=sampler, num_inference_steps=num_inference_steps,
            timesteps=timesteps, sigmas=sigmas, eta=eta, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={"prompt_embeds": ("cond", "encoder_hidden_states"),
                              "negative_prompt_embeds": ("uncond", "encoder_hidden_states"),
                              "add_text_embeds": ("cond", "text_embeds"),
                              "negative_pooled_prompt_embeds": ("uncond", "text_embeds"),
                              "add_time_ids": ("cond", "time_ids"),
                              "negative_add_time_ids": ("uncond", "time_ids")},
            call_attributes={"_clip_skip": clip_skip, "_guidance_rescale": guidance_rescale, "_denoising_start": None,
                             "_denoising_end": None, **({"_guidance_scale": embedded} if distilled else {})})
        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(self._decode(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return self.guided_output(image, nfe_per_image, state, guide, sampler, warnings=cut)

    def _prompt_branches(self, *, prompt, prompt_2, negative_prompt, negative_prompt_2, prompt_embeds,
                         negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, negative_branch,
                         device, rows, num_images_per_prompt, cross_attention_kwargs, clip_skip, original_size,
                         crops_coords_top_left, target_size, negative_original_size, negative_crops_coords_top_left,
                         negative_target_size) -> NetworkBranches:
        """The conditioned branches (``cond``, ``uncond``, the negative prompt's own): both text
        encoders' embeddings, pooled embeddings and micro-conditioning time ids, as the stock
        pipeline encodes them."""
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
         negative_pooled_prompt_embeds) = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=True, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=lora_scale, clip_skip=clip_skip)

        projection_dim = (int(pooled_prompt_embeds.shape[-1]) if self.text_encoder_2 is None
                          else self.text_encoder_2.config.projection_dim)
        time_ids = self._get_add_time_ids(original_size, crops_coords_top_left, target_size,
                                          dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim)
        negative_time_ids = time_ids
        if negative_original_size is not None and negative_target_size is not None:
            negative_time_ids = self._get_add_time_ids(
                negative_original_size, negative_crops_coords_top_left, negative_target_size,
                dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim)
        branches = NetworkBranches(self.unet, {
            "cond": {"encoder_hidden_states": prompt_embeds.to(device), "text_embeds": pooled_prompt_embeds.to(device),
                     "time_ids": time_ids.to(device).repeat(rows, 1)},
            "uncond": {"encoder_hidden_states": negative_prompt_embeds.to(device),
                       "text_embeds": negative_pooled_prompt_embeds.to(device),
                       "time_ids": negative_time_ids.to(device).repeat(rows, 1)},
        }, cross_attention_kwargs)
        def encode_texts(texts, texts_2=None, embeds=None, pooled=None) -> dict[str, torch.Tensor]:
            """A branch of other prompts (the negative's own, a method's), with the negative
            micro-conditioning, as the stock pipeline conditions its negative branch."""
            hidden, _, pooled, _ = self.encode_prompt(
                prompt=texts, prompt_2=texts_2, device=device, num_images_per_prompt=num_images_per_prompt,
                do_classifier_free_guidance=False, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                lora_scale=lora_scale, clip_skip=clip_skip)
            return {"encoder_hidden_states": hidden.to(device), "text_embeds": pooled.to(device),
                    "time_ids": negative_time_ids.to(device).repeat(rows, 1)}

        branches.encode_texts = encode_texts
        if negative_branch is not None:  # the user's negative prompt and micro-conditioning, "uncond" empty
            texts, embeds, texts_2, pooled = negative_branch
            conditions.add_negative_branch(branches, encode_texts(texts, texts_2, embeds, pooled))
        return branches

    # -- inversion hooks (InversionMixin) -----------------------------------------------------------
    def inversion_branches(self, prompts: list[str], negative_prompts: list[str] | None, size: tuple[int, int],
                           cross_attention_kwargs: dict[str, Any] | None, *, prompt_2=None, negative_prompt_2=None,
                           original_size: tuple[int, int] | None = None,
                           crops_coords_top_left: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                           clip_skip: int | None = None) -> NetworkBranches:
        """SDXL's ``cond`` / ``uncond`` branches of one image per prompt (both text encoders, pooled
        embeddings, micro-conditioning at the image's size unless given), as in :meth:`__call__`."""
        return self._prompt_branches(
            prompt=prompts, prompt_2=prompt_2, negative_prompt=negative_prompts, negative_prompt_2=negative_prompt_2,
            prompt_embeds=None, negative_prompt_embeds=None, pooled_prompt_embeds=None,
            negative_pooled_prompt_embeds=None, negative_branch=None, device=self._execution_device,
            rows=len(prompts), num_images_per_prompt=1, cross_attention_kwargs=cross_attention_kwargs,
            clip_skip=clip_skip, original_size=original_size or size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size or size, negative_original_size=None, negative_crops_coords_top_left=(0, 0),
            negative_target_size=None)

    def inversion_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """The posterior mean, encoded as the inverse of :meth:`_decode` (upcast VAE pass,
        ``latents_mean`` / ``latents_std`` when the VAE has them)."""
        return GuidedStableDiffusionXLPipeline.image_to_latents(self, pixels, None, mean=True)

    def text_to_image(self, prompt, **kwargs: Any):
        return GuidedStableDiffusionXLPipeline.__call__(self, prompt, **kwargs)

    def posterior_sample(self, pixels: torch.Tensor, generator, mean: bool = False) -> torch.Tensor:
        """The VAE posterior sample (or mean) of the stock SDXL pipelines: a float32 VAE pass when
        the VAE asks for it (``force_upcast``; it overflows in float16), back in the pixels' dtype."""
        dtype = pixels.dtype
        if not self.vae.config.force_upcast:
            return super().posterior_sample(pixels, generator, mean).to(dtype)
        self.vae.to(dtype=torch.float32)
        try:
            return super().posterior_sample(pixels.float(), generator, mean).to(dtype)
        finally:
            self.vae.to(dtype)

    def image_to_latents(self, pixels: torch.Tensor, generator, mean: bool = False) -> torch.Tensor:
        """The stock SDXL img2img encoding: the posterior sample (or mean) normalised by the VAE's
        ``latents_mean`` / ``latents_std`` when it has them, else scaled by ``scaling_factor``:
        the inverse of :meth:`_decode`."""
        dtype = pixels.dtype
        latents = self.posterior_sample(pixels, generator, mean)
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, dtype)
            return (latents - mean) * config.scaling_factor / std
        return config.scaling_factor * latents

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The stock SDXL decode: fp16 VAEs upcast when configured, latents mean/std if present."""
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:
            self.upcast_vae()
            latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
        config = self.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image = self.vae.decode(latents.to(get_module_execution_device(self.vae)), return_dict=False)[0]
        if needs_upcasting:
            self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return image
