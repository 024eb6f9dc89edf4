"""The performance benchmarks run end to end: benchmarks/gpu.py in its CPU smoke mode (and its
refusals), benchmarks/cli_start.py in a one-run, two-step check, benchmarks/overhead.py in a
two-repeat, two-step one, benchmarks/step_counts.py on DDIM. Each runs as a subprocess, as a
user runs it; the checks are on what it prints last (one line of JSON) and on the file it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def listing() -> list[str]:
    return sorted(p.name for p in RESULTS.iterdir()) if RESULTS.is_dir() else []


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_gpu_smoke_runs_end_to_end_and_writes_complete_results_outside_benchmarks_results(tmp_path) -> None:
    before = listing()
    done = run_script("benchmarks/gpu.py", "--smoke", "--results-dir", str(tmp_path), "--repeats", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = last_json(done.stdout)
    assert summary["benchmark"] == "gpu" and summary["smoke"] is True
    written = [p for p in tmp_path.iterdir()]
    assert [p.name for p in written] == [Path(summary["results"]).name]  # no temporary file left behind
    record = json.loads(written[0].read_text())
    assert listing() == before  # a smoke run never writes under benchmarks/results
    versions = record["versions"]
    assert versions["torch"] == torch.__version__ and versions["device"] == summary["device"]
    for key in ("diffusers", "transformers", "triton", "python", "cuda", "driver"):
        assert key in versions
    attention, pipelines = record["attention"]["rows"], record["pipelines"]["rows"]
    assert len(attention) == summary["attention_rows"] > 0 and len(pipelines) == summary["engine_rows"] > 0
    assert {r["dtype"] for r in attention} == {"float16", "bfloat16"}
    for row in attention:  # the kernel agrees with SDPA to a few units of the dtype's rounding
        assert len(row["triton_ms"]) == len(row["sdpa_ms"]) == record["attention"]["repeats"]
        assert 0 <= row["max_abs_diff"] <= 16 * torch.finfo(getattr(torch, row["dtype"])).eps
    assert {(r["method"], r["batch"]) for r in pipelines} == {(m, b) for m in ("cfg", "pag") for b in (1, 2)}
    for row in pipelines:  # the engine reproduces the stock pipelines' latents (bit for bit in the tests)
        assert len(row["stock_ms"]) == len(row["engine_ms"]) == record["pipelines"]["repeats"]
        assert row["latent_max_abs_diff"] <= 1e-5
        assert row["ratio"] > 0
    assert summary["engine_max_ratio"] == round(max(r["ratio"] for r in pipelines), 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_refuses_without_cuda_and_writes_nothing() -> None:
    before = listing()
    done = run_script("benchmarks/gpu.py")
    assert done.returncode == 2 and done.stdout == ""
    assert "no CUDA device" in done.stderr and "--smoke" in done.stderr
    assert listing() == before


def test_gpu_smoke_refuses_the_results_directory() -> None:
    done = run_script("benchmarks/gpu.py", "--smoke", "--results-dir", str(RESULTS / "smoke"))
    assert done.returncode == 2 and "--results-dir: smoke results never go under" in done.stderr
    assert not (RESULTS / "smoke").exists()


def test_cli_start_quick_run_reports_every_phase_and_the_target() -> None:
    done = run_script("benchmarks/cli_start.py", "--runs", "1", "--steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = last_json(done.stdout)
    assert summary["benchmark"] == "cli_start" and summary["runs"] == 1 and summary["steps"] == 2
    assert set(summary["phases_s"]) == {"import", "checks", "load", "sampling", "save"}
    assert all(v > 0 for v in summary["phases_s"].values())
    for key in ("generate_s", "help_s", "methods_s"):
        assert summary[key] > 0 and summary["times"][key.removesuffix("_s").replace("generate", "whole")]
    assert summary["target_met"] == (summary["generate_s"] < summary["target_s"])
    assert len(summary["load_average_before"]) == len(summary["load_average_after"]) == 3
    assert summary["omp_num_threads"] == "1"  # the caller's environment reaches the timed processes


def test_nag_benchmark_runs_on_the_distilled_model() -> None:
    """benchmarks/nag.py on the shipped distilled model (one seed, two steps): its rows, paired with
    the stock call, their NFE (one forward a step) and frequencies as shares."""
    done = run_script("benchmarks/nag.py", "--model", "distilled", "--cases", "size", "--seeds", "1", "--steps",
                      "2", "--repeats", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = last_json(done.stdout)
    assert summary["benchmark"] == "nag" and summary["distilled"] is True and summary["cases"] == "size"
    rows = summary["rows"]
    stock, nag, control = rows
    assert rows[nag]["vs"]["row"] == rows[control]["vs"]["row"] == stock and "vs" not in rows[stock]
    for row in rows.values():
        assert row["nfe_per_image"] == 2 and 0 <= row["negative_frequency"] <= 1 and 0 <= row["alignment"] <= 1
    assert len(summary["prompts"]) == 3 and all(len(case) == 3 for case in summary["prompts"])


def test_overhead_quick_run_pairs_every_path_and_holds_the_network_time_equal() -> None:
    """benchmarks/overhead.py on the shipped model (2 repeats, 2 steps): every engine path paired
    with stock, a whole-call and a held-equal ratio each with an interval around its median, and
    the UNet's forwards timed (the table's UNet column is below the whole call, above zero)."""
    done = run_script("benchmarks/overhead.py", "--models", "default", "--repeats", "2", "--steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = last_json(done.stdout)
    paths = {f"default/{s}/engine ({v})" for s in ("ddim", "euler", "dpmpp_2m") for v in ("scheduler.step", f"{s} solver")}
    assert summary["benchmark"] == "overhead" and summary["paths"] == 6
    assert set(summary["ratios"]) == set(summary["held_ratios"]) == paths
    for median, low, high in [*summary["ratios"].values(), *summary["held_ratios"].values()]:
        assert 0 < low <= median <= high
    assert 0 <= summary["held_paths_meeting_target"] <= 6
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| default")]
    assert len(rows) == 9
    for row in rows:
        whole, network = float(row[3]), float(row[4])
        assert 0 < network < whole


def test_step_counts_quick_run_counts_ops_and_calls_of_every_path() -> None:
    """benchmarks/step_counts.py (DDIM, 2- vs 4-step runs): stock and both engine paths counted;
    the counts are the machine-independent ones tests/test_host_syncs.py bounds."""
    done = run_script("benchmarks/step_counts.py", "--steps", "2", "--schedulers", "ddim")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = last_json(done.stdout)
    counts = summary["counts"]
    assert set(counts) == {"ddim/stock", "ddim/engine (scheduler.step)", "ddim/engine (ddim solver)"}
    stock_ops, stock_calls = counts["ddim/stock"]
    assert stock_ops > 20 and stock_calls > 30  # the scheduler's ops, the loop's calls
    assert summary["max_extra_ops"] <= 3 and summary["max_extra_calls"] <= 100
