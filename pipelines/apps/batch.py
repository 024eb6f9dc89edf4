"""``guidance-engine batch``: many prompts, many images, one or many processes, resumable.

    guidance-engine batch prompts.txt --out runs/a --method apg --scale 5 --per-prompt 4
    accelerate launch --num_processes 4 -m guidance_engine.pipelines.apps.cli batch prompts.jsonl --out runs/a

Every image gets a seed from (base seed, prompt index, image index) alone (:func:`image_seed`),
so the images do not depend on the number of processes or the batch size (up to float rounding
across batch sizes). Each image is written atomically as ``{prompt:05d}-{image:02d}.png`` and
described by one JSON line in its process's manifest shard ``manifest-{process}.jsonl`` (append,
flush and fsync per line); at the end the main process merges the shards into
``manifest.jsonl``. A rerun skips every image whose PNG and manifest line exist. See
docs/batch.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from guidance_engine import strict_json
from guidance_engine.registry import method_names, resolve_guidance
from guidance_engine.samplers import SAMPLER_NAMES

from . import cli_common
from .cli_checks import (SEED_MAX, check_device, check_eta, check_int, check_model_directory, check_run_settings,
                         check_size, check_steps, check_writable_directory, model_scheduler)
from ..messages import PromptTruncatedWarning
from ..models import check_class_label, checkpoint_classes, is_class_conditional, refuse_text_options

MANIFEST = "manifest.jsonl"
SHARD_PREFIX = "manifest-"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSONL_KEYS = ("prompt", "negative_prompt", "seed", "method", "scale", "params")
# Fields of a manifest line that must match the request for an existing image to be reused.
SETTINGS = ("prompt", "negative_prompt", "guidance", "sampler", "steps", "seed", "height", "width", "eta",
            "model", "dtype")
_MISSING = object()


# -- seeds, names -----------------------------------------------------------------------------

def image_seed(base_seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index`` (both 0-based).

    The first 8 bytes of SHA-256 of ``"guidance-engine-batch:{base}:{prompt}:{image}"``, big
    endian, shifted right by one bit (a 63-bit integer). It depends on nothing else: not on the
    number of processes, the batch size, ``--per-prompt`` or the other prompts. A JSONL prompt
    with its own ``"seed"`` uses ``seed + image_index`` instead (as ``generate --seed``).
    """
    text = f"guidance-engine-batch:{int(base_seed)}:{int(prompt_index)}:{int(image_index)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def image_name(prompt_index: int, image_index: int) -> str:
    return f"{prompt_index:05d}-{image_index:02d}.png"


def _canonical(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(strict_json.dumps(value))


# -- prompts ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptSpec:
    """One prompt of the file: its 0-based index among the prompts and 1-based line number."""

    index: int
    line: int
    prompt: str
    negative_prompt: str | None
    seed: int | None
    guidance: dict[str, Any]  # the requested method's config (``Guidance.to_dict()``)


def read_prompts(path: str | os.PathLike, method: str = "cfg", params: dict[str, Any] | None = None,
                 negative_prompt: str | None = None) -> list[PromptSpec]:
    """Prompts from a text file (one a line; blank lines are skipped) or a JSONL file (``.jsonl``:
    one object a line with ``prompt`` and optionally ``negative_prompt``, ``seed``, ``method``,
    ``scale``, ``params``). Every line's method is resolved here, so errors come with the line
    number before any model loads.

    A line's method: ``method`` (default: the command's), with the command's ``--scale``/
    ``--param`` values when it is the command's method (not when another method is named), then
    the line's ``params`` and ``scale`` on top.
    """
    params = dict(params or {})
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts: no such file {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"prompts: {path} is not UTF-8 text ({error})") from None
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    default = resolve_guidance(method, **params).to_dict()
    specs: list[PromptSpec] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"prompts: {path}:{number}"
        if not jsonl:
            specs.append(PromptSpec(len(specs), number, raw.strip(), negative_prompt, None, default))
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with a \"prompt\" string, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(JSONL_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(JSONL_KEYS)}")
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {prompt!r}")
        negative = obj.get("negative_prompt", negative_prompt)
        if negative is not None and not isinstance(negative, str):
            raise ValueError(f"{where}: \"negative_prompt\" must be a string or null, got {negative!r}")
        seed = obj.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"{where}: \"seed\" must be an integer >= 0, got {seed!r}")
        name = obj.get("method", method)
        if not isinstance(name, str):
            raise ValueError(f"{where}: \"method\" must be a method name, got {name!r}")
        line_params = dict(params) if name == method else {}
        extra = obj.get("params", {})
        if not isinstance(extra, dict):
            raise ValueError(f"{where}: \"params\" must be an object {{name: value}}, got {extra!r}")
        line_params.update(extra)
        if "scale" in obj:
            line_params["scale"] = obj["scale"]
        try:
            guidance = resolve_guidance(name, **line_params)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where}: {error}") from None
        specs.append(PromptSpec(len(specs), number, prompt.strip(), negative, seed, guidance.to_dict()))
    if not specs:
        raise ValueError(f"prompts: {path} has no prompts (empty or blank lines only)")
    return specs


