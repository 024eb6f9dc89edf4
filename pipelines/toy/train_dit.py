"""Train the project's class-conditional default model: a tiny DiT on the shapes data set (CPU).

    python -m guidance_engine.pipelines.toy.train_dit --vae pipelines/default_model/vae \\
        --out pipelines/default_model_dit --threads 1
    python -m guidance_engine.pipelines.toy.train_dit ... --resume          # continue a run

The result is an ordinary diffusers DiT folder (``DiTPipeline`` layout: ``transformer/``,
``vae/``, ``scheduler/``, ``model_index.json`` with ``id2label`` as in the ImageNet DiT
checkpoints) that loads with ``GuidedDiTPipeline.from_pretrained(DIR)`` (and with the stock
``DiTPipeline``, whose hard-coded null class 1000 does not fit it) and generates 32 x 32 images.

* classes: shape x colour of :mod:`~guidance_engine.pipelines.toy.shapes`, 12 of them, id
  ``k = shape_index * 4 + colour_index``: 0 red circle, 1 green circle, 2 blue circle, 3 yellow
  circle, 4 red square, ..., 8 red triangle, ..., 11 yellow triangle (``id2label``). Background,
  size, position and count are not conditioned on: they vary freely within a class.
* transformer: ``Transformer2DModel`` (DiT: adaLN-zero, patch 2 on the 8 x 8 x 4 latents = 16
  tokens), ``--hidden`` wide, ``--layers`` deep, epsilon prediction (no learned sigma),
  ``num_embeds_ada_norm = 12``: the label embedding's row 12 is the null class, trained with
  ``--class-dropout`` (10 %) of labels replaced by it so that CFG works. The shipped weights are
  an EMA, stored in float16.
* VAE: the text-to-image default model's (``--vae``), copied unchanged (its ``scaling_factor``).
* scheduler: ``DDIMScheduler``, scaled-linear betas 0.00085..0.012 over 1000 steps (as the
  text-to-image default model), ``steps_offset=1``, ``set_alpha_to_one=False``.

A checkpoint (model, EMA, optimiser, RNG, losses) goes to ``<work>/state.pt`` every
``--ckpt-every`` steps; ``<work>`` (default ``<out>.work``) also receives ``losses.csv`` and
``train_info.json``. Seeded (``--seed``): the data set is ``shapes.make_dataset(--n-train, seed)``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from guidance_engine import strict_json

from . import shapes
from .checkpoint import load_training_state, save_training_state

__all__ = ["NUM_CLASSES", "build_transformer", "build_scheduler", "class_labels", "main", "train"]

NUM_CLASSES = len(shapes.SHAPES) * len(shapes.COLORS)
LATENT_CHANNELS = 4
LATENT_SIZE = 8


def class_labels(labels: dict[str, np.ndarray]) -> np.ndarray:
    """Class ids (shape x colour) of :func:`shapes.make_dataset` labels."""
    return labels["shape"] * len(shapes.COLORS) + labels["color"]


def build_transformer(hidden: int = 128, layers: int = 6, heads: int = 4, seed: int = 0):
    """A fresh DiT (``Transformer2DModel``, adaLN-zero) for the 8 x 8 x 4 latents, 12 classes."""
    from diffusers import Transformer2DModel

    torch.manual_seed(seed)
    return Transformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, num_layers=layers, sample_size=LATENT_SIZE, patch_size=2,
        norm_type="ada_norm_zero", num_embeds_ada_norm=NUM_CLASSES, norm_elementwise_affine=False,
        activation_fn="gelu-approximate", attention_bias=True)


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, prediction_type="epsilon")


def _write_losses(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
        wr.writeheader()
        wr.writerows(rows)


def train(args: argparse.Namespace) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler

    from ..dit import GuidedDiTPipeline
    from ..guide_classifier import ID2LABEL

    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work or f"{args.out}.work")
    work.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(args.vae).float().eval().requires_grad_(False)
    sf = float(vae.config.scaling_factor)

    # ------------------------------------------------------------------ data: latents of the set
    t0 = time.time()
    images, _, labels = shapes.make_dataset(args.n_train, args.seed)
    y_all = torch.from_numpy(class_labels(labels)).long()
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    with torch.no_grad():
        post = [vae.encode(x_all[i:i + 512]).latent_dist for i in range(0, len(x_all), 512)]
    lat_mean = torch.cat([p.mean for p in post]) * sf
    lat_std = torch.cat([p.std for p in post]) * sf
    del x_all, post
    print(f"data set: {args.n_train} images encoded in {time.time() - t0:.1f}s; latent std "
          f"{float(lat_mean.std()):.3f}; class counts {torch.bincount(y_all, minlength=NUM_CLASSES).tolist()}")

    model = build_transformer(args.hidden, args.layers, args.heads, args.seed)
    model.eval()  # no dropout layers are active; labels are dropped below with our own seeded RNG
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 1)
    state = {"step": 0, "losses": [], "elapsed": 0.0}
    state_path = work / "state.pt"
    parts = {"model": model, "ema": ema, "opt": opt}
    resumed = load_training_state(state_path, parts, gen) if args.resume else None
    if resumed is not None:
        state = resumed
        print(f"resumed at step {state['step']}")

    def save_state() -> None:
        save_training_state(state_path, parts, gen, state)
        _write_losses(state["losses"], work / "losses.csv")

    alphas = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear").alphas_cumprod
    n = len(y_all)
    start = time.time() - state["elapsed"]
    bar = tqdm(range(state["step"], args.steps), desc="dit", initial=state["step"], total=args.steps)
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        y = y_all[idx].clone()
        y[torch.rand(args.batch, generator=gen) < args.class_dropout] = NUM_CLASSES  # the null class
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(model(zt, timestep=t, class_labels=y).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p, q in zip(model.parameters(), ema.parameters()):
                q.lerp_(p, 1 - decay)
        state["losses"].append({"step": step + 1, "loss": float(loss), "lr": lr})
        state["step"] = step + 1
        bar.set_postfix(loss=f"{float(loss):.4f}")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            state["elapsed"] = time.time() - start
            save_state()
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            state["elapsed"] = time.time() - start
            save_state()
            print(f"stopped after {args.max_minutes} minutes at step {step + 1} (resume with --resume)")
            return work
    seconds = time.time() - start

    # ------------------------------------------------------------------ export
    dtype = torch.float16 if args.fp16 else torch.float32
    pipe = GuidedDiTPipeline(transformer=ema.to(dtype), vae=vae.to(dtype), scheduler=build_scheduler(),
                             id2label=ID2LABEL)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = "DiTPipeline"  # loads with the stock class too (GuidedDiTPipeline is a subclass)
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for config in out.glob("*/config.json"):  # no path of the training machine in the shipped configs
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    info = {"seed": args.seed, "n_train": args.n_train, "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "ema": args.ema, "class_dropout": args.class_dropout, "hidden": args.hidden, "layers": args.layers,
            "heads": args.heads, "vae": str(args.vae), "scaling_factor": sf, "threads": args.threads,
            "fp16": bool(args.fp16), "seconds": round(seconds, 1),
            "final_loss_mean_100": float(np.mean([r["loss"] for r in state["losses"][-100:]]))}
    (work / "train_info.json").write_text(strict_json.dumps(info, indent=2))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"saved {out} ({size:.2f} MB); {info}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pipelines/default_model_dit", help="folder of the saved diffusers pipeline")
    p.add_argument("--work", default=None, help="checkpoints, losses.csv (default <out>.work)")
    p.add_argument("--vae", default="pipelines/default_model/vae", help="the VAE folder to encode with and ship")
    p.add_argument("--resume", action="store_true", help="continue from <work>/state.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--class-dropout", type=float, default=0.1, help="fraction of labels replaced by the null class")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop (resumable) after this long; 0 = no limit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="save float32 weights")
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
