"""What the commands share (generate, compare, eval, img2img, edit, batch, demo): reading
``--param`` values, the model options (a directory or single file, LoRAs, the scheduler),
loading a pipeline quietly, writing PNGs atomically with their settings, saying which prompts the
text encoder cuts. The commands import this module, never each other.

Two concepts stay apart. ``--sampler`` is the engine's solver: ``scheduler`` steps with the
pipeline's diffusers scheduler, ``ddim``/``euler``/``euler_ancestral``/``dpmpp_2m`` are the core's
own steps. ``--scheduler`` (with ``--karras``, ``--timestep-spacing``, ``--ays``) replaces that
diffusers scheduler, ``Scheduler.from_config(pipe.scheduler.config, ...)`` as diffusers documents
it: it is what ``--sampler scheduler`` steps with, and its config (training betas, timestep
spacing, Karras sigmas) sets the timesteps and levels every core solver visits.

PNGs carry two text chunks: ``guidance-engine`` (the settings as JSON) and ``parameters``, the
text AUTOMATIC1111's web UI writes and image browsers and model sites read (its
``create_infotext``, modules/processing.py, and ``quote``, modules/infotext_utils.py)::

    prompt
    Negative prompt: ...
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 0, Size: 32x32, Model: name, ...

A1111's keys that apply, in its order (Steps, Sampler, Schedule type, CFG scale, Seed, Size,
Model, Denoising strength), then the engine's own where A1111 puts extra parameters (Solver,
Scheduler, Timestep spacing, LoRA, Guidance: the method's config as JSON). A value holding a
comma, colon or newline is written as a JSON string, as A1111 quotes. Deviations: no "Model hash"
(A1111 hashes the whole checkpoint file, gigabytes, and caches it; the engine does not read the
file twice), LoRAs are listed with their scales under "LoRA" rather than as ``<lora:...>`` prompt
tags (the prompt stays the text the encoder saw), "Schedule type" is written for Karras sigmas
and AYS only (A1111's parser reads its absence as "Automatic").
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from guidance_engine import strict_json

__all__ = ["SCHEDULERS", "TIMESTEP_SPACINGS", "ModelOptions", "add_model_options", "atomic_save_png", "ays_timesteps",
           "check_scheduler_names", "configure_scheduler", "infotext", "load_loras", "load_quietly", "number_or_text", "output_paths",
           "parse_params", "png_parameters", "warn_truncated"]


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


def atomic_save_png(image, path: Path, metadata: dict[str, Any], parameters: str | None = None) -> None:
    """Write a PNG with its settings in a text chunk (and ``parameters``, A1111's text, in its
    own, :func:`png_parameters`); a temporary name is renamed when complete."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("guidance-engine", strict_json.dumps(metadata))  # strict: inf as "inf"
    if parameters is not None:
        info.add_text("parameters", parameters)
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


#: The API's parameter names as the command line spells them (for messages).
_OPTION_NAMES = {"num_inference_steps": "--steps", "sampler": "--sampler", "eta": "--eta", "guidance": "--method",
                 "model": "--model", "config": "--config"}


def as_option(error: ValueError) -> ValueError:
    """``error`` with the API's parameter name that starts it spelled as the command line's option."""
    name, sep, rest = str(error).partition(": ")
    return ValueError(f"{_OPTION_NAMES.get(name, name)}{sep}{rest}")


def load_quietly(model: str | None, device: str, dtype: str = "float32", options: ModelOptions | None = None):
    """The pipeline, without diffusers' loading bars (the sampling bar stays); with ``options``
    (checked by ``cli_checks.check_model_options``): a single file with its config directory, the
    LoRAs loaded, the scheduler replaced. Loading errors name the command-line option."""
    from diffusers.utils import logging as diffusers_logging

    from ..models import load_pipeline

    diffusers_logging.disable_progress_bar()
    if options is None:
        return load_pipeline(model, device=device, dtype=dtype)
    try:
        pipe = load_pipeline(model, device=device, dtype=dtype, config=options.config)
    except ValueError as error:  # the API names its parameters; say the options
        raise as_option(error) from None
    if options.loras:
        load_loras(pipe, options.loras)
    pipe.scheduler = configure_scheduler(pipe.scheduler, options.scheduler, karras=options.karras,
                                         timestep_spacing=options.timestep_spacing)
    return pipe


