"""``pipe.invert(image, prompt, guidance="cfgpp")``: DDIM inversion with CFG or CFG++, and editing.

Inversion maps an image to the noise from which a DDIM (eta 0) run with the same prompt, method
and number of steps regenerates it; regenerating from that noise with another prompt edits the
image (the official CFG++ code's "WardSwap" editing). CFG++ keeps its scale in [0, 1], so the
inverted path stays close to the data and reconstructions stay faithful where CFG at its usual
scales drifts. See :mod:`guidance_engine.samplers.inversion` for the update and its sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils import BaseOutput

from guidance_engine.samplers.inversion import check_inversion
from guidance_engine.samplers.inversion import invert as invert_latents
from guidance_engine.samplers.schedule import is_flow_scheduler

from . import conditions
from .branches import NetworkBranches
from .common import GuidanceSpec
from .image_input import ImageInput, ImageLike, load_image


@dataclass
class InversionOutput(BaseOutput):
    """``latents``: pass as ``latents=`` to the pipeline with ``sampler="ddim"``, ``eta=0`` and
    ``num_inference_steps=num_steps`` to regenerate (same prompt) or edit (another prompt);
    ``image_latents``: the encoded input; ``nfe`` per image; the method used."""

    latents: torch.Tensor
    image_latents: torch.Tensor
    nfe: float
    num_steps: int
    guidance: dict[str, Any]


class InversionMixin:
    """Adds :meth:`invert` and :meth:`regenerate` to the SD and SDXL pipelines (text-to-image,
    img2img, inpainting). A pipeline provides three hooks: :meth:`inversion_branches` (its prompt
    conditioning), :meth:`inversion_latents` (its image encoding) and :meth:`text_to_image` (its
    text-to-image call, which regenerates)."""

    @torch.no_grad()
    def invert(self, image: ImageLike, prompt: str | list[str] = "", *, guidance: GuidanceSpec = conditions.DEFAULT_INVERSION_GUIDANCE,
               guidance_scale: float | None = None, num_inference_steps: int = 10, negative_prompt: str | None = None,
               cross_attention_kwargs: dict[str, Any] | None = None, **conditioning: Any) -> InversionOutput:
        """Invert ``image`` (PIL, numpy, a [-1, 1] tensor, or a path) with ``prompt``.

        Args:
            guidance: "cfgpp" (default, scale lambda in [0, 1], 0.6 unless ``guidance_scale``),
                "cfg", or any single-sample method; FKC is refused.
            num_inference_steps: inversion steps; the official CFG++ default is 10.
            negative_prompt: the prompt of the unconditional branch; None: the pipeline's own null
                condition, the one :meth:`regenerate` uses too (SD: the empty prompt, as in the
                official code; SDXL: zeros when ``force_zeros_for_empty_prompt``).
            conditioning: the pipeline's further prompt conditioning (SDXL: ``prompt_2``,
                ``negative_prompt_2``, ``original_size``, ``crops_coords_top_left``,
                ``target_size``, ``clip_skip``); pass the same to :meth:`regenerate`.

        The image is encoded with the VAE posterior's mean (deterministic; the official code
        samples it), its size must be a multiple of the VAE factor.
        """
        start = ImageInput(load_image(image), 1.0)
        height, width = start.size(self, None, None)
        guide = self.resolve_guidance(guidance, guidance_scale)
        self.prompt_batch_size(prompt, None)  # a string or a non-empty list of strings
        check_inversion(guide, self.scheduler, num_inference_steps)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)
        branches = self.inversion_branches(prompts, negatives, (height, width), cross_attention_kwargs, **conditioning)
        branches.check_supports(guide)
        dtype = branches.conditions["cond"]["encoder_hidden_states"].dtype
        pixels = start.image if start.is_latents(self) else start.pixels(self, height, width)
        pixels = pixels.to(device=self._execution_device, dtype=dtype)
        clean = pixels if pixels.shape[1] == self.vae.config.latent_channels else self.inversion_latents(pixels)
        if clean.shape[0] != len(prompts):
            if len(prompts) % clean.shape[0]:
                raise ValueError(f"image: {clean.shape[0]} images for {len(prompts)} prompts")
            clean = torch.cat([clean] * (len(prompts) // clean.shape[0]))
        prediction_type = "flow" if is_flow_scheduler(self.scheduler) else \
            self.scheduler.config.get("prediction_type", "epsilon")
        progress = {**getattr(self, "_progress_bar_config", {})}
        result = invert_latents(branches, clean, guide, scheduler=self.scheduler, num_steps=num_inference_steps,
                                prediction_type=prediction_type, progress=progress or True)
        return InversionOutput(latents=result.latents, image_latents=clean, nfe=result.nfe,
                               num_steps=result.num_steps, guidance=guide.to_dict())

    def regenerate(self, prompt: str | list[str], inversion: InversionOutput, *, guidance: GuidanceSpec = None,
                   guidance_scale: float | None = None, **kwargs: Any):
        """Run DDIM (eta 0) from ``inversion.latents`` with ``prompt``: the source prompt
        reconstructs the image, another prompt edits it. ``guidance`` defaults to the method the
        inversion used; other keyword arguments go to the text-to-image call (``output_type``, ...)."""
        if not isinstance(inversion, InversionOutput):
            raise ValueError(f"inversion: expected what invert() returns (an InversionOutput), got "
                             f"{type(inversion).__name__}")
        if guidance is None:
            guidance = dict(inversion.guidance)
            if guidance_scale is not None:
                guidance["scale"] = guidance_scale
                guidance_scale = None
        return self.text_to_image(prompt, latents=inversion.latents, num_inference_steps=inversion.num_steps,
                                  guidance=guidance, guidance_scale=guidance_scale, sampler="ddim", eta=0.0, **kwargs)

    # -- the pipeline's hooks (SD 1.x / 2.x here; SDXL overrides them) -----------------------------
    def inversion_branches(self, prompts: list[str], negative_prompts: list[str] | None, size: tuple[int, int],
                           cross_attention_kwargs: dict[str, Any] | None, **conditioning: Any) -> NetworkBranches:
        """The ``cond`` / ``uncond`` branches of one image per prompt."""
        if conditioning:
            raise ValueError(f"{type(self).__name__}.invert: unexpected argument(s) {sorted(conditioning)}")
        cond, uncond = self.encode_prompt(prompts, self._execution_device, 1, True, negative_prompts)
        return NetworkBranches(self.unet, {"cond": {"encoder_hidden_states": cond},
                                        "uncond": {"encoder_hidden_states": uncond}}, cross_attention_kwargs)

    def inversion_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents of the VAE posterior's mean (the inverse of the pipeline's decoding)."""
        return self.posterior_sample(pixels, None, mean=True) * self.vae.config.scaling_factor

    def text_to_image(self, prompt, **kwargs: Any):
        """The text-to-image call of this pipeline family (img2img / inpainting subclasses too):
        each family's pipeline defines it."""
        raise NotImplementedError(f"{type(self).__name__}: no text-to-image call to regenerate with")