# -- work items -------------------------------------------------------------------------------

@dataclass
class Unit:
    """Images generated in one pipeline call together: one image, or the ``particles`` images of
    one FKC group (their resampling couples them, so they are never split or mixed)."""

    spec: PromptSpec
    images: list[int]
    seeds: list[int]
    guidance: dict[str, Any]  # the effective config (LinearAG falls back to AG with a negative prompt)
    done: list[bool] = field(default_factory=list)

    @property
    def key(self) -> str:
        return strict_json.dumps([self.guidance, self.spec.negative_prompt is None], sort_keys=True)

    @property
    def coupled(self) -> bool:
        return len(self.images) > 1


def _units(specs: Sequence[PromptSpec], per_prompt: int, base_seed: int) -> list[Unit]:
    from ..common import GuidedPipelineMixin

    units = []
    for spec in specs:
        requested = resolve_guidance(spec.guidance)
        effective = GuidedPipelineMixin.for_prompts(requested, spec.negative_prompt, None)
        size = effective.group_size()
        if per_prompt % size:
            raise ValueError(f"--per-prompt: {effective.name} couples groups of {size} images ('particles'); "
                             f"--per-prompt must be a multiple of {size}, got {per_prompt} "
                             f"(prompt {spec.index}, line {spec.line})")
        seeds = [spec.seed + i if spec.seed is not None else image_seed(base_seed, spec.index, i)
                 for i in range(per_prompt)]
        for start in range(0, per_prompt, size):
            idx = list(range(start, start + size))
            units.append(Unit(spec, idx, [seeds[i] for i in idx], _canonical(effective.to_dict())))
    return units


def _manifest_entries(out: Path) -> dict[str, dict[str, Any]]:
    """file -> manifest line, from ``manifest.jsonl`` then every shard (later lines win). Lines
    that do not parse (a write cut short by a crash) are ignored."""
    entries: dict[str, dict[str, Any]] = {}
    paths = [out / MANIFEST] + sorted(out.glob(f"{SHARD_PREFIX}*.jsonl"))
    for path in paths:
        if not path.is_file():
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            for raw in handle:
                if not raw.endswith("\n"):
                    continue  # the unfinished last line of a killed writer
                try:
                    entry = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                    entries[entry["file"]] = entry
    return entries


def _settings(unit: Unit, j: int, common: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": unit.spec.prompt, "negative_prompt": unit.spec.negative_prompt, "guidance": unit.guidance,
            "sampler": common["sampler"], "steps": common["steps"], "seed": unit.seeds[j],
            "height": common["height"], "width": common["width"], "eta": common["eta"],
            "model": common["model"], "dtype": common["dtype"]}


