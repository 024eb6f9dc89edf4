"""Up-front checks of the command line: every one runs before a model loads or a prompt is
encoded, and each message names the option, its accepted range and the value received."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Sequence

#: torch generators take seeds in [0, 2^64); the project keeps them in the signed range as well,
#: so that a seed prints and round-trips the same everywhere.
SEED_MAX = 2**63 - 1
#: A side of 4096 px is a 512 x 512 latent for SD-type models: well above what CPU or one GPU can
#: sample in reasonable time; larger sides are refused rather than run into the machine's memory.
SIZE_MAX = 4096
#: The image sides must be multiples of the VAE's downsampling factor of every supported family.
SIZE_MULTIPLE = 8
IMAGE_SUFFIXES = (".png",)


def check_int(option: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{option}: must be an integer in [{low}, {high}], got {value!r}")


def check_seeds(option: str, first: int, count: int) -> None:
    """Seeds ``first`` .. ``first + count - 1`` all in the generator's range."""
    check_int(option, first, 0, SEED_MAX)
    if first + count - 1 > SEED_MAX:
        raise ValueError(f"{option}: seeds {first}..{first + count - 1} must stay in [0, {SEED_MAX}], got {first}")


def check_size(option: str, value: int | None) -> None:
    if value is None:
        return
    check_int(option, value, SIZE_MULTIPLE, SIZE_MAX)
    if value % SIZE_MULTIPLE:
        raise ValueError(f"{option}: must be a multiple of {SIZE_MULTIPLE} in [{SIZE_MULTIPLE}, {SIZE_MAX}], "
                         f"got {value}")


def check_eta(eta: float | None) -> None:
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise ValueError(f"--eta: must be in [0, 1], got {eta!r}")


def check_device(device: str) -> None:
    """``cpu``, ``cuda``/``cuda:N`` or ``mps``, available on this machine."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: must be one of cpu, cuda, cuda:N, mps, got {device!r}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device: no CUDA device is available on this machine, got {device!r}; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device: must be cuda:0 .. cuda:{count - 1} here, got {device!r}")
    elif parsed.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"--device: MPS is not available on this machine, got {device!r}; use cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"--device: must be one of cpu, cuda, cuda:N, mps, got {device!r}")


def scheduler_training_steps(model: Path) -> int | None:
    """``num_train_timesteps`` of a model directory's scheduler config, read without loading it."""
    config = model / "scheduler" / "scheduler_config.json"
    try:
        return int(json.loads(config.read_text()).get("num_train_timesteps"))
    except (OSError, ValueError, TypeError):
        return None


def _check_safetensors(path: Path) -> str | None:
    """Why a .safetensors file cannot be read (truncated, not safetensors), or None."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, too short for a safetensors file"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return f"{path.name} is truncated (its header alone needs {length + 8} bytes, the file has {size})"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as error:
        return f"{path.name} is not a safetensors file ({error})"
    end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        return f"{path.name} is truncated ({size} bytes of {8 + length + end})"
    return None


def check_model_directory(model: str | None) -> None:
    """A diffusers model directory that can load: ``model_index.json`` and, for each component it
    names, a subfolder whose weight files are complete. None (the shipped model) passes."""
    from ..models import DIT_SHORTHAND, resolve_model

    if model is None or (model == DIT_SHORTHAND and not Path(model).exists()):
        return
    path = Path(resolve_model(model))
    if not path.is_dir():
        raise ValueError(f"--model: must be a diffusers model directory (or '{DIT_SHORTHAND}'), got {model!r}, "
                         "which is not a directory")
    index = path / "model_index.json"
    try:
        components = json.loads(index.read_text())
    except OSError:
        raise ValueError(f"--model: {model!r} has no model_index.json; a diffusers model directory (as written by "
                         "save_pretrained) is needed") from None
    except ValueError as error:
        raise ValueError(f"--model: {index} is not valid JSON ({error})") from None
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = path / name
        if not folder.is_dir():
            raise ValueError(f"--model: {model!r} names component {name!r} in model_index.json but has no "
                             f"{name}/ folder")
        for weights in folder.glob("*.safetensors"):
            problem = _check_safetensors(weights)
            if problem:
                raise ValueError(f"--model: {name}/{problem}; the checkpoint is incomplete")


def check_steps(steps: int, model: str | None) -> None:
    """At least one step, at most the scheduler's training steps (1000 for the shipped models)."""
    from ..models import resolve_model

    high = scheduler_training_steps(Path(resolve_model(model))) or 1000
    check_int("--steps", steps, 1, high)


def check_outputs(option: str, paths: Sequence[Path], overwrite: bool) -> None:
    """Each output: a .png name, not a directory, not an existing file unless ``overwrite``, in a
    directory that exists (or can be created) and is writable."""
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{option}: must name a file, got {str(path)!r}, which is a directory")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{option}: must end in {', '.join(IMAGE_SUFFIXES)} (PNG is written, with the settings "
                             f"in its metadata), got {str(path)!r}")
        if path.exists() and not overwrite:
            raise ValueError(f"{option}: {str(path)!r} exists; pass --overwrite to replace it, or another name")
        check_writable_directory(option, path.parent)


def check_writable_directory(option: str, directory: Path) -> None:
    """``directory`` exists and is writable, or its nearest existing parent is (to create it)."""
    existing = directory if str(directory) else Path(".")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option}: {str(existing)!r} is not a directory, so {str(directory)!r} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: the directory {str(existing)!r} is not writable")


#: The API's parameter names as the command line spells them (for messages).
_OPTION_NAMES = {"num_inference_steps": "--steps", "sampler": "--sampler", "eta": "--eta", "guidance": "--method"}


def _as_option(error: ValueError) -> ValueError:
    name, sep, rest = str(error).partition(": ")
    return ValueError(f"{_OPTION_NAMES.get(name, name)}{sep}{rest}")


def model_scheduler(model: str | None):
    """The scheduler of a model directory, built from its config alone (no weights): the run
    settings are checked against the scheduler that will run them. None when it has no config."""
    import diffusers

    from ..models import resolve_model

    folder = Path(resolve_model(model)) / "scheduler"
    try:
        config = json.loads((folder / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return None
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    return None if cls is None else cls.from_config(config)


def check_run_settings(guidance, model: str | None, *, steps: int, sampler: str | None, eta: float | None,
                       image_strength: float | None = None, inversion: bool = False, scheduler=None) -> None:
    """The run's settings against the model's scheduler, as the pipeline will check them after
    loading (steps, sampler, a method's need of a stochastic sampler or a pure-noise start; an
    inversion's method), here before it loads; messages name the command-line option.
    ``scheduler``: the model's, when the caller built it already (:func:`model_scheduler`)."""
    from guidance_engine.samplers.inversion import check_inversion
    from guidance_engine.samplers.loop import check_run

    scheduler = scheduler if scheduler is not None else model_scheduler(model)
    if scheduler is None:
        return
    try:
        if inversion:
            check_inversion(guidance, scheduler, steps)
        else:
            check_run(guidance, scheduler, num_steps=steps, sampler=sampler, eta=eta, image_strength=image_strength)
    except ValueError as error:
        raise _as_option(error) from None
