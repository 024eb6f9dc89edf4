"""``GuidedStableDiffusionInpaintPipeline``: inpainting with every guidance method and sampler.

For an ordinary (4-channel) UNet this is inpainting by replacement, as diffusers'
``StableDiffusionInpaintPipeline`` does it: the region outside the mask is reset after every
step to the input image noised to the next level (the sampler core's ``StartImage.mask``), and
at ``strength=1`` the run starts from pure noise. The draws from ``generator`` follow the stock
order (image latents, noise, masked-image latents), so CFG through the engine reproduces the
stock pipeline bit for bit. Inpainting-specific UNets (9 input channels: latents, mask,
masked-image latents) get the mask and the masked image as extra input channels of every row of
the one batched forward, as in the stock pipeline, and no replacement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from guidance_engine.samplers import StartImage

from .branches import NetworkBranches
from .common import GuidanceSpec, GuidedPipelineOutput
from .image_input import ImageInput, ImageLike, image_size, load_image
from .stable_diffusion import GuidedStableDiffusionPipeline


@dataclass(frozen=True)
class MaskedImageInput(ImageInput):
    """The input image, its mask (white = repaint, black = keep) and ``strength``."""

    mask_image: ImageLike = None

    def size(self, pipe, height: int | None, width: int | None) -> tuple[int, int]:
        latent, unet = pipe.vae.config.latent_channels, pipe.unet.config.in_channels
        if unet not in (latent, 2 * latent + 1):
            raise ValueError(f"unet: inpainting needs a UNet with {latent} (ordinary) or {2 * latent + 1} "
                             f"(inpainting-specific) input channels, got {unet}")
        h, w = super().size(pipe, height, width)
        if self.is_latents(pipe):
            raise ValueError("image: inpainting needs the image in pixels (the masked image is re-encoded), "
                             "got latents")
        image_hw, mask_hw = image_size(self.image), image_size(self.mask_image)
        if image_hw != mask_hw:
            raise ValueError(f"mask_image: its size {mask_hw[0]} x {mask_hw[1]} must match the image's "
                             f"{image_hw[0]} x {image_hw[1]}")
        return h, w

    def noised_strength(self) -> float | None:
        """At strength 1 inpainting starts from pure noise (the stock pipelines' rule)."""
        return None if self.strength == 1.0 else float(self.strength)

    def prepare(self, pipe, branches: NetworkBranches, shape: tuple[int, ...], particles: int, *, dtype, device,
                generator, latents: torch.Tensor | None) -> tuple[StartImage, torch.Tensor | None]:
        height, width = shape[2] * pipe.vae_scale_factor, shape[3] * pipe.vae_scale_factor
        pixels = self.pixels(pipe, height, width).to(dtype=torch.float32)
        nine_channels = pipe.unet.config.in_channels != pipe.vae.config.latent_channels
        if nine_channels and self.strength == 1.0:
            # pure noise and no replacement: the stock pipeline does not encode the image (nor
            # draw from the generator for it) in this case
            clean = torch.zeros(shape, device=device, dtype=dtype)
        else:
            # contiguous like the stock pipeline's repeat: the VAE may hand back channels-last
            # latents, and the UNet's kernels round differently on another memory layout
            clean = self.encode(pipe, pixels, shape[0], dtype, device, generator).contiguous()
        if latents is None and particles == 1:
            latents = pipe.initial_noise(shape, generator, device, dtype, None)
        mask = pipe.mask_processor.preprocess(self.mask_image, height=height, width=width)
        # The stock pipeline encodes the masked image here even for a 4-channel UNet, which draws
        # from the generator; do the same so that later draws (stochastic samplers) match it.
        masked = (pixels * (mask < 0.5)).to(device=device, dtype=dtype)
        masked_latents = self.encode(pipe, masked, masked.shape[0], dtype, device, generator)
        mask = torch.nn.functional.interpolate(mask, size=tuple(shape[2:])).to(device=device, dtype=dtype)
        mask = self.per_output(mask, shape[0], "mask_image")
        if not nine_channels:
            return StartImage(clean, float(self.strength), mask, pure_noise_at_full_strength=True), latents
        # An inpainting UNet sees the mask and the masked image as extra input channels of every row
        # and repaints by itself: no replacement after the steps.
        extra = torch.cat([mask, self.per_output(masked_latents, shape[0], "image")], dim=1)
        for condition in branches.conditions.values():
            condition["inpaint_channels"] = extra
        for name, provide in list(branches.providers.items()):
            branches.providers[name] = lambda provide=provide: {**provide(), "inpaint_channels": extra}
        return StartImage(clean, float(self.strength), None, pure_noise_at_full_strength=True), latents

    @staticmethod
    def per_output(tensor: torch.Tensor, rows: int, name: str) -> torch.Tensor:
        """One row per output image (the stock ``repeat``)."""
        if tensor.shape[0] == rows:
            return tensor
        if rows % tensor.shape[0]:
            raise ValueError(f"{name}: {tensor.shape[0]} inputs cannot be spread over {rows} outputs")
        return tensor.repeat(rows // tensor.shape[0], 1, 1, 1)


class GuidedStableDiffusionInpaintPipeline(GuidedStableDiffusionPipeline):
    """Stable Diffusion inpainting with any guidance method of the engine (4- and 9-channel UNets)."""

    @property
    def mask_processor(self):
        """The stock inpainting pipeline's mask preprocessing: grayscale, binarised, in [0, 1]."""
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True,
                                 do_convert_grayscale=True)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageLike = None,
        mask_image: ImageLike = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 1.0,
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
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Repaint the white region of ``mask_image`` in ``image`` following ``prompt``. Arguments
        are the stock inpainting pipeline's, plus ``guidance``, ``sampler``, ``particle_output``.

        Args:
            image: the input image (PIL, numpy, [-1, 1] tensor, or a path); height and width must be
                multiples of the VAE factor (8 for SD), or give ``height`` / ``width`` to resize.
            mask_image: same size as ``image``; white (>= 0.5) is repainted, black kept.
            strength: in (0, 1]; 1 starts from pure noise inside the mask.
        """
        if mask_image is None:
            raise ValueError("mask_image: inpainting needs a mask (white = repaint, black = keep)")
        start = MaskedImageInput(load_image(image), strength, mask_image=load_image(mask_image, "mask_image"))
        return self._generate(
            prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps, timesteps=timesteps,
            sigmas=sigmas, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale, clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, guidance=guidance,
            sampler=sampler, particle_output=particle_output, product_prompt=None, start=start, **kwargs)
