"""The CLI's cold start on the shipped default model: whole-process wall time and where it goes.

Each run starts fresh processes (nothing is cached in a process between runs; the OS file cache
is warm after the first), in this order, repeated ``--runs`` times so that a change of machine
load hits every measurement alike:

1. whole: ``guidance-engine generate PROMPT -o <tmp>.png`` as a subprocess, wall time from spawn
   to exit (interpreter start, imports, checks, load, sampling, save, exit);
2. phases: one fresh interpreter that runs the same command in-process, ``cli.main(argv)``, with
   timers wrapped around the CLI's own calls (nothing in the CLI is edited or re-implemented):
   - import: ``guidance_engine.pipelines.apps.cli`` and what ``generate`` imports later (torch,
     the pipeline class of the shipped model, which brings diffusers and transformers, the
     sampler loop, Pillow's PNG writer), imported up front so the later phases time no first import;
   - checks: ``main`` up to the load (argument parsing, method and option checks, the model's configs);
   - load: ``cli_common.load_quietly`` (the pipeline from the shipped model, as the CLI loads it);
   - sampling: ``generate_from_prompts`` with the CLI's defaults (read off its parser: steps,
     method, sampler, size; shown in the output);
   - save: from the end of sampling to ``main``'s return (the PNG, its metadata, the messages);
3. ``guidance-engine --help`` and ``guidance-engine methods``, wall time per process.

Medians over the runs; the load average (``os.getloadavg``) before and after. The environment
is the caller's (``OMP_NUM_THREADS``, ``PYTHONDONTWRITEBYTECODE`` are recorded), unless
``--threads`` sets ``OMP_NUM_THREADS`` for the children. Prints a markdown table, then ONE line of JSON.

    python benchmarks/cli_start.py                # 5 runs, the CLI's defaults
    python benchmarks/cli_start.py --runs 1 --steps 2   # a quick check (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "a red circle on a blue background"
TARGET_S = 10.0  # issue 27: a default-model image end to end in under 10 s on 2 idle cores
PHASES = ("import", "checks", "load", "sampling", "save")
MARKER = "CLI_START_PHASES "

# Runs in a fresh interpreter: argv[1] is the CLI's argv as JSON. Prints MARKER + JSON last.
PHASE_SCRIPT = r"""
import importlib, json, sys, time
argv = json.loads(sys.argv[1])
marks = {"start": time.perf_counter()}
modules = {"start": len(sys.modules)}

def mark(name):
    marks[name] = time.perf_counter()
    modules[name] = len(sys.modules)

from guidance_engine.pipelines.apps import cli, cli_common
from guidance_engine.pipelines import models
import torch
models.pipeline_class_for(models.resolve_model(None))  # the shipped model's pipeline module, as load imports it
for name in ("diffusers.utils.logging", "guidance_engine.samplers.loop", "PIL.PngImagePlugin"):
    importlib.import_module(name)
mark("imported")

calls = {"load": 0, "sampling": 0}

def timed(name, before, after, fn):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        mark(before)
        try:
            return fn(*args, **kwargs)
        finally:
            mark(after)
    return wrapper

cli_common.load_quietly = timed("load", "load_start", "loaded", cli_common.load_quietly)
sample = timed("sampling", "sampling_start", "sampled", models.generate_from_prompts)
models.generate_from_prompts = sample
if hasattr(cli, "generate_from_prompts"):  # cli binds the name at import
    cli.generate_from_prompts = sample
args = cli.build_parser().parse_args(argv)
defaults = {k: getattr(args, k) for k in ("steps", "method", "scale", "sampler", "height", "width", "device", "dtype")}
mark("main_start")
code = cli.main(argv)
mark("end")
if calls != {"load": 1, "sampling": 1}:
    raise SystemExit(f"benchmarks/cli_start.py: the CLI no longer calls load_quietly / generate_from_prompts "
                     f"once each ({calls}); update the phase wrappers")
phases = {"import": marks["imported"] - marks["start"], "checks": marks["load_start"] - marks["main_start"],
          "load": marks["loaded"] - marks["load_start"], "sampling": marks["sampled"] - marks["sampling_start"],
          "save": marks["end"] - marks["sampled"]}
new_modules = {"import": modules["imported"] - modules["start"],
               "checks": modules["load_start"] - modules["main_start"],
               "load": modules["loaded"] - modules["load_start"],
               "sampling": modules["sampled"] - modules["sampling_start"], "save": modules["end"] - modules["sampled"]}
print("CLI_START_PHASES " + json.dumps({"code": code, "phases": phases, "new_modules": new_modules,
                                        "torch_threads": torch.get_num_threads(), "defaults": defaults}))
