"""Train the project's default text-to-video model (a tiny Wan 2.1) on the moving-shapes data set (CPU).

    python -m guidance_engine.pipelines.toy.train_video --out pipelines/default_model_video
    python -m guidance_engine.pipelines.toy.train_video --out DIR --resume     # keep a trained VAE stage

The result is an ordinary diffusers Wan folder (``WanPipeline.save_pretrained``, safetensors,
float16 transformer / VAE, float32 text encoder) that loads with
``GuidedWanPipeline.from_pretrained(DIR)`` and generates 9-frame 32 x 32 clips
(:mod:`.moving_shapes`):

* tokenizer: the UMT5-style Unigram tokenizer of :mod:`.tiny_wan` whose word pieces are the
  data set's caption words (:data:`.moving_shapes.VOCABULARY`);
* text encoder: a 2-layer, 64-wide ``UMT5EncoderModel``, frozen at its random init by default
  (``--text-lr-scale 0``, as Wan keeps its pretrained UMT5 frozen: trained jointly, it learnt to
  leave the direction word out), or trained with the transformer at ``--lr`` x ``--text-lr-scale``;
* VAE: an ``AutoencoderKLWan`` (Wan's causal 3-D VAE), 16/32/32 channels, two down-sampling
  stages, both temporal: 9 x 32 x 32 x 3 clips -> 3 x 8 x 8 x 16 latents (temporal factor 4,
  spatial 4, the shipped model; ``--spatial-factor 8`` puts it on 2 x 2 pixel patches,
  ``patch_size=2`` as Wan 2.2's VAE: 3 x 4 x 4 x 16, which loses the shape); trained first (L1 + 0.1 L2 +
  1e-6 KL, shape pixels weighted x4, as the image default's VAE) as a deterministic autoencoder:
  the posterior mean is decoded, and is the transformer's data (a first run decoding posterior
  samples still had posterior stds of 0.5-1.0 against latent spreads of 0.3-3.0 after 600 steps,
  and reconstructed blurred blobs of the wrong colours: the CPU budget has no room for that
  noise); its ``latents_mean`` / ``latents_std`` are the per-channel statistics of the data's
  latents, so that the pipeline's ``z * std + mean`` de-normalisation maps the transformer's
  unit-variance space to the VAE's;
* transformer: a ``WanTransformer3DModel`` (4 blocks, 2 heads of 32 (``--head-dim``), 1 x 1 x 1
  patches: 192 video tokens), trained by flow matching as Wan: ``x_s = (1 - s) x0 + s eps``, target ``eps - x0``
  (``flow_prediction``), timestep ``1000 s``, with s drawn as ``3 u / (1 + 2 u)``, u uniform (the
  shift 3 that the sampling schedule uses), 15 % empty captions so that classifier-free guidance
  works; the shipped weights are an EMA;
* direction clips (``--direction-steps``, ``--direction-mix``): clips where only the direction
  varies ("a large red circle moving {direction} on a blue background",
  :data:`.moving_shapes.DIRECTION_ONLY`, ``--n-direction`` of them from seed + 4): a first
  transformer stage on them alone, whose EMA starts the main stage, and a share of every main-stage
  batch. On the full data set the background and colour words take the loss and the direction
  word is not learnt; alone, it is (docs/video.md, sessions 16-17);
* decoder stage: the VAE's decoder alone, on the frozen encoder's latents (the transformer's data,
  so the transformer stays valid) with a little latent noise, after the transformer stage (or on
  its own, ``--decoder-only``, from the VAE stage's checkpoint);
* scheduler: Wan's ``UniPCMultistepScheduler`` with flow sigmas (``flow_shift=3``).

Prompt embeddings. The stock pipeline pads every prompt's UMT5 embeddings with zeros to
``max_sequence_length`` (512 by default), and the transformer's cross-attention attends to all
512 (no mask). Training runs the text encoder on :data:`TRAIN_TOKENS` tokens instead and gives
the cross-attention one logit bias ``log((512 - n) / (TRAIN_TOKENS - n))`` on the zero rows (n =
the prompt's real tokens): identical keys and values, so the softmax is that of the 512-token
context exactly (:class:`PaddedContextAttention`; checked against the stock 512-token forward
before training starts, :func:`check_padded_context`). It is 3x cheaper on the CPU and the model
sees what the stock call feeds it.

Everything is seeded (``--seed``); the data set is ``moving_shapes.make_dataset(--n-train, seed)``.
``<work>`` (default ``<out>.work``) receives ``losses.csv``, ``train_info.json``, and the
checkpoints ``vae_stage.pt``, ``direction_stage.pt`` and ``decoder_stage.pt`` (``--resume`` reuses
them: only the main transformer stage runs again). ``--init-from DIR`` continues the transformer
stage from a saved pipeline's transformer and text encoder. The defaults are the shipped model's
recipe (docs/video.md).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import math
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from guidance_engine import strict_json

from . import moving_shapes

__all__ = ["PaddedContextAttention", "build_models", "build_scheduler", "build_tokenizer", "check_padded_context",
           "encode_captions", "flow_sigmas", "main", "padded_context", "train"]

#: The stock pipeline's default ``max_sequence_length``: the context the cross-attention sees.
STOCK_TOKENS = 512
#: Tokens the text encoder runs on in training (every caption is shorter: 11 tokens at most).
TRAIN_TOKENS = 16
TEXT_HIDDEN = 64
LATENT_CHANNELS = 16
UNCOND_PROBABILITY = 0.15
#: The VAE's spatial down-sampling factors :func:`build_models` builds (32 x 32 frames: 8 x 8 or 4 x 4 latents).
SPATIAL_FACTORS = (4, 8)
#: The transformer's attention head widths :func:`build_models` takes (width 64 = heads x head width).
HEAD_DIMS = (16, 32, 64)
#: The sampling schedule's shift (UniPC ``flow_shift``), also the shift of the training sigmas.
FLOW_SHIFT = 3.0


def build_tokenizer():
    """The UMT5-style tokenizer with one piece per caption word (:mod:`.tiny_wan`)."""
    from .tiny_wan import build_tiny_umt5_tokenizer

    return build_tiny_umt5_tokenizer(moving_shapes.VOCABULARY)


def build_models(tokenizer, seed: int = 0, spatial_factor: int = 8, head_dim: int = 16):
    """Fresh (text_encoder, vae, transformer), initialised from ``seed`` (see the module docstring);
    ``spatial_factor`` 8 (4 x 4 latents a frame) or 4 (8 x 8: no patches, the VAE on whole pixels;
    docs/video.md, "A VAE of spatial factor 4"); ``head_dim``: the transformer's attention head
    width (16, 32 or 64; its width stays 64), which sets how finely Wan's rotary positions tell the
    latent grid's columns and rows apart (2 (head_dim // 6) rotary dims an axis: 2 frequencies at
    16, 1 and 0.01 radian a cell, so 8 cells alias; 5 at 32; 10 at 64)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=TEXT_HIDDEN, d_kv=16, d_ff=2 * TEXT_HIDDEN, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id))
    if spatial_factor not in SPATIAL_FACTORS:
        raise ValueError(f"spatial_factor: must be one of {SPATIAL_FACTORS}, got {spatial_factor!r}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: must be one of {HEAD_DIMS}, got {head_dim!r}")
    # two stages (x 2 in space and time each): spatial factor 4, temporal 4; on 2 x 2 pixel
    # patches (Wan 2.2's patch_size=2: 12 channels in and out) spatial factor 8
    patch = {"patch_size": 2, "in_channels": 12, "out_channels": 12} if spatial_factor == 8 else {}
    vae = AutoencoderKLWan(
        base_dim=16, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[True, True],
        latents_mean=[0.0] * LATENT_CHANNELS, latents_std=[1.0] * LATENT_CHANNELS, scale_factor_temporal=4,
        scale_factor_spatial=spatial_factor, **patch)
    transformer = WanTransformer3DModel(
        patch_size=(1, 1, 1), num_attention_heads=64 // head_dim, attention_head_dim=head_dim, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, text_dim=TEXT_HIDDEN, freq_dim=64, ffn_dim=256, num_layers=4,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return text_encoder, vae, transformer


def build_scheduler():
    """Wan's sampler: UniPC on flow sigmas, ``flow_shift`` :data:`FLOW_SHIFT`."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT)


def flow_sigmas(u: torch.Tensor, shift: float = FLOW_SHIFT) -> torch.Tensor:
    """Training noise levels ``s = shift u / (1 + (shift - 1) u)`` of uniform ``u`` in [0, 1]."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def encode_captions(tokenizer, text_encoder, texts: list[str], tokens: int = TRAIN_TOKENS,
                    context: int = STOCK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings as the stock encoder makes them (cleaned text, UMT5 with its mask, the real
    tokens kept and zeros after them), on ``tokens`` positions, and the cross-attention logit bias
    that makes those zeros count as the ``context - n`` zeros of the stock ``context``-token
    padding: ``(embeddings [B, tokens, D], bias [B, tokens])``."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    inputs = tokenizer([prompt_clean(t) for t in texts], padding="max_length", max_length=tokens, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = inputs.attention_mask
    real = mask.sum(1, keepdim=True)
    if int(real.max()) >= tokens:
        raise ValueError(f"texts: a caption fills all {tokens} training tokens; no zero row is left to stand for "
                         "the stock padding")
    hidden = text_encoder(inputs.input_ids, mask).last_hidden_state * mask[..., None]
    zeros = (context - real).float() / (tokens - real).float()
    bias = torch.where(mask.bool(), torch.zeros(()), zeros.log())
    return hidden, bias


class PaddedContextAttention:
    """Cross-attention processor for training: the stock ``WanAttnProcessor`` with an additive
    logit bias on the context rows (:func:`encode_captions`' bias, set per batch in ``bias``)."""

    def __init__(self, stock) -> None:
        self.stock = stock
        self.bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        mask = None if self.bias is None else self.bias[:, None, None, :].to(hidden_states.dtype)
        return self.stock(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)


@contextlib.contextmanager
def padded_context(transformer) -> Iterator[list[PaddedContextAttention]]:
    """Install :class:`PaddedContextAttention` on every block's cross-attention (inside only)."""
    saved = [block.attn2.processor for block in transformer.blocks]
    processors = [PaddedContextAttention(p) for p in saved]
    for block, processor in zip(transformer.blocks, processors):
        block.attn2.set_processor(processor)
    try:
        yield processors
    finally:
        for block, processor in zip(transformer.blocks, saved):
            block.attn2.set_processor(processor)


def _forward(transformer, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return transformer(hidden_states=x, timestep=sigma * 1000.0, encoder_hidden_states=context, return_dict=False)[0]


def _padded_forward(transformer, processors, x, sigma, context, bias) -> torch.Tensor:
    for processor in processors:
        processor.bias = bias
    return _forward(transformer, x, sigma, context)


@torch.no_grad()
def check_padded_context(tokenizer, text_encoder, transformer, texts: list[str], tolerance: float = 1e-4) -> float:
    """The largest difference between the transformer's output on the stock 512-token zero-padded
    context and on the short context with the bias; RuntimeError above ``tolerance``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(len(texts), LATENT_CHANNELS, 3, 4, 4, generator=gen)  # any latent grid: the check is the context
    sigma = torch.rand(len(texts), generator=gen)
    short, bias = encode_captions(tokenizer, text_encoder, texts)
    full = torch.cat([short, short.new_zeros(len(texts), STOCK_TOKENS - TRAIN_TOKENS, short.shape[2])], 1)
    reference = _forward(transformer, x, sigma, full)
    with padded_context(transformer) as processors:
        ours = _padded_forward(transformer, processors, x, sigma, short, bias)
    error = float((ours - reference).abs().max())
    if error > tolerance:
        raise RuntimeError(f"the short context with the padding bias differs from the stock 512-token context by "
                           f"{error:.3g} (> {tolerance}): the training would not see what the pipeline feeds")
    return error


def _clip_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> float [B, 3, F, H, W] in [-1, 1] (the Wan VAE's input)."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def _lr(base: float, step: int, steps: int, warmup: int, floor: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` to ``floor * base``."""
    return base * min(1.0, (step + 1) / warmup) * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))


