"""Evaluation kit for the default video model: shape, colour and motion direction of generated clips.

Per clip (``uint8 [frames, 32, 32, 3]``, as :mod:`.moving_shapes` renders them):

``shape``, ``color``, ``background``
    the image default model's ``"eval"`` attribute classifier (:mod:`.classifiers`, trained on
    the still shapes data set at the same 32 x 32) on every frame, its class probabilities
    averaged over the frames, the most probable class. On the data set's own clips (the oracle,
    ``make_dataset(500, seed=1)``) it is right on 94.2 % of the shapes, 99.0 % of the colours and
    100 % of the backgrounds (single frames: 92.7 / 98.4 / 99.8 %): the classifier never saw
    positions off its five centres, which costs some shape accuracy, and no better scorer is needed
    to tell guidance methods apart.
``direction``
    the centroid track of the shape: the background colour is the median of the clip's border
    pixels (the shape keeps off the border, :data:`.moving_shapes.MARGIN`), the shape mask the
    pixels farther than :func:`mask_threshold` from it (max over channels), the centroid of the
    mask per frame, and a least-squares line through the centroids against the frame index; the
    direction is the axis of the larger slope and its sign (x: right / left, y: down / up, image
    rows growing downwards). A clip whose fitted travel (slope x (frames - 1)) stays under
    ``min_travel`` pixels on both axes, or with fewer than two frames showing a shape, has no
    direction (-1, scored wrong). Exact on the data set's clips (tests/test_video_model.py).

A row of :func:`summarize` (one per method, over prompts x seeds: benchmarks/video_guidance.py):
``alignment`` (the mean, over clips, of the fraction of the prompt's shape / colour / direction
that the clip shows), ``acc_shape``, ``acc_color``, ``acc_direction``, ``acc_background``,
``travel`` (mean fitted travel in pixels along the detected axis: whether motion happens at all).
Chance is 1/3 for the shape, 1/4 for the colour and the direction.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np
import torch

from . import moving_shapes
from .classifiers import AttributeClassifier, load_classifier

__all__ = ["DEFAULT_PROMPTS", "SCORED", "centroid_track", "format_table", "generate_clips",
           "mask_threshold", "motion_direction", "real_clips_for_prompt", "score_clips", "summarize"]

#: Every shape 4 times, every colour and direction 3 times, 6 backgrounds.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a red circle moving right on a blue background",
    "a green square moving left on a white background",
    "a blue triangle moving up on a yellow background",
    "a yellow circle moving down on a black background",
    "a red square moving up on a gray background",
    "a green triangle moving down on a red background",
    "a blue circle moving left on a white background",
    "a yellow square moving right on a green background",
    "a red triangle moving left on a black background",
    "a green circle moving up on a blue background",
    "a blue square moving down on a gray background",
    "a yellow triangle moving right on a blue background",
)
#: The attributes alignment averages (what the prompts are about).
SCORED = ("shape", "color", "direction")
_CLASSIFIED = ("shape", "color", "background")


def _background(clip: np.ndarray) -> np.ndarray:
    """The median colour of the clip's border pixels (all frames), float [3]."""
    border = np.concatenate([clip[:, 0], clip[:, -1], clip[:, 1:-1, 0], clip[:, 1:-1, -1]], axis=1)
    return np.median(border.reshape(-1, 3).astype(np.float64), axis=0)


def mask_threshold(distance: np.ndarray) -> float:
    """Pixels farther than this from the background (0..255, max over channels) are the shape:
    half of the clip's 99th-percentile distance (the shape's own contrast, whatever its colours),
    at least 10 (above the background's spread; the least contrasted pairs of the data set, a
    muted green on gray, differ by under 30)."""
    return max(10.0, 0.5 * float(np.percentile(distance, 99)))


def centroid_track(clip: np.ndarray) -> np.ndarray:
    """The shape's centroid (x, y) in every frame, ``float64 [frames, 2]`` (pixels; NaN where a
    frame shows no shape)."""
    clip = np.asarray(clip)
    distance = np.abs(clip.astype(np.float64) - _background(clip)).max(-1)
    mask = distance > mask_threshold(distance)
    ys, xs = np.mgrid[:clip.shape[1], :clip.shape[2]]
    counts = mask.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (mask * xs).sum((1, 2)) / counts
        cy = (mask * ys).sum((1, 2)) / counts
    return np.stack([cx, cy], 1)


def _travel(track: np.ndarray) -> np.ndarray | None:
    """Least-squares travel (dx, dy) in pixels from the first frame to the last, None with < 2 frames."""
    t = np.arange(len(track), dtype=np.float64)
    seen = ~np.isnan(track[:, 0])
    if seen.sum() < 2:
        return None
    slope = np.polyfit(t[seen], track[seen], 1)[0]  # one line per column: (slope_x, slope_y)
    return slope * (len(track) - 1)


