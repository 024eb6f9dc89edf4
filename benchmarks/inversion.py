"""Inversion and editing on the default model: CFG vs CFG++ reconstruction at equal NFEs, edits.

Reconstruction: every image is inverted with its own caption (DDIM inversion, the empty null
prompt) and regenerated from the inverted noise with the same caption, method, scale and steps;
the error is the pixel MSE (and PSNR) against the input, over procedural renders of the data set
and over images the model generated itself (CFG 7.5, 20 steps). NFEs are counted (inversion +
regeneration); CFG and CFG++ spend the same (2 per step).

Editing: renders are inverted with their caption and regenerated with the shape colour changed;
the evaluation classifier reports whether the new colour is there and shape / background kept.

    python benchmarks/inversion.py                    # 12 + 12 images, 10 steps (the CFG++ default)
    python benchmarks/inversion.py --steps 10,25 --images 16 --figure docs/images/inversion.png

Prints markdown tables, then ONE line of JSON.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from guidance_engine import strict_json  # noqa: E402
from guidance_engine.pipelines import GuidedStableDiffusionPipeline, default_model_path  # noqa: E402
from guidance_engine.pipelines.toy import shapes  # noqa: E402
from guidance_engine.pipelines.toy.evaluation import load_classifier  # noqa: E402

METHODS = (("cfg", 1.0), ("cfg", 3.0), ("cfg", 7.5), ("cfgpp", 0.2), ("cfgpp", 0.6), ("cfgpp", 1.0))
NEW_COLOR = {"red": "yellow", "yellow": "green", "green": "blue", "blue": "red"}


def procedural(n: int, seed: int) -> tuple[list[np.ndarray], list[str], list[dict]]:
    rng = np.random.default_rng(seed)
    images, captions, attrs = [], [], []
    for _ in range(n):
        a = shapes.sample_attributes(rng)
        a["say_size"] = a["say_position"] = True
        images.append(shapes.render(a))
        captions.append(shapes.caption(a))
        attrs.append(a)
    return images, captions, attrs


def generated(pipe, captions: list[str], seed: int) -> list[np.ndarray]:
    out = pipe(captions, guidance={"name": "cfg", "scale": 7.5}, num_inference_steps=20, output_type="np",
               generator=[torch.Generator().manual_seed(seed + i) for i in range(len(captions))]).images
    return [np.round(image * 255).astype(np.uint8) for image in out]


def reconstruct(pipe, images, captions, method, scale, steps):
    """Regenerated images (uint8) and NFEs per image (inversion + regeneration)."""
    guidance = {"name": method, "scale": scale}
    inverted = pipe.invert(np.stack(images), captions, guidance=guidance, num_inference_steps=steps)
    back = pipe.regenerate(captions, inverted, output_type="np")
    return [np.round(b * 255).astype(np.uint8) for b in back.images], inverted.nfe + back.nfe


def mse_psnr(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float]:
    errors = [np.mean((x.astype(float) / 255 - y.astype(float) / 255) ** 2) for x, y in zip(a, b)]
    psnr = [10 * np.log10(1.0 / max(e, 1e-12)) for e in errors]
    return float(np.mean(errors)), float(np.mean(psnr))


def edit_scores(classifier, edited: list[np.ndarray], attrs: list[dict], changed: bool = True) -> dict[str, float]:
    """Eval-classifier agreement: the (new or original) colour, and the kept shape and background."""
    pred = classifier.predict(np.stack(edited))
    color = np.mean([pred["color"][i] == shapes.COLORS.index(NEW_COLOR[a["color"]] if changed else a["color"])
                     for i, a in enumerate(attrs)])
    shape = np.mean([pred["shape"][i] == shapes.SHAPES.index(a["shape"]) for i, a in enumerate(attrs)])
    background = np.mean([pred["background"][i] == shapes.BACKGROUNDS.index(a["background"])
                          for i, a in enumerate(attrs)])
    return {"color": float(color), "shape": float(shape), "background": float(background)}


def figure(rows: list[tuple[str, list[np.ndarray]]], path: str, zoom: int = 3) -> None:
    size = 32 * zoom
    label_w = 150
    n = len(rows[0][1])
    canvas = Image.new("RGB", (label_w + n * (size + 4), len(rows) * (size + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * (size + 4) + size // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST),
                         (label_w + c * (size + 4), r * (size + 4)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="procedural renders (and as many generated)")
    parser.add_argument("--steps", default="10", help="comma-separated inversion step counts")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--figure", default=None, help="write a PNG: inputs, reconstructions, edits")
    args = parser.parse_args()
    pipe = GuidedStableDiffusionPipeline.from_pretrained(default_model_path(), safety_checker=None,
                                                         requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier("eval")
    renders, captions, attrs = procedural(args.images, args.seed)
    made = generated(pipe, captions, args.seed)
    step_counts = [int(s) for s in args.steps.split(",") if s]

    rows = []
    start = time.perf_counter()
    for steps in step_counts:
        for method, scale in METHODS:
            rec_r, nfe = reconstruct(pipe, renders, captions, method, scale, steps)
            rec_g, _ = reconstruct(pipe, made, captions, method, scale, steps)
            mse_r, psnr_r = mse_psnr(rec_r, renders)
            mse_g, psnr_g = mse_psnr(rec_g, made)
            rows.append({"method": method, "scale": scale, "steps": steps, "nfe": nfe, "mse_renders": mse_r,
                         "psnr_renders": psnr_r, "mse_generated": mse_g, "psnr_generated": psnr_g})

    edit_rows, figure_rows = [], [("input", renders[:8])]
    steps = step_counts[0]
    targets = [c.replace(a["color"], NEW_COLOR[a["color"]], 1) for c, a in zip(captions, attrs)]
    for method, scale in (("cfg", 7.5), ("cfg", 3.0), ("cfgpp", 0.6), ("cfgpp", 1.0)):
        guidance = {"name": method, "scale": scale}
        inverted = pipe.invert(np.stack(renders), captions, guidance=guidance, num_inference_steps=steps)
        back = pipe.regenerate(captions, inverted, output_type="np").images
        edited = pipe.regenerate(targets, inverted, output_type="np").images
        back = [np.round(b * 255).astype(np.uint8) for b in back]
        edited = [np.round(e * 255).astype(np.uint8) for e in edited]
        recon = edit_scores(classifier, back, attrs, changed=False)
        edit_rows.append({"method": method, "scale": scale, "steps": steps,
                          **{f"edit_{k}": v for k, v in edit_scores(classifier, edited, attrs).items()},
                          **{f"recon_{k}": v for k, v in recon.items()}})
        figure_rows += [(f"{method} {scale:g} recon.", back[:8]), (f"{method} {scale:g} edit", edited[:8])]
    seconds = time.perf_counter() - start

    print(f"Reconstruction: invert + regenerate with the caption; {args.images} renders and {args.images} "
          f"generated images (32 x 32); pixel MSE in [0, 1] units, PSNR in dB (higher is better)\n")
    print("| method | scale | steps | NFE (inv. + regen.) | MSE renders | PSNR renders | MSE generated | PSNR generated |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['scale']:g} | {r['steps']} | {r['nfe']:g} | {r['mse_renders']:.5f} | "
              f"{r['psnr_renders']:.2f} | {r['mse_generated']:.5f} | {r['psnr_generated']:.2f} |")
    print(f"\nEditing ({steps} steps): caption colour changed (red->yellow->green->blue->red); eval classifier\n")
    print("| method | scale | edit: new colour | edit: shape kept | edit: background kept | "
          "reconstruction: colour / shape / background |")
    print("|---|---:|---:|---:|---:|---|")
    for r in edit_rows:
        print(f"| {r['method']} | {r['scale']:g} | {r['edit_color']:.3f} | {r['edit_shape']:.3f} | "
              f"{r['edit_background']:.3f} | {r['recon_color']:.3f} / {r['recon_shape']:.3f} / "
              f"{r['recon_background']:.3f} |")
    if args.figure:
        figure(figure_rows, args.figure)
        print(f"\nwrote {args.figure}")
    best = {m: min((r for r in rows if r["method"] == m and r["steps"] == steps and r["scale"] != 1.0),
                   key=lambda r: r["mse_renders"]) for m in ("cfg", "cfgpp")}
    at_recommended = {(r["method"], r["scale"]): r for r in rows if r["steps"] == steps}
    summary = {
        "benchmark": "inversion", "images": args.images, "steps": step_counts, "seconds": round(seconds, 1),
        "mse_renders_cfg7.5": at_recommended[("cfg", 7.5)]["mse_renders"],
        "mse_renders_cfgpp0.6": at_recommended[("cfgpp", 0.6)]["mse_renders"],
        "mse_generated_cfg7.5": at_recommended[("cfg", 7.5)]["mse_generated"],
        "mse_generated_cfgpp0.6": at_recommended[("cfgpp", 0.6)]["mse_generated"],
        "nfe_cfg7.5": at_recommended[("cfg", 7.5)]["nfe"], "nfe_cfgpp0.6": at_recommended[("cfgpp", 0.6)]["nfe"],
        "best_guided": {m: {"scale": r["scale"], "mse_renders": r["mse_renders"]} for m, r in best.items()},
        "edit": edit_rows,
    }
    print()
    print(strict_json.dumps(summary))


if __name__ == "__main__":
    main()