def _reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, shape_weight: float) -> torch.Tensor:
    """L1 + 0.1 L2, shape pixels (away from the clip's median = background colour) weighted
    ``shape_weight`` x, as the image VAE: the background fills most of every frame."""
    bg = x.flatten(2).median(dim=2).values[:, :, None, None, None]
    weight = 1.0 + (shape_weight - 1.0) * ((x - bg).abs().amax(1, keepdim=True) > 0.1).float()
    err = (rec - x).abs() + 0.1 * (rec - x) ** 2
    return (weight * err).mean() / weight.mean()


def train_vae(vae, clips: np.ndarray, args: argparse.Namespace, gen: torch.Generator, losses: list) -> float:
    """Stage 1: the VAE alone; returns its seconds."""
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    vae.train()
    start = time.time()
    for step in (bar := tqdm(range(args.vae_steps), desc="vae")):
        for g in opt.param_groups:
            g["lr"] = _lr(args.vae_lr, step, args.vae_steps, 50, 0.0)
        x = _clip_tensor(clips[torch.randint(0, len(clips), (args.vae_batch,), generator=gen).numpy()])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample  # deterministic: see the module docstring
        loss = _reconstruction_loss(rec, x, args.vae_shape_weight) + args.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append({"stage": "vae", "step": step + 1, "loss": loss.item()})
        bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}")
    vae.eval()
    return time.time() - start


