"""What the commands share (generate, compare, eval, img2img, edit, batch, demo): reading
``--param`` values, loading a pipeline quietly, writing PNGs atomically with their settings,
saying which prompts the text encoder cuts. The commands import this module, never each other."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from guidance_engine import strict_json

__all__ = ["atomic_save_png", "load_quietly", "number_or_text", "output_paths", "parse_params", "warn_truncated"]


def number_or_text(text: str) -> Any:
    """An int, a float, inf/true/false, or the text itself (a --param value)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"inf": math.inf, "true": True, "false": False}.get(text.lower(), text)


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` items -> a dict of parameters (values as :func:`number_or_text` reads them)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param: expected NAME=VALUE, got {item!r}")
        params[key.strip()] = number_or_text(value.strip())
    return params


def atomic_save_png(image, path: Path, metadata: dict[str, Any]) -> None:
    """Write a PNG with its settings in a text chunk; a temporary name is renamed when complete."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("guidance-engine", strict_json.dumps(metadata))  # strict: inf as "inf"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; an image is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-0.png``, ``out-1.png``, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(count)]


def warn_truncated(pipe, **texts: str | list[str] | None) -> list[str]:
    """Say on stderr, before sampling, which prompts the text encoder will cut (the pipeline's own
    warning is silenced in the CLI, which prints this one line per prompt instead)."""
    check = getattr(pipe, "truncated_prompts", None)
    messages = check(**texts) if check is not None and getattr(pipe, "tokenizer", None) is not None else []
    for message in messages:
        print(f"guidance-engine: warning: {message}", file=sys.stderr)
    return messages


def load_quietly(model: str | None, device: str, dtype: str = "float32"):
    """The pipeline, without diffusers' loading bars (the sampling bar stays)."""
    from diffusers.utils import logging as diffusers_logging

    from ..models import load_pipeline

    diffusers_logging.disable_progress_bar()
    return load_pipeline(model, device=device, dtype=dtype)
