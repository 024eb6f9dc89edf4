"""``torch.compile(pipe.unet)`` and ``(pipe.transformer)`` under the engine (CPU, dynamo with the
eager backend: what is traced and where it breaks, without a compiler toolchain): CFG compiles
into one graph with no graph break and gives the uncompiled images bit for bit; PAG's row-aware
processors take the row plan as a forward argument, so PAG too compiles into one graph with no
break and the same images, and CFG on a UNet that PAG has run on stays unbroken; TSG's plan and
noise reach the time embedding as arguments, so it too compiles without a break, as TPG, whose
permutations are drawn before the forward; transformers
that hand no attention kwargs on (Z-Image, the video families) read the plan from a per-thread
slot that dynamo traces (documented in docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPT, seeded

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

CALL = dict(num_inference_steps=2, output_type="latent")


def _compiled(pipe, network: str, run):
    """``run()`` with ``pipe.<network>`` compiled (dynamo, eager backend), the network put back
    after: (its images, the graph breaks by reason, the number of graphs)."""
    plain = getattr(pipe, network)
    dynamo.reset()
    counters.clear()
    setattr(pipe, network, torch.compile(plain, backend="eager"))
    try:
        images = run()
    finally:
        setattr(pipe, network, plain)
        reasons = dict(counters["graph_break"])
        graphs = counters["stats"]["unique_graphs"]
        dynamo.reset()
    return images, reasons, graphs


def _assert_compiles_unbroken(pipe, network: str, run) -> None:
    """``run(steps)`` (images of a ``steps``-step call): the compiled 2-step run equals the
    uncompiled one bit for bit with no graph break, and a 4-step run compiles no more graphs."""
    want = run(2)
    got, reasons, graphs = _compiled(pipe, network, lambda: run(2))
    assert torch.equal(got, want)
    assert not reasons
    _, reasons, longer = _compiled(pipe, network, lambda: run(4))
    assert not reasons and longer == graphs


def _compiled_run(pipe, guidance):
    return _compiled(pipe, "unet", lambda: pipe(PROMPT, guidance=guidance, generator=seeded(0), **CALL).images)


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



@pytest.mark.parametrize("method", ["seg", "slg", "sag", "nag", "tpg"])
def test_the_other_row_plan_methods_compile_on_the_unet_without_a_break(sd_pair, method) -> None:
    """SEG, SLG, SAG, NAG and TPG on the UNet: the plan rides in ``cross_attention_kwargs`` as PAG's,
    so no graph break and the uncompiled images bit for bit; a longer run compiles no more graphs
    (SAG: a second for its probe's evaluation; TPG: its permutations drawn before the forward)."""
    _, guided = sd_pair
    spec = {"name": method} if method in ("sag", "nag", "tpg") else {"name": method, "start": 0.0, "stop": 1.0}
    _assert_compiles_unbroken(guided, "unet", lambda steps: guided(
        PROMPT, guidance=spec, generator=seeded(0), num_inference_steps=steps, output_type="latent").images)

def test_tsg_takes_its_plan_and_noise_as_arguments_under_compile(sd_pair) -> None:
    """TSG's plan reaches the UNet's time-embedding MLP as its ``timestep_cond`` argument, with the
    noise drawn and the strength made a tensor before the forward: no graph break (before: one per
    TSG step, the context-variable lookup), the uncompiled latents bit for bit, and one graph for
    every step that perturbs (a new strength each step is an input, not a recompile)."""
    _, guided = sd_pair
    for spec, layouts in (({"name": "tsg", "t_min": 0.0}, 1), ({"name": "tsg"}, 2)):  # default: 2 of 4 steps in
        want = guided(PROMPT, guidance=spec, generator=seeded(0), num_inference_steps=4, output_type="latent").images
        got, reasons, graphs = _compiled(guided, "unet", lambda: guided(
            PROMPT, guidance=spec, generator=seeded(0), num_inference_steps=4, output_type="latent").images)
        assert torch.equal(got, want)
        assert not reasons and graphs == layouts  # 3 rows a step inside the window, 2 outside


# --------------------------------------------------------------------------- flow transformers
def _flow_pipe(family: str):
    from conftest import quiet
    from guidance_engine.pipelines import (GuidedChromaPipeline, GuidedFlux2KleinPipeline, GuidedFluxPipeline,
                                           GuidedQwenImagePipeline, GuidedStableDiffusion3Pipeline)
    from guidance_engine.pipelines.toy.tiny_chroma import tiny_chroma_components
    from guidance_engine.pipelines.toy.tiny_flux2 import tiny_flux2_klein_components
    from guidance_engine.pipelines.toy.tiny_models import tiny_flux_components, tiny_sd3_components
    from guidance_engine.pipelines.toy.tiny_qwen_image import tiny_qwen_image_components
    build, text = {
        "sd3": (lambda: GuidedStableDiffusion3Pipeline(**tiny_sd3_components(0)), {}),
        "flux": (lambda: GuidedFluxPipeline(**tiny_flux_components(0)), {"max_sequence_length": 16}),
        "chroma": (lambda: GuidedChromaPipeline(**tiny_chroma_components(0)), {"max_sequence_length": 16}),
        "flux2": (lambda: GuidedFlux2KleinPipeline(**tiny_flux2_klein_components(0), is_distilled=False),
                  {"max_sequence_length": 32}),
        "qwen": (lambda: GuidedQwenImagePipeline(**tiny_qwen_image_components(0)), {"max_sequence_length": 16}),
    }[family]
    return quiet(build()), {"height": 32, "width": 32, "output_type": "latent", **text}


def _flow_run(pipe, call, guidance, steps: int):
    with torch.no_grad():
        return pipe(prompt=PROMPT, guidance=guidance, generator=seeded(0), num_inference_steps=steps, **call).images


@pytest.mark.parametrize("family", ["sd3", "flux", "chroma", "flux2", "qwen"])
@pytest.mark.parametrize("method", ["pag", "seg", "slg", "nag"])
def test_flow_transformers_take_the_row_plan_as_an_argument_under_compile(family, method) -> None:
    """SD3, Flux, Chroma, Flux.2 and Qwen-Image hand ``joint_attention_kwargs`` to every block and
    processor, so the plan travels there (NAG's negative text streams in it): PAG, SEG, SLG and
    NAG compile with no graph break (before: PAG 5-8, NAG 6-9 per run, each a context-variable
    lookup) and give the uncompiled latents bit for bit. The
    graphs are one per forward layout of the family (the branches that stock runs as separate
    forwards, prompts of other lengths), not one per step: a longer run compiles no more."""
    pipe, call = _flow_pipe(family)
    spec = {"name": method, "layers": [0], "start": 0.0, "stop": 1.0}
    _assert_compiles_unbroken(pipe, "transformer", lambda steps: _flow_run(pipe, call, spec, steps))


@pytest.mark.parametrize("family", ["flux", "chroma", "flux2", "qwen"])
def test_tsg_on_flow_transformers_draws_its_noise_before_the_forward_under_compile(family) -> None:
    """TSG's noise is drawn before the forward at the shape of one sample's embedding (Chroma's
    approximator: one row per modulation index) and its plan read from the thread's slot, which
    dynamo traces: no graph break (before: Flux 3 per run, the generator and the context variable
    inside the forward), latents equal, no more graphs for a longer run."""
    pipe, call = _flow_pipe(family)
    spec = {"name": "tsg", "t_min": 0.0}
    _assert_compiles_unbroken(pipe, "transformer", lambda steps: _flow_run(pipe, call, spec, steps))


# --------------------------------------------------------------------------- no attention kwargs
def _slot_family_pipe(family: str):
    """Z-Image and the video families, whose transformers hand no attention kwargs on to their
    blocks: the dispatchers read the plan from the thread's slot (``row_plan.ThreadSlot``)."""
    from conftest import quiet
    if family == "zimage":
        from guidance_engine.pipelines.toy.tiny_z_image import tiny_z_image_components
        from guidance_engine.pipelines.z_image import GuidedZImagePipeline
        return quiet(GuidedZImagePipeline(**tiny_z_image_components(0))), {"max_sequence_length": 64}
    if family == "wan":
        from guidance_engine.pipelines.toy.tiny_wan import tiny_wan_components
        from guidance_engine.pipelines.wan import GuidedWanPipeline
        return quiet(GuidedWanPipeline(**tiny_wan_components(0))), {"num_frames": 5, "max_sequence_length": 16}
    if family == "ltx":
        from guidance_engine.pipelines.ltx import GuidedLTXPipeline
        from guidance_engine.pipelines.toy.tiny_ltx import tiny_ltx_components
        return quiet(GuidedLTXPipeline(**tiny_ltx_components(0))), {"num_frames": 9, "max_sequence_length": 16}
    from guidance_engine.pipelines.hunyuan_video15 import GuidedHunyuanVideo15Pipeline
    from guidance_engine.pipelines.toy.tiny_hunyuan_video15 import tiny_hunyuan_video15_components
    pipe = GuidedHunyuanVideo15Pipeline(**tiny_hunyuan_video15_components(0))
    for name, value in {"tokenizer_max_length": 32, "tokenizer_2_max_length": 16, "vision_num_semantic_tokens": 8}.items():
        setattr(pipe, name, value)
    return quiet(pipe), {"num_frames": 5}


def _slot_family_run(pipe, call, spec, steps: int):
    with torch.no_grad():
        out = pipe(prompt=PROMPT, guidance=spec, generator=seeded(0), num_inference_steps=steps, height=32,
                   width=32, output_type="latent", **call)
    return out.frames if hasattr(out, "frames") else out.images


_SLOT_CASES = [(family, method) for family in ("zimage", "wan", "ltx") for method in ("pag", "seg", "slg", "nag", "tsg")]
_SLOT_CASES += [("hunyuan", method) for method in ("cfg", "pag", "slg", "tsg")]


@pytest.mark.parametrize("family, method", _SLOT_CASES)
def test_transformers_that_pass_no_attention_kwargs_compile_without_a_break(family, method) -> None:
    """Z-Image, Wan, LTX and HunyuanVideo 1.5 under ``torch.compile(pipe.transformer)``: PAG, SEG,
    SLG/STG, NAG and TSG with 0 graph breaks (before: 5-7 per 2-step run, at the context variable
    and, on the video families, at a ``nonzero`` of the row split), latents equal to the
    uncompiled run bit for bit, and a 4-step run compiles no more graphs than a 2-step one."""
    pipe, call = _slot_family_pipe(family)
    spec = {"name": "tsg", "t_min": 0.0} if method == "tsg" else (
        "cfg" if method == "cfg" else {"name": method, "layers": [0], "start": 0.0, "stop": 1.0})
    _assert_compiles_unbroken(pipe, "transformer", lambda steps: _slot_family_run(pipe, call, spec, steps))