def train_decoder(vae, latents: torch.Tensor, clips: np.ndarray, args: argparse.Namespace,
                  losses: list) -> float:
    """Stage 3: the VAE's decoder alone (and its ``post_quant_conv``) on the frozen encoder's
    latents (the transformer's data, so the transformer stays valid), with noise of
    ``--decoder-noise`` x each channel's std added to the latents (generated latents are not
    exact); its own generator (``seed + 2``), so that it depends on the VAE stage and the data only.
    Returns its seconds."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    spread = latents.std(dim=(0, 2, 3, 4)).view(1, -1, 1, 1, 1)
    vae.decoder.train()
    start = time.time()
    for step in (bar := tqdm(range(args.decoder_steps), desc="decoder")):
        for g in opt.param_groups:
            g["lr"] = _lr(args.vae_lr, step, args.decoder_steps, 50, 0.0)
        idx = torch.randint(0, len(latents), (args.vae_batch,), generator=gen)
        x = _clip_tensor(clips[idx.numpy()])
        z = latents[idx] + args.decoder_noise * spread * torch.randn(latents[idx].shape, generator=gen)
        rec = vae.decode(z).sample
        loss = _reconstruction_loss(rec, x, args.vae_shape_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append({"stage": "decoder", "step": step + 1, "loss": loss.item()})
        bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}")
    vae.eval().requires_grad_(False)
    return time.time() - start


@torch.no_grad()
def data_latents(vae, clips: np.ndarray, batch: int = 64) -> torch.Tensor:
    """The VAE posterior's mean of every clip, ``[N, 16, 3, 4, 4]``."""
    return torch.cat([vae.encode(_clip_tensor(clips[i:i + batch])).latent_dist.mode()
                      for i in range(0, len(clips), batch)])


