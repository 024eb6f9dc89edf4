"""Evaluation kit for the default model: attribute classifiers, metrics, tables, plots, grids.

Two small CNN attribute classifiers are trained on the procedural shapes data set
(:mod:`guidance_engine.pipelines.toy.shapes`) and shipped under ``default_model/classifiers/``:

* ``"eval"``  - used only to *measure* samples (alignment, fidelity features, diversity);
* ``"guide"`` - a different architecture, seed and training set, available to guidance methods
  (classifier guidance and the like) so that they are never scored by the network they follow.

Each predicts ``shape``, ``color``, ``background``, ``size``, ``position`` and ``count`` from a
32 x 32 RGB image (uint8 ``NHWC`` arrays or ``[-1, 1]`` float ``NCHW`` tensors, differentiable).

Metrics of :func:`evaluate` (one row per guidance method, over ``prompts`` x ``seeds``):

``alignment``        eval-classifier accuracy on the attributes each prompt names (mean over
                     images and named attributes); ``acc_<attr>`` per attribute
``fd``               Frechet distance between eval-classifier penultimate features of the
                     samples and of real renders of the same prompts (lower = closer to data)
``saturation``       mean HSV saturation (0..1) of the samples
``clipping``         fraction of pixel channels at 0 or 255
``diversity``        mean pairwise feature distance among the samples of one prompt
``nfe``              network evaluations per image (a CFG step is 2)
``sec_per_image``    wall time per image

Retrain the classifiers with
``python -m guidance_engine.pipelines.toy.evaluation train-classifiers``.
"""

from __future__ import annotations

import argparse
import itertools

import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from guidance_engine import strict_json

from ..apps import cli_common

from . import shapes
from ..models import default_model_path, load_pipeline
from .classifiers import (ARCHITECTURES, ATTRIBUTE_HEADS, AttributeClassifier, classifier_path, forget_classifier,
                      load_classifier)

__all__ = [
    "AttributeClassifier", "DEFAULT_PROMPTS", "classifier_path", "compare_grid", "default_model_path",
    "evaluate", "format_table", "frechet_distance", "image_stats", "load_classifier", "method_label",
    "plot_metrics", "real_images_for_prompt", "train_classifier",
]

#: A fixed prompt set covering every shape, colour and several backgrounds / positions / counts.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a red circle on a blue background",
    "a green square on a white background",
    "a blue triangle on a yellow background",
    "a yellow circle on a black background",
    "a large red square on a gray background, center",
    "a small green triangle on a red background, top left",
    "two blue circles on a white background",
    "two yellow squares on a green background, bottom right",
    "a red triangle on a green background, top right",
    "a blue square on a red background, bottom left",
    "a green circle on a yellow background",
    "two red triangles on a black background",
)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild robustness augmentation: blur some images, add noise and a little brightness jitter."""
    n = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = (torch.rand(n, 1, 1, 1, generator=gen) < 0.3).float() * torch.rand(n, 1, 1, 1, generator=gen)
    x = x * (1 - mix) + blur * mix
    x = x + 0.04 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    x = x * (1 + 0.1 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5))
    return x.clamp(-1.2, 1.2)


def train_classifier(kind: str = "eval", steps: int = 1500, n_train: int = 20000, batch: int = 128,
                     out: str | os.PathLike[str] | None = None, threads: int = 1) -> dict[str, float]:
    """Train the ``kind`` classifier on ``shapes.make_dataset(n_train, data_seed)`` and save it.

    Returns held-out accuracies (``shapes.make_dataset(2000, seed=424242)``) per attribute.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.set_num_threads(threads)
    arch = ARCHITECTURES[kind]
    torch.manual_seed(arch["seed"])
    model = AttributeClassifier(**arch)
    images, _, labels = shapes.make_dataset(n_train, arch["data_seed"])
    x_all = AttributeClassifier.prepare(images)
    y_all = {k: torch.from_numpy(v) for k, v in labels.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(arch["seed"])
    model.train()
    for step in tqdm(range(steps), desc=f"classifier {kind}"):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        logits = model(_augment(x_all[idx], gen))
        loss = sum(F.cross_entropy(logits[k], y_all[k][idx]) for k in ATTRIBUTE_HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    test_images, _, test_labels = shapes.make_dataset(2000, 424242)
    pred = model.predict(test_images)
    acc = {k: float((pred[k] == test_labels[k]).mean()) for k in ATTRIBUTE_HEADS}
    path = Path(out) if out is not None else classifier_path(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {**model.config}
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"config": strict_json.dumps(config), "kind": kind,
                        "held_out_accuracy": strict_json.dumps(acc), "data_seed": str(arch["data_seed"]), "steps": str(steps)})
    forget_classifier(kind, path)
    return acc


# ----------------------------------------------------------------------------- metrics

def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` and ``b`` (rows = samples):
    ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``Tr (S1 S2)^(1/2)`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric ``R S2 R``, R = S1^(1/2) (both by a symmetric eigendecomposition in float64): the
    products have the same eigenvalues, and it stays exact for the singular covariances of few
    samples, where a general matrix square root (scipy's ``sqrtm``, which this replaces and is
    tested against) needs a ridge. NumPy only: no scipy at import or run time."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = root @ s2 @ root
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)  # symmetrised against rounding
    trace_covmean = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_covmean)


