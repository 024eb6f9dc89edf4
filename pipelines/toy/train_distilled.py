"""Distil the shipped default model into a guidance-distilled student (CPU).

    python -m guidance_engine.pipelines.toy.train_distilled --out pipelines/default_model_distilled

Meng et al. 2023 ("On Distillation of Guided Diffusion Models", arXiv 2210.03142), stage one: a
student network takes the guidance scale w as an input and learns, in one forward, the teacher's
classifier-free guided prediction

    eps_student(z_t, t, c, w)  ~  eps_teacher(z_t, t, "") + w (eps_teacher(z_t, t, c) - eps_teacher(z_t, t, ""))

for w drawn uniformly in [1, ``--max-scale``] at every sample. The scale enters as diffusers'
guidance-scale embedding (``time_cond_proj_dim``: a sinusoidal embedding of w - 1, projected and
added to the time embedding, the input LCM and the stock Stable Diffusion pipeline feed
``timestep_cond``), so the student is an ordinary guidance-distilled checkpoint: the stock
``StableDiffusionPipeline`` runs it with ONE forward per step at ``guidance_scale`` and ignores the
negative prompt, as it does for every such model. That is the situation NAG is for (issue 25):
``docs/nag.md`` measures whether a negative prompt acts on it.

The student starts as the teacher (its UNet weights, the embedding's projection zero, so that at
the start it is the teacher's conditional prediction at every w) and trains on the teacher's data
set: VAE latents of ``shapes.make_dataset`` images, noised at uniform timesteps, captions with 15 %
empty ones (where cond == uncond the target is the unconditional prediction at every w). The text
encoder, VAE, tokenizer and scheduler are the teacher's, unchanged; the student's UNet is an EMA,
saved in float16 like the teacher's. Seeded (``--seed``); checkpoints every ``--ckpt-every``
steps to ``<out>.work/state.pt`` (``--resume`` continues).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from guidance_engine import strict_json

from . import shapes
from .checkpoint import load_training_state, save_training_state
from .train_default import MODEL_MAX_LENGTH, UNCOND_PROBABILITY, images_to_tensor

__all__ = ["GUIDANCE_EMBEDDING_DIM", "build_student", "guided_target", "main", "scale_embedding", "train"]

#: Width of the guidance-scale embedding (``time_cond_proj_dim``).
GUIDANCE_EMBEDDING_DIM = 64


def scale_embedding(scales: torch.Tensor, dim: int = GUIDANCE_EMBEDDING_DIM) -> torch.Tensor:
    """The embedding the stock pipeline feeds a distilled UNet for guidance scales ``scales``: its
    own ``get_guidance_scale_embedding`` of ``scales - 1`` (one row per scale)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, scales - 1.0, embedding_dim=dim)