@torch.no_grad()
def reconstruction_scores(vae, n: int = 96, seed: int = 7) -> dict[str, float]:
    """How much of a clip survives the VAE: ``n`` held-out data-set clips (``make_dataset(n, seed)``)
    encoded (posterior mean) and decoded, scored by :mod:`.video_evaluation` against their captions
    (``acc_shape``, ``acc_color``, ``acc_direction``, ``acc_background``, ``alignment``, ``travel``).
    No generated clip can score above its VAE's reconstructions."""
    from .video_evaluation import load_classifier, score_clips, summarize

    clips, captions, _ = moving_shapes.make_dataset(n, seed)
    rec = torch.cat([vae.decode(vae.encode(_clip_tensor(clips[i:i + 16])).latent_dist.mode()).sample
                     for i in range(0, n, 16)])
    frames = rec.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    classifier = load_classifier("eval")
    scores = [score_clips(frames[i:i + 1], captions[i], classifier)[0] for i in range(n)]
    return summarize(scores)


def latent_shape_mask(clips: np.ndarray, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Where the shape is on the latent grid, ``bool [N, 1, 3, h, w]``: a pixel is the shape's when
    it is farther than 0.1 (in [-1, 1]) from the clip's median colour (the background), as the VAE
    loss weighs it; a latent cell is the shape's when any of its pixels is, in any of its frames
    (latent frame 0 = frame 0, then frames 1-4 and 5-8: Wan's causal temporal grouping)."""
    masks = []
    for i in range(0, len(clips), 256):
        x = _clip_tensor(clips[i:i + 256])
        bg = x.flatten(2).median(dim=2).values[:, :, None, None, None]
        shape = ((x - bg).abs().amax(1, keepdim=True) > 0.1).float()  # [B, 1, 9, H, W]
        groups = torch.cat([shape[:, :, :1], shape[:, :, 1:5].amax(2, keepdim=True),
                            shape[:, :, 5:9].amax(2, keepdim=True)], 2)
        masks.append(F.adaptive_max_pool3d(groups, (3, *latent_hw)) > 0)
    return torch.cat(masks)


class Source(NamedTuple):
    """Where a transformer-stage batch draws ``rows`` of its rows: the normalised ``latents``, their
    ``captions`` and (``--shape-weight``) their :func:`latent_shape_mask`."""
    latents: torch.Tensor
    captions: list[str]
    rows: int
    shape_mask: torch.Tensor | None = None


def train_transformer(transformer, text_encoder, tokenizer, sources: list[Source], steps: int,
                      args: argparse.Namespace, gen: torch.Generator, losses: list, stage: str = "transformer"):
    """Stage 2: transformer + text encoder by flow matching for ``steps`` steps; returns (EMA
    transformer, EMA text encoder, seconds). Each batch takes ``source.rows`` rows of every source
    (the data set alone, or the data set and the direction-only clips of ``--direction-mix``); the
    latents are in the transformer's normalised space. The text encoder learns at
    ``args.text_lr_scale`` x the transformer's rate; at 0 it is frozen (evaluation mode, no
    dropout, as sampling runs it) and returned as built.
    ``shape_mask`` with ``--shape-weight`` w > 1: the latent cells of the shape weigh w in the loss
    (the background fills most cells; the words that only move or reshape the shape otherwise
    barely reach the loss). A reweighted objective: its optimum leans towards clips with the shape
    where the noisy input leaves it open, not the plain flow velocity."""
    train_text = args.text_lr_scale > 0
    batch = sum(source.rows for source in sources)
    weighted = args.shape_weight != 1.0
    groups = [{"params": list(transformer.parameters()), "scale": 1.0}]
    if train_text:
        groups.append({"params": list(text_encoder.parameters()), "scale": args.text_lr_scale})
    params = [p for group in groups for p in group["params"]]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=1e-4)
    ema_transformer = copy.deepcopy(transformer).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    transformer.train().requires_grad_(True)  # a previous stage's EMA copy comes without gradients
    text_encoder.train(train_text).requires_grad_(train_text)  # frozen: no dropout, as at sampling
    averaged = [(ema_transformer, transformer)] + ([(ema_text, text_encoder)] if train_text else [])
    start = time.time()
    with padded_context(transformer) as processors:
        for step in (bar := tqdm(range(steps), desc=stage)):
            for g in opt.param_groups:
                g["lr"] = g["scale"] * _lr(args.lr, step, steps, 100, 0.1)
            picks = [torch.randint(0, len(source.latents), (source.rows,), generator=gen) for source in sources]
            x0 = torch.cat([source.latents[idx] for source, idx in zip(sources, picks)])
            captions = [source.captions[i] for source, idx in zip(sources, picks) for i in idx.tolist()]
            drop = (torch.rand(batch, generator=gen) < UNCOND_PROBABILITY).tolist()
            texts = ["" if d else caption for d, caption in zip(drop, captions)]
            context, bias = encode_captions(tokenizer, text_encoder, texts)
            eps = torch.randn(x0.shape, generator=gen)
            sigma = flow_sigmas(torch.rand(batch, generator=gen))
            s = sigma.view(-1, 1, 1, 1, 1)
            pred = _padded_forward(transformer, processors, (1 - s) * x0 + s * eps, sigma, context, bias)
            if not weighted:
                loss = F.mse_loss(pred, eps - x0)
            else:
                mask = torch.cat([source.shape_mask[idx] for source, idx in zip(sources, picks)])
                weight = 1.0 + (args.shape_weight - 1.0) * mask.float()
                loss = (weight * (pred - (eps - x0)) ** 2).mean() / weight.expand_as(pred).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            decay = min(args.ema, (1 + step) / (10 + step))  # a short EMA early, the long one later
            with torch.no_grad():
                for ema, live in averaged:
                    for pe, p in zip(ema.parameters(), live.parameters()):
                        pe.lerp_(p, 1 - decay)
            losses.append({"stage": stage, "step": step + 1, "loss": loss.item()})
            bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}")
    return ema_transformer.eval(), ema_text.eval(), time.time() - start