def image_stats(images: np.ndarray) -> dict[str, float]:
    """Mean HSV saturation (0..1) and fraction of clipped channels (0 or 255) of uint8 NHWC images."""
    images = np.asarray(images, dtype=np.uint8)
    rgb = images.astype(np.float64) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0)
    clip = ((images == 0) | (images == 255)).mean()
    return {"saturation": float(sat.mean()), "clipping": float(clip)}


def real_images_for_prompt(prompt: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` renders that satisfy ``prompt`` (unnamed attributes drawn at random)."""
    want = shapes.parse_prompt(prompt)
    rng = np.random.default_rng(seed)
    out = np.empty((n, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3), np.uint8)
    for i in range(n):
        attrs = shapes.sample_attributes(rng)
        for name, index in want.items():
            if index >= 0:
                attrs[name] = shapes.ATTRIBUTES[name][index]
        if attrs["background"] == attrs["color"]:  # a prompt naming only one of the two
            attrs["background"] = next(b for b in shapes.BACKGROUNDS if b != attrs["color"])
        if attrs["count"] == "two":
            attrs["size"] = "small"
        # re-draw the colours for the (possibly overridden) colour names
        attrs["fg_rgb"] = shapes.draw_color(attrs["color"], rng)
        attrs["bg_rgb"] = shapes.draw_color(attrs["background"], rng)
        out[i] = shapes.render(attrs)
    return out


def method_label(method: dict[str, Any]) -> str:
    """Short label of a method dict: ``cfg(scale=5)``; a ``"label"`` key wins."""
    if "label" in method:
        return str(method["label"])
    params = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in method.items() if k != "name")
    return f"{method['name']}({params})" if params else str(method["name"])


def _guidance_arg(method: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in method.items() if k != "label"}


def generate(pipe, prompt: str, method: dict[str, Any], seeds: Sequence[int], steps: int = 20,
             **kwargs: Any) -> tuple[np.ndarray, float, float]:
    """Images (uint8 NHWC) of ``prompt`` for each seed, one batch; returns (images, nfe, seconds)."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    t0 = time.perf_counter()
    out = pipe([prompt] * len(seeds), guidance=_guidance_arg(method), num_inference_steps=steps,
               generator=gens, output_type="np", **kwargs)
    seconds = time.perf_counter() - t0
    images = np.clip(np.round(np.asarray(out.images) * 255.0), 0, 255).astype(np.uint8)
    nfe = out.nfe if not isinstance(out.nfe, (list, tuple, np.ndarray, torch.Tensor)) else float(np.mean(out.nfe))
    return images, float(nfe), seconds


def _row_metrics(classifier: AttributeClassifier, per_prompt: dict[str, np.ndarray],
                 reference: dict[str, np.ndarray]) -> dict[str, float]:
    correct = {name: [] for name in ATTRIBUTE_HEADS}
    feats, ref_feats, div = [], [], []
    for prompt, images in per_prompt.items():
        want = shapes.parse_prompt(prompt)
        pred = classifier.predict(images)
        for name, index in want.items():
            if index >= 0:
                correct[name].extend((pred[name] == index).tolist())
        f = classifier.embed(images)
        feats.append(f)
        ref_feats.append(classifier.embed(reference[prompt]))
        if len(f) > 1:
            d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
            div.append(d[np.triu_indices(len(f), 1)].mean())
    all_correct = list(itertools.chain.from_iterable(correct.values()))
    all_images = np.concatenate(list(per_prompt.values()))
    row = {"alignment": float(np.mean(all_correct))}
    row.update({f"acc_{name}": float(np.mean(v)) for name, v in correct.items() if v})
    row["fd"] = frechet_distance(np.concatenate(feats), np.concatenate(ref_feats))
    row.update(image_stats(all_images))
    row["diversity"] = float(np.mean(div)) if div else float("nan")
    return row


def evaluate(pipe, methods: Sequence[dict[str, Any]], prompts: Sequence[str] = DEFAULT_PROMPTS,
             seeds: Sequence[int] = tuple(range(8)), steps: int = 20, classifier: AttributeClassifier | None = None,
             reference_per_prompt: int = 64, include_real: bool = True, progress: bool = True,
             **pipe_kwargs: Any) -> list[dict[str, Any]]:
    """Generate ``prompts`` x ``seeds`` with every method and measure them (see module docstring).

    Args:
        pipe: a guided pipeline (e.g. ``GuidedStableDiffusionPipeline.from_pretrained(default_model_path())``).
        methods: guidance specs as dicts (``{"name": "cfg", "scale": 5.0}``); an optional ``"label"``
            key names the row.
        prompts, seeds, steps: what to generate (seed ``s`` gives the same initial noise to every
            method).
        classifier: the measuring classifier (default: the shipped ``"eval"`` one).
        reference_per_prompt: real renders per prompt for the Frechet distance.
        include_real: add a first row ``"real renders"`` measuring the reference images themselves.
        pipe_kwargs: passed on to the pipeline (e.g. ``sampler="ddim"``).

    Returns:
        One dict per method: ``method``, ``guidance``, ``steps``, ``n_images``, ``alignment``,
        ``acc_<attribute>``, ``fd``, ``saturation``, ``clipping``, ``diversity``, ``nfe``,
        ``sec_per_image``.
    """
    classifier = classifier or load_classifier("eval")
    reference = {p: real_images_for_prompt(p, reference_per_prompt, seed=10_000 + i) for i, p in enumerate(prompts)}
    rows: list[dict[str, Any]] = []
    if include_real:
        held_out = {p: real_images_for_prompt(p, len(seeds), seed=20_000 + i) for i, p in enumerate(prompts)}
        rows.append({"method": "real renders", "guidance": None, "steps": 0,
                     "n_images": len(prompts) * len(seeds), **_row_metrics(classifier, held_out, reference),
                     "nfe": 0.0, "sec_per_image": 0.0})
    for method in methods:
        per_prompt, nfes, seconds = {}, [], 0.0
        for prompt in prompts:
            images, nfe, sec = generate(pipe, prompt, method, seeds, steps, **pipe_kwargs)
            per_prompt[prompt] = images
            nfes.append(nfe)
            seconds += sec
        n = len(prompts) * len(seeds)
        row = {"method": method_label(method), "guidance": _guidance_arg(method), "steps": steps, "n_images": n,
               **_row_metrics(classifier, per_prompt, reference), "nfe": float(np.mean(nfes)),
               "sec_per_image": seconds / n}
        rows.append(row)
        if progress:
            print(f"  {row['method']}: alignment {row['alignment']:.3f} fd {row['fd']:.1f} "
                  f"sat {row['saturation']:.3f} clip {row['clipping']:.4f}", flush=True)
    return rows


_TABLE_COLUMNS = (("method", "method", "{}"), ("alignment", "align", "{:.3f}"), ("acc_shape", "shape", "{:.2f}"),
                  ("acc_color", "colour", "{:.2f}"), ("acc_background", "bg", "{:.2f}"),
                  ("fd", "FD", "{:.1f}"), ("saturation", "sat", "{:.3f}"), ("clipping", "clip", "{:.4f}"),
                  ("diversity", "div", "{:.2f}"), ("nfe", "NFE", "{:.0f}"), ("sec_per_image", "s/img", "{:.3f}"))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`evaluate` rows."""
    cols = [c for c in _TABLE_COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def plot_metrics(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str],
                 metrics: Sequence[str] = ("alignment", "fd", "saturation", "clipping", "diversity")) -> Path:
    """Bar charts (one panel per metric, one bar per row) drawn with PIL into ``path`` (PNG)."""
    from PIL import Image, ImageDraw

    palette = [(70, 110, 190), (210, 120, 50), (80, 160, 90), (190, 70, 70), (130, 100, 170), (120, 120, 120),
               (200, 170, 60), (60, 160, 170)]
    pw, ph, top, bottom = 260, 240, 28, 92
    img = Image.new("RGB", (pw * len(metrics), ph), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    for k, metric in enumerate(metrics):
        vals = [float(r.get(metric, float("nan"))) for r in rows]
        finite = [v for v in vals if math.isfinite(v)]
        vmax = max(finite + [1e-12])
        x0 = k * pw
        d.text((x0 + 8, 6), metric, fill="black", font=font)
        bw = (pw - 20) / max(1, len(rows))
        for i, (r, v) in enumerate(zip(rows, vals)):
            if not math.isfinite(v):
                continue
            h = (ph - top - bottom) * v / vmax
            bx = x0 + 10 + i * bw
            d.rectangle((bx + 2, ph - bottom - h, bx + bw - 2, ph - bottom), fill=palette[i % len(palette)])
            d.text((bx + 2, ph - bottom - h - 11), f"{v:.3g}", fill="black", font=font)
            label = str(r["method"])[:22]
            for j, chunk in enumerate([label[m:m + 7] for m in range(0, len(label), 7)][:6]):
                d.text((bx + 2, ph - bottom + 3 + 12 * j), chunk, fill="black", font=font)
        d.line((x0 + pw - 1, 0, x0 + pw - 1, ph), fill=(200, 200, 200))
    path = Path(path)
    cli_common.atomic_save_png(img, path, {"metrics": list(metrics), "rows": [str(r["method"]) for r in rows]})
    return path


def compare_grid(pipe, prompt: str, methods: Sequence[dict[str, Any]], seeds: Sequence[int],
                 path: str | os.PathLike[str], steps: int = 20, zoom: int = 3, progress: bool = False,
                 **pipe_kwargs: Any) -> Path:
    """Write a labelled PNG grid: one row per method, one column per seed (same noise down a column).
    ``progress``: a tqdm bar over the rows (on stderr). The PNG is written under a temporary name
    and renamed when complete."""
    from PIL import Image, ImageDraw
    from tqdm.auto import tqdm

    font = _font()
    size = shapes.IMAGE_SIZE * zoom
    label_w, head_h, gap = 150, 30, 4
    w = label_w + len(seeds) * (size + gap)
    h = head_h + len(methods) * (size + gap)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 2), prompt[:80], fill="black", font=font)
    for j, s in enumerate(seeds):
        d.text((label_w + j * (size + gap) + 2, 16), f"seed {s}", fill="black", font=font)
    bar = tqdm(methods, desc="compare", unit="method", disable=not progress)
    for i, method in enumerate(bar):
        bar.set_postfix_str(method_label(method))
        images, nfe, _ = generate(pipe, prompt, method, seeds, steps, **pipe_kwargs)
        y = head_h + i * (size + gap)
        d.text((4, y + size // 2 - 12), method_label(method)[:24], fill="black", font=font)
        d.text((4, y + size // 2 + 2), f"NFE {nfe:.0f}", fill=(90, 90, 90), font=font)
        for j, im in enumerate(images):
            tile = Image.fromarray(im).resize((size, size), Image.Resampling.NEAREST)
            img.paste(tile, (label_w + j * (size + gap), y))
    path = Path(path)
    cli_common.atomic_save_png(img, path, {"prompt": prompt, "methods": list(methods), "seeds": list(seeds), "steps": steps})
    return path


def _load_default_pipe():
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Settings of the results table in docs/default_model.md.
RECOMMENDED_METHODS: tuple[dict[str, Any], ...] = (
    {"name": "cfg", "scale": 1.0, "label": "unguided (cfg 1)"},
    {"name": "cfg", "scale": 3.0},
    {"name": "cfg", "scale": 5.0},
    {"name": "cfg", "scale": 7.5},
    {"name": "cfg", "scale": 10.0},
    {"name": "cfg", "scale": 15.0},
    {"name": "cfgpp", "scale": 0.6},
    {"name": "apg", "scale": 5.0},
    {"name": "apg", "scale": 7.5},
    {"name": "apg", "scale": 10.0},
    {"name": "apg", "scale": 15.0},
)


def main(argv: Iterable[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="default-model evaluation kit")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-classifiers", help="train and save the eval and guide classifiers")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--kinds", nargs="+", default=["eval", "guide"])
    t.add_argument("--out", default=None, help="folder for <kind>.safetensors (default: the shipped model's)")
    r = sub.add_parser("report", help="results table, plot and grid of the recommended methods")
    r.add_argument("--seeds", type=int, default=8)
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--out", default="docs/images", help="folder for the PNGs and the JSON of rows")
    r.add_argument("--threads", type=int, default=2)
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.cmd == "train-classifiers":
        for kind in args.kinds:
            path = Path(args.out) / f"{kind}.safetensors" if args.out else None
            print(kind, strict_json.dumps(train_classifier(kind, steps=args.steps, threads=args.threads, out=path)))
        return
    torch.set_num_threads(args.threads)
    pipe = _load_default_pipe()
    rows = evaluate(pipe, list(RECOMMENDED_METHODS), DEFAULT_PROMPTS, range(args.seeds), args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "default_model_eval.json").write_text(strict_json.dumps(rows, indent=1))
    plot_metrics(rows, out / "default_model_metrics.png")
    compare_grid(pipe, "a red circle on a blue background",
                 [{"name": "cfg", "scale": 1.0}, {"name": "cfg", "scale": 7.5}, {"name": "apg", "scale": 7.5},
                  {"name": "cfg", "scale": 15.0}, {"name": "cfgpp", "scale": 0.6}], range(6),
                 out / "default_model_compare.png", steps=args.steps)
    print(format_table(rows))


if __name__ == "__main__":
    main()