def _mark_done(units: Iterable[Unit], out: Path, common: dict[str, Any]) -> None:
    entries = _manifest_entries(out)
    for unit in units:
        unit.done = []
        for j, i in enumerate(unit.images):
            name = image_name(unit.spec.index, i)
            entry = entries.get(name)
            done = entry is not None and (out / name).is_file()
            if done:
                wanted = _canonical(_settings(unit, j, common))
                for key in SETTINGS:
                    if entry.get(key, _MISSING) != wanted[key]:
                        raise ValueError(
                            f"--out: {out / name} was made with other settings ({key}: {entry.get(key)!r}, "
                            f"now {wanted[key]!r}); use another --out directory, or delete the image and "
                            f"its manifest lines to redo it")
            unit.done.append(done)


def _model_label(model: str | os.PathLike | None) -> str:
    if model is None:
        return "default"
    return os.path.abspath(model) if Path(model).exists() else str(model)


def _model_arg(label: str) -> str | None:
    return None if label == "default" else label


def _batches(units: Sequence[Unit], batch_size: int) -> list[list[Unit]]:
    """Units grouped by (method config, has negative prompt), in order, packed up to
    ``batch_size`` images per call; a coupled unit (FKC group) is always a call of its own."""
    groups: dict[str, list[Unit]] = {}
    for unit in units:
        groups.setdefault(unit.key, []).append(unit)
    batches: list[list[Unit]] = []
    for members in groups.values():
        current: list[Unit] = []
        for unit in members:
            if unit.coupled:
                batches.append([unit])
                continue
            current.append(unit)
            if len(current) >= batch_size:
                batches.append(current)
                current = []
        if current:
            batches.append(current)
    return batches


