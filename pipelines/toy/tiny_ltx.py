"""Tiny, randomly initialised LTX-Video components built entirely in code (tests; no model hub).

* Tokenizer: the T5-style Unigram tokenizer of :mod:`.tiny_wan` (``<pad>`` = 0, ``</s>`` = 1
  appended to every text, ``<unk>`` = 2, T5's numbering), one piece per word of
  :data:`TINY_LTX_WORDS` and every printable ASCII character, so any ASCII text tokenizes.
* Text encoder: a 2-layer, 32-wide :class:`~transformers.T5EncoderModel` (the class LTX-Video
  checkpoints name: T5 v1.1 XXL there) over that vocabulary.
* Transformer: :class:`~diffusers.LTXVideoTransformer3DModel` of width 32 (2 heads of 16; its
  rotary embedding splits the width over frames, rows and columns), ``layers`` blocks, patch
  1 x 1 x 1 on 8 latent channels (the real model's patch sizes), captions of width 32.
* VAE: an :class:`~diffusers.AutoencoderKLLTXVideo` with two space-time down-sampling stages
  (factors 4 in time and 4 in space): ``num_frames = 4 k + 1`` frames of 32 x 32 pixels are
  ``k + 1`` latent frames of 8 x 8 tokens; per-channel ``latents_mean`` / ``latents_std`` away
  from 0 / 1 and ``scaling_factor`` 0.8, so that the stock de-normalisation matters;
  ``timestep_conditioning`` (LTX-Video 0.9.1+'s VAE: the decoder takes a timestep and the stock
  pipeline noises the latents before decoding) when asked.
* Scheduler: ``FlowMatchEulerDiscreteScheduler`` with LTX-Video's dynamic shift (mu from the
  video's token count, 0.95 at 1024 tokens to 2.05 at 4096: the values of ComfyUI's
  ``LTXVScheduler``, ``comfy_extras/nodes_lt.py``).

Weights are initialised under :func:`~.tiny_models.seeded_weights`, so building components never
changes the caller's RNG state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from .tiny_models import seeded_weights
from .tiny_wan import TINY_WAN_WORDS, build_tiny_umt5_tokenizer

__all__ = ["TINY_LTX_WORDS", "save_tiny_ltx", "tiny_ltx_components"]

#: Words with a piece of their own (the prompts of the tests and demos).
TINY_LTX_WORDS: tuple[str, ...] = TINY_WAN_WORDS
_WIDTH = 32
_LATENT_CHANNELS = 8


def _text_encoder(tokenizer: T5Tokenizer, seed: int) -> T5EncoderModel:
    config = T5Config(vocab_size=len(tokenizer), d_model=_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    with seeded_weights(seed):
        return T5EncoderModel(config).eval()


def _transformer(seed: int, layers: int) -> LTXVideoTransformer3DModel:
    with seeded_weights(seed):
        return LTXVideoTransformer3DModel(
            in_channels=_LATENT_CHANNELS, out_channels=_LATENT_CHANNELS, patch_size=1, patch_size_t=1,
            num_attention_heads=2, attention_head_dim=16, cross_attention_dim=_WIDTH, num_layers=layers,
            caption_channels=_WIDTH).eval()


def _vae(seed: int, timestep_conditioning: bool) -> AutoencoderKLLTXVideo:
    with seeded_weights(seed):
        vae = AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=_LATENT_CHANNELS, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
            upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=timestep_conditioning,
            patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False, scaling_factor=0.8).eval()
    # persistent buffers (saved with the weights): the stock decode de-normalises with them
    vae.latents_mean.copy_(torch.linspace(-0.3, 0.3, _LATENT_CHANNELS))
    vae.latents_std.copy_(torch.linspace(0.6, 1.8, _LATENT_CHANNELS))
    return vae


def tiny_ltx_components(seed: int = 0, layers: int = 2, timestep_conditioning: bool = False) -> dict[str, Any]:
    """Components for ``LTXPipeline(**components)`` (see the module docstring): videos of
    ``num_frames = 4 k + 1`` frames at ``height=width=32`` (the stock check wants multiples of 32).

    Args:
        seed: weight-initialisation seed of every model (the caller's RNG state is left untouched).
        layers: transformer blocks (>= 1).
        timestep_conditioning: a VAE decoder conditioned on the decode timestep (LTX-Video 0.9.1+).
    """
    tokenizer = build_tiny_umt5_tokenizer(TINY_LTX_WORDS)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096)
    return {"transformer": _transformer(seed, layers), "vae": _vae(seed + 1, timestep_conditioning),
            "text_encoder": _text_encoder(tokenizer, seed + 2), "tokenizer": tokenizer, "scheduler": scheduler}


def save_tiny_ltx(path: str | os.PathLike[str], seed: int = 0, timestep_conditioning: bool = False) -> Path:
    """Save a tiny stock :class:`~diffusers.LTXPipeline` to ``path`` (safetensors); it loads offline
    with ``LTXPipeline.from_pretrained(path)`` or the guided pipeline's."""
    path = Path(path)
    components = tiny_ltx_components(seed, timestep_conditioning=timestep_conditioning)
    LTXPipeline(**components).save_pretrained(path, safe_serialization=True)
    return path
