"""Host reads per denoising step (each is a device sync on a GPU): the engine adds none to the
stock pipeline's on the path through the scheduler's step, and its own solvers read nothing per
step. Counted with a torch dispatch mode (``_local_scalar_dense`` is what ``float(t)``,
``int(t)``, ``bool(t)`` and ``t.item()`` run), as the difference between a 6-step and a 3-step run,
so that per-call reads (the initial noise check, the one end-of-run NaN check) cancel out."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import PROMPT, quiet, seeded

READS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.item"}


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in READS:
            self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def reads_per_step(pipe, **call) -> float:
    totals = []
    for steps in (3, 6):
        with HostReads() as reads:
            pipe(PROMPT, num_inference_steps=steps, generator=seeded(0), output_type="latent", **call)
        totals.append(sum(reads.count.values()))
    return (totals[1] - totals[0]) / 3


def _sd():
    from diffusers import StableDiffusionPipeline
    from guidance_engine.pipelines import GuidedStableDiffusionPipeline
    from guidance_engine.pipelines.toy.tiny_models import tiny_sd_components
    stock = quiet(StableDiffusionPipeline(**tiny_sd_components(0), requires_safety_checker=False))
    return stock, quiet(GuidedStableDiffusionPipeline.from_pipe(stock)), {}


def _flux():
    from diffusers import FluxPipeline
    from guidance_engine.pipelines import GuidedFluxPipeline
    from guidance_engine.pipelines.toy.tiny_models import tiny_flux_components
    stock = quiet(FluxPipeline(**tiny_flux_components(0)))
    return stock, quiet(GuidedFluxPipeline.from_pipe(stock)), {
        "height": 32, "width": 32, "max_sequence_length": 16, "negative_prompt": "blue", "true_cfg_scale": 4.0}


@pytest.mark.parametrize("build", [_sd, _flux], ids=["sd", "flux"])
def test_the_engine_adds_no_host_read_per_step_to_the_stock_pipeline(build) -> None:
    stock, guided, call = build()
    stock_reads = reads_per_step(stock, **call)
    assert reads_per_step(guided, **call) <= stock_reads
    assert reads_per_step(guided, sampler="euler", **call) == 0  # the core's own solver: none at all
    assert reads_per_step(guided, guidance="apg", **call) <= stock_reads  # a stateful method too


def _step_counts():
    """benchmarks/step_counts.py's counters (the benchmark and these bounds count alike)."""
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import step_counts
    return step_counts


def test_the_engine_adds_at_most_three_tensor_ops_per_step_to_the_stock_pipeline() -> None:
    """Beside the stock DDIM CFG loop's ops outside the UNet (40 per step: the scheduler's, CFG's
    three, the latents' concatenation and split), the engine's path through ``scheduler.step``
    adds the NaN/inf note (one sum) and its level views; its own DDIM solver runs fewer in all.
    Each op is a kernel launch on a GPU and microseconds of dispatch on a CPU."""
    ops_per_step = _step_counts().ops_per_step
    stock, guided, _ = _sd()
    stock_ops = ops_per_step(stock, 3)
    assert stock_ops > 20  # the count sees the scheduler's ops
    assert ops_per_step(guided, 3) <= stock_ops + 3
    assert ops_per_step(guided, 3, sampler="ddim") < stock_ops


def test_the_engine_adds_at_most_a_hundred_python_calls_per_step_to_the_stock_pipeline() -> None:
    """Python work per step, beside the network's: function calls (cProfile's count, builtins
    included, the UNet's forward answering at once) of a CFG step through ``scheduler.step``,
    engine against stock. The stock DDIM loop makes about 70; the engine, whose step goes through
    the method, the branch model and the row plan, about 140 (221 before session 12's cuts).
    After a real forward, whose code and data have evicted the caches, each call costs several
    times what it costs in a tight loop, so these are what the engine adds to a step of a small
    model (docs/benchmarks.md)."""
    calls_per_step = _step_counts().calls_per_step
    stock, guided, _ = _sd()
    stock_calls = calls_per_step(stock, 3)
    assert stock_calls > 30
    assert calls_per_step(guided, 3) <= stock_calls + 100