# -- the model options: --model, --config, --lora, --scheduler, --karras, --timestep-spacing, --ays

@dataclass(frozen=True)
class ModelOptions:
    """What a command loads, read off its options and checked before any weight loads.

    ``config``: a single file's config directory (None: a directory model, or a single file whose
    configs diffusers infers); ``family``: the guided pipeline class name (None where the options
    were not checked: :func:`png_parameters` without options); ``loras``: (path, scale) pairs;
    ``karras``: Karras sigmas asked (``--karras`` or a ``*_karras`` scheduler); ``timesteps``: the
    AYS timesteps of ``--ays``.
    """

    model: str | None
    config: Path | None
    family: str | None
    loras: tuple[tuple[Path, float], ...] = ()
    scheduler: str | None = None
    karras: bool = False
    timestep_spacing: str | None = None
    timesteps: tuple[int, ...] | None = None

    def metadata(self) -> dict[str, Any]:
        """These options as the PNG's JSON chunk and the batch manifest record them."""
        return {"config": None if self.config is None else str(self.config),
                "loras": [[str(path), scale] for path, scale in self.loras], "scheduler": self.scheduler,
                "karras": self.karras, "timestep_spacing": self.timestep_spacing,
                "timesteps": None if self.timesteps is None else list(self.timesteps)}


def add_model_options(parser, *, ays: bool, model_help: str | None = None) -> None:
    """Add --model, --config, --lora, --scheduler, --karras, --timestep-spacing (and --ays when
    the command passes timesteps to its pipeline) to ``parser``."""
    from ..models import DISTILLED_SHORTHAND, DIT_SHORTHAND

    parser.add_argument("--model", default=None, help=model_help or (
        "diffusers model directory, or a single-file checkpoint (.safetensors, .ckpt: see --config) "
        f"(default: the shipped model; '{DIT_SHORTHAND}': the shipped class-conditional model; "
        f"'{DISTILLED_SHORTHAND}': the shipped guidance-distilled one)"))
    parser.add_argument("--config", default=None, metavar="DIR",
                        help="a single file's configs: a diffusers model directory of its architecture (its JSON and "
                             "tokenizer files suffice; default: the shipped model's when the file fits it, else the "
                             "configs diffusers infers from its keys, from the hub or its cache)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA (.safetensors file, or a directory written by save_lora_weights) at SCALE "
                             "(default 1), repeatable; needs peft (pip install 'guidance-engine[lora]')")
    parser.add_argument("--scheduler", default=None, metavar="NAME",
                        help=f"replace the model's diffusers scheduler: {', '.join(SCHEDULERS)} (the one --sampler "
                             "scheduler steps with, whose timesteps and levels every --sampler visits)")
    parser.add_argument("--karras", action="store_true", help="Karras sigmas (use_karras_sigmas) on the scheduler")
    parser.add_argument("--timestep-spacing", default=None, metavar="SPACING",
                        help=f"the scheduler's timestep_spacing: {', '.join(TIMESTEP_SPACINGS)} (default: the model's)")
    if ays:
        parser.add_argument("--ays", action="store_true",
                            help="Align Your Steps: the 10 timesteps of diffusers' AysSchedules for SD 1.x/2.x or "
                                 "SDXL (needs --steps 10 and a scheduler that takes timesteps)")


def load_loras(pipe, loras: Sequence[tuple[Path, float]]) -> list[str]:
    """Load each LoRA as its own adapter (``pipe.load_lora_weights``, named after its file) and
    activate them together at their scales (``pipe.set_adapters``). Returns the adapter names."""
    import warnings

    names = lora_names([path for path, _ in loras])
    with warnings.catch_warnings():  # peft warns on each adapter after the first: several are the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for (path, _), name in zip(loras, names):
            if path.is_dir():
                pipe.load_lora_weights(str(path), adapter_name=name)
            else:
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    return names


