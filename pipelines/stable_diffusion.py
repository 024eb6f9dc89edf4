"""``GuidedStableDiffusionPipeline``: the stock SD 1.x/2.x pipeline with the engine's sampler core.

Everything but the denoising loop is the stock pipeline's (prompt encoding, input checks, VAE
decoding, safety checker, ``from_pretrained``, ``from_pipe``, ``save_pretrained``). The loop is
the core's: ``guidance=`` picks the method, ``sampler=`` the solver.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from diffusers import StableDiffusionPipeline

from . import conditions
from .branches import NetworkBranches
from .common import GuidanceSpec, GuidedPipelineMixin, GuidedPipelineOutput
from .distilled import distilled_guidance, embed_scale, embedded_scale, is_guidance_distilled
from .inversion import InversionMixin

if TYPE_CHECKING:
    from .image_input import ImageInput


class GuidedStableDiffusionPipeline(GuidedPipelineMixin, InversionMixin, StableDiffusionPipeline):
    """Stable Diffusion text-to-image with any guidance method of the engine.

    Load like the stock pipeline (``GuidedStableDiffusionPipeline.from_pretrained(path)``) or
    convert one (``GuidedStableDiffusionPipeline.from_pipe(stock_pipe)``; components are shared,
    the stock pipeline is not modified).
    """

    default_guidance_scale = 7.5

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        particle_output: str = "draw",
        product_prompt: str | list[str] | None = None,
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Generate images. Arguments are the stock pipeline's, plus:

        Args:
            guidance: a :class:`~guidance_engine.Guidance` object, a method name (``"apg"``) or a
                dict ``{"name": "apg", "scale": 5.0, ...}``; None is CFG at ``guidance_scale``.
            guidance_scale: CFG's scale when ``guidance`` is None (default 7.5); with a method
                name or dict, that method's ``scale``. Must not be set with a guidance object.
            sampler: "scheduler" (this pipeline's scheduler through its ``step``), "ddim",
                "euler", "euler_ancestral" or "dpmpp_2m" (the core's solvers), or None: the
                scheduler, or the solver mirroring it when the method needs one (CFG++).
            eta: DDIM's eta in [0, 1] (DDIM scheduler or sampler "ddim").
            particle_output: with a particle method (FKC, ``particles`` K > 1) every image is a
                group of K particles: "draw" (default) returns one particle of each group drawn
                by its final normalised weight (distributed like the weighted population; "best",
                the old name, means the same), "all" every particle (K images per image,
                consecutive). ``nfe`` counts the work of a whole group.
            product_prompt: a second prompt for product-of-experts targets (FKC
                ``target="product"`` samples from (p(x|prompt) p(x|product_prompt))^b).
            reference_unet: (keyword) autoguidance's reference network, a weaker UNet taking the
                same text embeddings; default: the one given to ``from_pretrained``/``from_pipe``
                or the model directory's ``reference_unet/`` subfolder.

        Returns:
            :class:`GuidedPipelineOutput` (images, nsfw flags, ``nfe`` per image, the guidance
            config and sampler), or ``(images, nsfw)`` when ``return_dict`` is False.
        """
        return self._generate(
            prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps, timesteps=timesteps,
            sigmas=sigmas, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale, clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, guidance=guidance,
            sampler=sampler, particle_output=particle_output, product_prompt=product_prompt, **kwargs)

    def _generate(self, *, prompt, height, width, num_inference_steps, timesteps, sigmas, guidance_scale,
                  negative_prompt, num_images_per_prompt, eta, generator, latents, prompt_embeds,
                  negative_prompt_embeds, output_type, return_dict, cross_attention_kwargs, guidance_rescale,
                  clip_skip, callback_on_step_end, callback_on_step_end_tensor_inputs, guidance, sampler,
                  particle_output, product_prompt, start: ImageInput | None = None, reference_unet=None,
                  **kwargs: Any):
        """The shared body of text-to-image, img2img and inpainting (``start``: the input image)."""
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {unsupported} "
                             "(IP-Adapter and the deprecated `callback` are not supported)")
        distilled = is_guidance_distilled(self.unet)  # the scale is embedded: guidance_scale means that
        embedded = embedded_scale(guidance_scale, self.default_guidance_scale) if distilled else None
        if start is not None:  # the image decides the size (checked: a multiple of the VAE factor)
            height, width = start.size(self, height, width)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
                          None, None, callback_on_step_end_tensor_inputs)
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
            negative_prompt = negative_prompt_embeds = None

        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, True, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip)
        branches = NetworkBranches(self.unet, {
            "cond": {"encoder_hidden_states": prompt_embeds},
            "uncond": {"encoder_hidden_states": negative_prompt_embeds},
        }, cross_attention_kwargs, providers=conditions.independent_text_conditions(self, prompt_embeds, generator),
            networks={"reference": self.reference_network(guide, reference_unet)})
        if distilled:
            embed_scale(self, branches, embedded, device, prompt_embeds.dtype)
        conditions.add_product_branch(branches, product_prompt, lambda texts: self.encode_prompt(
            texts, device, num_images_per_prompt, False, lora_scale=lora_scale, clip_skip=clip_skip)[0],
            batch_size, num_images_per_prompt)
        def encode_texts(texts, embeds=None) -> dict[str, torch.Tensor]:
            return {"encoder_hidden_states": self.encode_prompt(texts, device, num_images_per_prompt, False,
                                                                prompt_embeds=embeds, lora_scale=lora_scale,
                                                                clip_skip=clip_skip)[0]}

        if negative_branch is not None:
            conditions.add_negative_branch(branches, encode_texts(*negative_branch))
        guide = conditions.attach_text_gfcg(self, guide, branches, prompt, num_images_per_prompt, lambda texts: self.encode_prompt(
            texts, device, num_images_per_prompt, False, lora_scale=lora_scale, clip_skip=clip_skip)[0])
        conditions.add_text_branches(self, branches, guide, encode_texts, batch_size=batch_size, generator=generator)

        latents, nfe_per_image, state = self.denoise(
            branches, guide, shape, dtype=prompt_embeds.dtype, device=device, generator=generator, latents=latents,
            start=start, particle_output=particle_output, sampler=sampler, num_inference_steps=num_inference_steps,
            timesteps=timesteps, sigmas=sigmas, eta=eta, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={"prompt_embeds": ("cond", "encoder_hidden_states"),
                              "negative_prompt_embeds": ("uncond", "encoder_hidden_states")},
            call_attributes={"_clip_skip": clip_skip, "_guidance_rescale": guidance_rescale,
                             **({"_guidance_scale": embedded} if distilled else {})})
        if output_type == "latent":
            image, has_nsfw = latents, None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False,
                                    generator=generator)[0]
            image, has_nsfw = self.run_safety_checker(image, device, prompt_embeds.dtype)
            denormalize = [True] * image.shape[0] if has_nsfw is None else [not flag for flag in has_nsfw]
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return image, has_nsfw
        return self.guided_output(image, nfe_per_image, state, guide, sampler, nsfw_content_detected=has_nsfw,
                                  warnings=cut)

    def text_to_image(self, prompt, **kwargs: Any):
        """The text-to-image call that :meth:`regenerate` runs (img2img / inpainting subclasses too)."""
        return GuidedStableDiffusionPipeline.__call__(self, prompt, **kwargs)