def _cast(model, dtype: torch.dtype):
    """A copy of ``model`` in ``dtype``, except the modules its class keeps in float32 (Wan's rotary
    table, time embedding, norms: what diffusers' own ``torch_dtype`` loading keeps in float32)."""
    copied = torch.nn.Module.to(copy.deepcopy(model), dtype)  # diffusers' own .to() warns of the float32 modules
    keep = getattr(copied, "_keep_in_fp32_modules", None) or []
    for name, module in copied.named_modules():
        if any(part in keep for part in name.split(".")):
            module.float()
    return copied


def save_model(out: Path, transformer, vae, text_encoder, tokenizer, fp16: bool) -> None:
    """``WanPipeline.save_pretrained`` (safetensors); transformer and VAE in float16 with ``fp16``."""
    from diffusers import WanPipeline

    half = torch.float16 if fp16 else torch.float32
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_cast(vae, half),
                       scheduler=build_scheduler(), transformer=_cast(transformer, half))
    pipe.save_pretrained(out, safe_serialization=True)


def decoder_stage(vae, latents: torch.Tensor, clips: np.ndarray, args: argparse.Namespace, work: Path,
                  losses: list) -> float:
    """Stage 3 (:func:`train_decoder`), or with ``--resume`` its saved result ``<work>/decoder_stage.pt``."""
    path = work / "decoder_stage.pt"
    if args.resume and path.exists():
        state = torch.load(path, weights_only=False)
        vae.load_state_dict(state["vae"])
        losses += state["losses"]
        print(f"resumed: the decoder stage of {path}")
        return state["seconds"]
    mine: list[dict] = []
    seconds = train_decoder(vae, latents, clips, args, mine)
    torch.save({"vae": vae.state_dict(), "losses": mine, "seconds": seconds}, path)
    losses += mine
    return seconds


