"""Tiny, randomly initialised Wan 2.1 / 2.2 components built entirely in code (tests; no model hub).

* Tokenizer: a UMT5-style :class:`~transformers.T5Tokenizer` (a Unigram model; ``<pad>`` = 0,
  ``</s>`` = 1 appended to every text, ``<unk>`` = 2, as UMT5's vocabulary numbers them) whose
  pieces are the words of :data:`TINY_WAN_WORDS` (one piece each, with SentencePiece's leading
  ``▁``) and single printable ASCII characters, so that any ASCII text tokenizes without unknown
  tokens and the stock ``padding="max_length"`` call pads with id 0.
* Text encoder: a 2-layer, 32-wide :class:`~transformers.UMT5EncoderModel` (the class Wan
  checkpoints name) over that vocabulary.
* Transformer(s): :class:`~diffusers.WanTransformer3DModel` of width 32 (2 heads of 16; rotary axes
  8 frames + 4 + 4), ``layers`` blocks, 3-D patches (1, 2, 2) on 4 latent channels; Wan 2.2 A14B's
  second (low-noise) expert with ``two_experts``.
* VAE: an :class:`~diffusers.AutoencoderKLWan` with two down-sampling stages, both temporal
  (scale factors 4 in time, as the real VAE, and 4 in space): ``num_frames = 4 k + 1`` frames of
  32 x 32 pixels are ``k + 1`` latent frames of 8 x 8 (4 x 4 tokens per frame); per-channel
  ``latents_mean`` / ``latents_std`` away from 0 / 1, so that the stock de-normalisation matters.
* Scheduler: Wan's ``UniPCMultistepScheduler`` with flow sigmas (``use_flow_sigmas``,
  ``prediction_type="flow_prediction"``, ``flow_shift=3``, the shift of Wan's 480p configs).

Weights are initialised under :func:`~.tiny_models.seeded_weights`, so building components never
changes the caller's RNG state.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

from .tiny_models import TINY_VOCAB_WORDS, seeded_weights

__all__ = ["TINY_WAN_BOUNDARY_RATIO", "TINY_WAN_WORDS", "build_tiny_umt5_tokenizer", "save_tiny_wan",
           "tiny_wan_components"]

#: Words with a piece of their own (the prompts of the tests and demos).
TINY_WAN_WORDS: tuple[str, ...] = TINY_VOCAB_WORDS + ("video", "dance", "cat", "dog", "moving", "slowly")
#: Wan 2.2 A14B's expert boundary: the high-noise expert runs while t >= 0.875 * 1000.
TINY_WAN_BOUNDARY_RATIO = 0.875

_SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 in UMT5's order
_SPACE = "\u2581"  # SentencePiece's word-start marker
_TEXT_HIDDEN = 32
_LATENT_CHANNELS = 4


def build_tiny_umt5_tokenizer(words: tuple[str, ...] = TINY_WAN_WORDS) -> T5Tokenizer:
    """A UMT5-style Unigram tokenizer: the special tokens, the word-start piece, one piece per word
    of ``words`` (scored above any split into characters, so each word is one token) and every
    printable ASCII character as a fallback piece. No sentinel (extra-id) tokens."""
    pieces = [(token, 0.0) for token in _SPECIAL] + [(_SPACE, -2.0)]
    pieces += [(_SPACE + word, -1.0) for word in dict.fromkeys(words)]
    pieces += [(char, -10.0) for char in string.ascii_letters + string.digits + string.punctuation]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    split = [word for word in words if len(tokenizer.tokenize(word)) != 1]
    if split:  # each word scores higher whole than split: a failure here is a bug in the scores
        raise RuntimeError(f"tiny UMT5 tokenizer: words not one token: {split}")
    return tokenizer


def _text_encoder(tokenizer: T5Tokenizer, seed: int) -> UMT5EncoderModel:
    config = UMT5Config(vocab_size=len(tokenizer), d_model=_TEXT_HIDDEN, d_kv=8, d_ff=64, num_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    with seeded_weights(seed):
        return UMT5EncoderModel(config).eval()


def _transformer(seed: int, layers: int) -> WanTransformer3DModel:
    with seeded_weights(seed):
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=_LATENT_CHANNELS,
            out_channels=_LATENT_CHANNELS, text_dim=_TEXT_HIDDEN, freq_dim=32, ffn_dim=64, num_layers=layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def tiny_wan_components(seed: int = 0, layers: int = 2, two_experts: bool = False,
                        expand_timesteps: bool = False) -> dict[str, Any]:
    """Components for ``WanPipeline(**components)`` (see the module docstring): videos of
    ``num_frames = 4 k + 1`` frames, with ``height=width=32`` (multiples of 16).

    Args:
        seed: weight-initialisation seed of every model (the caller's RNG state is left untouched).
        layers: transformer blocks per expert (>= 1).
        two_experts: Wan 2.2 A14B: a second, low-noise expert ``transformer_2`` (other weights) and
            ``boundary_ratio`` :data:`TINY_WAN_BOUNDARY_RATIO`; else Wan 2.1 (one transformer).
        expand_timesteps: Wan 2.2 TI2V's per-token timesteps (the stock flag of the same name).
    """
    tokenizer = build_tiny_umt5_tokenizer()
    with seeded_weights(seed + 1):
        vae = AutoencoderKLWan(
            base_dim=8, z_dim=_LATENT_CHANNELS, dim_mult=[1, 1, 1], num_res_blocks=1,
            temperal_downsample=[True, True], latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0],
            scale_factor_temporal=4, scale_factor_spatial=4).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return {"transformer": _transformer(seed, layers), "vae": vae, "text_encoder": _text_encoder(tokenizer, seed + 2),
            "tokenizer": tokenizer, "scheduler": scheduler,
            "transformer_2": _transformer(seed + 3, layers) if two_experts else None,
            "boundary_ratio": TINY_WAN_BOUNDARY_RATIO if two_experts else None,
            "expand_timesteps": expand_timesteps}


def save_tiny_wan(path: str | os.PathLike[str], seed: int = 0, two_experts: bool = False) -> Path:
    """Save a tiny stock :class:`~diffusers.WanPipeline` to ``path`` (safetensors); it loads offline
    with ``WanPipeline.from_pretrained(path)`` or the guided pipeline's."""
    path = Path(path)
    WanPipeline(**tiny_wan_components(seed, two_experts=two_experts)).save_pretrained(path, safe_serialization=True)
    return path