class _ShardWriter:
    """This process's manifest shard: append, flush and fsync per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_file():  # drop the unfinished last line a killed run may have left
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as handle:
                    handle.truncate(data.rfind(b"\n") + 1)
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, entry: dict[str, Any]) -> None:
        self.handle.write(strict_json.dumps(entry) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def merge_manifest(out: str | os.PathLike) -> Path:
    """Write ``out/manifest.jsonl``: every image's line (from the shards and the previous merge),
    one per file whose PNG exists, sorted by (prompt index, image index); atomically."""
    out = Path(out)
    entries = [e for name, e in _manifest_entries(out).items() if (out / name).is_file()]
    entries.sort(key=lambda e: (e.get("prompt_index", 0), e.get("image_index", 0), e["file"]))
    target = out / MANIFEST
    tmp = out / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(strict_json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    return target


# -- the run ----------------------------------------------------------------------------------

def _state(device: str | None):
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Without CUDA, processes started by `accelerate launch`/torchrun only form a group on CPU
    # (gloo) when the state is told to use the CPU.
    cpu = (device is not None and str(device).startswith("cpu")) or parse_flag_from_env("ACCELERATE_USE_CPU") \
        or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def run_batch(prompts: str | os.PathLike, out: str | os.PathLike, *, method: str = "cfg", scale: float | None = None,
              params: dict[str, Any] | None = None, negative_prompt: str | None = None, per_prompt: int = 1,
              steps: int = 30, seed: int = 0, batch_size: int = 1, model: str | os.PathLike | None = None,
              sampler: str | None = None, height: int | None = None, width: int | None = None,
              eta: float | None = None, device: str | None = None, dtype: str = "float32",
              progress: bool = True) -> dict[str, Any]:
    """Generate ``per_prompt`` images for every prompt of ``prompts`` into ``out``, on the
    processes of the current ``accelerate`` launch (one process without one).

    Every argument is checked and every prompt line's method resolved before a model loads.
    ``device`` None is this process's accelerate device (``cuda:{local rank}``, or the CPU).
    Returns a summary: ``total`` images asked, ``existing`` (skipped, already written),
    ``written`` by this process, ``processes``, and ``manifest`` (the merged manifest's path).
    """
    params = dict(params or {})
    if scale is not None:
        params["scale"] = scale
    check_int("--per-prompt", per_prompt, 1, 1024)
    check_int("--batch-size", batch_size, 1, 1024)
    check_int("--seed", seed, 0, SEED_MAX)
    check_size("--height", height)
    check_size("--width", width)
    check_eta(eta)
    if sampler is not None and sampler not in SAMPLER_NAMES:
        raise ValueError(f"--sampler: must be one of {', '.join(SAMPLER_NAMES)}, got {sampler!r}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"--dtype: must be float32, float16 or bfloat16, got {dtype!r}")
    if device is not None:
        check_device(device)
    if model is not None and not Path(model).exists() and os.sep in str(model):
        raise ValueError(f"--model: no such directory {str(model)!r}")
    check_model_directory(None if model is None else str(model))
    check_steps(steps, None if model is None else str(model))
    command_guidance = resolve_guidance(method, **params)  # the command's own method, named as such
    scheduler = model_scheduler(None if model is None else str(model))  # read once for every line
    check_run_settings(command_guidance, None, steps=steps, sampler=sampler, eta=eta, scheduler=scheduler)
    specs = read_prompts(prompts, method, params, negative_prompt)
    for spec in specs:  # each line's own method, against the same scheduler
        try:
            check_run_settings(resolve_guidance(spec.guidance), None, steps=steps, sampler=sampler, eta=eta,
                               scheduler=scheduler)
        except ValueError as error:
            raise ValueError(f"prompts: {prompts}:{spec.line}: {error}") from None
    if is_class_conditional(model):  # prompts are class names or ids: text-only options are refused
        refuse_text_options(**{"--negative-prompt": negative_prompt, "--height": height, "--width": width})
        num_classes, names = checkpoint_classes(model)
        for spec in specs:
            where = f"prompts: {prompts}:{spec.line}"
            check_class_label(spec.prompt, num_classes, names, where)
            refuse_text_options(**{f"{where}: negative_prompt": spec.negative_prompt})
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {str(out)!r} exists and is not a directory")
    check_writable_directory("--out", out)
    units = _units(specs, per_prompt, seed)
    common = {"sampler": sampler or "auto", "steps": steps, "height": height, "width": width, "eta": eta,
              "model": _model_label(model), "dtype": dtype}

    state = _state(device)
    out.mkdir(parents=True, exist_ok=True)
    # Nothing is written to `out` before the barrier below, so every process sees the same files
    # and computes the same list of pending work (then split by position).
    _mark_done(units, out, common)
    pending = [unit for unit in units if not all(unit.done)]
    if state.is_main_process:
        for stale in out.glob(".*.tmp"):  # PNGs / merges cut short by a killed run
            stale.unlink(missing_ok=True)
    state.wait_for_everyone()

    total = len(specs) * per_prompt
    existing = total - sum(unit.done.count(False) for unit in pending)
    written = 0
    with state.split_between_processes(pending) as mine:
        todo = sum(unit.done.count(False) for unit in mine)
        if mine:
            written = _generate(mine, out, common, batch_size, device or str(state.device), state, todo, progress)
    state.wait_for_everyone()
    manifest = merge_manifest(out) if state.is_main_process else out / MANIFEST
    state.wait_for_everyone()
    return {"total": total, "existing": existing, "written": written, "processes": state.num_processes,
            "process_index": state.process_index, "manifest": str(manifest)}


def _generate(units: list[Unit], out: Path, common: dict[str, Any], batch_size: int, device: str, state,
              todo: int, progress: bool) -> int:
    import torch
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm

    from guidance_engine.samplers.loop import resolve_sampler

    from ..models import generate_from_prompts, load_pipeline

    diffusers_logging.disable_progress_bar()
    pipe = load_pipeline(_model_arg(common["model"]), device=device, dtype=common["dtype"])
    pipe.set_progress_bar_config(disable=True)
    shard = _ShardWriter(out / f"{SHARD_PREFIX}{state.process_index}.jsonl")
    bar = tqdm(total=todo, unit="img", disable=not (progress and state.is_main_process),
               desc=f"batch (process 0 of {state.num_processes})" if state.num_processes > 1 else "batch")
    written = 0

    def truncated(spec) -> list[str]:
        """What the text encoder cuts of this line's prompts (said in the manifest, once on stderr)."""
        if getattr(pipe, "tokenizer", None) is None:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)
            return pipe.truncated_prompts(prompt=spec.prompt, negative_prompt=spec.negative_prompt)

    cut = {unit.spec.index: truncated(unit.spec) for unit in units}  # tokenized once per line
    for unit in units:
        for message in cut[unit.spec.index]:
            print(f"guidance-engine: warning: prompts line {unit.spec.line}: {message}", file=sys.stderr)
    try:
        for batch in _batches(units, batch_size):
            first = batch[0]
            prompts = [u.spec.prompt for u in batch for _ in u.images]
            negatives = [u.spec.negative_prompt for u in batch for _ in u.images]
            seeds = [s for u in batch for s in u.seeds]
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            start = time.perf_counter()
            with warnings.catch_warnings():  # truncation is said per line, above and in the manifest
                warnings.simplefilter("ignore", PromptTruncatedWarning)
                result = generate_from_prompts(
                    pipe, prompts, negative_prompt=None if first.spec.negative_prompt is None else negatives,
                    guidance=resolve_guidance(first.guidance), sampler=common["sampler"] if
                    common["sampler"] != "auto" else None, num_inference_steps=common["steps"],
                    generator=generators, height=common["height"], width=common["width"], eta=common["eta"],
                    output_type="pil")
            seconds = (time.perf_counter() - start) / len(prompts)
            solver = resolve_sampler(None if common["sampler"] == "auto" else common["sampler"],
                                     resolve_guidance(first.guidance), pipe.scheduler)
            row = 0
            for unit in batch:
                for j, i in enumerate(unit.images):
                    image, nfe = result.images[row], result.nfe_per_image[row]
                    row += 1
                    if unit.done[j]:
                        continue  # the rest of a coupled group that was redone
                    name = image_name(unit.spec.index, i)
                    entry = {"file": name, "prompt_index": unit.spec.index, "image_index": i,
                             **_settings(unit, j, common), "guidance": result.guidance, "nfe": int(nfe),
                             "seconds": round(seconds, 4), "process_index": state.process_index,
                             "warnings": cut[unit.spec.index]}
                    if unit.coupled:  # rebuilding needs the whole group
                        entry["group_images"] = unit.images
                        entry["group_seeds"] = unit.seeds
                    text = cli_common.png_parameters(
                        unit.spec.prompt, unit.spec.negative_prompt, pipe=pipe, guidance=result.guidance,
                        sampler=solver, steps=common["steps"], seed=unit.seeds[j], size=image.size,
                        model=_model_arg(common["model"]))
                    cli_common.atomic_save_png(image, out / name, entry, text)  # the image, then its line
                    shard.write(entry)
                    unit.done[j] = True
                    written += 1
                    bar.update(1)
    finally:
        bar.close()
        shard.close()
    return written


