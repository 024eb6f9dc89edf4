"""Tiny, randomly initialised Chroma components built entirely in code (tests; no model hub).

The text side and the VAE are those of :func:`~.tiny_models.tiny_flux_components`, so the tiny
T5 is built in one place: its one-layer T5 encoder (width 32) with the locally built BPE tokenizer
in the T5 slot, and its one-channel VAE (scale factor 2 with a shift factor: 32 x 32 images are
16 x 16 latents, 64 packed tokens of 4 channels). Added here: a one-double-block,
one-single-block :class:`~diffusers.ChromaTransformer2DModel` (width 32 = 2 heads of 16, rotary
axes 4 + 4 + 8 = the head width, a one-layer, 32-wide modulation approximator) and Flux's
dynamically shifted ``FlowMatchEulerDiscreteScheduler`` (so the stock ``mu`` matters).

Weights are drawn inside :func:`torch.random.fork_rng`: building never moves the caller's RNG.
"""

from __future__ import annotations

from typing import Any

from diffusers import ChromaTransformer2DModel

from .tiny_models import seeded_weights, tiny_flux_components

__all__ = ["tiny_chroma_components"]


def tiny_chroma_components(seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for ``ChromaPipeline(**components)``.

    Args:
        seed: seed of the weight initialisation (any integer); the same seed gives the same
            weights, and the text encoder and VAE equal those of ``tiny_flux_components(seed)``.

    Returns:
        ``transformer``, ``vae``, ``text_encoder`` (T5), ``tokenizer``, ``scheduler``, and
        ``image_encoder`` / ``feature_extractor`` set to None (no IP-Adapter).
    """
    flux = tiny_flux_components(seed)
    with seeded_weights(seed):
        transformer = ChromaTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
            approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1)
    return {
        "transformer": transformer.eval(),
        "vae": flux["vae"],
        "text_encoder": flux["text_encoder_2"],
        "tokenizer": flux["tokenizer_2"],
        "scheduler": flux["scheduler"],
        "image_encoder": None,
        "feature_extractor": None,
    }
