"""``torch.compile(pipe.unet)`` under the engine (CPU, dynamo with the eager backend: what is
traced and where it breaks, without a compiler toolchain): CFG compiles into one graph with no
graph break and gives the uncompiled images bit for bit; PAG's row-aware processors take the row
plan as a forward argument, so PAG too compiles into one graph with no break and the same images,
and CFG on a UNet that PAG has run on stays unbroken (documented in docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPT, seeded

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

CALL = dict(num_inference_steps=2, output_type="latent")


def _compiled_run(pipe, guidance):
    plain = pipe.unet
    dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(plain, backend="eager")
    try:
        images = pipe(PROMPT, guidance=guidance, generator=seeded(0), **CALL).images
    finally:
        pipe.unet = plain
        reasons = dict(counters["graph_break"])
        graphs = counters["stats"]["unique_graphs"]
        dynamo.reset()
    return images, reasons, graphs


def test_cfg_compiles_into_one_graph_and_equals_the_uncompiled_run(sd_pair) -> None:
    _, guided = sd_pair
    want = guided(PROMPT, guidance="cfg", generator=seeded(0), **CALL).images
    got, reasons, graphs = _compiled_run(guided, "cfg")
    assert torch.equal(got, want)
    assert not reasons and graphs == 1  # the same graph every step: no break, no recompile


def test_pag_compiles_into_one_graph_and_equals_the_uncompiled_run(sd_pair) -> None:
    _, guided = sd_pair
    want = guided(PROMPT, guidance="pag", generator=seeded(0), **CALL).images
    got, reasons, graphs = _compiled_run(guided, "pag")
    assert torch.equal(got, want)
    assert not reasons and graphs == 1  # the plan is an argument: traced, the same graph every step
    cfg_want = guided(PROMPT, guidance="cfg", generator=seeded(0), **CALL).images
    cfg_got, reasons, graphs = _compiled_run(guided, "cfg")  # its dispatchers installed, no plan
    assert torch.equal(cfg_got, cfg_want)
    assert not reasons and graphs == 1
