"""The guidance-engine command: generate images with any guidance method, compare methods in a
grid, score them (eval), transform or edit images, run batches on many processes, calibrate
LinearAG, serve a demo, list the methods and their parameters.

    guidance-engine generate "a red circle on a blue background" --method apg --scale 7.5 -o out.png
    guidance-engine img2img in.png "a blue square on a white background" --strength 0.6
    guidance-engine edit in.png --source-prompt "a red circle" --target-prompt "a blue circle"
    guidance-engine methods
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os

# transformers warns at import that torchvision is missing (it falls back to PIL, which is all a
# text-to-image pipeline needs); keep the command's output to what the user asked for.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from guidance_engine.guidance import describe_range  # noqa: E402
from guidance_engine.registry import method_class, method_names, resolve_guidance  # noqa: E402
from guidance_engine.samplers import SAMPLER_NAMES, SAMPLERS  # noqa: E402

from . import cli_common  # noqa: E402
from .batch import add_batch_parser  # noqa: E402
from .cli_checks import (check_device, check_eta, check_int, check_model_directory, check_model_options,  # noqa: E402
                         check_outputs, check_run_settings, check_seeds, check_size, check_steps)
from .cli_image import add_image_parsers  # noqa: E402
from .demo_cli import add_demo_parser  # noqa: E402
from ..distilled import DEFAULT_EMBEDDED_SCALE, EMBEDDED_SCALE_RANGE  # noqa: E402
from ..messages import PromptTruncatedWarning  # noqa: E402
from ..models import (DISTILLED_SHORTHAND, DIT_SHORTHAND, generate_from_prompts, is_class_conditional, is_single_file,  # noqa: E402
                      refuse_text_options)


def cmd_generate(args: argparse.Namespace) -> int:
    from ..models import is_video_model

    if is_video_model(args.model):  # a text-to-video checkpoint (Wan, LTX-Video, HunyuanVideo 1.5) writes clips
        from .video_io import cmd_generate_video
        return cmd_generate_video(args)
    if args.num_frames is not None:
        raise ValueError(f"--num-frames: only video models take it, got {args.num_frames} for an image model")
    args.output = args.output or "out.png"
    import torch

    params = cli_common.parse_params(args.param)
    if args.scale is not None:
        params["scale"] = args.scale
    embedded = check_guidance_scale(args.guidance_scale, args.model)
    if embedded is not None and args.method is None and "scale" not in params:
        params["scale"] = 1.0  # the stock call of a distilled model: the prompt's rows alone, one forward a step
    guidance = resolve_guidance(args.method or "cfg", **params)  # validates before the model loads
    check_int("--num-images", args.num_images, 1, 1024)
    check_seeds("--seed", args.seed, args.num_images)
    check_size("--height", args.height)
    check_size("--width", args.width)
    check_eta(args.eta)
    check_device(args.device)
    paths = cli_common.output_paths(Path(args.output), args.num_images)
    check_outputs("-o/--output", paths, args.overwrite)
    if not is_single_file(args.model):  # a directory's step bound is in its JSON: no model stack yet
        check_model_directory(args.model)
        check_steps(args.steps, args.model)
    options, scheduler = check_model_options(args)  # reads the model's configs (through diffusers)
    check_steps(args.steps, args.model, scheduler)
    # last: the checks that read the model's scheduler (its config, through diffusers)
    settings = dict(steps=args.steps, sampler=args.sampler, eta=args.eta, karras=options.karras,
                    timesteps=options.timesteps)
    check_run_settings(guidance, args.model, scheduler=scheduler, **settings)
    if is_class_conditional(args.model):  # the prompt is a class: refuse text-only options before loading
        refuse_text_options(**{"--negative-prompt": args.negative_prompt, "--height": args.height,
                                "--width": args.width})
    pipe = cli_common.load_quietly(args.model, args.device, args.dtype, options)
    if scheduler is None:  # its configs came with the weights: check against the loaded scheduler
        check_run_settings(guidance, None, scheduler=pipe.scheduler, **settings)
    if args.attention != "sdpa":
        in_effect = pipe.set_attention(args.attention)
        if in_effect != args.attention:
            print(f"attention: {args.attention} is not available here, using {in_effect}", file=sys.stderr)
    cut = cli_common.warn_truncated(pipe, prompt=args.prompt, negative_prompt=args.negative_prompt) \
        if not is_class_conditional(args.model) else []
    generators = [torch.Generator(device=args.device).manual_seed(args.seed + i) for i in range(args.num_images)]
    timesteps = None if options.timesteps is None else list(options.timesteps)
    start = time.perf_counter()
    out = generate_from_prompts(pipe, args.prompt, negative_prompt=args.negative_prompt, height=args.height,
                                width=args.width, num_images_per_prompt=args.num_images, num_inference_steps=args.steps,
                                guidance=guidance, sampler=args.sampler, generator=generators, eta=args.eta,
                                **({"timesteps": timesteps} if timesteps is not None else {}),
                                **({"guidance_scale": embedded} if embedded is not None else {}))
    seconds = time.perf_counter() - start
    from guidance_engine.samplers.loop import resolve_sampler  # after the checks: it imports diffusers

    solver = resolve_sampler(args.sampler, guidance, pipe.scheduler)
    for i, (image, path) in enumerate(zip(out.images, paths)):
        meta = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "guidance": guidance.to_dict(),
                "sampler": args.sampler or "auto", "steps": args.steps, "seed": args.seed + i,
                "model": str(args.model or "default"), **options.metadata(), "nfe": out.nfe, "warnings": cut,
                **({"guidance_scale": embedded} if embedded is not None else {})}
        text = cli_common.png_parameters(args.prompt, args.negative_prompt, pipe=pipe, guidance=guidance.to_dict(),
                                         sampler=solver, steps=args.steps, seed=args.seed + i, size=image.size,
                                         model=args.model, options=options, embedded_scale=embedded)
        cli_common.atomic_save_png(image, path, meta, text)
        print(f"wrote {path}")
    embedded_note = f" on the embedded guidance scale {embedded:g}" if embedded is not None else ""
    print(f"method {guidance.name}{embedded_note}, {out.nfe:g} network evaluations per image, {seconds:.2f} s")
    return 0


def check_guidance_scale(value: float | None, model: str | None) -> float | None:
    """The embedded guidance scale of a run on a guidance-distilled model (``value``, or stock's 7.5),
    range-checked; None for any other model, which refuses ``--guidance-scale``. JSON reads only."""
    from ..models import is_distilled_model

    if not is_distilled_model(model):
        if value is not None:
            raise ValueError(f"--guidance-scale: only guidance-distilled models (a UNet with time_cond_proj_dim, "
                             f"e.g. --model distilled) take it, got {value!r} for {model or 'the default model'}; "
                             "--scale sets a method's scale")
        return None
    low, high = EMBEDDED_SCALE_RANGE
    scale = DEFAULT_EMBEDDED_SCALE if value is None else value
    if not math.isfinite(scale) or not low <= scale <= high:
        raise ValueError(f"--guidance-scale: the embedded guidance scale must be in [{low:g}, {high:g}], got {value!r}")
    return scale


def parse_methods(text: str) -> list[dict[str, Any]]:
    """``cfg,apg:scale=10,cfgpp:scale=0.6`` -> method dicts (each validated by the registry)."""
    methods = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rest = item.partition(":")
        params = cli_common.parse_params([kv for kv in rest.split(";") if kv]) if rest else {}
        resolve_guidance(name, **params)  # validate before any model loads
        methods.append({"name": name, **params})
    if not methods:
        raise ValueError(f"--methods: expected e.g. 'cfg,apg:scale=10', got {text!r}")
    return methods


def cmd_eval(args: argparse.Namespace) -> int:
    from ..toy.evaluation import DEFAULT_PROMPTS, evaluate, format_table, plot_metrics

    methods = parse_methods(args.methods)
    check_int("--seeds", args.seeds, 1, 100000)
    check_device(args.device)
    options, scheduler = check_model_options(args)
    check_steps(args.steps, args.model, scheduler)
    if args.plot:
        check_outputs("--plot", [Path(args.plot)], args.overwrite)
    if is_class_conditional(args.model):
        raise ValueError(f"--model: eval scores text-to-image models on the evaluation prompts, {args.model!r} is "
                         "class-conditional; measure it with benchmarks/gfcg.py (per-class accuracy, FD, paired "
                         "comparisons at equal NFEs)")
    pipe = cli_common.load_quietly(args.model, args.device, options=options)
    pipe.set_progress_bar_config(disable=True)
    rows = evaluate(pipe, methods, prompts=DEFAULT_PROMPTS, seeds=range(args.seeds), steps=args.steps,
                    sampler=args.sampler)
    print(format_table(rows))
    if args.plot:
        print(f"wrote {plot_metrics(rows, args.plot)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..toy.evaluation import compare_grid

    methods = parse_methods(args.methods)
    check_int("--seeds", args.seeds, 1, 1024)
    check_seeds("--seed", args.seed, args.seeds)
    check_device(args.device)
    options, scheduler = check_model_options(args)
    check_steps(args.steps, args.model, scheduler)
    check_outputs("-o/--output", [Path(args.output)], args.overwrite)
    pipe = cli_common.load_quietly(args.model, args.device, options=options)
    pipe.set_progress_bar_config(disable=True)
    if not is_class_conditional(args.model):
        cli_common.warn_truncated(pipe, prompt=args.prompt)
    path = compare_grid(pipe, args.prompt, methods, range(args.seed, args.seed + args.seeds), args.output,
                        steps=args.steps, progress=True)
    print(f"wrote {path}")
    return 0


#: Column widths of the ``methods`` listing (parameter, default, accepted values); the meaning
#: wraps in what is left of :data:`LISTING_WIDTH`.
_COLUMNS = (18, 12, 24)
LISTING_WIDTH = 100


def _listing_row(cells: Sequence[str], meaning: str) -> list[str]:
    """One parameter as lines of at most LISTING_WIDTH columns: a cell wider than its column
    pushes the meaning to the next line (never cut); the meaning wraps under its column."""
    import textwrap

    line = "    "
    for cell, width in zip(cells[:-1], _COLUMNS):
        line += f"{cell:<{width}} "
    last_column = len(line)
    # the last cell (the accepted values) wraps under its own column when wider than the page
    last = textwrap.wrap(cells[-1], LISTING_WIDTH - last_column) or [""]
    line += f"{last[0]:<{_COLUMNS[len(cells) - 1]}} "
    overflow = [" " * last_column + text for text in last[1:]]
    indent = 4 + sum(width + 1 for width in _COLUMNS)
    wrapped = textwrap.wrap(meaning, LISTING_WIDTH - indent) or [""]
    if len(line) > indent or overflow:  # a cell overflowed its column
        return [line.rstrip(), *overflow, *(" " * indent + text for text in wrapped)]
    return [line + wrapped[0], *(" " * indent + text for text in wrapped[1:])]


def methods_listing() -> str:
    """Every method: its summary and paper (wrapped), then a table of its parameters."""
    import textwrap

    lines: list[str] = ["Set a parameter with --param NAME=VALUE (generate, img2img, edit, batch), as NAME=VALUE after",
                        "'method:' in --methods (compare, eval), or as a key of the method dict (Python).", ""]
    for name in method_names():
        cls = method_class(name)
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        summary = " ".join(doc.split()).replace("``", "")
        lines += textwrap.wrap(f"{name}: {summary}", LISTING_WIDTH, subsequent_indent="    ")
        lines += textwrap.wrap(f"paper: {cls.paper}", LISTING_WIDTH, initial_indent="    ", subsequent_indent="      ")
        lines += _listing_row(("parameter", "default", "accepted"), "meaning")
        for f in cls.parameters():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if hasattr(default, "to_dict"):
                default = default.name  # a nested method: give its name (or a dict in Python)
            accepted = describe_range(f.metadata) if "low" in f.metadata or "choices" in f.metadata \
                else "see meaning"
            lines += _listing_row((f.name, repr(default), accepted), f.metadata.get("doc", ""))
        lines.append("")
    samplers = ", ".join(f"{name} ({SAMPLERS[name].description})" if name in SAMPLERS else
                         f"{name} (the model's diffusers scheduler)" for name in SAMPLER_NAMES)
    lines += textwrap.wrap(f"samplers: {samplers}", LISTING_WIDTH, subsequent_indent="    ")
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    print(methods_listing())
    return 0


def cmd_calibrate_linear_ag(args: argparse.Namespace) -> int:
    from ..toy.calibration import calibrate_linear_ag
    from ..models import load_pipeline

    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()] \
        if args.prompts else None
    if prompts is None:
        from ..toy.shapes import make_dataset
        prompts = list(make_dataset(args.num_prompts, seed=args.seed)[1])
    prompts = prompts[:args.num_prompts]
    pipe = load_pipeline(args.model, device=args.device, dtype="float32")
    out = args.out or (args.model if args.model else None)
    if out is None:
        raise ValueError("--out: required with the default model (the package directory is not the place)")
    meta = calibrate_linear_ag(pipe, prompts, out, steps=args.steps, scale=args.scale, sampler=args.sampler,
                               window=args.window, period=args.period, seed=args.seed)
    print(f"fitted {len(meta['predicted_steps'])} predicted steps on {meta['trajectories']} trajectories "
          f"in {meta['seconds']:.1f} s; wrote {out}/linear_ag.safetensors and linear_ag.json")
    return 0


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; an option's default appended to its help unless it is None,
    False or already said."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unsaid = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS
        if unsaid or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guidance-engine", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate images from a prompt (or a class, for a class-conditional model)")
    gen.add_argument("prompt", help="the prompt; for a class-conditional (DiT) model a class name or id, "
                     "e.g. 'red circle' or 0")
    gen.add_argument("-n", "--negative-prompt", default=None,
                     help="what the unconditional branch sees instead of the empty prompt")
    gen.add_argument("--method", default=None, help=f"guidance method: {', '.join(method_names())} (default: cfg; "
                     "on a guidance-distilled model cfg at scale 1, the stock call: its guidance is embedded)")
    gen.add_argument("--scale", type=float, default=None, help="the method's scale (default: its paper's)")
    gen.add_argument("--guidance-scale", type=float, default=None,
                     help=f"guidance-distilled models (--model {DISTILLED_SHORTHAND}): the guidance scale the UNet "
                     f"embeds, in [0, 100] (default {DEFAULT_EMBEDDED_SCALE:g}, stock's); a method runs on top at its "
                     "own --scale (e.g. --method nag: one forward per step, and the negative prompt acts)")
    gen.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="another method parameter, repeatable (see 'guidance-engine methods')")
    gen.add_argument("--sampler", default=None, choices=SAMPLER_NAMES,
                     help="solver (default: the model's scheduler, or its mirror for CFG++)")
    gen.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1] (default: the sampler's own)")
    gen.add_argument("--steps", type=int, default=30, help="denoising steps, 1 to the scheduler's training steps")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    gen.add_argument("--num-images", type=int, default=1, help="images to generate, 1 to 1024")
    gen.add_argument("--height", type=int, default=None,
                     help="image height, a multiple of 8 in [8, 4096] (default: the model's, 32 for the shipped one)")
    gen.add_argument("--width", type=int, default=None, help="image width, as --height")
    cli_common.add_model_options(gen, ays=True)
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    gen.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                     help="weights' precision")
    gen.add_argument("--attention", default="sdpa", choices=("sdpa", "xformers", "triton"),
                     help="attention processor (triton: the project's kernel; falls back to sdpa where it cannot run)")
    gen.add_argument("-o", "--output", default=None,
                     help="file to write: a PNG (default out.png; several images: out-0.png, ...); for a video "
                     "model (--model video, a Wan, LTX-Video or HunyuanVideo 1.5 directory) a .gif, .webp or .mp4 "
                     "clip (default out.gif) and its settings in <clip>.json")
    gen.add_argument("--num-frames", type=int, default=None,
                     help="video models: frames per clip, t k + 1 with t the VAE's temporal factor (Wan, "
                     "HunyuanVideo 1.5: 4; LTX-Video: 8) (default: the stock pipeline's, 9 for the shipped model)")
    gen.add_argument("--fps", type=int, default=10, help="video models: frames per second of the clip, 1 to 100")
    gen.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    gen.set_defaults(func=cmd_generate)

    cal = sub.add_parser("calibrate-linear-ag", help="record CFG trajectories and fit LinearAG's coefficients")
    cal.add_argument("--prompts", default=None, help="text file, one prompt a line (default: data-set captions)")
    cal.add_argument("--num-prompts", type=int, default=200, help="prompts to record trajectories of")
    cal.add_argument("--steps", type=int, default=20, help="steps of the recorded CFG runs")
    cal.add_argument("--scale", type=float, default=7.5, help="CFG scale of the recorded runs")
    cal.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, help="solver of the recorded runs")
    cal.add_argument("--window", type=float, default=0.5, help="fraction of the run with predicted steps")
    cal.add_argument("--period", type=int, default=0, help="every period-th step stays real (0: only the first)")
    cal.add_argument("--seed", type=int, default=0, help="seed of the data-set captions and of the runs")
    cal.add_argument("--model", default=None, help="diffusers checkpoint directory (default: the shipped model)")
    cal.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    cal.add_argument("--out", default=None, help="directory for the coefficients (default: the model's)")
    cal.set_defaults(func=cmd_calibrate_linear_ag)

    add_batch_parser(sub)
    add_demo_parser(sub)

    ev = sub.add_parser("eval", help="metrics table (alignment, fidelity, saturation, ...) for methods",
                        description="Score methods on the shipped evaluation prompts with the shipped attribute "
                        "classifier: alignment (prompt attributes recognised), fidelity (Frechet distance to "
                        "the training images), saturation, NFEs and time. Text-to-image models only.")
    ev.add_argument("--methods", default="cfg,cfgpp,apg",
                    help="comma-separated methods, parameters after ':' separated by ';', "
                    "e.g. 'cfg,apg:scale=10;momentum=0,cfgpp:scale=0.6'")
    ev.add_argument("--seeds", type=int, default=6, help="seeds per prompt, 1 to 100000")
    ev.add_argument("--steps", type=int, default=20, help="denoising steps")
    ev.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, help="solver (default: as for generate)")
    ev.add_argument("--plot", default=None, help="write a PNG of the metrics here")
    cli_common.add_model_options(ev, ays=False)
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --plot file (default: refuse)")
    ev.set_defaults(func=cmd_eval)

    cmp = sub.add_parser("compare", help="labelled grid: one row per method, same seed per column")
    cmp.add_argument("prompt", help="the prompt of every image")
    cmp.add_argument("--methods", default="cfg:scale=1,cfg,cfgpp,apg",
                     help="one grid row per method, as for eval: 'cfg,apg:scale=10;momentum=0'")
    cmp.add_argument("--seeds", type=int, default=4, help="columns: seeds per method, 1 to 1024")
    cmp.add_argument("--seed", type=int, default=0, help="seed of the first column; column i uses seed + i")
    cmp.add_argument("--steps", type=int, default=20, help="denoising steps")
    cli_common.add_model_options(cmp, ays=False, model_help=f"as for generate ('{DIT_SHORTHAND}': the "
                                 "class-conditional model; the prompt is then a class name)")
    cmp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    cmp.add_argument("-o", "--output", default="compare.png", help="PNG file of the grid")
    cmp.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: refuse)")
    cmp.set_defaults(func=cmd_compare)

    add_image_parsers(sub)
    methods = sub.add_parser("methods", help="list guidance methods, their parameters and ranges")
    methods.set_defaults(func=cmd_methods)
    for subparser in sub.choices.values():  # the defaults in every command's --help
        subparser.formatter_class = HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PromptTruncatedWarning)  # said once, in warn_truncated's words
            return args.func(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"guidance-engine: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `guidance-engine methods | head`: the reader stopped early
        sys.stderr.close()
        return 0


def run() -> None:
    """The console script: :func:`main`, then an exit that skips the interpreter's teardown.

    After a command the process holds torch, diffusers and transformers; tearing their modules and
    objects down at exit took about 2 s of a default-model ``generate`` (benchmarks/cli_start.py,
    docs/benchmarks.md), longer than the sampling. Every output is already complete (written to a
    temporary name and renamed), so the exit runs the atexit handlers as a normal exit would
    (logging's flush and close among them), flushes the standard streams and leaves without the
    module teardown.
    """
    import atexit

    code = main()
    atexit._run_exitfuncs()  # what a normal exit runs first (CPython's own hook for it)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or a stream closed by main
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