"""


def cli_command() -> list[str]:
    """The installed console script next to this interpreter, else the module run by this interpreter."""
    script = Path(sys.executable).with_name("guidance-engine")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "guidance_engine.pipelines.apps.cli"]


def run_process(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """(wall seconds from spawn to exit, stdout); RuntimeError with stderr's tail on a non-zero exit."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... exited {done.returncode}: {done.stderr[-2000:]}")
    return seconds, done.stdout


def measure(runs: int, extra: list[str], env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Every timing list (seconds) over ``runs`` interleaved rounds of fresh processes."""
    cli = cli_command()
    times: dict[str, list[float]] = {"whole": [], "help": [], "methods": [], **{p: [] for p in PHASES}}
    details: list[dict[str, Any]] = []
    for i in range(runs):
        whole, _ = run_process(cli + ["generate", PROMPT, "-o", str(workdir / f"whole-{i}.png"), *extra], env)
        times["whole"].append(whole)
        argv = ["generate", PROMPT, "-o", str(workdir / f"phases-{i}.png"), *extra]
        _, out = run_process([sys.executable, "-c", PHASE_SCRIPT, json.dumps(argv)], env)
        lines = [line for line in out.splitlines() if line.startswith(MARKER)]
        if not lines:
            raise RuntimeError(f"the phase process printed no {MARKER.strip()} line: {out[-2000:]}")
        detail = json.loads(lines[-1][len(MARKER):])
        if detail["code"] != 0:
            raise RuntimeError(f"the in-process generate returned {detail['code']}")
        details.append(detail)
        for phase in PHASES:
            times[phase].append(detail["phases"][phase])
        times["help"].append(run_process(cli + ["--help"], env)[0])
        times["methods"].append(run_process(cli + ["methods"], env)[0])
    return {"command": cli, "times": times, "details": details}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per measurement, 1 to 100")
    parser.add_argument("--steps", type=int, default=None,
                        help="pass --steps to generate (default: the CLI's own default; a small value for a quick check)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the children, 1 to 256 (default: the caller's environment)")
    args = parser.parse_args(argv)
    for name, low, high in (("runs", 1, 100), ("steps", 1, 1000), ("threads", 1, 256)):
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            parser.error(f"--{name}: must be in [{low}, {high}], got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = dict(os.environ)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    extra = [] if args.steps is None else ["--steps", str(args.steps)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cli_start_") as tmp:
        result = measure(args.runs, extra, env, Path(tmp))
    load_after = os.getloadavg()
    times = result["times"]
    medians = {key: statistics.median(values) for key, values in times.items()}
    first = result["details"][0]
    print(f"{args.runs} run(s) of fresh processes; `{' '.join(Path(c).name for c in result['command'])} generate "
          f"\"{PROMPT}\" -o <tmp>.png{' ' + ' '.join(extra) if extra else ''}`; CLI defaults {first['defaults']}; "
          f"torch threads {first['torch_threads']}, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}, "
          f"PYTHONDONTWRITEBYTECODE={env.get('PYTHONDONTWRITEBYTECODE', 'unset')}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| measurement | median s | min s | max s | modules first imported (run 1) |")
    print("|---|---:|---:|---:|---:|")
    for key in ("whole", *PHASES, "help", "methods"):
        label = {"whole": "generate, whole process", "help": "--help, whole process",
                 "methods": "methods, whole process"}.get(key, f"generate: {key}")
        count = first["new_modules"].get(key, "")
        print(f"| {label} | {medians[key]:.2f} | {min(times[key]):.2f} | {max(times[key]):.2f} | {count} |")
    residual = medians["whole"] - sum(medians[p] for p in PHASES)
    print(f"| generate: rest (interpreter start, exit; whole minus phases) | {residual:.2f} | | | |")
    summary = {"benchmark": "cli_start", "runs": args.runs, "steps": args.steps or first["defaults"]["steps"],
               "generate_s": round(medians["whole"], 3),
               "phases_s": {p: round(medians[p], 3) for p in PHASES}, "rest_s": round(residual, 3),
               "help_s": round(medians["help"], 3), "methods_s": round(medians["methods"], 3),
               "target_s": TARGET_S, "target_met": medians["whole"] < TARGET_S,
               "torch_threads": first["torch_threads"], "omp_num_threads": env.get("OMP_NUM_THREADS"),
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in load_after],
               "times": {key: [round(v, 3) for v in values] for key, values in times.items()}}
    print()
    from guidance_engine import strict_json  # only here: the parent process times nothing of its own

    print(strict_json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
