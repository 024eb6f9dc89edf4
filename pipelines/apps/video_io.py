"""Clips: writing a generated video (animated GIF / WebP through Pillow, MP4 through imageio-ffmpeg
or PyAV), reading one back, its settings beside it, and ``guidance-engine generate`` on a
text-to-video model: a Wan 2.1 / 2.2, LTX-Video or HunyuanVideo 1.5 checkpoint directory.

    guidance-engine generate "a red circle moving right on a blue background" --model video -o clip.gif
    guidance-engine generate "a blue square moving up on a white background" --model video -o clip.mp4
    guidance-engine generate "a cat walking" --model path/to/LTX-Video -o clip.webp --num-frames 97

The clip's size, by family (:func:`video_family`, read from the checkpoint's configs before any
model loads): frames ``t k + 1`` with t the VAE's temporal factor (Wan and HunyuanVideo 1.5: 4,
LTX-Video: 8, in the stock VAEs; the factor of the checkpoint's own VAE config is the rule), sides
multiples of the VAE's spatial factor times the transformer's patch (LTX-Video: also of 32, the
stock pipeline's check). Defaults: the stock pipeline's (Wan 480 x 832, 81 frames; LTX-Video
512 x 704, 161 frames; HunyuanVideo 1.5: 121 frames at the stock 16:9 size for the transformer's
``target_size``, 480 x 848 at 640), the shipped model's native 32 x 32, 9 frames.

Options of the image command that a video model does not take (``--config``, ``--scheduler``,
``--karras``, ``--timestep-spacing``, ``--ays``, ``--guidance-scale``) are refused before any model loads
(:func:`refuse_image_options`); ``--lora`` loads LoRAs into the pipelines that have a LoRA loader
(Wan, LTX-Video; HunyuanVideo 1.5 has none and refuses it), and the settings file records them.
LTX-Video's ``frame_rate`` (the rate its rotary positions assume) stays the stock 25 whatever
``--fps`` writes the clip at.

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
model, LoRAs, size, frame count, rate, NFEs, and the SHA-256 of the frames (uint8, before encoding).
:func:`rebuild_clip` regenerates the frames from that file; with the same model and device they
are the same bytes (the CLI generates each clip in its own call, so a rebuilt clip alone equals
it: batch rows need not agree to the last bit).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from guidance_engine import strict_json

from . import cli_common

__all__ = ["DEFAULT_FPS", "DEFAULT_OUTPUT", "VIDEO_SUFFIXES", "VideoFamily", "check_video_outputs",
           "cmd_generate_video", "frames_digest", "mp4_backend", "read_clip", "rebuild_clip", "refuse_image_options",
           "settings_path", "to_uint8", "video_family", "write_clip"]

VIDEO_SUFFIXES = (".gif", ".webp", ".mp4")
#: The clip generate writes for a video model when -o is not given.
DEFAULT_OUTPUT = "out.gif"
#: Frames per second (divides 100: a GIF's frame time is whole centiseconds).
DEFAULT_FPS = 10
#: The shipped video model's native clip (its training data: moving_shapes, 9 frames of 32 x 32).
SHIPPED_CLIP = {"height": 32, "width": 32, "num_frames": 9}
#: The stock Wan pipeline's defaults, for any other Wan checkpoint.
STOCK_CLIP = {"height": 480, "width": 832, "num_frames": 81}
#: The stock LTXPipeline's defaults.
LTX_STOCK_CLIP = {"height": 512, "width": 704, "num_frames": 161}
#: The stock HunyuanVideo15Pipeline's frame count (its size follows the transformer's target_size).
HUNYUAN_VIDEO15_STOCK_FRAMES = 121
#: The stock LTXPipeline's check_inputs: sides divisible by 32.
LTX_SIDE_MULTIPLE = 32
#: Most frames a clip may have (a bound on what a command line may ask, not a model's).
MAX_FRAMES = 1025
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

    ``model``: None is the settings' model; a directory; or an already loaded guided pipeline
    (with the settings' LoRAs already in it: only a pipeline loaded here gets them loaded).
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
        if settings.get("loras"):
            cli_common.load_loras(pipe, [(Path(path), float(scale)) for path, scale in settings["loras"]])
    else:
        pipe = model
    pipe.set_progress_bar_config(disable=True)
    return to_uint8(clip_call(pipe, settings).frames[0])


@dataclass(frozen=True)
class VideoFamily:
    """What the CLI checks of a video checkpoint before it loads: the family's name (as messages
    say it), the frame rule ``temporal k + 1``, the multiple ``spatial`` of both sides (and
    ``spatial_why``, where it comes from), and the clip the stock pipeline makes by default."""

    name: str
    temporal: int
    spatial: int
    default: Mapping[str, int]
    spatial_why: str = "its VAE's spatial factor times the transformer's patch"

    def check(self, size: Mapping[str, int]) -> None:
        """ValueError naming the option, the rule and the value, unless ``size`` keeps the rules."""
        from .cli_checks import check_int, check_size

        check_size("--height", size["height"])
        check_size("--width", size["width"])
        for option, key in (("--height", "height"), ("--width", "width")):
            if size[key] % self.spatial:
                raise ValueError(f"{option}: {self.name} takes sides that are multiples of {self.spatial} "
                                 f"({self.spatial_why}), got {size[key]}")
        check_int("--num-frames", size["num_frames"], 1, MAX_FRAMES)
        if size["num_frames"] % self.temporal != 1 % self.temporal:
            t = self.temporal
            raise ValueError(f"--num-frames: {self.name}'s VAE takes {t} k + 1 frames (1, {t + 1}, {2 * t + 1}, ..., "
                             f"at most {MAX_FRAMES}), got {size['num_frames']}")


def _config(folder: Path) -> dict[str, Any]:
    """A component's ``config.json`` (empty when it has none: the class defaults then apply)."""
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _wan(vae: Mapping[str, Any], transformer: Mapping[str, Any], shipped: bool) -> VideoFamily:
    # AutoencoderKLWan's defaults 4 and 8; WanTransformer3DModel's patch (1, 2, 2)
    patch = transformer.get("patch_size", (1, 2, 2))
    spatial = vae.get("scale_factor_spatial", 8) * max(patch[1], patch[2])
    return VideoFamily("Wan", vae.get("scale_factor_temporal", 4), spatial, SHIPPED_CLIP if shipped else STOCK_CLIP)


