"""``GuidedQwenImageImg2ImgPipeline``: the stock Qwen-Image image-to-image pipeline
(``QwenImageImg2ImgPipeline``) with the engine's sampler core.

Everything but the start is the text-to-image adapter's (:class:`GuidedQwenImagePipeline`: prompt
encoding with the padding masks, the branch model on packed tokens, the stock schedule with its
``mu``, the stock true CFG with its per-token renorm, decoding). The start follows the stock img2img
rules, which are those of SD3 and Flux (:class:`FlowImageInput`): of the ``n`` steps of the schedule
the first ``int(n - n * strength)`` are skipped; the image's VAE posterior is sampled once per given
image (``generator[i]`` for image ``i`` when a list) and its latents are repeated over the outputs;
then the noise is drawn and the latents are noised to the first step's level with the scheduler's
``scale_noise``; given ``latents`` are that noised start. What is Qwen's own is the encoding: the
VAE encodes one-frame videos (B, C, 1, H, W), its latents are normalised per channel,
``(z - latents_mean) / latents_std`` (the inverse of the decoding), and its latent channels are its
config's ``z_dim``.

Two deviations from the stock pipeline (diffusers 0.42.1): without ``height`` / ``width`` the output
has the input image's size (stock resizes the image to the model's default 1024 x 1024), and
``strength`` must be in (0, 1] (stock accepts 0 and then fails after encoding the prompts)."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable

import torch

from guidance_engine.guidance import Guidance

from .common import GuidanceSpec, GuidedPipelineOutput
from .image_input import FlowImageInput, ImageInput, ImageLike, load_image
from .qwen_image import GuidedQwenImagePipeline, QwenImageBranches

__all__ = ["GuidedQwenImageImg2ImgPipeline", "QwenImageInput"]

#: The input image of the call in progress (per thread and task, so that concurrent calls on one
#: pipeline never see each other's), read where the text-to-image body checks the call and starts
#: the core. None outside an img2img call.
_START: ContextVar[ImageInput | None] = ContextVar("qwen_image_img2img_start", default=None)


@dataclass(frozen=True)
class QwenImageInput(FlowImageInput):
    """An img2img input image with the stock SD3 / Flux rules (:class:`FlowImageInput`) for a
    Qwen-Image VAE, whose latent channels are its config's ``z_dim`` (it has no
    ``latent_channels``): an input of that many channels is taken as normalised latents, as the
    stock pipeline takes it (neither encoded nor normalised)."""

    @staticmethod
    def latent_channels(pipe) -> int:
        return pipe.vae.config.z_dim


class GuidedQwenImageImg2ImgPipeline(GuidedQwenImagePipeline):
    """Qwen-Image image-to-image with any guidance method of the engine: the input image is encoded
    (the VAE posterior sampled with ``generator``), noise is drawn, and the core runs the steps that
    the stock ``QwenImageImg2ImgPipeline`` runs at this ``strength``, from the image noised to the
    first of their levels, in the stock order of draws, so that ``guidance=None`` (the conditional
    alone, or the stock true CFG with its renorm) reproduces the stock pipeline bit for bit. Scales
    mean what they mean in :class:`GuidedQwenImagePipeline`. Components are those of the
    text-to-image pipeline (``from_pipe`` from either stock pipeline shares them)."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float | None = None,
        image: ImageLike = None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.6,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        output_type: str = "pil",
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
    ) -> GuidedPipelineOutput | tuple:
        """Transform ``image`` towards ``prompt``. Arguments are the stock Qwen-Image img2img
        pipeline's plus those of :meth:`GuidedQwenImagePipeline.__call__` (``guidance``,
        ``sampler``, ``eta``, ``particle_output``, ``reference_unet``), which also says what
        ``true_cfg_scale`` (None: the stock 4.0) and ``guidance_scale`` mean.

        Args:
            image: the input image (PIL, numpy, a [-1, 1] tensor, normalised latents with the VAE's
                ``z_dim`` channels, a path, or a list: one image, or one per prompt); the output has
                its size unless ``height`` / ``width`` are given (the image is then resized to them,
                as the stock pipeline does; stock defaults to the model's sample size instead).
                Sizes are cut down to multiples of twice the VAE's factor, as stock does.
            strength: in (0, 1]: how much of the schedule is run, 1 = from pure noise; the first
                ``int(n - n * strength)`` of the ``n`` steps are skipped (the stock rule).
            latents: the packed start latents, (B, H/2 * W/2, C * 4) at latent size H x W, already
                noised to the first step's level (the stock meaning): the image is then neither
                encoded nor noised.
        """
        start = QwenImageInput(load_image(image), strength)
        height, width = start.size(self, height, width)  # strength and size, before any model call
        token = _START.set(start)
        try:
            return super().__call__(
                prompt, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, height=height, width=width,
                num_inference_steps=num_inference_steps, sigmas=sigmas, guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                negative_prompt_embeds=negative_prompt_embeds, negative_prompt_embeds_mask=negative_prompt_embeds_mask,
                output_type=output_type, return_dict=return_dict, attention_kwargs=attention_kwargs,
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

    def denoise(self, branches: QwenImageBranches, guide: Guidance, shape: tuple[int, ...],
                **core: Any) -> tuple[torch.Tensor, list[int], Any]:
        """The core run from the call's input image (encoded, then the noise drawn, in the
        conditional embeddings' dtype, as the stock ``prepare_latents``)."""
        return super().denoise(branches, guide, shape, start=_START.get(), **core)

    def image_to_latents(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """Normalised latents (B, z_dim, h, w) of [-1, 1] images (B, 3, H, W), as the stock
        Qwen-Image img2img pipeline encodes its input: the VAE encodes them as one-frame videos,
        the posterior is sampled with ``generator``, then ``(z - latents_mean) * (1 / latents_std)``
        per channel (the stock arithmetic, the inverse of :meth:`decode_latents`)."""
        latents = self.posterior_sample(pixels.unsqueeze(2), generator)
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return ((latents - mean) * inverse_std)[:, :, 0]