def direction_stage(transformer, text_encoder, tokenizer, clips: Source, args: argparse.Namespace,
                    gen: torch.Generator, work: Path, losses: list):
    """The ``--direction-steps`` stage on the direction-only clips; returns its EMA transformer and
    text encoder (the main stage's start) and its seconds. Saved as ``<work>/direction_stage.pt``
    with the generator's state after it; ``--resume`` reuses it when its settings are these."""
    path = work / "direction_stage.pt"
    settings = {name: getattr(args, name) for name in ("direction_steps", "n_direction", "batch", "lr",
                                                        "text_lr_scale", "ema", "shape_weight", "seed", "n_train",
                                                        "spatial_factor", "head_dim")}
    if args.resume and path.exists():
        state = torch.load(path, weights_only=False)
        if state["settings"] == settings:
            transformer.load_state_dict(state["transformer"])
            text_encoder.load_state_dict(state["text_encoder"])
            gen.set_state(state["gen"])
            losses += state["losses"]
            print(f"resumed: the direction stage of {path}")
            return transformer.eval(), text_encoder.eval(), state["seconds"]
        print(f"not resumed: {path} was trained with {state['settings']}, not {settings}")
    mine: list[dict] = []
    transformer, text_encoder, seconds = train_transformer(transformer, text_encoder, tokenizer, [clips],
                                                           args.direction_steps, args, gen, mine, stage="direction")
    torch.save({"transformer": transformer.state_dict(), "text_encoder": text_encoder.state_dict(),
                "gen": gen.get_state(), "losses": mine, "seconds": seconds, "settings": settings}, path)
    losses += mine
    return transformer, text_encoder, seconds


def patch_decoder(out: Path, vae, fp16: bool) -> Path:
    """Put ``vae`` (its fine-tuned decoder) into the pipeline saved in ``out`` (``--decoder-only``:
    stage 3 run on its own, from the VAE stage, beside or after the transformer stage)."""
    from diffusers import AutoencoderKLWan

    if not (out / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"--out: no saved pipeline in {out} to put the decoder into (rerun with --resume "
                                "--decoder-only once the transformer stage has saved it)")
    saved = AutoencoderKLWan.from_pretrained(out / "vae")
    if saved.config.latents_mean != vae.config.latents_mean:
        raise ValueError(f"--out: {out}/vae was normalised with other latent statistics: not this VAE stage's")
    _cast(vae, torch.float16 if fp16 else torch.float32).save_pretrained(out / "vae", safe_serialization=True)
    print(f"put the fine-tuned decoder into {out}/vae")
    return out


