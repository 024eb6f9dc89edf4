"""Train the project's default text-to-image model on the procedural shapes data set (CPU).

    python -m guidance_engine.pipelines.toy.train_default --out pipelines/default_model
    python -m guidance_engine.pipelines.toy.train_default --out DIR --resume      # continue a run

The result is an ordinary diffusers Stable Diffusion folder (``StableDiffusionPipeline``
``save_pretrained``, safetensors, float16 UNet / VAE weights, float32 text encoder, no safety
checker) that loads with
``GuidedStableDiffusionPipeline.from_pretrained(DIR)`` and generates 32 x 32 images:

* tokenizer: a CLIP byte-level BPE tokenizer whose whole-word vocabulary is the data set's
  caption words (:data:`guidance_engine.pipelines.toy.shapes.VOCABULARY`), ``model_max_length=16``;
* text encoder: a 2-layer, 64-wide ``CLIPTextModel`` trained jointly with the UNet;
* VAE: a 3-level ``AutoencoderKL`` mapping 32 x 32 x 3 images to 8 x 8 x 4 latents, trained
  first (L1 + 0.1 L2 + 1e-6 KL, shape pixels weighted x4 against the background); its ``scaling_factor`` is 1 / the latent std of the data;
* UNet: a 3-level ``UNet2DConditionModel`` (32/64/64 channels, cross-attention at every level),
  epsilon prediction, scaled-linear betas 0.00085..0.012 over 1000 steps, trained with 15 %
  empty captions so that classifier-free guidance works; the shipped weights are an EMA;
* scheduler: ``DDIMScheduler`` (``steps_offset=1``, ``set_alpha_to_one=False``);
* reference UNet (``<out>/reference_unet``): a deliberately *weaker* UNet for AutoGuidance
  (Karras et al. 2024, arXiv 2406.02507: guide with a smaller, less trained version of the same
  model). Half the channels (16/32/32), trained on the same batches and the same (detached) text
  embeddings as the main UNet, EMA like it, for ``--reference-steps`` steps (default: all of
  them, so that it reads the final text encoder's embeddings as well as the main UNet does; the
  degradation is capacity, not a mismatched condition).

Stages: ``vae`` (``--vae-steps``), then ``unet`` (``--steps``). A checkpoint of everything
(models, EMA, optimisers, RNG, loss log) is written to ``<work>/state.pt`` every
``--ckpt-every`` steps and at the end of each stage; ``--resume`` continues from it.
``<work>`` (default ``<out>.work``) also receives ``losses.csv``; the loss plot is written
with ``--plot PATH``. Everything is seeded (``--seed``): the data set is
``shapes.make_dataset(--n-train, seed)``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from guidance_engine import strict_json

from . import shapes
from .checkpoint import load_training_state, save_training_state

__all__ = ["build_tokenizer", "build_models", "build_reference_unet", "images_to_tensor", "main", "plot_losses", "train"]

MODEL_MAX_LENGTH = 16
TEXT_HIDDEN = 64
LATENT_CHANNELS = 4
LATENT_SIZE = 8
UNCOND_PROBABILITY = 0.15


def build_tokenizer(directory: str | os.PathLike[str]):
    """Write the shapes vocabulary (``vocab.json`` / ``merges.txt``) to ``directory`` and load it."""
    from transformers import CLIPTokenizer

    from .tiny_models import tiny_vocab, tiny_bpe_merges

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = tiny_bpe_merges(shapes.VOCABULARY)
    vocab = tiny_vocab(merges)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")
    # transformers 5: paths must be positional (keywords silently build a 2-token tokenizer).
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                        model_max_length=MODEL_MAX_LENGTH)
    if len(tok) != len(vocab):
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected {len(vocab)}")
    return tok


def build_reference_unet(seed: int = 0):
    """The AutoGuidance reference: the main UNet's architecture at half the channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed + 7)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8)


