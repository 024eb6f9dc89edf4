"""Procedural "moving shapes" text-to-video data set: the default video model's training data.

Every example is a clip of :data:`NUM_FRAMES` (9 = 4 k + 1, the frame count Wan's VAE takes)
32 x 32 RGB frames: one shape of the image data set (:mod:`.shapes`: its shapes, colour names,
backgrounds and sizes, drawn by :func:`.shapes.render`) sliding in a straight line, at constant
speed, in the direction the caption names::

    "a red circle moving right on a blue background"
    "a large green triangle moving up on a white background"

Attributes (the label integers index these tuples):

==========  ==================================================================
shape       circle, square, triangle
color       red, green, blue, yellow  (shape colour)
background  red, green, blue, yellow, white, gray, black  (never the shape colour)
size        small, large
direction   left, right, up, down  (image coordinates: "up" is towards row 0)
==========  ==================================================================

Motion: the shape travels :data:`TRAVEL` pixels (uniform in that range) from the first frame to
the last, :data:`NUM_FRAMES` - 1 equal steps; its start is drawn so that the whole path stays
inside the frame (the shape keeps :data:`MARGIN` pixel from the border: the background colour
of the border is what the motion scorer reads), and the coordinate across the motion is drawn
uniformly within the frame. Colours draw their saturation and brightness per clip as
:func:`.shapes.draw_color` does (constant within a clip). One shape per clip (two shapes side by
side would leave the frame when moving sideways).

Captions: ``"a [size] {color} {shape} moving {direction} on a {background} background"``, the
size left out with probability 0.3. Everything is a pure function of a
:class:`numpy.random.Generator`: ``make_dataset(n, seed)`` returns the same arrays for the same
``(n, seed)`` on every machine.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from . import shapes

__all__ = [
    "ATTRIBUTES", "DIRECTIONS", "DIRECTION_ONLY", "IMAGE_SIZE", "MARGIN", "NUM_FRAMES", "TRAVEL", "VOCABULARY",
    "caption", "labels_of", "make_dataset", "parse_prompt", "render_clip", "sample_attributes", "track",
]

IMAGE_SIZE = shapes.IMAGE_SIZE
#: Frames per clip: 4 k + 1 with k = 2 (Wan's VAE: the first frame alone, then groups of 4).
NUM_FRAMES = 9
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
#: Unit step (dx, dy) in pixels of each direction (y grows downwards, as image rows).
_STEP: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                         "down": (0.0, 1.0)}
#: Distance (pixels) the shape travels from the first frame to the last, drawn uniformly in this range.
TRAVEL = (8.0, 12.0)
#: Background pixels kept between the shape's bounding box and the frame's border.
MARGIN = 1.0
_RADIUS = {"small": 4.5, "large": 8.0}  # as shapes.py draws them (half the bounding-box side)
_OMIT_SIZE_PROBABILITY = 0.3

#: attribute name -> its class names, in label order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": shapes.SHAPES, "color": shapes.COLORS, "background": shapes.BACKGROUNDS, "size": shapes.SIZES,
    "direction": DIRECTIONS,
}

#: Every word the captions use (the video model's tokenizer gets a whole-word piece for each).
VOCABULARY: tuple[str, ...] = (
    "a", "an", "moving", "on", "background", *shapes.SIZES, *shapes.COLORS, "white", "gray", "black",
    *shapes.SHAPES, *DIRECTIONS,
)


#: The attributes of the direction-only clips (:func:`make_dataset`'s ``fixed``): the one prompt
#: family "a large red circle moving {direction} on a blue background", which the default video
#: model's training mixes in so that the direction word is learnt (docs/video.md).
DIRECTION_ONLY = {"shape": "circle", "color": "red", "background": "blue", "size": "large"}


def _bounds(size: str) -> tuple[float, float]:
    """Lowest and highest centre coordinate that keeps a shape of ``size`` :data:`MARGIN` inside."""
    r = _RADIUS[size]
    return r + MARGIN, IMAGE_SIZE - r - MARGIN


def _check_fixed(fixed: dict[str, str]) -> None:
    for name, value in fixed.items():
        if name not in ATTRIBUTES:
            raise ValueError(f"fixed: attributes are {sorted(ATTRIBUTES)}, got {name!r}")
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"fixed[{name!r}]: must be one of {list(ATTRIBUTES[name])}, got {value!r}")
    if "color" in fixed and fixed.get("background") == fixed["color"]:
        raise ValueError(f"fixed: the background must differ from the shape colour, got both {fixed['color']!r}")


def sample_attributes(rng: np.random.Generator, fixed: dict[str, str] | None = None) -> dict[str, Any]:
    """Draw one clip's attributes; those named in ``fixed`` (``{"shape": "circle", ...}``) are
    taken as given instead of drawn (and a fixed size is always said in the caption).

    Returns a dict with the class names ``shape``, ``color``, ``background``, ``size``,
    ``direction``; the rendering details ``fg_rgb`` / ``bg_rgb`` (jittered colours), ``start``
    (the centre (x, y) in the first frame, pixels) and ``travel`` (pixels to the last frame);
    and the caption flag ``say_size``. Without ``fixed`` the draws are those of every earlier
    version (the data set of a seed does not change).
    """
    fixed = fixed or {}
    _check_fixed(fixed)

    def draw(name: str, choices) -> str:
        return fixed[name] if name in fixed else choices[rng.integers(len(choices))]

    shape = draw("shape", shapes.SHAPES)
    color = draw("color", shapes.COLORS)
    background = draw("background", [b for b in shapes.BACKGROUNDS if b != color])
    size = draw("size", shapes.SIZES)
    direction = draw("direction", DIRECTIONS)
    low, high = _bounds(size)
    travel = float(rng.uniform(*TRAVEL))
    travel = min(travel, high - low)  # a large shape has 14 px of room: never more than that
    dx, dy = _STEP[direction]
    # along the motion: a start from which the whole path stays inside; across it: anywhere inside
    along = rng.uniform(low, high - travel)
    across = rng.uniform(low, high)
    if dx:
        start = (along if dx > 0 else IMAGE_SIZE - along, across)
    else:
        start = (across, along if dy > 0 else IMAGE_SIZE - along)
    fg = shapes.draw_color(color, rng)
    bg = shapes.draw_color(background, rng)
    return {
        "shape": shape, "color": color, "background": background, "size": size, "direction": direction,
        "fg_rgb": fg, "bg_rgb": bg, "start": (float(start[0]), float(start[1])), "travel": travel,
        "say_size": bool(rng.random() >= _OMIT_SIZE_PROBABILITY) or "size" in fixed,
    }


def track(attrs: dict[str, Any], num_frames: int = NUM_FRAMES) -> np.ndarray:
    """The shape's centre (x, y) in each frame, ``float64 [num_frames, 2]`` (pixels)."""
    dx, dy = _STEP[attrs["direction"]]
    t = np.linspace(0.0, 1.0, num_frames)[:, None]
    return np.asarray(attrs["start"], dtype=np.float64) + t * attrs["travel"] * np.array([dx, dy])


