"""Up-front checks of the command line: every one runs before a model loads or a prompt is
encoded, and each message names the option, its accepted range and the value received."""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from .cli_common import ModelOptions

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
    from ..models import DIT_SHORTHAND, SINGLE_FILE_SUFFIXES, resolve_model

    if model is None or (model == DIT_SHORTHAND and not Path(model).exists()):
        return
    path = Path(resolve_model(model))
    if not path.is_dir():
        raise ValueError(f"--model: must be a diffusers model directory, a single-file checkpoint "
                         f"({', '.join(SINGLE_FILE_SUFFIXES)}) or '{DIT_SHORTHAND}', got {model!r}, which is not a "
                         "directory")
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


def check_single_file(model: str) -> None:
    """A single-file checkpoint that exists and, for safetensors, is complete."""
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"--model: no such file {model!r} (a single-file checkpoint, by its suffix)")
    problem = _check_safetensors(path) if path.suffix.lower() == ".safetensors" else None
    if problem:
        raise ValueError(f"--model: {problem}; the checkpoint is incomplete")


def parse_lora(text: str) -> tuple[Path, float]:
    """``PATH[:SCALE]`` -> (path, scale): the scale is what follows the last colon when it reads
    as a number (so a Windows drive's colon stays in the path), 1.0 without one."""
    path, sep, tail = text.rpartition(":")
    try:
        scale = float(tail) if sep else 1.0
    except ValueError:
        path, scale = text, 1.0
    if not sep:
        path = text
    if not math.isfinite(scale):
        raise ValueError(f"--lora: the scale after ':' must be a finite number, got {tail!r} in {text!r}")
    if not path:
        raise ValueError(f"--lora: expected PATH[:SCALE], got {text!r}")
    return Path(path), scale


def check_loras(items: Sequence[str], pipeline_class: type) -> tuple[tuple[Path, float], ...]:
    """Every ``--lora`` item: a complete .safetensors file, or a directory holding one (as
    ``save_lora_weights`` writes); a pipeline class with a LoRA loader; peft installed."""
    loras = tuple(parse_lora(item) for item in items)
    for path, _ in loras:
        if path.is_dir():
            if not any(path.glob("*.safetensors")):
                raise ValueError(f"--lora: the directory {str(path)!r} holds no .safetensors file")
            continue
        if not path.is_file():
            raise ValueError(f"--lora: no such file or directory {str(path)!r}")
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"--lora: must be a .safetensors file or a directory of one, got {str(path)!r}")
        problem = _check_safetensors(path)
        if problem:
            raise ValueError(f"--lora: {problem}")
    if not loras:
        return loras
    if not hasattr(pipeline_class, "load_lora_weights"):
        raise ValueError(f"--lora: {pipeline_class.__name__} has no LoRA loader (load_lora_weights)")
    try:
        import peft  # noqa: F401 (diffusers loads LoRAs through it)
    except ImportError:
        raise ValueError("--lora: loading LoRAs needs peft, which is not installed: pip install "
                         "'guidance-engine[lora]' (or pip install 'peft>=0.17')") from None
    return loras


def _model_source(model: str | None, config: str | None) -> tuple[Path | None, type]:
    """(the directory of the model's configs, its guided pipeline class): a model directory
    itself; for a single file the config directory it fits (None: diffusers infers the configs
    when loading)."""
    from ..models import is_single_file, pipeline_class_for, resolve_model, single_file_config, single_file_pipeline_class

    if is_single_file(model):
        check_single_file(model)
        try:
            directory = single_file_config(model, config)
            return directory, single_file_pipeline_class(model, directory)
        except ValueError as error:
            from .cli_common import as_option

            raise as_option(error) from None
    check_model_directory(model)
    if config is not None:
        raise ValueError(f"--config: only a single-file --model takes a config directory; "
                         f"{model or 'the shipped model'} is a diffusers directory, which holds its own; got {config!r}")
    path = Path(resolve_model(model))  # a directory: check_model_directory refused anything else
    return path, pipeline_class_for(path)


def check_model_options(args: argparse.Namespace) -> tuple[ModelOptions, Any]:
    """The model a command loads, from ``--model``, ``--config``, ``--lora``, ``--scheduler``,
    ``--karras``, ``--timestep-spacing`` and ``--ays`` (those the command has), checked before any
    weight loads: the directory or single file and the config directory the file fits, the LoRA
    files, the scheduler names and flags against the scheduler they change, AYS's step count.
    Returns the options and the scheduler the run will use, built from configs alone (None when
    the configs come with the weights: a single file whose architecture diffusers infers)."""
    from .cli_common import ModelOptions
    from ..models import is_single_file

    directory, pipeline_class = _model_source(args.model, getattr(args, "config", None))
    family = pipeline_class.__name__
    loras = check_loras(getattr(args, "lora", []), pipeline_class)
    scheduler, karras, timesteps = _check_scheduler_options(args, directory, family)
    config = directory if is_single_file(args.model) else None
    return ModelOptions(args.model, config, family, loras, getattr(args, "scheduler", None), karras,
                        getattr(args, "timestep_spacing", None), timesteps), scheduler


