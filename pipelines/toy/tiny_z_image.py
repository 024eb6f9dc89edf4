"""Tiny, randomly initialised Z-Image components built entirely in code (tests; no model hub).

* Tokenizer: a byte-level BPE :class:`~transformers.Qwen2Tokenizer` (Qwen3's tokenizer class, the
  one diffusers' Z-Image tests load) over the 256 byte characters, with Qwen's special tokens and a ChatML chat
  template of Qwen3's form, so that the stock ``encode_prompt`` (which wraps every prompt in the
  chat template with ``add_generation_prompt=True, enable_thinking=True``) runs offline.
* Text encoder: a 2-layer, 16-wide :class:`~transformers.Qwen3Model` (the stock pipeline reads
  its second-to-last hidden states).
* Transformer: a :class:`~diffusers.ZImageTransformer2DModel` of width 32 (2 heads of 16, rotary
  axes 8 + 4 + 4), one refiner layer per stream and ``layers`` main layers, on 4 latent channels.
* VAE: a two-block AutoencoderKL (scale factor 2: 32 x 32 images are 16 x 16 latents, 8 x 8
  transformer tokens of 2 x 2 patches; sizes must be multiples of 4) with a shift factor, as
  Z-Image decodes ``z / scale + shift``.
* Scheduler: Z-Image's ``FlowMatchEulerDiscreteScheduler`` (shift 3, no dynamic shifting), or the
  dynamically shifted one, so that the stock ``mu`` matters.

Weights are initialised under :func:`torch.random.fork_rng`, so building components never changes
the caller's RNG state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from tokenizers import AddedToken
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from .tiny_models import bytes_to_unicode

__all__ = ["QWEN_CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS", "TINY_Z_IMAGE_TEXT_LENGTH", "build_tiny_qwen_tokenizer",
           "save_tiny_z_image", "tiny_z_image_components"]

#: Qwen's end-of-text token (also the pad token) and the ChatML turn delimiters.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Qwen3's thinking delimiters: ordinary added tokens, written by the template when thinking is off.
QWEN_THINK_TOKENS: tuple[str, ...] = ("<think>", "</think>")
#: Qwen3's chat template for plain system / user / assistant turns (no tools): each turn is
#: ``<|im_start|>role\ncontent<|im_end|>\n``; the generation prompt opens the assistant turn and,
#: with ``enable_thinking=False`` only, adds an empty thinking block.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
#: The longest token sequence the tiny text encoder and transformer positions take.
TINY_Z_IMAGE_TEXT_LENGTH = 1024

_TEXT_HIDDEN = 16
_LATENT_CHANNELS = 4


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """The body with torch's CPU RNG seeded, the caller's RNG state restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE Qwen tokenizer: one token per byte character (no merges), Qwen's special
    tokens (``<|endoftext|>`` pads) as single tokens, the think delimiters, and
    :data:`QWEN_CHAT_TEMPLATE`. Any text tokenizes without unknown tokens; ``save_pretrained``
    writes ``tokenizer.json`` and the template, which ``Qwen2Tokenizer.from_pretrained`` reads back."""
    vocab = {char: index for index, char in enumerate(bytes_to_unicode().values())}
    for token in QWEN_SPECIAL_TOKENS + QWEN_THINK_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=QWEN_CHAT_TEMPLATE,
                               model_max_length=TINY_Z_IMAGE_TEXT_LENGTH)
    # Without this the turn delimiters would be split into characters by the pre-tokenizer.
    tokenizer.add_tokens([AddedToken(token, special=True) for token in QWEN_SPECIAL_TOKENS[1:]], special_tokens=True)
    tokenizer.add_tokens([AddedToken(token, special=False) for token in QWEN_THINK_TOKENS])
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tiny Qwen tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    return tokenizer


def _tiny_transformer(seed: int, layers: int) -> ZImageTransformer2DModel:
    with _seeded(seed):
        return ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=_LATENT_CHANNELS, dim=32, n_layers=layers,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=_TEXT_HIDDEN,
            rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[TINY_Z_IMAGE_TEXT_LENGTH, 32, 32])


def tiny_z_image_components(seed: int = 0, layers: int = 1, dynamic_shift: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``ZImagePipeline(**components)`` (32 x 32 images, 4 x 16 x 16 latents).

    Args:
        seed: seed of every model's weights (the caller's RNG state is left untouched).
        layers: main transformer layers (>= 1).
        dynamic_shift: use the dynamically shifted flow schedule (the stock ``mu`` then shapes
            the sigmas) instead of Z-Image's fixed shift of 3.
    """
    tokenizer = build_tiny_qwen_tokenizer()
    with _seeded(seed + 1):
        text_encoder = Qwen3Model(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=TINY_Z_IMAGE_TEXT_LENGTH,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    with _seeded(seed + 2):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=_LATENT_CHANNELS, norm_num_groups=4, sample_size=32, scaling_factor=0.3611,
            shift_factor=0.1159)
    if dynamic_shift:
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                    base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return {
        "transformer": _tiny_transformer(seed, layers).eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_tiny_z_image(path: str | os.PathLike[str], seed: int = 0, **options: Any) -> Path:
    """Save a tiny stock :class:`~diffusers.ZImagePipeline` to ``path`` (safetensors); ``options``
    as :func:`tiny_z_image_components`. Returns ``path``."""
    path = Path(path)
    ZImagePipeline(**tiny_z_image_components(seed, **options)).save_pretrained(path, safe_serialization=True)
    return path
