"""``GuidedStableDiffusionImg2ImgPipeline``: image-to-image with every guidance method and sampler.

A thin adapter onto the text-to-image pipeline's body: the input image is encoded (sampling the
VAE posterior with ``generator``), noise is drawn, and the sampler core runs the last
``int(num_inference_steps * strength)`` steps from the image noised to the first of their
levels, exactly as diffusers' ``StableDiffusionImg2ImgPipeline`` does (same order of draws from
the generator, so CFG through the engine reproduces the stock pipeline bit for bit).
Every ``guidance=`` method and ``sampler=`` works; windows in sigma and step fractions refer to
the full schedule, so a method's interval means the same noise levels at every strength.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .common import GuidanceSpec, GuidedPipelineOutput
from .image_input import ImageInput, ImageLike, load_image
from .stable_diffusion import GuidedStableDiffusionPipeline


class GuidedStableDiffusionImg2ImgPipeline(GuidedStableDiffusionPipeline):
    """Stable Diffusion image-to-image with any guidance method of the engine.

    ``from_pretrained`` / ``from_pipe`` as for the stock pipelines (from a stock SD or img2img
    pipeline, or from the engine's text-to-image one: components are shared, nothing is modified).
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageLike = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
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
        latents: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Transform ``image`` towards ``prompt``. Arguments are the stock img2img pipeline's, plus
        those of :class:`GuidedStableDiffusionPipeline` (``guidance``, ``sampler``, ``particle_output``).

        Args:
            image: the input image (PIL, numpy, a [-1, 1] tensor, latents with the VAE's channels, or
                a path); its height and width must be multiples of the VAE factor (8 for SD).
            strength: in (0, 1]: how much of the schedule is run, 1 = from (almost) pure noise;
                ``int(num_inference_steps * strength)`` steps are taken (at least 1).
            latents: the noise to add to the image (unit Gaussian, latent shape); drawn from
                ``generator`` when None.
        """
        return self._generate(
            prompt=prompt, height=None, width=None, num_inference_steps=num_inference_steps, timesteps=timesteps,
            sigmas=sigmas, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale, clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, guidance=guidance,
            sampler=sampler, particle_output=particle_output, product_prompt=None,
            start=ImageInput(load_image(image), strength), **kwargs)