def _check_scheduler_options(args: argparse.Namespace, directory: Path | None, family: str):
    """(the configured scheduler or None, Karras sigmas asked, AYS timesteps or None) of
    ``--scheduler``, ``--karras``, ``--timestep-spacing`` and ``--ays``; a flow-matching model
    takes none of them."""
    from guidance_engine.samplers.schedule import is_flow_scheduler

    from .cli_common import SCHEDULERS, ays_timesteps, check_scheduler_names, configure_scheduler

    name, karras = getattr(args, "scheduler", None), getattr(args, "karras", False)
    spacing, ays = getattr(args, "timestep_spacing", None), getattr(args, "ays", False)
    check_scheduler_names(name, spacing)
    scheduler = model_scheduler(directory) if directory is not None else None
    asked = [flag for flag, value in (("--scheduler", name), ("--karras", karras), ("--timestep-spacing", spacing),
                                      ("--ays", ays)) if value]
    if asked and scheduler is not None and is_flow_scheduler(scheduler):
        raise ValueError(f"{asked[0]}: the scheduler options are for DDPM-trained models (SD 1.x/2.x, SDXL, DiT); "
                         f"this model's {type(scheduler).__name__} is a flow-matching scheduler")
    if scheduler is not None:
        scheduler = configure_scheduler(scheduler, name, karras=karras, timestep_spacing=spacing)
    if name is not None and dict(SCHEDULERS[name].config).get("use_karras_sigmas"):
        karras = True  # a *_karras name asks for them as --karras does
    if not ays:
        return scheduler, karras, None
    if karras or spacing:
        raise ValueError(f"--ays: sets the timesteps itself; drop {'--karras' if karras else '--timestep-spacing'}")
    timesteps = ays_timesteps(family)
    if args.steps != len(timesteps):
        raise ValueError(f"--steps: --ays runs the {len(timesteps)} timesteps of diffusers' AYS schedule; pass "
                         f"--steps {len(timesteps)}, got {args.steps}")
    return scheduler, karras, timesteps


def check_schedule_support(sampler: str, scheduler, *, karras: bool, timesteps: Sequence[int] | None) -> None:
    """The solver that steps can run the asked schedule: the scheduler itself (``scheduler``) or,
    for a core solver, the stock scheduler whose levels it visits (configured from the model's:
    Karras sigmas carry over only to a class that has them; AYS needs ``set_timesteps(timesteps=)``)."""
    from guidance_engine.samplers import SAMPLERS

    cls = SAMPLERS[sampler].scheduler() if sampler in SAMPLERS else type(scheduler)
    if karras and not _takes(cls.__init__, "use_karras_sigmas"):
        raise ValueError(f"--karras: sampler {sampler!r} visits the levels of {cls.__name__}, which has no Karras "
                         "sigmas (asked by --karras or a *_karras --scheduler); use --sampler euler, dpmpp_2m or "
                         "scheduler")
    if timesteps is not None and not _takes(cls.set_timesteps, "timesteps"):
        raise ValueError(f"--ays: sampler {sampler!r} steps with {cls.__name__}, which takes no explicit timesteps; "
                         "use --scheduler euler or dpmpp_2m (or --sampler euler, dpmpp_2m)")


def _takes(function, name: str) -> bool:
    import inspect

    return name in inspect.signature(function).parameters


def check_steps(steps: int, model: str | None, scheduler=None) -> None:
    """At least one step, at most the scheduler's training steps (1000 for the shipped models):
    ``scheduler``'s when given (a single file's, from its config directory), else the model's."""
    from ..models import resolve_model

    trained = scheduler.config.get("num_train_timesteps") if scheduler is not None else None
    high = int(trained or scheduler_training_steps(Path(resolve_model(model))) or 1000)
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
                       image_strength: float | None = None, inversion: bool = False, scheduler=None,
                       karras: bool = False, timesteps: Sequence[int] | None = None) -> str | None:
    """The run's settings against the model's scheduler, as the pipeline will check them after
    loading (steps, sampler, a method's need of a stochastic sampler or a pure-noise start; an
    inversion's method; the solver's support of ``--karras`` and ``--ays`` ``timesteps``), here
    before it loads; messages name the command-line option. ``scheduler``: the one the run uses,
    when the caller built it already (:func:`model_scheduler`, ``configure_scheduler``).
    Returns the resolved sampler (None when no scheduler config is at hand)."""
    from guidance_engine.samplers.inversion import check_inversion
    from guidance_engine.samplers.loop import check_run

    scheduler = scheduler if scheduler is not None else model_scheduler(model)
    if scheduler is None:
        return None
    try:
        if inversion:
            check_inversion(guidance, scheduler, steps)
            return None
        resolved = check_run(guidance, scheduler, num_steps=steps, sampler=sampler, eta=eta,
                             image_strength=image_strength, timesteps=None if timesteps is None else list(timesteps))
    except ValueError as error:
        from .cli_common import as_option

        raise as_option(error) from None
    check_schedule_support(resolved, scheduler, karras=karras, timesteps=timesteps)
    return resolved