def rebuild_from_manifest(line: str | dict[str, Any], model=None, device: str = "cpu"):
    """Regenerate the image a manifest line describes (a PIL image).

    ``model``: None is the line's model; a directory or hub id; or an already loaded guided
    pipeline (to rebuild many images without reloading). Pixels equal the file when the batch
    ran with ``--batch-size 1``; other batch sizes agree up to float rounding.
    """
    import torch

    from ..models import generate_from_prompts, load_pipeline

    entry = json.loads(line) if isinstance(line, str) else dict(line)
    missing = [key for key in ("prompt", "guidance", "steps", "seed") if key not in entry]
    if missing:
        raise ValueError(f"line: not a batch manifest line, missing {', '.join(missing)}")
    if model is None or isinstance(model, (str, os.PathLike)):
        label = str(model) if model is not None else entry.get("model", "default")
        pipe = load_pipeline(_model_arg(label), device=device, dtype=entry.get("dtype", "float32"))
    else:
        pipe = model
    pipe.set_progress_bar_config(disable=True)
    seeds = entry.get("group_seeds") or [entry["seed"]]
    row = entry["group_images"].index(entry["image_index"]) if entry.get("group_seeds") else 0
    negative = entry.get("negative_prompt")
    sampler = entry.get("sampler", "auto")
    result = generate_from_prompts(
        pipe, [entry["prompt"]] * len(seeds), negative_prompt=None if negative is None else [negative] * len(seeds),
        guidance=resolve_guidance(entry["guidance"]), sampler=None if sampler == "auto" else sampler,
        num_inference_steps=entry["steps"], generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        height=entry.get("height"), width=entry.get("width"), eta=entry.get("eta"), output_type="pil")
    return result.images[row]


