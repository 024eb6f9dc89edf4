"""Tiny, randomly initialised InstructPix2Pix components built in code: the tiny SD components
(:func:`~.tiny_models.tiny_sd_components`) with the UNet rebuilt for 8 input channels (the noisy
latents and the input image's latents) and the Euler ancestral scheduler that the
timbrooks/instruct-pix2pix checkpoint ships. Images of 32 x 32 pixels, latents 4 x 16 x 16."""

from __future__ import annotations

from typing import Any

from diffusers import EulerAncestralDiscreteScheduler, UNet2DConditionModel

from .tiny_models import TINY_LATENT_CHANNELS, seeded_weights, tiny_sd_components

__all__ = ["tiny_instruct_pix2pix_components"]


def tiny_instruct_pix2pix_components(seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``StableDiffusionInstructPix2PixPipeline(**components)``.

    Args:
        seed: weight-initialisation seed of every model (the caller's RNG state is untouched);
            the UNet is the tiny SD UNet's configuration with ``in_channels`` = 8, built after
            seeding as the tiny SD one is.

    Returns:
        The tiny SD components (``safety_checker`` and ``feature_extractor`` None) with that UNet
        and an ``EulerAncestralDiscreteScheduler`` made from the tiny SD scheduler's config
        (scaled-linear betas 0.00085-0.012, ``steps_offset`` 1, epsilon prediction).
    """
    components = tiny_sd_components(seed)
    config = {**components["unet"].config, "in_channels": 2 * TINY_LATENT_CHANNELS}
    with seeded_weights(seed):
        unet = UNet2DConditionModel.from_config(config)
    components["unet"] = unet.eval()
    components["scheduler"] = EulerAncestralDiscreteScheduler.from_config(components["scheduler"].config)
    return components