def build_student(teacher_unet, dim: int = GUIDANCE_EMBEDDING_DIM):
    """The teacher's UNet with a guidance-scale input: same weights, the new projection zero, so the
    student starts as the teacher's conditional prediction whatever the scale."""
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or missing != ["time_embedding.cond_proj.weight"]:
        raise RuntimeError(f"student does not match the teacher: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student.float()


@torch.no_grad()
def guided_target(teacher_unet, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                  scales: torch.Tensor) -> torch.Tensor:
    """The teacher's classifier-free guided epsilon u + w (c - u), one batched forward, per-row w."""
    eps_uncond, eps_cond = teacher_unet(torch.cat([z_t, z_t]), torch.cat([t, t]),
                                        torch.cat([uncond, cond])).sample.chunk(2)
    return eps_uncond + scales.view(-1, 1, 1, 1) * (eps_cond - eps_uncond)


def train(args: argparse.Namespace) -> Path:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from ..shipped import default_model_path

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    work = Path(args.work or f"{out}.work")
    work.mkdir(parents=True, exist_ok=True)
    teacher = StableDiffusionPipeline.from_pretrained(args.teacher or default_model_path(), safety_checker=None,
                                                      requires_safety_checker=False)
    teacher_unet = teacher.unet.float().eval().requires_grad_(False)
    text_encoder = teacher.text_encoder.eval().requires_grad_(False)
    vae = teacher.vae.float().eval().requires_grad_(False)
    tokenizer = teacher.tokenizer
    student = build_student(teacher_unet, args.embedding_dim).train()
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=1e-4)

    t0 = time.time()
    images, captions, _ = shapes.make_dataset(args.n_train, args.seed)
    x_all = images_to_tensor(images)
    with torch.no_grad():
        ids = tokenizer(captions + [""], padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        embeds = torch.cat([text_encoder(ids[i:i + 1024])[0] for i in range(0, len(ids), 1024)])
        caption_embeds, empty_embeds = embeds[:-1], embeds[-1:]
        posterior = [vae.encode(x_all[i:i + 512]).latent_dist for i in range(0, len(x_all), 512)]
    sf = vae.config.scaling_factor
    lat_mean = torch.cat([p.mean for p in posterior]) * sf
    lat_std = torch.cat([p.std for p in posterior]) * sf
    alphas = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear").alphas_cumprod
    print(f"data set: {args.n_train} images, latents and caption embeddings in {time.time() - t0:.1f}s")

    gen = torch.Generator().manual_seed(args.seed + 11)
    state = {"step": 0, "losses": [], "elapsed": 0.0}
    state_path = work / "state.pt"
    parts = {"student": student, "ema": ema, "opt": opt}
    resumed = load_training_state(state_path, parts, gen) if args.resume else None
    if resumed is not None:
        state = resumed
        print(f"resumed at step {state['step']}")

    def save_state() -> None:
        save_training_state(state_path, parts, gen, state)

    n = len(x_all)
    start = time.time() - state["elapsed"]
    bar = tqdm(range(state["step"], args.steps), desc="distil", initial=state["step"], total=args.steps)
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, n, (args.batch,), generator=gen)
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        cond = caption_embeds[idx].clone()
        cond[torch.rand(args.batch, generator=gen) < UNCOND_PROBABILITY] = empty_embeds
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * torch.randn(z0.shape, generator=gen)
        scales = 1.0 + (args.max_scale - 1.0) * torch.rand(args.batch, generator=gen)
        target = guided_target(teacher_unet, z_t, t, cond, empty_embeds.expand_as(cond), scales)
        prediction = student(z_t, t, cond, timestep_cond=scale_embedding(scales, args.embedding_dim)).sample
        loss = F.mse_loss(prediction, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p, q in zip(student.parameters(), ema.parameters()):
                q.lerp_(p, 1 - decay)
        state["losses"].append({"step": step + 1, "loss": float(loss)})
        state["step"] = step + 1
        bar.set_postfix(loss=f"{float(loss):.4f}")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            state["elapsed"] = time.time() - start
            save_state()

    dtype = torch.float16 if args.fp16 else torch.float32
    pipe = StableDiffusionPipeline(
        vae=vae.to(dtype), text_encoder=text_encoder, tokenizer=tokenizer, unet=ema.to(dtype),
        scheduler=teacher.scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False)
    tmp = out.with_name(out.name + ".partial")
    pipe.save_pretrained(tmp, safe_serialization=True)
    drop_local_paths(tmp)
    last = state["losses"][-100:]
    info = {"teacher": str(args.teacher or "default model"), "seed": args.seed, "n_train": args.n_train,
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "ema": args.ema, "max_scale": args.max_scale,
            "embedding_dim": args.embedding_dim, "threads": args.threads, "fp16": bool(args.fp16),
            "seconds": state["elapsed"], "final_loss": sum(r["loss"] for r in last) / len(last)}
    (tmp / "distillation.json").write_text(strict_json.dumps(info, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"saved {out}; {info}")
    return out


def drop_local_paths(folder: Path) -> None:
    """Remove ``_name_or_path`` (the teacher's folder on the training machine, which the student's
    VAE and UNet configs inherit) from every component config of a saved pipeline."""
    for config in folder.glob("*/config.json"):
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the saved diffusers pipeline")
    p.add_argument("--teacher", default=None, help="the teacher's folder (default: the shipped default model)")
    p.add_argument("--work", default=None, help="checkpoints (default <out>.work)")
    p.add_argument("--resume", action="store_true", help="continue from <work>/state.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--max-scale", type=float, default=10.0, help="guidance scales drawn in [1, max]")
    p.add_argument("--embedding-dim", type=int, default=GUIDANCE_EMBEDDING_DIM)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="save float32 weights")
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
