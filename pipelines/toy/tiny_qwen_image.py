"""Tiny, randomly initialised Qwen-Image components built entirely in code (tests; no model hub).

* Tokenizer: a byte-level BPE :class:`~transformers.Qwen2Tokenizer` (the class Qwen-Image
  checkpoints name) over the 256 byte characters, with Qwen's special tokens and merges that make
  every word of the stock prompt template one token, as Qwen's own vocabulary does: the
  template's system turn and the opening of the user turn are then exactly the
  ``prompt_template_encode_start_idx`` = 34 tokens that the stock pipeline drops, so the
  embeddings it keeps are the prompt's (and the template's closing tokens), as with the real
  model. Other words tokenize by byte characters; :data:`TINY_QWEN_WORDS` get whole-word tokens.
* Text encoder: a :class:`~transformers.Qwen2_5_VLForConditionalGeneration` with a 2-layer,
  16-wide language model (2 heads of 8, multimodal rotary sections 1 + 1 + 2) and a one-block
  vision tower that text prompts never run.
* Transformer: a :class:`~diffusers.QwenImageTransformer2DModel` of width 32 (2 heads of 16,
  rotary axes 8 + 4 + 4) with ``layers`` dual-stream blocks, on 2 x 2-packed latents of 4
  channels (16 per token).
* VAE: an :class:`~diffusers.AutoencoderKLQwenImage` with one down-sampling stage (scale factor 2:
  32 x 32 images are 16 x 16 latents, 64 packed tokens) and per-channel ``latents_mean`` /
  ``latents_std`` away from 0 / 1, so that the stock de-normalisation at decode matters.
* Scheduler: Qwen-Image's ``FlowMatchEulerDiscreteScheduler`` (dynamic shift ``mu`` with
  exponential time shift, terminal shift 0.02).

Weights are initialised under :func:`torch.random.fork_rng`, so building components never changes
the caller's RNG state.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                       QwenImageTransformer2DModel)
from tokenizers import AddedToken
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from .tiny_models import TINY_VOCAB_WORDS, bytes_to_unicode, seeded_weights

__all__ = ["QWEN_IMAGE_SPECIAL_TOKENS", "TINY_QWEN_WORDS", "bpe_merges", "build_tiny_qwen_image_tokenizer",
           "save_tiny_qwen_image", "tiny_qwen_image_components"]

#: Qwen's end-of-text token (also the pad token) and the ChatML turn delimiters of the template.
QWEN_IMAGE_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: The words of the stock template (its system turn and role names), one token each, as in Qwen's vocabulary.
_TEMPLATE_WORDS: tuple[str, ...] = (
    "system", "Describe", "the", "image", "by", "detailing", "color", "shape", "size", "texture", "quantity",
    "text", "spatial", "relationships", "of", "objects", "and", "background", "user", "assistant")
#: Words with whole-word tokens, at the start of a text and after a space: the template's and the prompts'.
TINY_QWEN_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_TEMPLATE_WORDS + TINY_VOCAB_WORDS))

_TEXT_HIDDEN = 16
_LATENT_CHANNELS = 4


def _merged(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """``symbols`` with every non-overlapping occurrence of ``pair`` merged, left to right."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges, in rank order, that make every word of ``words`` (byte-level strings) one token.

    Learned as BPE learns them: at each step the adjacent pair in most of the words not yet whole
    is merged (ties: the lexicographically first pair), so applying the merges by rank reproduces
    the whole words."""
    pieces = [list(word) for word in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while any(len(symbols) > 1 for symbols in pieces):
        counts = Counter(p for symbols in pieces for p in set(zip(symbols, symbols[1:])))
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        pieces = [_merged(symbols, pair) for symbols in pieces]
    return merges


def build_tiny_qwen_image_tokenizer(words: Sequence[str] = TINY_QWEN_WORDS) -> Qwen2Tokenizer:
    """A byte-level BPE Qwen tokenizer: the 256 byte characters, merges that make each of
    ``words`` (ASCII) one token at the start of a text and after a space, and Qwen's special
    tokens as single tokens (``<|endoftext|>`` pads, on the right as Qwen's). ``save_pretrained``
    writes ``tokenizer.json``, which ``Qwen2Tokenizer.from_pretrained`` reads back."""
    odd = [word for word in words if not (word.isascii() and word.isalpha())]
    if odd:
        raise ValueError(f"words: must be ASCII letters (one byte character each), got {odd}")
    to_unicode = bytes_to_unicode()
    space = to_unicode[ord(" ")]  # the byte-level pre-tokenizer keeps a word's leading space as this character
    spelled = [form for word in words for form in (word, space + word)]
    merges = bpe_merges(spelled)
    vocab = {char: index for index, char in enumerate(to_unicode.values())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in QWEN_IMAGE_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    # Without this the turn delimiters would be split into characters by the pre-tokenizer.
    tokenizer.add_tokens([AddedToken(token, special=True) for token in QWEN_IMAGE_SPECIAL_TOKENS[1:]],
                         special_tokens=True)
    split = [word for word in spelled if len(tokenizer.tokenize(word.replace(space, " "))) != 1]
    if split:  # the merges were learned for exactly these words: a failure here is a bug in bpe_merges
        raise RuntimeError(f"tiny Qwen tokenizer: words not one token: {split}")
    return tokenizer


def _text_encoder(tokenizer: Qwen2Tokenizer, seed: int) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL with a 2-layer, 16-wide language model (``hidden_size`` = the transformer's
    ``joint_attention_dim``) over ``tokenizer``'s vocabulary, and a one-block vision tower."""
    special = dict(zip(("bos_token_id", "pad_token_id", "eos_token_id"),
                       tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|endoftext|>", "<|im_end|>"])))
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": _TEXT_HIDDEN, "intermediate_size": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, **special,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": _TEXT_HIDDEN},
    )
    with seeded_weights(seed):
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_components(seed: int = 0, layers: int = 1, guidance_embeds: bool = False) -> dict[str, Any]:
    """Components for ``QwenImagePipeline(**components)`` (see the module docstring): default
    output 32 x 32 pixels with ``height=width=32``.

    Args:
        seed: weight-initialisation seed of every model (the caller's RNG state is left untouched).
        layers: dual-stream transformer blocks (>= 1).
        guidance_embeds: the transformer config's ``guidance_embeds`` flag (guidance-distilled
            models; the stock pipeline then requires ``guidance_scale``).
    """
    tokenizer = build_tiny_qwen_image_tokenizer()
    with seeded_weights(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * _LATENT_CHANNELS, out_channels=_LATENT_CHANNELS, num_layers=layers,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=_TEXT_HIDDEN,
            guidance_embeds=guidance_embeds, axes_dims_rope=(8, 4, 4))
    with seeded_weights(seed + 1):
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=_LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
            latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    text_encoder = _text_encoder(tokenizer, seed + 2)
    scheduler = FlowMatchEulerDiscreteScheduler(  # Qwen-Image's scheduler config
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)
    return {"transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": text_encoder,
            "tokenizer": tokenizer, "scheduler": scheduler}


def save_tiny_qwen_image(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a tiny stock :class:`~diffusers.QwenImagePipeline` to ``path`` (safetensors); it loads
    offline with ``QwenImagePipeline.from_pretrained(path)`` or the guided pipeline's."""
    path = Path(path)
    QwenImagePipeline(**tiny_qwen_image_components(seed)).save_pretrained(path, safe_serialization=True)
    return path