def lora_names(paths: Sequence[Path]) -> list[str]:
    """Adapter names: each file's stem (a directory's name), non-word characters as ``_`` (peft
    keeps adapters in module dicts), ``_2``, ``_3``, ... for repeats."""
    names: list[str] = []
    for path in paths:
        base = re.sub(r"\W", "_", path.stem if path.is_file() else path.name) or "lora"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


# -- --scheduler choices -----------------------------------------------------------------------

@dataclass(frozen=True)
class SchedulerChoice:
    """A ``--scheduler`` name: the diffusers class, the config entries it sets over the model's
    scheduler config, and A1111's sampler name (diffusers' scheduler overview maps A1111's names
    to these classes and options; PLMS is LDM's name for PNDM's pseudo-linear multistep)."""

    class_name: str
    label: str
    config: tuple[tuple[str, Any], ...] = ()


_DPMPP = (("algorithm_type", "dpmsolver++"), ("solver_order", 2))
_DPMPP_SDE = (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2))
_KARRAS = (("use_karras_sigmas", True),)
SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler", "DDIM"),
    "ddpm": SchedulerChoice("DDPMScheduler", "DDPM"),
    "pndm": SchedulerChoice("PNDMScheduler", "PLMS", (("skip_prk_steps", True),)),
    "lms": SchedulerChoice("LMSDiscreteScheduler", "LMS"),
    "euler": SchedulerChoice("EulerDiscreteScheduler", "Euler"),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SchedulerChoice("HeunDiscreteScheduler", "Heun"),
    "dpm2": SchedulerChoice("KDPM2DiscreteScheduler", "DPM2"),
    "dpm2_a": SchedulerChoice("KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M", _DPMPP),
    "dpmpp_2m_karras": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M", _DPMPP + _KARRAS),
    "dpmpp_2m_sde": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M SDE", _DPMPP_SDE),
    "dpmpp_2m_sde_karras": SchedulerChoice("DPMSolverMultistepScheduler", "DPM++ 2M SDE", _DPMPP_SDE + _KARRAS),
    "unipc": SchedulerChoice("UniPCMultistepScheduler", "UniPC"),
    "deis": SchedulerChoice("DEISMultistepScheduler", "DEIS"),
    "lcm": SchedulerChoice("LCMScheduler", "LCM"),
}
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def check_scheduler_names(name: str | None, timestep_spacing: str | None) -> None:
    """``--scheduler`` one of :data:`SCHEDULERS`, ``--timestep-spacing`` one of :data:`TIMESTEP_SPACINGS`."""
    if name is not None and name not in SCHEDULERS:
        raise ValueError(f"--scheduler: must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"--timestep-spacing: must be one of {', '.join(TIMESTEP_SPACINGS)}, got {timestep_spacing!r}")


def _accepts(cls: type, method: str, name: str) -> bool:
    return name in inspect.signature(getattr(cls, method)).parameters


def configure_scheduler(scheduler, name: str | None = None, *, karras: bool = False,
                        timestep_spacing: str | None = None):
    """``Scheduler.from_config(scheduler.config, ...)``: the ``--scheduler`` class (None: the
    model's own) with its config entries, Karras sigmas and the timestep spacing when asked, every
    other entry (betas, prediction type, steps offset) kept from the model's config. ``scheduler``
    itself when nothing is asked. ValueError naming the option before any model call."""
    import diffusers

    check_scheduler_names(name, timestep_spacing)
    choice = SCHEDULERS.get(name) if name is not None else None
    cls = getattr(diffusers, choice.class_name) if choice is not None else type(scheduler)
    options = dict(choice.config) if choice is not None else {}
    if karras:
        if not _accepts(cls, "__init__", "use_karras_sigmas"):
            takes = sorted(n for n, c in SCHEDULERS.items()
                           if _accepts(getattr(diffusers, c.class_name), "__init__", "use_karras_sigmas"))
            raise ValueError(f"--karras: {cls.__name__} has no Karras sigmas; --scheduler one of {', '.join(takes)}")
        options["use_karras_sigmas"] = True
    if timestep_spacing is not None:
        if not _accepts(cls, "__init__", "timestep_spacing"):
            raise ValueError(f"--timestep-spacing: {cls.__name__} has no timestep_spacing")
        options["timestep_spacing"] = timestep_spacing
    if choice is None and not options:
        return scheduler
    from guidance_engine.samplers.schedule import fresh_scheduler

    return fresh_scheduler(cls, {**scheduler.config, **options})


def ays_timesteps(family: str | None) -> tuple[int, ...]:
    """The 10 AYS timesteps (Sabour et al., "Align Your Steps", 2024) of diffusers' AysSchedules
    for a guided pipeline family: SDXL's for SDXL, SD's for SD 1.x/2.x; ValueError otherwise."""
    from diffusers.schedulers import AysSchedules

    if family is None or not family.startswith("GuidedStableDiffusion") or "3" in family:
        raise ValueError(f"--ays: AYS schedules exist for SD 1.x/2.x and SDXL (diffusers' AysSchedules), "
                         f"not for {family or 'this model'}")
    key = "StableDiffusionXLTimesteps" if "XL" in family else "StableDiffusionTimesteps"
    return tuple(int(t) for t in AysSchedules[key])


def sampler_label(sampler: str, scheduler) -> str:
    """A1111's name of what steps: the scheduler's (``sampler="scheduler"``) or, for a core
    solver, the stock scheduler it mirrors; the class name where A1111 has none."""
    from guidance_engine.samplers import SAMPLERS

    if sampler in SAMPLERS:
        class_name, config = SAMPLERS[sampler].scheduler_name, {}
    else:
        class_name, config = type(scheduler).__name__, dict(scheduler.config)
    for choice in SCHEDULERS.values():
        if choice.class_name == class_name and all(config.get(k, v) == v for k, v in choice.config
                                                   if k != "use_karras_sigmas"):
            return choice.label
    return class_name


def png_parameters(prompt: str, negative_prompt: str | None, *, pipe, guidance: Mapping[str, Any], sampler: str,
                   steps: int, seed: int | None, size: tuple[int, int], model: str | None,
                   options: ModelOptions | None = None, strength: float | None = None,
                   embedded_scale: float | None = None) -> str:
    """The A1111 ``parameters`` text of an image (see the module docstring): ``sampler`` is the
    resolved solver (``resolve_sampler``), ``guidance`` the method's config, ``size`` (W, H),
    ``embedded_scale`` a guidance-distilled model's embedded scale (Forge's "Distilled CFG Scale")."""
    options = options or ModelOptions(model, None, None)
    scheduler = pipe.scheduler
    schedule = "Align Your Steps" if options.timesteps else "Karras" if scheduler.config.get("use_karras_sigmas") \
        else None
    scale = guidance.get("scale")
    params = {"Steps": len(options.timesteps) if options.timesteps else steps,
              "Sampler": sampler_label(sampler, scheduler), "Schedule type": schedule,
              "CFG scale": scale if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None,
              "Distilled CFG Scale": embedded_scale,
              "Seed": seed, "Size": f"{size[0]}x{size[1]}", "Model": _model_name(model),
              "Denoising strength": strength, "Solver": sampler, "Scheduler": options.scheduler,
              "Timestep spacing": options.timestep_spacing,
              "LoRA": ", ".join(f"{name}: {scale:g}" for name, (_, scale) in
                                zip(lora_names([p for p, _ in options.loras]), options.loras)) or None,
              "Guidance": strict_json.dumps(dict(guidance))}
    return infotext(prompt, negative_prompt, params)


def _model_name(model: str | None) -> str:
    """A1111's "Model": the checkpoint's name, a file's without its suffix."""
    if model is None:
        return "default"
    path = Path(model)
    return path.stem if path.suffix else path.name or str(model)


def infotext(prompt: str, negative_prompt: str | None, params: Mapping[str, Any]) -> str:
    """A1111's layout: the prompt, ``Negative prompt: ...`` when there is one, then one line of
    ``Key: value`` pairs (None values left out) joined by ``, ``."""
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _quote(value: Any) -> str:
    """A value as A1111 writes it: as is, or as a JSON string when it holds ``,``, ``:`` or a newline
    (which would end the pair)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text
