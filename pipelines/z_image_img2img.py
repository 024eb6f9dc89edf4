"""``GuidedZImageImg2ImgPipeline``: the stock Z-Image image-to-image pipeline
(``ZImageImg2ImgPipeline``) with the engine's sampler core.

Everything but the start is the text-to-image adapter's (:class:`GuidedZImagePipeline`: prompt
encoding, the branch model, the stock schedule with its ``mu``, the stock CFG with its norm cap and
truncation, decoding). The start follows the stock img2img rules, which are those of SD3 and Flux
(:class:`FlowImageInput`): of the ``n`` steps of the schedule the first ``int(n - n * strength)``
are skipped; the image's VAE posterior is sampled once per given image (``generator[i]`` for image
``i`` when a list) and its latents, ``(z - shift_factor) * scaling_factor``, are repeated over the
outputs; then the noise is drawn and the latents are noised to the first step's level with the
scheduler's ``scale_noise``; given ``latents`` are that noised start. ``cfg_truncation`` reads each
step's own timestep, so it acts on the steps that run, as in the stock loop."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable

import torch

from guidance_engine.guidance import Guidance

from .common import GuidanceSpec, GuidedPipelineOutput
from .image_input import FlowImageInput, ImageInput, ImageLike, load_image
from .z_image import TEXT_KEY, GuidedZImagePipeline, ZImageBranches

__all__ = ["GuidedZImageImg2ImgPipeline"]

#: The input image of the call in progress (per thread and task, so that concurrent calls on one
#: pipeline never see each other's), read where the text-to-image body checks the call and starts
#: the core. None outside an img2img call.
_START: ContextVar[ImageInput | None] = ContextVar("z_image_img2img_start", default=None)


class GuidedZImageImg2ImgPipeline(GuidedZImagePipeline):
    """Z-Image image-to-image with any guidance method of the engine: the input image is encoded
    (the VAE posterior sampled with ``generator``), noise is drawn, and the core runs the steps that
    the stock ``ZImageImg2ImgPipeline`` runs at this ``strength``, from the image noised to the first
    of their levels, in the stock order of draws, so that ``guidance=None`` (the stock CFG, with
    ``cfg_normalization`` and ``cfg_truncation``) reproduces the stock pipeline bit for bit. Guidance
    scales mean what they mean in :class:`GuidedZImagePipeline`. Components are those of the
    text-to-image pipeline (``from_pipe`` from either stock pipeline shares them)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image: ImageLike = None,
        strength: float = 0.6,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        cfg_normalization: bool | float = False,
        cfg_truncation: float | None = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: list[torch.Tensor] | None = None,
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
        """Transform ``image`` towards ``prompt``. Arguments are the stock Z-Image img2img
        pipeline's plus those of :meth:`GuidedZImagePipeline.__call__` (``guidance``, ``sampler``,
        ``eta``, ``particle_output``, ``reference_unet``), which also says what ``guidance_scale``
        (None: the stock 5.0), ``cfg_normalization`` and ``cfg_truncation`` mean.

        Args:
            image: the input image (PIL, numpy, a [-1, 1] tensor, latents with the VAE's channels,
                a path, or a list: one image, or one per prompt); the output has its size unless
                ``height`` / ``width`` are given (the image is then resized to them; the stock
                pipeline cannot run at another size than the image's). Sizes must be multiples of
                twice the VAE's factor (16 for the released models): the stock pipeline resizes
                another image to them silently; here a ValueError says so.
            strength: in (0, 1]: how much of the schedule is run, 1 = from pure noise; the first
                ``int(n - n * strength)`` of the ``n`` steps are skipped (the stock rule).
            latents: (B, C, H, W) start latents at latent size, already noised to the first
                step's level (the stock meaning): the image is then neither encoded nor noised.
        """
        start = FlowImageInput(load_image(image), strength)
        height, width = start.size(self, height, width)  # strength and size, before any model call
        token = _START.set(start)
        try:
            return super().__call__(
                prompt, height=height, width=width, num_inference_steps=num_inference_steps, sigmas=sigmas,
                guidance_scale=guidance_scale, cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation,
                negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt, generator=generator,
                latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                output_type=output_type, return_dict=return_dict, joint_attention_kwargs=joint_attention_kwargs,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                max_sequence_length=max_sequence_length, guidance=guidance, sampler=sampler, eta=eta,
                particle_output=particle_output, **kwargs)
        finally:
            _START.reset(token)

    def check_prompted_call(self, guide: Guidance, prompt, prompt_embeds, latent_shape: tuple[int, ...], *,
                            num_images_per_prompt: int, **run: Any) -> tuple[int, tuple[int, ...]]:
        """The text-to-image checks with the call's input image: a method that needs a pure-noise
        start (FKC's prior weighting) is refused before any prompt is encoded."""
        return super().check_prompted_call(guide, prompt, prompt_embeds, latent_shape,
                                           num_images_per_prompt=num_images_per_prompt, start=_START.get(), **run)

    def denoise(self, branches: ZImageBranches, guide: Guidance, shape: tuple[int, ...], *, dtype: torch.dtype,
                **core: Any) -> tuple[torch.Tensor, list[int], Any]:
        """The core run from the call's input image. The stock img2img pipeline encodes the image
        and draws the noise in the prompt embeddings' dtype (text-to-image draws float32), so
        the start is made in the conditional branch's embedding dtype."""
        start = _START.get()
        if start is not None:
            dtype = branches.conditions["cond"][TEXT_KEY].dtype
        return super().denoise(branches, guide, shape, dtype=dtype, start=start, **core)

    def image_to_latents(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """Shifted, scaled latents of [-1, 1] images, as the stock Z-Image img2img pipeline encodes
        its input (the inverse of its decoding ``z / scaling_factor + shift_factor``)."""
        config = self.vae.config
        return (self.posterior_sample(pixels, generator) - config.shift_factor) * config.scaling_factor