def _ltx(vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> VideoFamily:
    # AutoencoderKLLTXVideo's own rule when the ratios are not given: patch x 2 ^ (scaling stages)
    stages = sum(bool(v) for v in vae.get("spatio_temporal_scaling", (True, True, True, False)))
    temporal = vae.get("temporal_compression_ratio") or vae.get("patch_size_t", 1) * 2 ** stages
    spatial = (vae.get("spatial_compression_ratio") or vae.get("patch_size", 4) * 2 ** stages) \
        * transformer.get("patch_size", 1)
    return VideoFamily("LTX-Video", temporal, math.lcm(spatial, LTX_SIDE_MULTIPLE), LTX_STOCK_CLIP,
                       f"its VAE's spatial factor times the transformer's patch, {spatial}, and the stock "
                       f"pipeline's {LTX_SIDE_MULTIPLE}")


def _hunyuan_video15(vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> VideoFamily:
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    spatial = vae.get("spatial_compression_ratio", 16)
    # the stock default: the crop size nearest 16:9 for the transformer's target_size (640: 480 x 848)
    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=spatial)
    height, width = processor.calculate_default_height_width(9, 16, transformer.get("target_size", 640))
    return VideoFamily("HunyuanVideo 1.5", vae.get("temporal_compression_ratio", 4),
                       spatial * transformer.get("patch_size", 1),
                       {"height": int(height), "width": int(width), "num_frames": HUNYUAN_VIDEO15_STOCK_FRAMES})


def video_family(model: str | os.PathLike | None) -> VideoFamily:
    """The :class:`VideoFamily` of a video checkpoint directory (``model`` as ``resolve_model``
    reads it), from its ``model_index.json`` and its VAE's and transformer's config files; each
    entry a config lacks is the diffusers class's default."""
    from ..models import default_video_model_path, model_class_name, resolve_model

    path = Path(resolve_model(model))
    vae, transformer = _config(path / "vae"), _config(path / "transformer")
    name = model_class_name(path)
    if name == "LTXPipeline":
        return _ltx(vae, transformer)
    if name == "HunyuanVideo15Pipeline":
        return _hunyuan_video15(vae, transformer)
    try:
        shipped = path.resolve() == default_video_model_path().resolve()
    except FileNotFoundError:  # no shipped video model here: --model names another checkpoint
        shipped = False
    return _wan(vae, transformer, shipped)


def _clip_size(args: argparse.Namespace) -> dict[str, int]:
    """Height, width and frames of the call: the options, else the family's default clip (the
    shipped model's native one for it), checked against the family's rules."""
    family = video_family(args.model)
    size = dict(family.default)
    for key, value in (("height", args.height), ("width", args.width), ("num_frames", args.num_frames)):
        if value is not None:
            size[key] = value
    family.check(size)
    return size


#: The image command's options a video model does not take: (option, attribute, unset value, why).
_IMAGE_OPTIONS = (
    ("--config", "config", None, "video models load from diffusers directories, which hold their own configs"),
    ("--scheduler", "scheduler", None, "their flow-matching scheduler is the checkpoint's, and --sampler picks "
                                       "the engine's solver"),
    ("--karras", "karras", False, "Karras sigmas are for DDPM-trained schedulers; theirs is a flow-matching one"),
    ("--timestep-spacing", "timestep_spacing", None, "their flow-matching scheduler sets its own levels"),
    ("--ays", "ays", False, "AYS timesteps exist for SD 1.x/2.x and SDXL only"),
    ("--guidance-scale", "guidance_scale", None, "it is the embedded scale of guidance-distilled image models; "
                                                 "--scale sets the method's"),
)


def refuse_image_options(args: argparse.Namespace) -> None:
    """ValueError for the first image-only option that is set: video models do not take it."""
    for option, attribute, unset, why in _IMAGE_OPTIONS:
        value = getattr(args, attribute, unset)
        if value != unset:
            raise ValueError(f"{option}: video models do not take it; {why}; got {value!r}")


def cmd_generate_video(args: argparse.Namespace) -> int:
    """``guidance-engine generate`` for a text-to-video model: every check, then one call per clip
    (clip i with seed + i), each written by :func:`write_clip` with its settings."""
    from guidance_engine.registry import resolve_guidance

    from ..models import pipeline_class_for, resolve_model

    from .cli_checks import (check_device, check_eta, check_int, check_loras, check_model_directory,
                             check_run_settings, check_seeds, check_steps)

    refuse_image_options(args)
    params = cli_common.parse_params(args.param)
    if args.scale is not None:
        params["scale"] = args.scale
    guidance = resolve_guidance(args.method or "cfg", **params)  # validates before the model loads
    check_int("--num-images", args.num_images, 1, 1024)
    check_seeds("--seed", args.seed, args.num_images)
    check_int("--fps", args.fps, 1, 100)
    check_eta(args.eta)
    check_device(args.device)
    check_model_directory(args.model)
    size = _clip_size(args)
    check_steps(args.steps, args.model)
    loras = check_loras(getattr(args, "lora", []), pipeline_class_for(resolve_model(args.model)))
    paths = cli_common.output_paths(Path(args.output or DEFAULT_OUTPUT), args.num_images)
    check_video_outputs("-o/--output", paths, args.overwrite)
    check_run_settings(guidance, args.model, steps=args.steps, sampler=args.sampler, eta=args.eta)
    pipe = cli_common.load_quietly(args.model, args.device, args.dtype)
    if loras:
        cli_common.load_loras(pipe, loras)
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
                    "loras": [[str(path), scale] for path, scale in loras], "device": args.device,
                    "dtype": args.dtype, **size}
        out = clip_call(pipe, settings)
        total_nfe += out.nfe
        write_clip(out.frames[0], path, args.fps, {**settings, "nfe": out.nfe, "warnings": cut})
        print(f"wrote {path} ({size['num_frames']} frames, {size['width']} x {size['height']}; settings in "
              f"{settings_path(path).name})")
    seconds = time.perf_counter() - start
    print(f"method {guidance.name}, {total_nfe / len(paths):g} network evaluations per clip, {seconds:.2f} s")
    return 0
