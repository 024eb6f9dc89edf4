"""``GuidedStableDiffusionXLImg2ImgPipeline`` and ``GuidedStableDiffusionXLInpaintPipeline``.

The SDXL pair of :mod:`.img2img` / :mod:`.inpaint`: the text-to-image SDXL body with the input
image as the start (stock encoding: float32 VAE pass when ``force_upcast``, ``latents_mean`` /
``latents_std`` normalisation for img2img), so CFG through the engine reproduces diffusers'
``StableDiffusionXLImg2ImgPipeline`` / ``StableDiffusionXLInpaintPipeline`` on base models.
Not supported (refused with a clear error): ``denoising_start`` / ``denoising_end`` (the
base + refiner ensemble), aesthetic-score conditioning of refiner checkpoints, 9-channel
inpainting UNets.
"""

from __future__ import annotations

from typing import Any

import torch

from .common import GuidedPipelineOutput
from .image_input import ImageInput, load_image
from .inpaint import MaskedImageInput
from .stable_diffusion_xl import GuidedStableDiffusionXLPipeline


class _XLImageMixin:
    def _check_refiner(self) -> None:
        if getattr(self.config, "requires_aesthetics_score", False):
            raise ValueError("unet: refiner checkpoints with aesthetic-score conditioning are not supported")


class GuidedStableDiffusionXLImg2ImgPipeline(_XLImageMixin, GuidedStableDiffusionXLPipeline):
    """SDXL image-to-image with any guidance method of the engine (base checkpoints)."""

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image: Any = None, strength: float = 0.3,
                 **kwargs: Any) -> GuidedPipelineOutput | tuple:
        """Transform ``image`` towards ``prompt``: the stock SDXL img2img arguments (default strength
        0.3) plus ``guidance``, ``sampler``, ``particle_output``; any other argument as in
        :meth:`GuidedStableDiffusionXLPipeline.__call__`. ``height`` / ``width`` come from the image."""
        self._check_refiner()
        for name in ("height", "width"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: img2img takes the size of the image; resize the image instead")
        return GuidedStableDiffusionXLPipeline.__call__(
            self, prompt, start=ImageInput(load_image(image), strength), **kwargs)


class GuidedStableDiffusionXLInpaintPipeline(_XLImageMixin, GuidedStableDiffusionXLPipeline):
    """SDXL inpainting (4-channel base UNets) with any guidance method of the engine."""

    @property
    def mask_processor(self):
        from diffusers.image_processor import VaeImageProcessor

        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True,
                                 do_convert_grayscale=True)

    def image_to_latents(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """The stock SDXL inpainting encoding: the (upcast) posterior sample times ``scaling_factor``
        only (its ``_encode_vae_image`` ignores ``latents_mean`` / ``latents_std``)."""
        return self.vae.config.scaling_factor * self.posterior_sample(pixels, generator)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image: Any = None, mask_image: Any = None,
                 strength: float = 0.9999, **kwargs: Any) -> GuidedPipelineOutput | tuple:
        """Repaint the white region of ``mask_image`` in ``image``: the stock SDXL inpainting arguments
        (default strength 0.9999) plus ``guidance``, ``sampler``, ``particle_output``."""
        self._check_refiner()
        if mask_image is None:
            raise ValueError("mask_image: inpainting needs a mask (white = repaint, black = keep)")
        start = MaskedImageInput(load_image(image), strength, mask_image=load_image(mask_image, "mask_image"))
        return GuidedStableDiffusionXLPipeline.__call__(self, prompt, start=start, **kwargs)