def build_models(tokenizer, seed: int = 0):
    """Fresh (text_encoder, vae, unet), initialised from ``seed``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
        latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=shapes.IMAGE_SIZE)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8)
    return text_encoder, vae, unet


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, prediction_type="epsilon")


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W, 3) as float tensors (N, 3, H, W) in [-1, 1], the models' input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def plot_losses(rows: list[dict], path: str | os.PathLike[str]) -> None:
    """Draw the loss curves (one panel per stage, log-scale y, running mean) into a PNG with PIL."""
    from PIL import Image, ImageDraw

    stages = [s for s in ("vae", "unet") if any(r["stage"] == s for r in rows)]
    w, h, pad = 420, 260, 40
    img = Image.new("RGB", (w * len(stages), h), "white")
    d = ImageDraw.Draw(img)
    for k, stage in enumerate(stages):
        pts = [(r["step"], r["loss"]) for r in rows if r["stage"] == stage]
        steps = np.array([p[0] for p in pts], float)
        loss = np.array([p[1] for p in pts], float)
        win = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(win) / win, mode="valid")
        ls = np.log10(np.clip(loss, 1e-6, None))
        lo, hi = float(ls.min()), float(ls.max()) + 1e-9
        x0 = k * w

        def xy(s, v):
            return (x0 + pad + (s - steps[0]) / max(1.0, steps[-1] - steps[0]) * (w - 2 * pad),
                    h - pad - (math.log10(max(v, 1e-6)) - lo) / (hi - lo) * (h - 2 * pad))

        d.rectangle((x0 + pad, pad, x0 + w - pad, h - pad), outline="black")
        d.line([xy(s, v) for s, v in zip(steps, loss)], fill=(190, 190, 230))
        d.line([xy(s, v) for s, v in zip(steps[win - 1:], smooth)], fill=(20, 20, 160), width=2)
        d.text((x0 + pad, 10), f"{stage} loss (log scale), final {smooth[-1]:.4f}", fill="black")
        d.text((x0 + pad, h - pad + 5), f"step {int(steps[0])}", fill="black")
        d.text((x0 + w - pad - 60, h - pad + 5), f"step {int(steps[-1])}", fill="black")
        d.text((x0 + 2, pad), f"{10 ** hi:.3g}", fill="black")
        d.text((x0 + 2, h - pad - 10), f"{10 ** lo:.3g}", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def train(args: argparse.Namespace) -> Path:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work or f"{out}.work")
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(work / "tokenizer")
    text_encoder, vae, unet = build_models(tokenizer, args.seed)

    t0 = time.time()
    images, captions, _ = shapes.make_dataset(args.n_train, args.seed)
    x_all = images_to_tensor(images)
    ids_all = tokenizer(captions, padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                          return_tensors="pt").input_ids
    print(f"data set: {args.n_train} images in {time.time() - t0:.1f}s; e.g. {captions[0]!r}")

    vae_opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    reference = build_reference_unet(args.seed)
    ema_reference = copy.deepcopy(reference).requires_grad_(False)
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=args.lr, weight_decay=1e-4)
    state = {"stage": "vae", "step": 0, "losses": [], "scaling_factor": None, "elapsed": 0.0}
    gen = torch.Generator().manual_seed(args.seed + 1)
    state_path = work / "state.pt"

    parts = {"vae": vae, "unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text,
             "vae_opt": vae_opt, "opt": opt, "reference": reference, "ema_reference": ema_reference,
             "reference_opt": reference_opt}
    resumed = load_training_state(state_path, parts, gen) if args.resume else None
    if resumed is not None:
        state = resumed
        print(f"resumed: stage {state['stage']} step {state['step']}")

    def save_state() -> None:
        save_training_state(state_path, parts, gen, state)
        with open(work / "losses.csv", "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["stage", "step", "loss", "reference_loss"])
            wr.writeheader()
            wr.writerows(state["losses"])

    n = len(x_all)
    # ---------------------------------------------------------------- stage 1: VAE
    if state["stage"] == "vae":
        vae.train()
        start = time.time() - state["elapsed"]
        bar = tqdm(range(state["step"], args.vae_steps), desc="vae", initial=state["step"], total=args.vae_steps)
        for step in bar:
            lr = args.vae_lr * min(1.0, (step + 1) / 100) * (0.5 * (1 + math.cos(math.pi * step / args.vae_steps)))
            for g in vae_opt.param_groups:
                g["lr"] = lr
            x = x_all[torch.randint(0, n, (args.vae_batch,), generator=gen)]
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
            # Shape pixels (those away from the image's median = background colour) weigh more: the
            # background fills most of the image and would otherwise dominate the loss.
            bg = x.flatten(2).median(dim=2).values[:, :, None, None]
            weight = 1.0 + (args.vae_shape_weight - 1.0) * ((x - bg).abs().amax(1, keepdim=True) > 0.1).float()
            err = (rec - x).abs() + 0.1 * (rec - x) ** 2
            loss = (weight * err).mean() / weight.mean() + args.kl_weight * post.kl().mean()
            vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            vae_opt.step()
            state["losses"].append({"stage": "vae", "step": step + 1, "loss": float(loss)})
            state["step"] = step + 1
            bar.set_postfix(loss=f"{float(loss):.4f}")
            if (step + 1) % args.ckpt_every == 0:
                state["elapsed"] = time.time() - start
                save_state()
        vae.eval()
        with torch.no_grad():
            mean = torch.cat([vae.encode(x_all[i:i + 512]).latent_dist.mean for i in range(0, min(n, 4096), 512)])
        state.update(stage="unet", step=0, scaling_factor=float(1.0 / mean.std()),
                     vae_seconds=time.time() - start, elapsed=0.0)
        print(f"vae done in {state['vae_seconds']:.0f}s; latent std {mean.std():.3f} -> scaling_factor "
              f"{state['scaling_factor']:.4f}")
        save_state()

    # ---------------------------------------------------------------- latents of the data set
    vae.eval().requires_grad_(False)
    sf = state["scaling_factor"]
    with torch.no_grad():
        post = [vae.encode(x_all[i:i + 512]).latent_dist for i in range(0, n, 512)]
    lat_mean = torch.cat([p.mean for p in post]) * sf
    lat_std = torch.cat([p.std for p in post]) * sf
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear")
    alphas = noise_sched.alphas_cumprod

    # ---------------------------------------------------------------- stage 2: UNet + text encoder
    if state["stage"] == "unet":
        unet.train()
        text_encoder.train()
        start = time.time() - state["elapsed"]
        reference_steps = args.steps if args.reference_steps is None else args.reference_steps
        bar = tqdm(range(state["step"], args.steps), desc="unet", initial=state["step"], total=args.steps)
        for step in bar:
            lr = args.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.randint(0, n, (args.batch,), generator=gen)
            z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
            ids = ids_all[idx].clone()
            drop = torch.rand(args.batch, generator=gen) < UNCOND_PROBABILITY
            ids[drop] = empty_ids
            t = torch.randint(0, 1000, (args.batch,), generator=gen)
            eps = torch.randn(z0.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
            cond = text_encoder(ids)[0]
            loss = F.mse_loss(unet(zt, t, cond).sample, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            pairs = [(unet, ema_unet), (text_encoder, ema_text)]
            row = {"stage": "unet", "step": step + 1, "loss": float(loss)}
            if step < reference_steps:
                # The weaker AutoGuidance reference sees the same batch; its gradient stops at the
                # text embeddings, so it never pulls the shared text encoder its way.
                for g in reference_opt.param_groups:
                    g["lr"] = lr
                reference_loss = F.mse_loss(reference(zt, t, cond.detach()).sample, eps)
                reference_opt.zero_grad(set_to_none=True)
                reference_loss.backward()
                torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
                reference_opt.step()
                pairs.append((reference, ema_reference))
                row["reference_loss"] = float(reference_loss)
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for src, dst in pairs:
                    for p, q in zip(src.parameters(), dst.parameters()):
                        q.lerp_(p, 1 - decay)
            state["losses"].append(row)
            state["step"] = step + 1
            bar.set_postfix(loss=f"{float(loss):.4f}")
            if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
                state["elapsed"] = time.time() - start
                save_state()
        state.update(stage="done", unet_seconds=time.time() - start)
        save_state()

    # ---------------------------------------------------------------- export
    vae.config.scaling_factor = sf
    vae.register_to_config(scaling_factor=sf)
    dtype = torch.float16 if args.fp16 else torch.float32
    pipe = StableDiffusionPipeline(
        # The text encoder stays float32: transformers 5 loads it in its saved dtype (diffusers upcasts
        # the UNet / VAE to float32), and float16 prompt embeddings would not match a float32 UNet.
        vae=vae.to(dtype), text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet.to(dtype),
        scheduler=build_scheduler(), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    ema_reference.to(dtype).save_pretrained(out / "reference_unet", safe_serialization=True)
    info = {"seed": args.seed, "n_train": args.n_train, "vae_steps": args.vae_steps, "steps": args.steps,
            "batch": args.batch, "vae_batch": args.vae_batch, "lr": args.lr, "vae_lr": args.vae_lr,
            "kl_weight": args.kl_weight, "vae_shape_weight": args.vae_shape_weight, "ema": args.ema, "uncond_probability": UNCOND_PROBABILITY,
            "reference_steps": args.reference_steps,
            "scaling_factor": sf, "threads": args.threads, "fp16": bool(args.fp16),
            "vae_seconds": state.get("vae_seconds"), "unet_seconds": state.get("unet_seconds")}
    (work / "train_info.json").write_text(strict_json.dumps(info, indent=2))
    if args.plot:
        plot_losses(state["losses"], args.plot)
    print(f"saved {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.2f} MB); {info}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the saved diffusers pipeline")
    p.add_argument("--work", default=None, help="checkpoints, losses.csv (default <out>.work)")
    p.add_argument("--resume", action="store_true", help="continue from <work>/state.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--vae-steps", type=int, default=1300)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--vae-shape-weight", type=float, default=4.0, help="loss weight of shape pixels")
    p.add_argument("--steps", type=int, default=3000, help="UNet + text-encoder steps")
    p.add_argument("--reference-steps", type=int, default=None,
                   help="steps the weaker AutoGuidance reference UNet trains (default: --steps)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="save float32 weights")
    p.add_argument("--plot", default=None, help="write the loss plot (PNG) here")
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
