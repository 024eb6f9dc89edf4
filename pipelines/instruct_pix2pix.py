"""``GuidedStableDiffusionInstructPix2PixPipeline``: instruction-based image editing
(InstructPix2Pix) with the engine's sampler core and every guidance method it can serve.

The stock pipeline (diffusers' ``StableDiffusionInstructPix2PixPipeline``) runs an 8-channel UNet
on [noisy latents, input-image latents] and guides with two conditions in one batched forward of
three rows per image. Here those rows are three branches of the branch model:

    "cond"    the prompt's text embeddings      + the image latents
    "image"   the negative prompt's embeddings  + the image latents
              (the empty prompt without one)
    "uncond"  the negative prompt's embeddings  + zero image latents (neither condition)

The image latents reach the UNet as extra input channels of each branch's rows (the branch
model's ``inpaint_channels``, concatenated after the scheduler has scaled the latents, as the
stock pipeline does). ``guidance=None`` is the stock recipe: two-condition CFG (``dual_cfg``) at
``guidance_scale`` and ``image_guidance_scale``, its rows in the stock order [cond, image,
uncond], so that the engine reproduces the stock pipeline bit for bit (tests/
test_instruct_pix2pix.py). Like the stock pipeline it guides only when ``guidance_scale > 1`` and
``image_guidance_scale >= 1``, and otherwise returns the conditional prediction alone
(``guidance="dual_cfg"`` applies the rule at every pair of scales).

Every other method sees "cond" and "uncond" as above: CFG, APG, PAG, ... guide from "neither the
instruction nor the image" towards "both". Methods that need a branch this pipeline does not
provide (ICG's independent condition, Perp-Neg's negative prompt branch, GFCG's classes, FKC's
product prompt) are refused before any model call, naming the missing branch.

Kept from the stock pipeline: the image latents are the VAE posterior's mode, unscaled; n input
images for r output rows are repeated whole, [image 1..n] r / n times (so with one image per
prompt and ``num_images_per_prompt`` > 1, row j gets image j mod n rather than its prompt's
image, as in the stock pipeline, whose output such calls reproduce). Differences: ``eta`` None is the
sampler's own (DDIM: 0, as the stock default); a callback's ``prompt_embeds`` are the prompt's
rows only (the stock pipeline hands the three branches stacked) and ``image_latents`` are not
offered (they are per-branch conditioning here); IP-Adapter inputs are refused.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from guidance_engine.guidance import Guidance
from guidance_engine.registry import resolve_guidance

from . import conditions
from .branches import NetworkBranches
from .common import TEXT_LOCK, GuidanceSpec, GuidedPipelineMixin, GuidedPipelineOutput
from .image_input import ImageLike, load_image

#: ``image_guidance_scale`` when not given (the stock default).
DEFAULT_IMAGE_GUIDANCE_SCALE = 1.5

#: Callback tensors besides the latents: name -> (branch, conditioning key).
CALLBACK_TENSORS: dict[str, tuple[str, str]] = {"prompt_embeds": ("cond", "encoder_hidden_states")}


def check_image_count(images: int, rows: int) -> None:
    """ValueError unless the input images spread evenly over the output rows (one image, one per
    prompt, or one per output image)."""
    if images > rows or rows % images:
        raise ValueError(f"image: {images} images cannot be spread over {rows} outputs (give one image, or one "
                         "per prompt)")


class GuidedStableDiffusionInstructPix2PixPipeline(GuidedPipelineMixin, StableDiffusionInstructPix2PixPipeline):
    """InstructPix2Pix image editing with any guidance method of the engine.

    Load like the stock pipeline (``from_pretrained(path)``, e.g. a saved
    ``StableDiffusionInstructPix2PixPipeline``) or convert one with ``from_pipe(stock_pipe)``
    (components shared, the stock pipeline not modified).
    """

    default_guidance_scale = 7.5

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageLike = None,
        num_inference_steps: int = 100,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        particle_output: str = "draw",
        reference_unet=None,
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Edit ``image`` following the instruction ``prompt``. Arguments are the stock
        pipeline's, plus ``guidance``, ``sampler`` and ``particle_output`` as in
        :class:`~guidance_engine.pipelines.GuidedStableDiffusionPipeline`.

        Args:
            image: the input image (PIL, numpy, a [-1, 1] tensor, a path, or latents with the
                VAE's channels), one for all prompts or one per prompt; its size sets the output's
                (rounded down to a multiple of the VAE factor, as the stock preprocessing does).
            guidance_scale: the text scale s in [0, 100] (default 7.5); with a method name or dict
                its ``scale``. Must not be set with a guidance object.
            image_guidance_scale: the image scale s_img in [0, 100] (default 1.5) of ``guidance``
                None or "dual_cfg" (its ``image_scale``); refused with a method that has none.
            guidance: a :class:`~guidance_engine.Guidance` object, a method name or dict; None:
                the stock two-condition CFG (see the module docstring). "uncond" is the negative
                (empty) prompt with zero image latents.
            eta: DDIM's eta in [0, 1]; None: the sampler's own (0 for a DDIM scheduler).
            reference_unet: autoguidance's reference network (an 8-channel UNet taking the same
                inputs); default: the one given to ``from_pretrained``/``from_pipe``.

        Returns:
            :class:`GuidedPipelineOutput` (images, nsfw flags, ``nfe`` per image: 3 per step for
            the stock recipe, the guidance config and sampler), or ``(images, nsfw)`` when
            ``return_dict`` is False.
        """
        self.check_editing_call(kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(prompt, None, negative_prompt, prompt_embeds, negative_prompt_embeds, None, None,
                          callback_on_step_end_tensor_inputs)
        particle_output = self.check_particle_output(particle_output)
        guide = self.for_prompts(self.resolve_edit_guidance(guidance, guidance_scale, image_guidance_scale),
                                 negative_prompt, negative_prompt_embeds)
        pixels = self.image_processor.preprocess(load_image(image))
        _, shape = self.check_prompted_call(
            guide, prompt, prompt_embeds, self.output_latent_shape(pixels), num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps, timesteps=None, sigmas=None, sampler=sampler, eta=eta,
            generator=generator, latents=latents, output_type=output_type)
        check_image_count(pixels.shape[0], shape[0])
        cut = self.truncated_prompts(prompt=prompt, negative_prompt=negative_prompt)
        device = self._execution_device

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds)
        image_latents = self.image_latents(pixels, shape[0], prompt_embeds.dtype, device)
        branches = NetworkBranches(self.unet, {
            "cond": {"encoder_hidden_states": prompt_embeds, "inpaint_channels": image_latents},
            conditions.IMAGE: {"encoder_hidden_states": negative_prompt_embeds, "inpaint_channels": image_latents},
            "uncond": {"encoder_hidden_states": negative_prompt_embeds,
                       "inpaint_channels": torch.zeros_like(image_latents)},
        }, cross_attention_kwargs, networks={"reference": self.reference_network(guide, reference_unet)})

        latents, nfe_per_image, state = self.denoise(
            branches, guide, shape, dtype=prompt_embeds.dtype, device=device, generator=generator, latents=latents,
            particle_output=particle_output, sampler=sampler, num_inference_steps=num_inference_steps,
            timesteps=None, sigmas=None, eta=eta, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors=CALLBACK_TENSORS, call_attributes={"_image_guidance_scale": getattr(
                guide, conditions.IMAGE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE)})  # read by do_classifier_free_guidance
        images, has_nsfw = self.decode_output(latents, output_type, device, prompt_embeds.dtype)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, has_nsfw
        return self.guided_output(images, nfe_per_image, state, guide, sampler, nsfw_content_detected=has_nsfw,
                                  warnings=cut)

    # -- the checks made before any model call -------------------------------------------------
    def check_editing_call(self, extra: dict[str, Any], callback_on_step_end,
                           callback_on_step_end_tensor_inputs: list[str]) -> None:
        """Refuse what this pipeline does not serve: IP-Adapter and the deprecated callback
        arguments, a UNet that is not an 8-channel editing UNet, guidance-distilled UNets, callback
        tensors other than ``latents`` and ``prompt_embeds``."""
        unsupported = sorted(name for name, value in extra.items() if value is not None)
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {unsupported} "
                             "(IP-Adapter and the deprecated `callback` are not supported)")
        latent, channels = self.vae.config.latent_channels, self.unet.config.in_channels
        if channels != 2 * latent:
            raise ValueError(f"unet: InstructPix2Pix needs a UNet with {2 * latent} input channels (the latents and "
                             f"the image latents), got {channels}")
        if self.unet.config.time_cond_proj_dim is not None:
            raise ValueError("unet: guidance-distilled models (time_cond_proj_dim set, e.g. LCM) take no guidance")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        offered = ["latents", *CALLBACK_TENSORS]
        refused = [name for name in callback_on_step_end_tensor_inputs if name not in offered]
        if refused:
            raise ValueError(f"callback_on_step_end_tensor_inputs: this pipeline offers {offered}, got {refused} "
                             "(the image latents are per-branch conditioning here)")

    def resolve_edit_guidance(self, guidance: GuidanceSpec, guidance_scale: float | None,
                              image_guidance_scale: float | None) -> Guidance:
        """``guidance=None``: the stock two-condition CFG at the two scales (defaults 7.5 and
        1.5). A method name or dict takes ``guidance_scale`` as its ``scale`` and
        ``image_guidance_scale`` as its image scale (a method without one refuses it, naming
        its parameters); a guidance object must carry its own scales."""
        if guidance is None:
            scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
            image_scale = DEFAULT_IMAGE_GUIDANCE_SCALE if image_guidance_scale is None else image_guidance_scale
            return conditions.stock_dual_guidance(scale, image_scale)
        if isinstance(guidance, Guidance):
            if guidance_scale is not None or image_guidance_scale is not None:
                raise ValueError("guidance_scale/image_guidance_scale: set them on the guidance object itself, got "
                                 f"guidance={guidance!r}, guidance_scale={guidance_scale!r}, "
                                 f"image_guidance_scale={image_guidance_scale!r}")
            return guidance
        overrides: dict[str, float] = {}
        if guidance_scale is not None:
            overrides["scale"] = guidance_scale
        if image_guidance_scale is not None:
            overrides[conditions.IMAGE_SCALE] = image_guidance_scale
        return resolve_guidance(guidance, **overrides)

    def output_latent_shape(self, pixels: torch.Tensor) -> tuple[int, int, int]:
        """(C, H, W) of one output image's latents: the input image's latent size."""
        latent = self.vae.config.latent_channels
        if pixels.shape[1] == latent:  # the image given as latents
            return latent, pixels.shape[2], pixels.shape[3]
        return latent, pixels.shape[2] // self.vae_scale_factor, pixels.shape[3] // self.vae_scale_factor

    # -- conditioning ---------------------------------------------------------------------------
    def encode_prompt(self, prompt, device, num_images_per_prompt: int, negative_prompt=None,
                      prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt embeddings, negative embeddings), one row per output image: the stock
        ``_encode_prompt`` (which stacks [prompt, negative, negative]) split, one call at a time
        (the shared fast tokenizers are not thread-safe)."""
        with TEXT_LOCK:
            stacked = self._encode_prompt(prompt, device, num_images_per_prompt, True, negative_prompt,
                                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
        text, negative, _ = stacked.chunk(3)
        return text, negative

    def image_latents(self, pixels: torch.Tensor, rows: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The input image's latents, one row per output image, as the stock pipeline makes them:
        the VAE posterior's mode, unscaled (or the latents given), repeated as a whole."""
        pixels = pixels.to(device=device, dtype=dtype)
        latents = pixels if pixels.shape[1] == self.vae.config.latent_channels else \
            self.posterior_sample(pixels, None, mean=True)
        return torch.cat([latents] * (rows // latents.shape[0]))

    def decode_output(self, latents: torch.Tensor, output_type: str, device, dtype: torch.dtype
                      ) -> tuple[Any, list[bool] | None]:
        """(images, nsfw flags): the latents themselves for "latent", else decoded, checked by
        the safety checker (when loaded) and post-processed as the stock pipeline does."""
        if output_type == "latent":
            return latents, None
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        decoded, has_nsfw = self.run_safety_checker(decoded, device, dtype)
        denormalize = [True] * decoded.shape[0] if has_nsfw is None else [not flag for flag in has_nsfw]
        return self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=denormalize), has_nsfw

