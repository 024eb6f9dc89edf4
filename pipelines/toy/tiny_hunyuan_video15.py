"""Tiny, randomly initialised HunyuanVideo 1.5 components built entirely in code (tests; no model hub).

* Tokenizer: a byte-level BPE :class:`~transformers.Qwen2Tokenizer` (the class HunyuanVideo 1.5
  checkpoints name) built as :mod:`.tiny_qwen_image` builds Qwen-Image's: the 256 byte characters,
  Qwen's special tokens, whole-word tokens for the words of the stock system message and of the
  test prompts, and one token for a run of 8 spaces (Qwen's vocabulary has it; the stock system
  message is indented by 9), with a ChatML chat template (``<|im_start|>role``, newline, content,
  ``<|im_end|>``, newline per turn, then the assistant's opening: Qwen2.5-VL's template on
  text-only turns). The system turn and the opening of the user turn are then exactly the
  ``prompt_template_encode_start_idx`` = 108 tokens the stock pipeline drops, as with the real
  tokenizer, so the embeddings it keeps are the prompt's and the template's closing tokens.
* Text encoder: a 2-layer, 16-wide :class:`~transformers.Qwen2_5_VLTextModel` (2 heads of 8,
  multimodal rotary sections 1 + 1 + 2), the class HunyuanVideo 1.5 checkpoints name; the stock
  pipeline reads its third-to-last hidden state.
* Glyph encoder: :class:`~transformers.ByT5Tokenizer` (bytes: it needs no vocabulary file) and a
  2-layer, 32-wide :class:`~transformers.T5EncoderModel` over its 384 ids; the stock pipeline runs
  it on the prompt's quoted texts only.
* Transformer: :class:`~diffusers.HunyuanVideo15Transformer3DModel` of width 32 (2 heads of 16,
  rotary axes 4 + 6 + 6), ``layers`` dual-stream blocks, one token-refiner block, patch 1 on 4
  latent channels (its input: the latents, zero condition latents and a zero mask, 9 channels),
  image embeddings of width 12.
* VAE: an :class:`~diffusers.AutoencoderKLHunyuanVideo15` with factors 4 in space and 2 in time
  (``num_frames = 2 k + 1`` frames of 32 x 32 pixels are ``k + 1`` latent frames of 8 x 8) and a
  ``scaling_factor`` of 0.8, so that the stock un-scaling matters.
* Scheduler: ``FlowMatchEulerDiscreteScheduler(shift=7.0)``; guider: diffusers'
  ``ClassifierFreeGuidance`` at ``guidance_scale`` (the stock pipeline's CFG lives in it).

Weights are initialised under :func:`~.tiny_models.seeded_weights`, so building components never
changes the caller's RNG state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffusers import (AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                       HunyuanVideo15Transformer3DModel)
from diffusers.guiders import ClassifierFreeGuidance
from tokenizers import AddedToken
from transformers import (ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, Qwen2Tokenizer, T5Config,
                          T5EncoderModel)

from .tiny_models import bytes_to_unicode, seeded_weights
from .tiny_qwen_image import QWEN_IMAGE_SPECIAL_TOKENS, TINY_QWEN_WORDS, bpe_merges

__all__ = ["CHATML_TEMPLATE", "TINY_HUNYUAN_VIDEO15_WORDS", "build_tiny_qwen_chat_tokenizer",
           "save_tiny_hunyuan_video15", "tiny_hunyuan_video15_components"]

#: ChatML, as Qwen2.5-VL's template renders text-only turns.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")
#: Words with whole-word tokens: the stock system message's, the role names, the test prompts'.
TINY_HUNYUAN_VIDEO15_WORDS: tuple[str, ...] = tuple(dict.fromkeys(TINY_QWEN_WORDS + (
    "You", "are", "a", "helpful", "assistant", "Describe", "the", "video", "by", "detailing", "following",
    "aspects", "The", "main", "content", "and", "theme", "of", "color", "shape", "size", "texture", "quantity",
    "text", "spatial", "relationships", "objects", "Actions", "events", "behaviors", "temporal", "physical",
    "movement", "changes", "background", "environment", "light", "style", "atmosphere", "camera", "angles",
    "movements", "transitions", "used", "in", "sign", "saying", "hello", "cat", "dog", "moving", "slowly")))
_TEXT_HIDDEN = 16
_GLYPH_HIDDEN = 32
_IMAGE_EMBED = 12
_LATENT_CHANNELS = 4


def build_tiny_qwen_chat_tokenizer(words: tuple[str, ...] = TINY_HUNYUAN_VIDEO15_WORDS) -> Qwen2Tokenizer:
    """The byte-level BPE Qwen tokenizer of the module docstring: merges that make each of
    ``words`` (ASCII letters) one token at the start of a text and after a space, and 8 spaces one
    token; Qwen's special tokens whole; the ChatML template."""
    to_unicode = bytes_to_unicode()
    space = to_unicode[ord(" ")]  # the byte-level pre-tokenizer keeps a word's leading space as this character
    spelled = [form for word in words for form in (word, space + word)]
    merges = bpe_merges(spelled + [space * 8])
    vocab = {char: index for index, char in enumerate(to_unicode.values())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in QWEN_IMAGE_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    # Without this the turn delimiters would be split into characters by the pre-tokenizer.
    tokenizer.add_tokens([AddedToken(token, special=True) for token in QWEN_IMAGE_SPECIAL_TOKENS[1:]],
                         special_tokens=True)
    tokenizer.chat_template = CHATML_TEMPLATE
    split = [word for word in spelled + [" " * 8] if len(tokenizer.tokenize(word.replace(space, " "))) != 1]
    if split:  # the merges were learned for exactly these words: a failure here is a bug in bpe_merges
        raise RuntimeError(f"tiny Qwen tokenizer: not one token: {split}")
    return tokenizer


def _text_encoder(tokenizer: Qwen2Tokenizer, seed: int) -> Qwen2_5_VLTextModel:
    special = dict(zip(("bos_token_id", "pad_token_id", "eos_token_id"),
                       tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|endoftext|>", "<|im_end|>"])))
    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048, **special,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, rope_theta=1000000.0)
    with seeded_weights(seed):
        return Qwen2_5_VLTextModel(config).eval()


def _glyph_encoder(tokenizer: ByT5Tokenizer, seed: int) -> T5EncoderModel:
    config = T5Config(vocab_size=len(tokenizer), d_model=_GLYPH_HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    with seeded_weights(seed):
        return T5EncoderModel(config).eval()


def _transformer(seed: int, layers: int) -> HunyuanVideo15Transformer3DModel:
    with seeded_weights(seed):
        return HunyuanVideo15Transformer3DModel(
            in_channels=2 * _LATENT_CHANNELS + 1, out_channels=_LATENT_CHANNELS, num_attention_heads=2,
            attention_head_dim=16, num_layers=layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
            patch_size_t=1, text_embed_dim=_TEXT_HIDDEN, text_embed_2_dim=_GLYPH_HIDDEN, image_embed_dim=_IMAGE_EMBED,
            rope_axes_dim=(4, 6, 6), target_size=32, task_type="t2v").eval()


def tiny_hunyuan_video15_components(seed: int = 0, layers: int = 2, guidance_scale: float = 6.0) -> dict[str, Any]:
    """Components for ``HunyuanVideo15Pipeline(**components)`` (see the module docstring): videos
    of ``num_frames = 2 k + 1`` frames at ``height=width=32``.

    Args:
        seed: weight-initialisation seed of every model (the caller's RNG state is left untouched).
        layers: dual-stream transformer blocks (>= 1).
        guidance_scale: the guider's CFG scale (1: the conditional forward alone, as stock).
    """
    tokenizer, glyph_tokenizer = build_tiny_qwen_chat_tokenizer(), ByT5Tokenizer()
    with seeded_weights(seed + 1):
        vae = AutoencoderKLHunyuanVideo15(
            in_channels=3, out_channels=3, latent_channels=_LATENT_CHANNELS, block_out_channels=(16, 16),
            layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
            downsample_match_channel=False, upsample_match_channel=False, scaling_factor=0.8).eval()
    return {"transformer": _transformer(seed, layers), "vae": vae,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
            "text_encoder": _text_encoder(tokenizer, seed + 2), "tokenizer": tokenizer,
            "text_encoder_2": _glyph_encoder(glyph_tokenizer, seed + 3), "tokenizer_2": glyph_tokenizer,
            "guider": ClassifierFreeGuidance(guidance_scale=guidance_scale)}


def save_tiny_hunyuan_video15(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a tiny stock :class:`~diffusers.HunyuanVideo15Pipeline` to ``path`` (safetensors); it
    loads offline with ``HunyuanVideo15Pipeline.from_pretrained(path)`` or the guided pipeline's."""
    path = Path(path)
    HunyuanVideo15Pipeline(**tiny_hunyuan_video15_components(seed)).save_pretrained(path, safe_serialization=True)
    return path
