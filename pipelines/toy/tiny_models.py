"""Tiny, randomly initialised Stable Diffusion / SDXL components built entirely in code.

Everything here is constructed locally (no model hub, no network): a miniature byte-level
CLIP BPE tokenizer, and UNet / VAE / text-encoder configurations that are as small as the
stock diffusers pipelines accept.  The models are meaningless (random weights) but they are
structurally faithful, fast on CPU and fully deterministic given a seed, which makes them
suitable for unit tests of guidance / sampling code that drives the stock
:class:`~diffusers.StableDiffusionPipeline` and :class:`~diffusers.StableDiffusionXLPipeline`.

Sizes (defaults):

* SD:   latent 4 x 16 x 16, VAE scale factor 2 -> images of 32 x 32 pixels.
* SDXL: latent 4 x 16 x 16, VAE scale factor 2 -> images of 32 x 32 pixels.

Weight initialisation seeds torch with :func:`torch.manual_seed` inside
:func:`torch.random.fork_rng`, so building components never changes the caller's global
RNG state.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "TINY_IMAGE_SIZE",
    "TINY_LATENT_CHANNELS",
    "TINY_LATENT_SIZE",
    "TINY_MODEL_MAX_LENGTH",
    "TINY_VAE_SCALE_FACTOR",
    "TINY_VOCAB_WORDS",
    "build_tiny_tokenizer",
    "bytes_to_unicode",
    "save_tiny_sd",
    "save_tiny_sdxl",
    "seeded_weights",
    "tiny_bpe_merges",
    "tiny_flux_components",
    "tiny_sd_components",
    "tiny_sdxl_components",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

#: Maximum prompt length in tokens (same as real CLIP).
TINY_MODEL_MAX_LENGTH = 77
#: Spatial size of the UNet latent (``unet.config.sample_size``).
TINY_LATENT_SIZE = 16
#: Number of latent channels (as in real SD / SDXL).
TINY_LATENT_CHANNELS = 4
#: ``2 ** (len(vae.config.block_out_channels) - 1)``.
TINY_VAE_SCALE_FACTOR = 2
#: Default pipeline output size in pixels (``TINY_LATENT_SIZE * TINY_VAE_SCALE_FACTOR``).
TINY_IMAGE_SIZE = TINY_LATENT_SIZE * TINY_VAE_SCALE_FACTOR

#: Words that get whole-word BPE tokens ("red</w>" etc.).  Anything else still tokenizes,
#: character by character, because every byte-level character is in the vocabulary.
TINY_VOCAB_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "and",
    "with",
    "photo",
    "painting",
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "orange",
    "purple",
    "circle",
    "square",
    "triangle",
    "star",
    "background",
    "one",
    "two",
    "three",
    "four",
    "big",
    "small",
    "left",
    "right",
    "top",
    "bottom",
)

_WORD_SUFFIX = "</w>"

# Text encoder / UNet widths.
_TEXT_HIDDEN = 32
_TEXT_INTERMEDIATE = 64
_TEXT_HEADS = 4
_TEXT_LAYERS = 2
_TEXT_PROJECTION = 32
_UNET_CHANNELS = (8, 16)
_VAE_CHANNELS = (8, 16)
_NORM_GROUPS = 4
_SDXL_TIME_EMBED_DIM = 8


def bytes_to_unicode() -> dict[int, str]:
    """Return CLIP/GPT-2's reversible mapping from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the remaining bytes (control characters,
    space, ...) map to code points starting at 256.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _word_symbols(word: str) -> list[str]:
    """Split ``word`` into initial BPE symbols: its characters, with ``</w>`` on the last one."""
    symbols = list(word)
    symbols[-1] = symbols[-1] + _WORD_SUFFIX
    return symbols


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Merge every non-overlapping occurrence of ``pair`` in ``symbols`` (left to right)."""
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


def tiny_bpe_merges(words: Sequence[str] = TINY_VOCAB_WORDS) -> list[tuple[str, str]]:
    """Learn BPE merges (in rank order) that turn every word of ``words`` into one token.

    This is a miniature, deterministic BPE trainer: at each step the most frequent adjacent
    symbol pair over all (not yet fully merged) words is merged, ties broken by the pair's
    lexicographic order.  Because the merges are learned exactly the way real BPE learns
    them, applying them by rank at tokenization time reproduces whole-word tokens.

    Args:
        words: Lowercase ASCII words.

    Returns:
        The merges, highest priority first, as ``(left, right)`` symbol pairs.
    """
    for word in words:
        if not word or not (word.isascii() and word.isalpha() and word.islower()):
            raise ValueError(f"tiny BPE words must be non-empty lowercase ASCII letters, got {word!r}")
    segmented = [_word_symbols(w) for w in dict.fromkeys(words)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in segmented:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        segmented = [_merge_pair(s, best) for s in segmented]


def tiny_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP-ordered vocabulary: bytes, bytes + ``</w>``, merge results, then BOS and EOS."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + _WORD_SUFFIX for c in chars] + [a + b for a, b in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_tiny_tokenizer(directory: str | os.PathLike[str]) -> CLIPTokenizer:
    """Write a tiny byte-level CLIP BPE vocabulary to ``directory`` and load it.

    ``directory`` receives ``vocab.json`` and ``merges.txt`` (CLIP's original file format).
    The vocabulary contains every byte-level character (plain and with ``</w>``), whole-word
    tokens for :data:`TINY_VOCAB_WORDS` and the ``<|startoftext|>`` / ``<|endoftext|>``
    special tokens (the latter doubles as pad and unk token, as in real CLIP).  Any text
    therefore tokenizes without unknown tokens.

    Args:
        directory: Folder to write the vocabulary files into (created if missing).

    Returns:
        A :class:`~transformers.CLIPTokenizer` with ``model_max_length=77``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = tiny_bpe_merges()
    vocab = tiny_vocab(merges)
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    # transformers 5: the file paths must be passed positionally (they bind to the ``vocab``
    # and ``merges`` parameters).  ``vocab_file=`` / ``merges_file=`` keywords are silently
    # ignored and yield a 3-entry default vocabulary.
    tokenizer = CLIPTokenizer(
        str(vocab_path), str(merges_path), model_max_length=TINY_MODEL_MAX_LENGTH
    )
    if len(tokenizer) != len(vocab):
        raise RuntimeError(
            f"tiny tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}; "
            "CLIPTokenizer did not load the vocabulary files"
        )
    return tokenizer


@contextmanager
def seeded_weights(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def _tokenizer_directory(tokenizer_dir: str | os.PathLike[str] | None) -> Iterator[Path]:
    """Yield ``tokenizer_dir`` or, when it is ``None``, a temporary folder removed afterwards."""
    if tokenizer_dir is not None:
        yield Path(tokenizer_dir)
        return
    with tempfile.TemporaryDirectory(prefix="tiny_clip_tokenizer_") as tmp:
        yield Path(tmp)


def _text_config(tokenizer: CLIPTokenizer, hidden_act: str) -> CLIPTextConfig:
    """A 2-layer, 32-wide CLIP text config whose vocabulary and special ids match ``tokenizer``."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=_TEXT_INTERMEDIATE,
        projection_dim=_TEXT_PROJECTION,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=_TEXT_HEADS,
        max_position_embeddings=TINY_MODEL_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(seed: int) -> AutoencoderKL:
    """Two-block AutoencoderKL (scale factor 2) with 4 latent channels."""
    with seeded_weights(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=_VAE_CHANNELS,
            layers_per_block=1,
            latent_channels=TINY_LATENT_CHANNELS,
            norm_num_groups=_NORM_GROUPS,
            sample_size=TINY_IMAGE_SIZE,
        )


def tiny_sd_components(
    seed: int = 0,
    prediction_type: str = "epsilon",
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Build keyword arguments for ``StableDiffusionPipeline(**components)``.

    Args:
        seed: Seed for the weight initialisation of every model (each model is built right
            after ``torch.manual_seed(seed)``; the caller's RNG state is left untouched).
        prediction_type: Scheduler prediction type (``"epsilon"``, ``"v_prediction"`` or
            ``"sample"``).
        tokenizer_dir: Where to write the tokenizer's ``vocab.json`` / ``merges.txt``; a
            temporary folder (deleted again) when ``None``.  The returned tokenizer does not
            need the files afterwards.

    Returns:
        A dict with ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` and
        ``safety_checker`` / ``feature_extractor`` / ``image_encoder`` set to ``None``.
        Default pipeline output is 32 x 32 pixels (latents 4 x 16 x 16).
    """
    with _tokenizer_directory(tokenizer_dir) as directory:
        tokenizer = build_tiny_tokenizer(directory)

    with seeded_weights(seed):
        unet = UNet2DConditionModel(
            sample_size=TINY_LATENT_SIZE,
            in_channels=TINY_LATENT_CHANNELS,
            out_channels=TINY_LATENT_CHANNELS,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=_UNET_CHANNELS,
            layers_per_block=1,
            norm_num_groups=_NORM_GROUPS,
            cross_attention_dim=_TEXT_HIDDEN,
            attention_head_dim=2,
        )
    vae = _tiny_vae(seed)
    with seeded_weights(seed):
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="quick_gelu"))

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def tiny_sdxl_components(
    seed: int = 0,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Build keyword arguments for ``StableDiffusionXLPipeline(**components)``.

    The UNet uses SDXL's ``"text_time"`` additional conditioning:
    ``projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + projection_dim``
    (six micro-conditioning numbers plus the pooled ``text_encoder_2`` embedding) and
    ``cross_attention_dim`` is the concatenated width of both text encoders.

    Args:
        seed: Seed for the weight initialisation of every model (the caller's RNG state is
            left untouched).
        tokenizer_dir: Where to write the tokenizer files; a temporary folder when ``None``.

    Returns:
        A dict with ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``,
        ``tokenizer_2`` (the same tiny tokenizer), ``scheduler`` and ``image_encoder`` /
        ``feature_extractor`` set to ``None``.  Default output is 32 x 32 pixels.
    """
    with _tokenizer_directory(tokenizer_dir) as directory:
        tokenizer = build_tiny_tokenizer(directory)

    with seeded_weights(seed):
        unet = UNet2DConditionModel(
            sample_size=TINY_LATENT_SIZE,
            in_channels=TINY_LATENT_CHANNELS,
            out_channels=TINY_LATENT_CHANNELS,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=_UNET_CHANNELS,
            layers_per_block=1,
            norm_num_groups=_NORM_GROUPS,
            cross_attention_dim=2 * _TEXT_HIDDEN,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 1),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED_DIM + _TEXT_PROJECTION,
        )
    vae = _tiny_vae(seed)
    with seeded_weights(seed):
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="quick_gelu"))
    with seeded_weights(seed):
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, hidden_act="gelu"))

    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def save_tiny_sd(
    path: str | os.PathLike[str],
    seed: int = 0,
    prediction_type: str = "epsilon",
) -> Path:
    """Save a tiny :class:`~diffusers.StableDiffusionPipeline` to ``path`` (safetensors).

    The result loads offline with ``StableDiffusionPipeline.from_pretrained(path)``.  The
    pipeline is saved with ``requires_safety_checker=False`` so loading it does not warn
    about the missing safety checker.

    Args:
        path: Destination folder (created if missing).
        seed: Weight-initialisation seed, see :func:`tiny_sd_components`.
        prediction_type: Scheduler prediction type.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    pipe = StableDiffusionPipeline(
        **tiny_sd_components(seed=seed, prediction_type=prediction_type),
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_sdxl(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Save a tiny :class:`~diffusers.StableDiffusionXLPipeline` to ``path`` (safetensors).

    The result loads offline with ``StableDiffusionXLPipeline.from_pretrained(path)``.

    Args:
        path: Destination folder (created if missing).
        seed: Weight-initialisation seed, see :func:`tiny_sdxl_components`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed=seed))
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def tiny_sd3_components(seed: int = 0, tokenizer_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Components for ``StableDiffusion3Pipeline(**components)``: a one-layer SD3 transformer
    (flow matching), two tiny CLIP text encoders with projection, no T5 (the pipeline then uses
    zeros for its part, as SD3 allows), the tiny VAE and a ``FlowMatchEulerDiscreteScheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    with _tokenizer_directory(tokenizer_dir) as directory:
        tokenizer = build_tiny_tokenizer(directory)
    with seeded_weights(seed):
        transformer = SD3Transformer2DModel(
            sample_size=TINY_LATENT_SIZE, patch_size=1, in_channels=TINY_LATENT_CHANNELS, num_layers=1,
            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
            pooled_projection_dim=64, out_channels=TINY_LATENT_CHANNELS, pos_embed_max_size=32)
    with seeded_weights(seed + 1):
        text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, hidden_act="gelu"))
    with seeded_weights(seed + 2):
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, hidden_act="gelu"))
    vae = _tiny_vae(seed)
    vae.register_to_config(shift_factor=0.0)  # SD3 decodes latents / scaling_factor + shift_factor
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "text_encoder_3": None,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "tokenizer_3": None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def tiny_dit_components(num_classes: int = 1000, learned_sigma: bool = True, seed: int = 0, scheduler=None
                        ) -> dict[str, Any]:
    """Components of a tiny random DiT pipeline built in code (tests): a 2-layer
    ``Transformer2DModel`` (adaLN-zero, patch 2, 16 x 16 x 4 latents, ``num_classes`` classes,
    learned sigma by default, as the ImageNet DiT), the tiny VAE and a scheduler (DDIM by
    default). adaLN-zero starts as the identity; the weights are jittered so that the output
    depends on the class."""
    from diffusers import DDIMScheduler, Transformer2DModel

    with seeded_weights(seed):
        transformer = Transformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8 if learned_sigma else 4,
            num_layers=2, sample_size=16, patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=num_classes,
            norm_elementwise_affine=False)
        for p in transformer.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    return {"transformer": transformer.eval(), "vae": _tiny_vae(seed).eval(),
            "scheduler": scheduler if scheduler is not None else DDIMScheduler()}