def motion_direction(clip: np.ndarray, min_travel: float = 2.0) -> tuple[int, float]:
    """(direction index into :data:`.moving_shapes.DIRECTIONS` or -1, travel in pixels along its
    axis) of a clip ``uint8 [frames, H, W, 3]`` (see the module docstring). ``min_travel``: pixels
    (>= 0) below which a clip has not moved."""
    if not min_travel >= 0:
        raise ValueError(f"min_travel: must be >= 0 pixels, got {min_travel!r}")
    travel = _travel(centroid_track(clip))
    if travel is None:
        return -1, 0.0
    axis = int(np.argmax(np.abs(travel)))
    if abs(travel[axis]) < min_travel:
        return -1, float(abs(travel[axis]))
    names = (("left", "right"), ("up", "down"))[axis]
    return moving_shapes.DIRECTIONS.index(names[int(travel[axis] > 0)]), float(abs(travel[axis]))


@torch.no_grad()
def _frame_probabilities(classifier: AttributeClassifier, clips: np.ndarray) -> dict[str, np.ndarray]:
    """Per clip, the classifier's class probabilities averaged over its frames: ``[clips, classes]``."""
    n, frames = clips.shape[:2]
    logits = classifier(clips.reshape(n * frames, *clips.shape[2:]))
    return {name: logits[name].softmax(-1).reshape(n, frames, -1).mean(1).numpy() for name in _CLASSIFIED}


def score_clips(clips: np.ndarray, prompt: str, classifier: AttributeClassifier | None = None) -> list[dict[str, Any]]:
    """Per clip of ``clips`` (``uint8 [n, frames, H, W, 3]``): the predicted ``shape``, ``color``,
    ``background``, ``direction`` (indices; -1: no motion), ``travel`` (pixels), and
    ``correct_<attribute>`` for each attribute ``prompt`` names (:func:`.moving_shapes.parse_prompt`)."""
    classifier = classifier or load_classifier("eval")
    clips = np.asarray(clips)
    want = moving_shapes.parse_prompt(prompt)
    probabilities = _frame_probabilities(classifier, clips)
    rows = []
    for i, clip in enumerate(clips):
        direction, travel = motion_direction(clip)
        row: dict[str, Any] = {name: int(probabilities[name][i].argmax()) for name in _CLASSIFIED}
        row.update(direction=direction, travel=travel)
        row.update({f"correct_{name}": row[name] == index for name, index in want.items()
                    if index >= 0 and name in row})
        rows.append(row)
    return rows


def real_clips_for_prompt(prompt: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` data-set clips satisfying every attribute ``prompt`` names (drawn until they match)."""
    want = {name: index for name, index in moving_shapes.parse_prompt(prompt).items() if index >= 0}
    rng = np.random.default_rng(seed)
    clips = []
    while len(clips) < n:
        attrs = moving_shapes.sample_attributes(rng)
        labels = moving_shapes.labels_of(attrs)
        if all(labels[name] == index for name, index in want.items()):
            clips.append(moving_shapes.render_clip(attrs))
    return np.stack(clips)


def generate_clips(pipe, prompt: str, method: dict[str, Any], seeds: Sequence[int], steps: int,
                   **kwargs: Any) -> tuple[np.ndarray, float, float]:
    """Clips (``uint8 [seeds, frames, H, W, 3]``) of ``prompt`` for each seed in one batch; returns
    (clips, NFEs per clip, seconds). ``kwargs`` go to the pipeline (``num_frames``, ``height``, ...)."""
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    guidance = {k: v for k, v in method.items() if k != "label"}
    start = time.perf_counter()
    out = pipe([prompt] * len(seeds), guidance=guidance, num_inference_steps=steps, generator=gens,
               output_type="np", **kwargs)
    seconds = time.perf_counter() - start
    clips = np.clip(np.round(np.asarray(out.frames) * 255.0), 0, 255).astype(np.uint8)
    nfe = float(np.mean(out.nfe)) if isinstance(out.nfe, (list, tuple, np.ndarray, torch.Tensor)) else float(out.nfe)
    return clips, nfe, seconds


def summarize(scores: list[dict[str, Any]]) -> dict[str, float]:
    """A row's metrics from :func:`score_clips` results: ``alignment``, ``acc_<attribute>``, ``travel``."""
    row: dict[str, float] = {}
    per_clip = [np.mean([s[f"correct_{name}"] for name in SCORED if f"correct_{name}" in s]) for s in scores]
    row["alignment"] = float(np.mean(per_clip))
    for name in (*SCORED, "background"):
        flags = [s[f"correct_{name}"] for s in scores if f"correct_{name}" in s]
        if flags:
            row[f"acc_{name}"] = float(np.mean(flags))
    row["travel"] = float(np.mean([s["travel"] for s in scores]))
    return row


_COLUMNS = (("method", "method", "{}"), ("alignment", "align", "{:.3f}"), ("acc_shape", "shape", "{:.2f}"),
            ("acc_color", "colour", "{:.2f}"), ("acc_direction", "direction", "{:.2f}"),
            ("acc_background", "bg", "{:.2f}"), ("travel", "travel px", "{:.1f}"), ("nfe", "NFE", "{:.0f}"),
            ("sec_per_clip", "s/clip", "{:.3f}"), ("time_vs_cfg", "time / CFG", "{:.2f}"))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of rows holding :func:`summarize`'s metrics and ``method`` (plus ``nfe``,
    ``sec_per_clip``, ``time_vs_cfg`` where given)."""
    cols = [c for c in _COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
