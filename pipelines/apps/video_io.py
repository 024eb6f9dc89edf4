"""Clips: writing a generated video (animated GIF / WebP through Pillow, MP4 through imageio-ffmpeg
or PyAV), reading one back, its settings beside it, and ``guidance-engine generate`` on a
text-to-video (Wan) model.

    guidance-engine generate "a red circle moving right on a blue background" --model video -o clip.gif
    guidance-engine generate "a blue square moving up on a white background" --model video -o clip.mp4

Formats, by the output's suffix:

``.gif``   Pillow, always available; 256 colours a frame (Pillow's quantiser), frame time in
           centiseconds (so ``--fps`` should divide 100 for an exact rate; the default 10 does).
           Pillow merges a frame identical to the one before into it (adding its time):
           :func:`read_clip` expands such frames again from their duration.
``.webp``  Pillow, lossless (``lossless=True``): the file holds the generated frames exactly.
``.mp4``   H.264 through imageio + imageio-ffmpeg, else PyAV, when installed (the optional extra
           ``pip install 'guidance-engine[video]'``); refused before any model loads otherwise.

Every clip is written under a temporary name in its directory and renamed when complete, then
its settings go to ``<clip>.json`` beside it (same way): prompt, method, sampler, steps, seed,
model, size, frame count, rate, NFEs, and the SHA-256 of the frames (uint8, before encoding).
:func:`rebuild_clip` regenerates the frames from that file; with the same model and device they
are the same bytes (the CLI generates each clip in its own call, so a rebuilt clip alone equals
it: batch rows need not agree to the last bit).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from guidance_engine import strict_json

from . import cli_common

__all__ = ["DEFAULT_FPS", "DEFAULT_OUTPUT", "VIDEO_SUFFIXES", "check_video_outputs", "cmd_generate_video",
           "frames_digest", "mp4_backend", "read_clip", "rebuild_clip", "settings_path", "to_uint8", "write_clip"]

VIDEO_SUFFIXES = (".gif", ".webp", ".mp4")
#: The clip generate writes for a video model when -o is not given.
DEFAULT_OUTPUT = "out.gif"
#: Frames per second (divides 100: a GIF's frame time is whole centiseconds).
DEFAULT_FPS = 10
#: The shipped video model's native clip (its training data: moving_shapes, 9 frames of 32 x 32).
SHIPPED_CLIP = {"height": 32, "width": 32, "num_frames": 9}
#: The stock Wan pipeline's defaults, for any other Wan checkpoint.
STOCK_CLIP = {"height": 480, "width": 832, "num_frames": 81}
_MP4_INSTALL = "pip install 'guidance-engine[video]' (imageio and imageio-ffmpeg), or PyAV ('pip install av')"


def mp4_backend() -> str | None:
    """The MP4 writer installed: ``"imageio"`` (imageio with imageio-ffmpeg's bundled ffmpeg),
    else ``"av"`` (PyAV), else None."""
    if importlib.util.find_spec("imageio") and importlib.util.find_spec("imageio_ffmpeg"):
        return "imageio"
    if importlib.util.find_spec("av"):
        return "av"
    return None


def settings_path(clip: str | os.PathLike) -> Path:
    """Where a clip's settings are written: ``<clip>.json`` beside it."""
    return Path(f"{clip}.json")


def check_video_outputs(option: str, paths: Sequence[Path], overwrite: bool) -> None:
    """Each output: a .gif, .webp or .mp4 name (.mp4 only with a writer installed), not a directory,
    neither it nor its settings file existing unless ``overwrite``, in a writable directory."""
    from .cli_checks import check_writable_directory

    for path in paths:
        suffix = path.suffix.lower()
        if suffix not in VIDEO_SUFFIXES:
            raise ValueError(f"{option}: a video model writes a clip, the name must end in "
                             f"{', '.join(VIDEO_SUFFIXES)}, got {str(path)!r}")
        if suffix == ".mp4" and mp4_backend() is None:
            raise ValueError(f"{option}: writing .mp4 needs an MP4 writer, none is installed: {_MP4_INSTALL}; "
                             f"or write .gif / .webp (Pillow), got {str(path)!r}")
        if path.is_dir():
            raise ValueError(f"{option}: must name a file, got {str(path)!r}, which is a directory")
        for existing in (path, settings_path(path)):
            if existing.exists() and not overwrite:
                raise ValueError(f"{option}: {str(existing)!r} exists; pass --overwrite to replace it, or another name")
        check_writable_directory(option, path.parent)


def to_uint8(frames: Any) -> np.ndarray:
    """A clip as ``uint8 [frames, height, width, 3]``: float frames in [0, 1] (the pipeline's
    ``output_type="np"``) rounded to the nearest level; uint8 frames as they are."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected a (frames, height, width, 3) array, got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    return np.clip(np.round(frames.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def frames_digest(frames: np.ndarray) -> str:
    """SHA-256 of a uint8 clip's shape and bytes (what a rebuild must reproduce)."""
    frames = to_uint8(frames)
    digest = hashlib.sha256(str(frames.shape).encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    return digest.hexdigest()


def _save_pillow(frames: np.ndarray, handle, suffix: str, fps: int) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    duration = 1000.0 / fps
    options: dict[str, Any] = {"save_all": True, "append_images": images[1:], "loop": 0}
    if suffix == ".gif":
        options.update(format="GIF", duration=round(duration), optimize=False)
    else:
        options.update(format="WEBP", duration=round(duration), lossless=True, quality=100, method=4)
    images[0].save(handle, **options)


def _save_mp4(frames: np.ndarray, path: str, fps: int) -> None:
    """H.264 at the highest quality the writer offers, yuv420p (what players read)."""
    if mp4_backend() == "imageio":
        import imageio.v2 as imageio

        # macro_block_size=1: imageio would otherwise resize sides that are not multiples of 16
        with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", quality=10, macro_block_size=1,
                                pixelformat="yuv420p") as writer:
            for frame in frames:
                writer.append_data(frame)
        return
    import av

    with av.open(path, mode="w", format="mp4") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(temporary name)`` in ``path``'s directory, then renamed to ``path`` (removed on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name keeps the suffix: ffmpeg picks its container from it
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a clip is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_clip(frames: Any, path: str | os.PathLike, fps: int = DEFAULT_FPS,
               metadata: Mapping[str, Any] | None = None) -> Path:
    """Write a clip (``frames`` as :func:`to_uint8` reads them) to ``path`` (.gif, .webp or .mp4)
    at ``fps`` frames per second (an integer in [1, 100]), then ``metadata`` (with the frame
    digest, count, size and rate added) to :func:`settings_path`; each under a temporary name
    renamed when complete."""
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 100:
        raise ValueError(f"fps: must be an integer in [1, 100], got {fps!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"path: must end in {', '.join(VIDEO_SUFFIXES)}, got {str(path)!r}")
    if suffix == ".mp4" and mp4_backend() is None:
        raise ValueError(f"path: writing .mp4 needs an MP4 writer, none is installed: {_MP4_INSTALL}")
    frames = to_uint8(frames)
    if suffix == ".mp4":
        _atomic_write(path, lambda tmp: _save_mp4(frames, tmp, fps))
    else:
        def save(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                _save_pillow(frames, handle, suffix, fps)
        _atomic_write(path, save)
    if metadata is not None:
        record = {**metadata, "file": path.name, "format": suffix[1:], "fps": fps, "frames": int(frames.shape[0]),
                  "height": int(frames.shape[1]), "width": int(frames.shape[2]), "frames_sha256": frames_digest(frames)}
        text = strict_json.dumps(record, indent=1)
        _atomic_write(settings_path(path), lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return path


def read_clip(path: str | os.PathLike, fps: int | None = None) -> np.ndarray:
    """A written clip's frames, ``uint8 [frames, height, width, 3]``. GIF frames that Pillow merged
    (identical to the one before) come back repeated, by their duration over one frame's time (of
    ``fps``, default: the settings file's, else :data:`DEFAULT_FPS`)."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        if mp4_backend() == "imageio":
            import imageio.v2 as imageio

            with imageio.get_reader(str(path), format="FFMPEG") as reader:
                return np.stack([np.asarray(frame) for frame in reader])
        import av

        with av.open(str(path)) as container:
            return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    from PIL import Image, ImageSequence

    if fps is None:
        settings = settings_path(path)
        fps = json.loads(settings.read_text())["fps"] if settings.is_file() else DEFAULT_FPS
    frames = []
    with Image.open(path) as image:
        for frame in ImageSequence.Iterator(image):
            repeat = 1
            if path.suffix.lower() == ".gif":
                repeat = max(1, round(frame.info.get("duration", 1000 / fps) / round(1000 / fps)))
            frames += [np.asarray(frame.convert("RGB"))] * repeat
    return np.stack(frames)


def _model_arg(label: str | None) -> str | None:
    """The settings' ``model`` back to what load_pipeline takes (``"default"`` is the image model)."""
    return None if label in (None, "default") else label


def clip_call(pipe, settings: Mapping[str, Any]):
    """The pipeline call of one clip's ``settings`` (generate's, or a settings file's)."""
    import torch

    from guidance_engine.registry import resolve_guidance

    sampler = settings.get("sampler", "auto")
    return pipe(prompt=settings["prompt"], negative_prompt=settings.get("negative_prompt"),
                height=settings["height"], width=settings["width"], num_frames=settings["num_frames"],
                num_inference_steps=settings["steps"], guidance=resolve_guidance(settings["guidance"]),
                sampler=None if sampler == "auto" else sampler, eta=settings.get("eta"),
                generator=torch.Generator(settings.get("device", "cpu")).manual_seed(settings["seed"]),
                output_type="np")


def rebuild_clip(settings: str | os.PathLike | Mapping[str, Any], model=None, device: str | None = None) -> np.ndarray:
    """Regenerate the clip a settings file (a ``<clip>.json`` path, or its dict) describes, as
    ``uint8 [frames, height, width, 3]``.

    ``model``: None is the settings' model; a directory; or an already loaded guided pipeline.
    ``device``: None is the settings' device. Same model and device: the same bytes as the clip's
    ``frames_sha256``.
    """
    from ..models import load_pipeline

    if not isinstance(settings, Mapping):
        settings = json.loads(Path(settings).read_text())
    missing = [key for key in ("prompt", "guidance", "steps", "seed", "height", "width", "num_frames")
               if key not in settings]
    if missing:
        raise ValueError(f"settings: not a clip's settings, missing {', '.join(missing)}")
    settings = {**settings, "device": device or settings.get("device", "cpu")}
    if model is None or isinstance(model, (str, os.PathLike)):
        pipe = load_pipeline(_model_arg(str(model) if model is not None else settings.get("model")),
                             device=settings["device"], dtype=settings.get("dtype", "float32"))
    else:
        pipe = model
    pipe.set_progress_bar_config(disable=True)
    return to_uint8(clip_call(pipe, settings).frames[0])


def _clip_size(args: argparse.Namespace) -> dict[str, int]:
    """Height, width and frames of the call: the options, else the shipped model's native clip, else
    the stock Wan defaults (any other checkpoint)."""
    from ..models import default_video_model_path, resolve_model

    from .cli_checks import check_int, check_size

    try:
        shipped = Path(resolve_model(args.model)).resolve() == default_video_model_path().resolve()
    except FileNotFoundError:  # no shipped video model here: --model names another checkpoint
        shipped = False
    size = dict(SHIPPED_CLIP if shipped else STOCK_CLIP)
    for key, value in (("height", args.height), ("width", args.width), ("num_frames", args.num_frames)):
        if value is not None:
            size[key] = value
    check_size("--height", size["height"])
    check_size("--width", size["width"])
    check_int("--num-frames", size["num_frames"], 1, 1025)
    if size["num_frames"] % 4 != 1:
        raise ValueError(f"--num-frames: Wan's VAE takes 4 k + 1 frames (1, 5, 9, ..., 1025), got {size['num_frames']}")
    return size


def cmd_generate_video(args: argparse.Namespace) -> int:
    """``guidance-engine generate`` for a text-to-video model: every check, then one call per clip
    (clip i with seed + i), each written by :func:`write_clip` with its settings."""
    from guidance_engine.registry import resolve_guidance

    from .cli_checks import (check_device, check_eta, check_int, check_model_directory, check_run_settings,
                             check_seeds, check_steps)

    params = cli_common.parse_params(args.param)
    if args.scale is not None:
        params["scale"] = args.scale
    guidance = resolve_guidance(args.method, **params)  # validates before the model loads
    check_int("--num-images", args.num_images, 1, 1024)
    check_seeds("--seed", args.seed, args.num_images)
    check_int("--fps", args.fps, 1, 100)
    size = _clip_size(args)
    check_eta(args.eta)
    check_device(args.device)
    check_model_directory(args.model)
    check_steps(args.steps, args.model)
    paths = cli_common.output_paths(Path(args.output or DEFAULT_OUTPUT), args.num_images)
    check_video_outputs("-o/--output", paths, args.overwrite)
    check_run_settings(guidance, args.model, steps=args.steps, sampler=args.sampler, eta=args.eta)
    pipe = cli_common.load_quietly(args.model, args.device, args.dtype)
    if args.attention != "sdpa":
        in_effect = pipe.set_attention(args.attention)
        if in_effect != args.attention:
            print(f"attention: {args.attention} is not available here, using {in_effect}", file=sys.stderr)
    cut = cli_common.warn_truncated(pipe, prompt=args.prompt, negative_prompt=args.negative_prompt)
    total_nfe, start = 0.0, time.perf_counter()
    for i, path in enumerate(paths):
        settings = {"command": "generate", "prompt": args.prompt, "negative_prompt": args.negative_prompt,
                    "guidance": guidance.to_dict(), "sampler": args.sampler or "auto", "eta": args.eta,
                    "steps": args.steps, "seed": args.seed + i, "model": str(args.model or "default"),
                    "device": args.device, "dtype": args.dtype, **size}
        out = clip_call(pipe, settings)
        total_nfe += out.nfe
        write_clip(out.frames[0], path, args.fps, {**settings, "nfe": out.nfe, "warnings": cut})
        print(f"wrote {path} ({size['num_frames']} frames, {size['width']} x {size['height']}; settings in "
              f"{settings_path(path).name})")
    seconds = time.perf_counter() - start
    print(f"method {guidance.name}, {total_nfe / len(paths):g} network evaluations per clip, {seconds:.2f} s")
    return 0
