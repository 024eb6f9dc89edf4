"""Procedural "shapes" text-to-image data set: the default model's training data.

Every example is a 32 x 32 RGB image of one or two coloured shapes on a plain background, with
a caption from a small grammar and integer attribute labels::

    "two small red triangles on a blue background, top left"
    "a yellow circle on a gray background"
    "a large green square on a white background, center"

Attributes (the label integers index these tuples):

==========  ==================================================================
shape       circle, square, triangle
color       red, green, blue, yellow  (shape colour)
background  red, green, blue, yellow, white, gray, black  (never the shape colour)
size        small, large  (two shapes are always small)
position    top left, top right, bottom left, bottom right, center
count       one, two
==========  ==================================================================

Colour *names* are hues, not fixed RGB values: every example draws its shape colour's HSV
saturation uniformly from 0.3 to 0.85 (and its brightness around the name's base value), so a
"red" shape may be anything from a greyish rose to a strong red. The strongly saturated ones
are the least ambiguous for the caption, which is exactly what classifier-free guidance
amplifies (it samples from p(x|c) p(c|x)^(w-1)): high-scale CFG therefore drifts towards
over-saturated, eventually clipped colours, as it does on real models, and the evaluation kit
measures it. (A first version used a fixed muted palette with +-12 jitter; every pixel of a
"red" shape was then equally red, and no guidance scale raised saturation.) White, gray and
black stay nearly achromatic (saturation below 0.06).

Captions always name count, colour, shape and background; size and position are each left out
with probability 0.3, so prompts like "a red circle on a blue background" are in distribution.

Everything is a pure function of a :class:`numpy.random.Generator`: ``make_dataset(n, seed)``
returns the same arrays for the same ``(n, seed)`` on every machine.
"""

from __future__ import annotations

import colorsys
import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTES", "BACKGROUNDS", "COLORS", "COUNTS", "IMAGE_SIZE", "PALETTE", "POSITIONS", "SHAPES",
    "SIZES", "VOCABULARY", "caption", "draw_color", "labels_of", "make_dataset", "parse_prompt", "render",
    "sample_attributes",
]

IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # draw at 128 x 128, box-filter down to 32 x 32 (antialiasing)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
BACKGROUNDS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "gray", "black")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
COUNTS: tuple[str, ...] = ("one", "two")

#: attribute name -> its class names, in label order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "color": COLORS, "background": BACKGROUNDS, "size": SIZES,
    "position": POSITIONS, "count": COUNTS,
}

#: Base RGB of every colour name: its hue, and the colour drawn when no jitter is asked for.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (196, 62, 56),
    "green": (58, 158, 72),
    "blue": (56, 92, 196),
    "yellow": (214, 190, 64),
    "white": (226, 224, 218),
    "gray": (122, 124, 128),
    "black": (34, 34, 38),
}

_SATURATION = (0.3, 0.85)    # chromatic names: HSV saturation drawn uniformly in this range
_NEUTRAL_SATURATION = 0.06   # white, gray, black: saturation drawn in [0, this)
_HUE_JITTER = 0.015          # +- (hue in turns)
_VALUE_JITTER = 0.06         # +- HSV value around the name's base value
_NEUTRAL = ("white", "gray", "black")
_POSITION_JITTER = 1.5  # +- pixels
_RADIUS = {"small": 4.5, "large": 8.0}  # half the bounding-box side, in pixels
_CENTERS = {
    "top left": (9.0, 9.0), "top right": (23.0, 9.0), "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0), "center": (16.0, 16.0),
}
_PAIR_OFFSET = 5.5  # two shapes sit side by side, +- this many pixels from the position centre
_OMIT_PROBABILITY = 0.3  # captions leave out size / position this often (each independently)

#: Every word the captions use (the default model's tokenizer gets a whole-word token for each).
VOCABULARY: tuple[str, ...] = (
    "a", "an", "one", "two", "on", "background", "small", "large",
    *COLORS, "white", "gray", "black",
    *SHAPES, *(s + "s" for s in SHAPES),
    "top", "bottom", "left", "right", "center",
)


def draw_color(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """One RGB colour for the colour name ``name``: the name's hue, a random saturation and brightness.

    Chromatic names (red, green, blue, yellow) draw saturation uniformly in 0.3-0.85; white,
    gray and black stay below 0.06. Hue and value jitter a little around :data:`PALETTE`.
    """
    hue, _, value = colorsys.rgb_to_hsv(*(c / 255.0 for c in PALETTE[name]))
    if name in _NEUTRAL:
        saturation = rng.uniform(0.0, _NEUTRAL_SATURATION)
    else:
        saturation = rng.uniform(*_SATURATION)
    hue = (hue + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
    value = float(np.clip(value + rng.uniform(-_VALUE_JITTER, _VALUE_JITTER), 0.0, 1.0))
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value))


def sample_attributes(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one example's attributes.

    Returns a dict with the class names ``shape``, ``color``, ``background``, ``size``,
    ``position``, ``count``; the rendering details ``fg_rgb`` / ``bg_rgb`` (jittered colours)
    and ``offset`` (pixel jitter); and the caption flags ``say_size`` / ``say_position``.
    """
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = COLORS[rng.integers(len(COLORS))]
    backgrounds = [b for b in BACKGROUNDS if b != color]
    background = backgrounds[rng.integers(len(backgrounds))]
    count = COUNTS[rng.integers(len(COUNTS))]
    size = "small" if count == "two" else SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    fg = draw_color(color, rng)
    bg = draw_color(background, rng)
    offset = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, 2)
    say = rng.random(2) >= _OMIT_PROBABILITY
    return {
        "shape": shape, "color": color, "background": background, "size": size,
        "position": position, "count": count,
        "fg_rgb": fg, "bg_rgb": bg,
        "offset": (float(offset[0]), float(offset[1])),
        "say_size": bool(say[0]), "say_position": bool(say[1]),
    }


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    s = _SUPERSAMPLE
    x0, y0, x1, y1 = (cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        inset = 0.1 * r * s  # a square of the same bounding box looks bigger than the circle
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx * s, y0), (x1, y1 - 0.1 * r * s), (x0, y1 - 0.1 * r * s)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(attrs: dict[str, Any]) -> np.ndarray:
    """Render ``attrs`` (from :func:`sample_attributes`) as a ``uint8`` array of shape (32, 32, 3).

    Missing rendering details fall back to the base palette and no jitter, so
    ``render({"shape": "circle", "color": "red", "background": "blue", "size": "large",
    "position": "center", "count": "one"})`` works.
    """
    big = IMAGE_SIZE * _SUPERSAMPLE
    fg = tuple(attrs.get("fg_rgb", PALETTE[attrs["color"]]))
    bg = tuple(attrs.get("bg_rgb", PALETTE[attrs["background"]]))
    image = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(image)
    cx, cy = _CENTERS[attrs["position"]]
    dx, dy = attrs.get("offset", (0.0, 0.0))
    cx, cy = cx + dx, cy + dy
    count = attrs.get("count", "one")
    size = "small" if count == "two" else attrs.get("size", "large")
    r = _RADIUS[size]
    if count == "two":
        cx = min(max(cx, _PAIR_OFFSET + r + 0.5), IMAGE_SIZE - _PAIR_OFFSET - r - 0.5)  # keep both inside
        for sign in (-1.0, 1.0):
            _draw_shape(draw, attrs["shape"], cx + sign * _PAIR_OFFSET, cy, r, fg)
    else:
        _draw_shape(draw, attrs["shape"], cx, cy, r, fg)
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.uint8).copy()


def caption(attrs: dict[str, Any]) -> str:
    """The caption of ``attrs``: ``"{a|two} [size] {color} {shape}[s] on a {background} background[, position]"``.

    Size and position are written when ``attrs["say_size"]`` / ``attrs["say_position"]`` are
    true (default true).
    """
    two = attrs.get("count", "one") == "two"
    words = ["two" if two else "a"]
    if attrs.get("say_size", True) and "size" in attrs:
        words.append(attrs["size"])
    words += [attrs["color"], attrs["shape"] + ("s" if two else ""), "on", "a", attrs["background"], "background"]
    text = " ".join(words)
    if attrs.get("say_position", True) and "position" in attrs:
        text += ", " + attrs["position"]
    return text


def labels_of(attrs: dict[str, Any]) -> dict[str, int]:
    """Integer labels (indices into :data:`ATTRIBUTES`) of every attribute in ``attrs``."""
    return {name: ATTRIBUTES[name].index(attrs[name]) for name in ATTRIBUTES if name in attrs}


def parse_prompt(prompt: str) -> dict[str, int]:
    """Labels a prompt asks for: ``{attribute: index}``, ``-1`` where the prompt does not say.

    Understands the caption grammar and small variations ("one red circle", "a big red circle",
    "red circles", "in the top left", "centre"). The first colour word is the shape colour, the
    colour word right before "background" the background. Two shapes imply ``size = small``.
    """
    text = prompt.lower().replace("centre", "center").replace("big", "large").replace("grey", "gray")
    words = re.findall(r"[a-z]+", text)
    out = {name: -1 for name in ATTRIBUTES}
    for i, word in enumerate(words):
        if word == "background" and i > 0 and words[i - 1] in BACKGROUNDS:
            out["background"] = BACKGROUNDS.index(words[i - 1])
    for i, word in enumerate(words):
        if word in COLORS and not (i + 1 < len(words) and words[i + 1] == "background"):
            out["color"] = COLORS.index(word)
            break
    for word in words:
        stem = word[:-1] if word.endswith("s") and word[:-1] in SHAPES else word
        if stem in SHAPES:
            out["shape"] = SHAPES.index(stem)
            if out["count"] == -1:
                out["count"] = 1 if word != stem else 0
            break
    if "two" in words:
        out["count"] = 1
    elif out["count"] == -1 and ({"a", "an", "one"} & set(words)):
        out["count"] = 0
    for size in SIZES:
        if size in words:
            out["size"] = SIZES.index(size)
    if out["count"] == 1:
        out["size"] = SIZES.index("small")
    vertical = next((w for w in words if w in ("top", "bottom")), None)
    horizontal = next((w for w in words if w in ("left", "right")), None)
    if vertical and horizontal:
        out["position"] = POSITIONS.index(f"{vertical} {horizontal}")
    elif "center" in words or "middle" in words:
        out["position"] = POSITIONS.index("center")
    return out


def make_dataset(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """``n`` examples from ``seed``: (images ``uint8 [n, 32, 32, 3]``, captions, labels).

    ``labels`` maps every attribute name of :data:`ATTRIBUTES` to an ``int64 [n]`` array of
    the true (rendered) classes, whether or not the caption mentions it.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    labels = {name: np.empty(n, dtype=np.int64) for name in ATTRIBUTES}
    for i in range(n):
        attrs = sample_attributes(rng)
        images[i] = render(attrs)
        captions.append(caption(attrs))
        for name, value in labels_of(attrs).items():
            labels[name][i] = value
    return images, captions, labels