def render_clip(attrs: dict[str, Any], num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Render ``attrs`` (from :func:`sample_attributes`) as ``uint8 [num_frames, 32, 32, 3]``.

    Each frame is :func:`.shapes.render` of one shape placed at the frame's point of
    :func:`track` (as the image data set's centre position plus an offset).
    """
    centre = shapes.IMAGE_SIZE / 2  # the image data set's "center" position, offsets from it
    frames = np.empty((num_frames, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(track(attrs, num_frames)):
        frame = {"shape": attrs["shape"], "color": attrs["color"], "background": attrs["background"],
                 "size": attrs["size"], "count": "one", "position": "center", "offset": (x - centre, y - centre),
                 "fg_rgb": attrs["fg_rgb"], "bg_rgb": attrs["bg_rgb"]}
        frames[i] = shapes.render(frame)
    return frames


def caption(attrs: dict[str, Any]) -> str:
    """``"a [size] {color} {shape} moving {direction} on a {background} background"`` (the size when
    ``attrs["say_size"]``, default true)."""
    words = ["a"]
    if attrs.get("say_size", True) and "size" in attrs:
        words.append(attrs["size"])
    words += [attrs["color"], attrs["shape"], "moving", attrs["direction"], "on", "a", attrs["background"],
              "background"]
    return " ".join(words)


def labels_of(attrs: dict[str, Any]) -> dict[str, int]:
    """Integer labels (indices into :data:`ATTRIBUTES`) of every attribute in ``attrs``."""
    return {name: ATTRIBUTES[name].index(attrs[name]) for name in ATTRIBUTES if name in attrs}


def parse_prompt(prompt: str) -> dict[str, int]:
    """Labels a prompt asks for: ``{attribute: index}`` over :data:`ATTRIBUTES`, ``-1`` where the
    prompt does not say. Shape, colour, background and size are read as
    :func:`.shapes.parse_prompt` reads them; the direction is the word after "moving", else the
    first direction word ("a red circle going left")."""
    image = shapes.parse_prompt(prompt)
    out = {name: image[name] for name in ATTRIBUTES if name in image}
    words = re.findall(r"[a-z]+", prompt.lower())
    after = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "moving" and words[i + 1] in DIRECTIONS]
    named = after or [word for word in words if word in DIRECTIONS]
    out["direction"] = DIRECTIONS.index(named[0]) if named else -1
    return out


def make_dataset(n: int, seed: int = 0, fixed: dict[str, str] | None = None
                 ) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """``n`` clips from ``seed``: (clips ``uint8 [n, 9, 32, 32, 3]``, captions, labels).

    ``labels`` maps every attribute name of :data:`ATTRIBUTES` to an ``int64 [n]`` array of the
    rendered classes, whether or not the caption names it. ``fixed``: attributes every clip
    shares (:func:`sample_attributes`), e.g. :data:`DIRECTION_ONLY`, where only the direction
    (and the path, the colour jitter) varies.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: must be an integer >= 0, got {n!r}")
    _check_fixed(fixed or {})
    rng = np.random.default_rng(seed)
    clips = np.empty((n, NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    labels = {name: np.empty(n, dtype=np.int64) for name in ATTRIBUTES}
    for i in range(n):
        attrs = sample_attributes(rng, fixed)
        clips[i] = render_clip(attrs)
        captions.append(caption(attrs))
        for name, value in labels_of(attrs).items():
            labels[name][i] = value
    return clips, captions, labels
