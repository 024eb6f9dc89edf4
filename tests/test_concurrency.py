"""One pipeline, many threads: every call equals the same call made alone.

Row alterations (PAG, SEG, SLG, SAG, TSG) are per-forward row plans held in a context variable,
read by dispatchers installed once (pipelines/row_plan.py), and prompt encoding takes turns on
the tokenizer; so calls sharing a pipeline never see each other's alterations."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

#: (guidance, sampler): every kind of row alteration, a per-sample switch (AG), particles (FKC),
#: a multistep solver.
METHODS = [("pag", None), ("seg", None), ("slg", None), ("tsg", None), ("sag", None), ("apg", None), ("ag", None),
           ({"name": "fkc", "particles": 2}, "euler_ancestral"), ("cfg", "dpmpp_2m")]
#: prompts of different token lengths (the stock encoder pads, then tokenizes again for its warning)
PROMPTS = ["a red circle", "two small blue squares on a yellow background, top left",
           "a green triangle on a white background", "a large yellow square on a black background, center"]
CALLS = [(method, sampler, prompt, seed) for seed, ((method, sampler), prompt)
         in enumerate(itertools.islice(itertools.cycle(itertools.product(METHODS, PROMPTS)), 200))]


@pytest.fixture(scope="module")
def pipe():
    from guidance_engine.pipelines.models import load_pipeline

    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, method, sampler, prompt, seed) -> torch.Tensor:
    return pipe(prompt, guidance=method, sampler=sampler, num_inference_steps=3,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


def test_four_threads_on_one_pipeline_equal_the_serial_calls(pipe) -> None:
    serial = [_call(pipe, *call) for call in CALLS]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda call: _call(pipe, *call), CALLS))
    differing = [(call[0], call[2], float((a - b).abs().max())) for call, a, b in zip(CALLS, serial, threaded)
                 if not torch.equal(a, b)]
    assert not differing, f"{len(differing)} of {len(CALLS)} calls differ: {differing[:5]}"


def test_a_plain_call_beside_a_perturbed_one_sees_no_alteration(pipe) -> None:
    """While PAG runs in another thread, a CFG call on the same pipeline computes what it does
    alone (the dispatchers only act on the plan of their own context)."""
    alone = _call(pipe, "cfg", None, PROMPTS[0], 7)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_call, pipe, "pag" if i % 2 else "cfg", None, PROMPTS[0], 7) for i in range(8)]
        results = [future.result() for future in futures]
    assert all(torch.equal(result, alone) for result in results[0::2])
