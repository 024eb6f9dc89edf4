"""Tiny, randomly initialised Flux.2 Klein components built entirely in code (tests).

No model hub and no network: the Qwen-style byte-level BPE tokenizer is written here (its chat
template, the part of Qwen3's that the stock pipeline uses, included), and every model is built
from a tiny config. The models are meaningless but structurally faithful to
:class:`~diffusers.Flux2KleinPipeline`:

* text encoder: a 27-layer, 16-wide :class:`~transformers.Qwen3ForCausalLM`, deep enough for the
  stock ``text_encoder_out_layers=(9, 18, 27)``, whose three stacked hidden states give 48-wide
  prompt embeddings;
* VAE: a two-block :class:`~diffusers.AutoencoderKLFlux2` (scale factor 2) with 2 latent channels,
  patchified to 8, and random batch-norm statistics (the stock decode de-normalises with them, so
  they must not be the identity);
* transformer: a one-double-block, one-single-block :class:`~diffusers.Flux2Transformer2DModel` on 8
  channels (rotary axes 4 x 4 = the head width 16), without a guidance embedding (Klein passes
  ``guidance=None``);
* scheduler: ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting (the stock ``mu``).

32 x 32 images are 16 x 16 x 2 latents, 8 x 8 x 8 patchified latents, 64 tokens of 8 channels.
Weights are drawn inside :func:`torch.random.fork_rng`: building never moves the caller's RNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from tokenizers import AddedToken
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

from .tiny_models import TINY_VOCAB_WORDS, bytes_to_unicode, seeded_weights

__all__ = ["QWEN_CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS", "TINY_FLUX2_TEXT_LAYERS", "build_tiny_qwen_tokenizer",
           "tiny_flux2_klein_components"]

#: The special tokens of Qwen3's chat format: the end of text (pad, eos and unk here, as Qwen's),
#: the turn markers and the reasoning block that ``enable_thinking=False`` leaves empty.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

#: Qwen3's chat template reduced to what the stock pipeline renders: plain-text turns, the
#: generation prompt and, with ``enable_thinking=False``, the empty reasoning block. Stored with the
#: tokenizer, so a saved pipeline renders it offline.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

#: The Qwen3 layers whose hidden states the stock pipeline stacks by default, and so the depth
#: of the tiny text encoder (hidden state k is the output of layer k).
TINY_FLUX2_TEXT_LAYERS = 27
#: Words of the chat format that get whole-word tokens besides :data:`TINY_VOCAB_WORDS`.
_TEMPLATE_WORDS = ("user", "assistant")
#: Byte-level BPE's marker of a leading space (the byte 0x20 as GPT-2 maps it).
_SPACE = bytes_to_unicode()[ord(" ")]

_TEXT_HIDDEN = 16
_LATENT_CHANNELS = 2
_VAE_CHANNELS = (8, 16)


def _merged(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """``symbols`` with the occurrences of ``pair`` merged, left to right, none overlapping."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if tuple(symbols[i:i + 2]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _word_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Byte-level BPE merges, in rank order, giving each word one token, bare and after a space:
    learned as BPE learns them (the most frequent adjacent pair first, ties by the pair's order),
    so that applying them by rank reproduces the whole words."""
    segmented = [list(spelling) for word in words for spelling in (word, _SPACE + word) if len(spelling) > 1]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in segmented:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        segmented = [_merged(symbols, best) for symbols in segmented]


def build_tiny_qwen_tokenizer(model_max_length: int = 32768) -> Qwen2TokenizerFast:
    """A Qwen-style tokenizer: byte-level BPE (every byte a token, so any text tokenizes) whose
    merges make whole-word tokens of the tiny vocabulary words, Qwen3's special tokens (pad and
    eos ``<|endoftext|>``) and :data:`QWEN_CHAT_TEMPLATE`, in the tokenizer class the stock
    pipeline expects. ``model_max_length``: the longest input it reads, in tokens (>= 1)."""
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
        raise ValueError(f"model_max_length: must be an integer >= 1, got {model_max_length!r}")
    merges = _word_merges((*TINY_VOCAB_WORDS, *_TEMPLATE_WORDS))
    vocab: dict[str, int] = {}
    for token in (*bytes_to_unicode().values(), *(a + b for a, b in merges), *QWEN_SPECIAL_TOKENS):
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=merges, model_max_length=model_max_length)
    # the turn and reasoning markers are single tokens, never split into bytes
    tokenizer.add_tokens([AddedToken(token, special=True) for token in QWEN_SPECIAL_TOKENS[1:]])
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tiny Qwen tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


def _tiny_qwen3(tokenizer: Qwen2TokenizerFast, seed: int) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=32,
        num_hidden_layers=TINY_FLUX2_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, tie_word_embeddings=True)
    with seeded_weights(seed):
        return Qwen3ForCausalLM(config).eval()


def _tiny_vae(seed: int) -> AutoencoderKLFlux2:
    with seeded_weights(seed):
        vae = AutoencoderKLFlux2(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=_VAE_CHANNELS, layers_per_block=1,
            latent_channels=_LATENT_CHANNELS, norm_num_groups=4, sample_size=32, use_quant_conv=False,
            use_post_quant_conv=False)
        # the statistics the stock pipeline normalises patchified latents with: not the identity
        vae.bn.running_mean.copy_(0.2 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    return vae.eval()


def tiny_flux2_klein_components(seed: int = 0) -> dict[str, Any]:
    """Components for ``Flux2KleinPipeline(**components, is_distilled=...)`` (see the module
    docstring); ``seed`` draws every weight (the text encoder, VAE and transformer from seeds
    ``seed``, ``seed + 1``, ``seed + 2``)."""
    tokenizer = build_tiny_qwen_tokenizer()
    text_encoder = _tiny_qwen3(tokenizer, seed)
    vae = _tiny_vae(seed + 1)
    with seeded_weights(seed + 2):
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=4 * _LATENT_CHANNELS, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * _TEXT_HIDDEN,
            timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "transformer": transformer.eval()}