def _saved_networks(directory: Path):
    """The (transformer, text encoder) of a pipeline saved by this script, in float32."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    transformer = WanTransformer3DModel.from_pretrained(directory / "transformer", torch_dtype=torch.float32)
    text_encoder = UMT5EncoderModel.from_pretrained(directory / "text_encoder", dtype=torch.float32)
    return transformer, text_encoder


def train(args: argparse.Namespace) -> Path:
    if not (math.isfinite(args.shape_weight) and args.shape_weight >= 1.0):
        raise ValueError(f"--shape-weight: must be a finite number >= 1 (1 = plain flow matching), "
                         f"got {args.shape_weight!r}")
    if not (math.isfinite(args.text_lr_scale) and args.text_lr_scale >= 0.0):
        raise ValueError(f"--text-lr-scale: must be a finite number >= 0 (0 = a frozen text encoder), "
                         f"got {args.text_lr_scale!r}")
    if isinstance(args.direction_steps, bool) or not isinstance(args.direction_steps, int) or args.direction_steps < 0:
        raise ValueError(f"--direction-steps: must be an integer >= 0 (0 = no direction-only stage), "
                         f"got {args.direction_steps!r}")
    if not (math.isfinite(args.direction_mix) and 0.0 <= args.direction_mix < 1.0):
        raise ValueError(f"--direction-mix: must be a number in [0, 1) (the share of each batch that is "
                         f"direction-only clips), got {args.direction_mix!r}")
    if isinstance(args.n_direction, bool) or not isinstance(args.n_direction, int) or args.n_direction < 1:
        raise ValueError(f"--n-direction: must be an integer >= 1, got {args.n_direction!r}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work or f"{out}.work")
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    text_encoder, vae, transformer = build_models(tokenizer, args.seed, args.spatial_factor, args.head_dim)
    error = check_padded_context(tokenizer, text_encoder, transformer,
                                 ["a red circle moving right on a blue background", ""])
    print(f"padded-context check: max difference {error:.2e} from the stock 512-token context")

    t0 = time.time()
    clips, captions, _ = moving_shapes.make_dataset(args.n_train, args.seed)
    print(f"data set: {args.n_train} clips in {time.time() - t0:.1f}s; e.g. {captions[0]!r}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses: list[dict] = []
    vae_path = work / "vae_stage.pt"
    if args.resume and vae_path.exists():
        state = torch.load(vae_path, weights_only=False)
        vae.load_state_dict(state["vae"])
        gen.set_state(state["gen"])
        losses, vae_seconds = state["losses"], state["seconds"]
        vae.eval()
        print(f"resumed: the VAE stage of {vae_path}")
    else:
        vae_seconds = train_vae(vae, clips, args, gen, losses)
        torch.save({"vae": vae.state_dict(), "gen": gen.get_state(), "losses": losses, "seconds": vae_seconds},
                   vae_path)
    vae.requires_grad_(False)
    vae_scores = reconstruction_scores(vae)
    print(f"VAE reconstructions of held-out clips: {strict_json.dumps(vae_scores)}")
    if args.vae_only:
        return work
    mean = data_latents(vae, clips)
    # the pipeline decodes z * latents_std + latents_mean: the transformer works in (z - mean) / std
    channel_mean = mean.mean(dim=(0, 2, 3, 4))
    channel_std = mean.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=channel_mean.tolist(), latents_std=channel_std.tolist())
    view = (1, -1, 1, 1, 1)
    normalised = (mean - channel_mean.view(view)) / channel_std.view(view)
    print(f"vae done in {vae_seconds:.0f}s; latent channel std {channel_std.min():.3f}..{channel_std.max():.3f}")

    if args.decoder_only:
        decoder_stage(vae, mean, clips, args, work, losses)
        return patch_decoder(out, vae, args.fp16)
    if args.init_from:  # a continuation: the saved transformer and text encoder, other batches
        transformer, text_encoder = _saved_networks(Path(args.init_from))
        gen.manual_seed(args.seed + 3)

    def source(latents, texts, video, rows):
        mask = latent_shape_mask(video, tuple(latents.shape[-2:])) if args.shape_weight != 1.0 else None
        return Source(latents, texts, rows, mask)

    direction_seconds = 0.0
    curriculum = bool(args.direction_steps) and not args.init_from  # a continuation goes on with the main stage
    mixed = round(args.direction_mix * args.batch)
    if curriculum or mixed:
        # the clips where only the direction varies, in the data set's normalised latent space
        direction_clips, direction_captions, _ = moving_shapes.make_dataset(args.n_direction, args.seed + 4,
                                                                           moving_shapes.DIRECTION_ONLY)
        direction_latents = (data_latents(vae, direction_clips) - channel_mean.view(view)) / channel_std.view(view)
        direction = source(direction_latents, direction_captions, direction_clips, args.batch)
    if curriculum:  # the direction word first, alone
        transformer, text_encoder, direction_seconds = direction_stage(transformer, text_encoder, tokenizer, direction,
                                                                       args, gen, work, losses)
    sources = [source(normalised, captions, clips, args.batch - mixed)]
    if mixed:
        sources.append(direction._replace(rows=mixed))
    ema_transformer, ema_text, seconds = train_transformer(transformer, text_encoder, tokenizer, sources, args.steps,
                                                           args, gen, losses)
    decoder_seconds = decoder_stage(vae, mean, clips, args, work, losses)
    save_model(out, ema_transformer, vae, ema_text, tokenizer, args.fp16)
    with open(work / "losses.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["stage", "step", "loss"])
        writer.writeheader()
        writer.writerows(losses)
    final = {stage: float(np.mean([r["loss"] for r in losses if r["stage"] == stage][-100:]))
             for stage in ("vae", "direction", "transformer", "decoder")
             if any(r["stage"] == stage for r in losses)}
    info = {"seed": args.seed, "n_train": args.n_train, "vae_steps": args.vae_steps, "vae_batch": args.vae_batch,
            "vae_lr": args.vae_lr, "kl_weight": args.kl_weight, "vae_shape_weight": args.vae_shape_weight,
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "ema": args.ema, "init_from": args.init_from,
            "uncond_probability": UNCOND_PROBABILITY, "threads": args.threads, "fp16": bool(args.fp16),
            "decoder_steps": args.decoder_steps, "decoder_noise": args.decoder_noise, "head_dim": args.head_dim,
            "shape_weight": args.shape_weight, "text_lr_scale": args.text_lr_scale,
            "direction_steps": args.direction_steps, "direction_mix": args.direction_mix,
            "direction_rows": mixed, "n_direction": args.n_direction, "direction_seconds": direction_seconds,
            "padded_context_error": error, "vae_seconds": vae_seconds, "transformer_seconds": seconds,
            "decoder_seconds": decoder_seconds, "spatial_factor": args.spatial_factor,
            "vae_reconstruction_scores": vae_scores,
            "final_losses_last100": final}
    (work / "train_info.json").write_text(strict_json.dumps(info, indent=2))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"saved {out} ({size:.2f} MB); {strict_json.dumps(info)}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the saved diffusers pipeline")
    p.add_argument("--work", default=None, help="losses.csv, train_info.json, vae_stage.pt (default <out>.work)")
    p.add_argument("--resume", action="store_true", help="reuse <work>/vae_stage.pt: train the transformer only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=6000, help="clips in the training set")
    p.add_argument("--spatial-factor", type=int, choices=SPATIAL_FACTORS, default=4,
                   help="the VAE's spatial down-sampling: 4 (8 x 8 latents a frame, the shipped model) or 8 (4 x 4)")
    p.add_argument("--head-dim", type=int, choices=HEAD_DIMS, default=32,
                   help="the transformer's attention head width (64 // it heads): finer rotary positions")
    p.add_argument("--vae-only", action="store_true", help="stop after the VAE stage (and its reconstruction scores)")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--vae-shape-weight", type=float, default=4.0, help="loss weight of shape pixels")
    p.add_argument("--steps", type=int, default=3000, help="main transformer-stage steps")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--shape-weight", type=float, default=1.0,
                   help="transformer stage: loss weight of the shape's latent cells (1 = plain flow matching)")
    p.add_argument("--decoder-steps", type=int, default=600, help="stage 3: the VAE decoder alone")
    p.add_argument("--decoder-noise", type=float, default=0.1,
                   help="stage 3: latent noise, times each channel's std")
    p.add_argument("--decoder-only", action="store_true",
                   help="run stage 3 alone (needs <work>/vae_stage.pt) and put the decoder into the pipeline in --out")
    p.add_argument("--init-from", default=None,
                   help="continue the transformer stage from the transformer and text encoder saved in this "
                   "folder (new optimiser and schedule, batches from seed + 3); with --resume for the VAE stages")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--text-lr-scale", type=float, default=0.0,
                   help="transformer stage: the text encoder's learning rate, times --lr (0 = frozen at its random "
                   "init, as Wan's pretrained UMT5 is frozen)")
    p.add_argument("--direction-steps", type=int, default=1500,
                   help="a first transformer stage of this many steps on direction-only clips (one shape, colour, "
                   "background; moving_shapes.DIRECTION_ONLY), whose EMA starts the main stage (0 = none; "
                   "skipped with --init-from)")
    p.add_argument("--direction-mix", type=float, default=0.25,
                   help="main transformer stage: the share of each batch drawn from the direction-only clips, "
                   "in [0, 1) (rounded to whole rows)")
    p.add_argument("--n-direction", type=int, default=2000, help="direction-only clips (seed + 4)")
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="save float32 weights")
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