def tiny_flux_components(seed: int = 0, guidance_embeds: bool = True,
                         tokenizer_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Components for ``FluxPipeline(**components)``: a one-double-block, one-single-block Flux
    transformer (patch 1 on 2 x 2-packed latents: 4 channels; rotary axes 4 + 4 + 8 = the head
    width 16; the embedded guidance input when ``guidance_embeds``, as guidance-distilled Flux
    models), a tiny CLIP text encoder (its pooled output is the pooled projection), a one-layer
    T5 encoder (the token embeddings), both with the locally built tiny tokenizer (the T5 slot
    takes the CLIP BPE tokenizer: no T5 vocabulary is built here), a tiny VAE with one latent
    channel (scale factor 2: 32 x 32 images, 16 x 16 latents, 64 packed tokens of 4 channels) and
    Flux's dynamically shifted ``FlowMatchEulerDiscreteScheduler``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    with _tokenizer_directory(tokenizer_dir) as directory:
        tokenizer = build_tiny_tokenizer(directory)
    with seeded_weights(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=_TEXT_HIDDEN,
            guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))
    with seeded_weights(seed + 1):
        text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="quick_gelu"))
    with seeded_weights(seed + 2):
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))
    with seeded_weights(seed):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=_VAE_CHANNELS, layers_per_block=1, latent_channels=1,
            norm_num_groups=_NORM_GROUPS, sample_size=TINY_IMAGE_SIZE,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }
