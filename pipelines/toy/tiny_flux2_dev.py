"""Tiny, randomly initialised Flux.2 [dev] components built entirely in code (tests).

No model hub and no network: a Mistral-style byte-level BPE tokenizer is written here (with the
part of Mistral Small 3.1's chat template that the stock pipeline renders: system prompt and user
turn), and every model is built from a tiny config. The models are meaningless but structurally
faithful to :class:`~diffusers.Flux2Pipeline`:

* tokenizer: a plain :class:`~transformers.PreTrainedTokenizerFast` in the slot of the stock
  PixtralProcessor (which needs torchvision for its image half; the stock pipeline only calls
  ``apply_chat_template`` on text, which both provide). The words of the stock system message get
  whole-word tokens, so that the templated prompt stays short (39 tokens for the tests' prompt);
* text encoder: a 30-layer, 16-wide :class:`~transformers.Mistral3ForConditionalGeneration` (with
  a one-layer Pixtral vision tower, never run), deep enough for the stock
  ``text_encoder_out_layers=(10, 20, 30)``, whose three stacked hidden states give 48-wide
  prompt embeddings;
* VAE: a two-block :class:`~diffusers.AutoencoderKLFlux2` (scale factor 2) with 2 latent channels,
  patchified to 8, and random batch-norm statistics (the stock decode de-normalises with them, so
  they must not be the identity), configured as the Klein toy's;
* transformer: a one-double-block, one-single-block :class:`~diffusers.Flux2Transformer2DModel` on 8
  channels WITH a guidance embedding (Flux.2 [dev] is guidance-distilled: the stock pipeline
  embeds ``guidance_scale``);
* scheduler: ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting (the stock ``mu``).

32 x 32 images are 16 x 16 x 2 latents, 8 x 8 x 8 patchified latents, 64 tokens of 8 channels.
Weights are drawn inside :func:`torch.random.fork_rng`: building never moves the caller's RNG.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

from .tiny_models import TINY_VOCAB_WORDS, seeded_weights

__all__ = ["MISTRAL_CHAT_TEMPLATE", "MISTRAL_SPECIAL_TOKENS", "TINY_FLUX2_DEV_TEXT_LAYERS",
           "build_tiny_mistral_tokenizer", "tiny_flux2_dev_components"]

#: Mistral's special tokens: unknown, begin and end of sequence, padding, the instruction and
#: system-prompt markers of its chat format (Tekken, v7) and the image placeholder.
MISTRAL_SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                                           "[/SYSTEM_PROMPT]", "[IMG]")

#: Mistral Small 3.1's chat template reduced to what the stock pipeline renders: the begin token,
#: the system prompt and user turns in their markers (contents as the stock ``format_input`` gives
#: them, lists of text parts, or plain strings), an assistant turn closed by the end token.
#: Stored with the tokenizer, so a saved pipeline renders it offline.
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

#: The Mistral layers whose hidden states the stock pipeline stacks by default are 10, 20 and 30,
#: hence the depth of the tiny text encoder (hidden state k is the output of layer k).
TINY_FLUX2_DEV_TEXT_LAYERS = 30

_TEXT_HIDDEN = 16
_LATENT_CHANNELS = 2
_VAE_CHANNELS = (8, 16)
#: Room for every merge: BPE training stops when each word is one token, long before this.
_VOCAB_LIMIT = 100_000


def _system_words() -> tuple[str, ...]:
    """The words of the stock system message (every prompt starts with it), in order, once each."""
    return tuple(dict.fromkeys(re.findall(r"[A-Za-z]+", SYSTEM_MESSAGE)))


def build_tiny_mistral_tokenizer(model_max_length: int = 131072) -> PreTrainedTokenizerFast:
    """A Mistral-style tokenizer: byte-level BPE (every byte a token, so any text tokenizes),
    trained by the ``tokenizers`` library until the tiny vocabulary words and the stock system
    message's words, bare and after a space, are one token each (checked), Mistral's special
    tokens (``<s>``, ``</s>``, ``<pad>``, ``<unk>``, the chat markers) and
    :data:`MISTRAL_CHAT_TEMPLATE`. ``model_max_length``: the longest input it reads, in tokens (>= 1)."""
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
        raise ValueError(f"model_max_length: must be an integer >= 1, got {model_max_length!r}")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB_LIMIT, min_frequency=0, show_progress=False,
                                  special_tokens=list(MISTRAL_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = dict.fromkeys((*TINY_VOCAB_WORDS, *_system_words()))
    spellings = [spelling for word in words for spelling in (word, " " + word)]
    backend.train_from_iterator(spellings, trainer=trainer)
    split = [spelling for spelling in spellings if len(backend.encode(spelling).ids) != 1]
    if split:
        raise RuntimeError(f"tiny Mistral tokenizer: words not learned as single tokens: {split}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=list(MISTRAL_SPECIAL_TOKENS[4:]), model_max_length=model_max_length)
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def _tiny_mistral3(tokenizer: PreTrainedTokenizerFast, seed: int) -> Mistral3ForConditionalGeneration:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": _TEXT_HIDDEN,
                     "intermediate_size": 32, "num_hidden_layers": TINY_FLUX2_DEV_TEXT_LAYERS,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "max_position_embeddings": 512, "sliding_window": None, **ids},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "intermediate_size": 32, "image_size": 32, "patch_size": 8},
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), **ids)
    with seeded_weights(seed):
        return Mistral3ForConditionalGeneration(config).eval()


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


def tiny_flux2_dev_components(seed: int = 0) -> dict[str, Any]:
    """Components for ``Flux2Pipeline(**components)`` (see the module docstring); ``seed`` draws
    every weight (the text encoder, VAE and transformer from seeds ``seed``, ``seed + 1``,
    ``seed + 2``)."""
    tokenizer = build_tiny_mistral_tokenizer()
    text_encoder = _tiny_mistral3(tokenizer, seed)
    vae = _tiny_vae(seed + 1)
    with seeded_weights(seed + 2):
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=4 * _LATENT_CHANNELS, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * _TEXT_HIDDEN,
            timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return {"scheduler": scheduler, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "transformer": transformer.eval()}