# -- the command ------------------------------------------------------------------------------

def cmd_batch(args: argparse.Namespace) -> int:
    summary = run_batch(args.prompts, args.out, method=args.method, scale=args.scale, params=cli_common.parse_params(args.param),
                        negative_prompt=args.negative_prompt, per_prompt=args.per_prompt, steps=args.steps,
                        seed=args.seed, batch_size=args.batch_size, model=args.model, sampler=args.sampler,
                        height=args.height, width=args.width, eta=args.eta, device=args.device, dtype=args.dtype,
                        progress=not args.no_progress)
    if summary["process_index"] == 0:
        print(f"{summary['total']} images: {summary['existing']} already written, "
              f"{summary['total'] - summary['existing']} generated on {summary['processes']} process(es); "
              f"manifest {summary['manifest']}", file=sys.stdout)
    return 0


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``batch`` on the CLI's subparsers."""
    bat = subparsers.add_parser(
        "batch", help="generate images for a file of prompts, across processes (accelerate launch), resumable",
        description="Generate --per-prompt images for every prompt of a .txt (one a line) or .jsonl file "
                    "into --out, with a JSONL manifest; a rerun skips what is written. See docs/batch.md.")
    bat.add_argument("prompts", help="prompts file: .txt, one a line; or .jsonl, objects with \"prompt\" and "
                                     "optional \"negative_prompt\", \"seed\", \"method\", \"scale\", \"params\"")
    bat.add_argument("--out", required=True, help="output directory (PNGs, manifest.jsonl)")
    bat.add_argument("-n", "--negative-prompt", default=None, help="negative prompt of every line without its own")
    bat.add_argument("--method", default="cfg", help=f"guidance method: {', '.join(method_names())}")
    bat.add_argument("--scale", type=float, default=None, help="the method's scale (default: its paper's)")
    bat.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="another method parameter, repeatable (see 'guidance-engine methods')")
    bat.add_argument("--per-prompt", type=int, default=1, help="images per prompt")
    bat.add_argument("--steps", type=int, default=30, help="denoising steps, 1 to the scheduler's training steps")
    bat.add_argument("--seed", type=int, default=0,
                     help="base seed; image i of prompt p uses image_seed(seed, p, i) (docs/batch.md)")
    bat.add_argument("--batch-size", type=int, default=1, help="images per pipeline call on each process")
    bat.add_argument("--sampler", default=None, choices=SAMPLER_NAMES,
                     help="solver (default: the model's scheduler, or its mirror for CFG++)")
    bat.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1] (default: the sampler's own)")
    bat.add_argument("--height", type=int, default=None,
                     help="image height, a multiple of 8 in [8, 4096] (default: the model's, 32 for the shipped one)")
    bat.add_argument("--width", type=int, default=None, help="image width, as --height")
    bat.add_argument("--model", default=None, help="diffusers checkpoint directory (default: the shipped model)")
    bat.add_argument("--device", default=None,
                     help="default: this process's accelerate device (the GPU of its rank, or the CPU)")
    bat.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                     help="weights' precision")
    bat.add_argument("--no-progress", action="store_true", help="no progress bar")
    bat.set_defaults(func=cmd_batch)
    return bat
