"""diffusers' own callbacks (diffusers/callbacks.py) on the engine's pipelines, against the stock
pipelines with the same callback, bit for bit.

What the stock callbacks read and write, and how the stock loops act on it:

* ``SDCFGCutoffCallback``, ``SDXLCFGCutoffCallback``, ``SD3CFGCutoffCallback``: at step
  ``cutoff_step_index`` (or ``int(pipe.num_timesteps * cutoff_step_ratio)``) they cut the CFG-stacked
  conditioning to its last rows (``prompt_embeds[-1:]``; SDXL also ``add_text_embeds`` and
  ``add_time_ids``; SD3 ``pooled_prompt_embeds``) and set ``pipe._guidance_scale = 0.0``; the stock
  loop's ``do_classifier_free_guidance`` then reads false: one forward per step, the conditional
  prediction alone. The engine hands callbacks each branch's own rows (the conditional rows are
  the last rows of the stock layout), switches the run's method to the conditional alone
  (``RunGuidance``), and keeps every image's rows where stock, with several images, keeps one.
* ``IPAdapterScaleCutoffCallback`` reads ``num_timesteps`` and calls ``set_ip_adapter_scale(0.0)``,
  which sets the scale of the UNet's IP-Adapter attention processors. The engine's pipelines take
  no IP-Adapter image (refused before any model call), so no IP-Adapter processor acts in a run
  and the callback changes nothing, as on a stock pipeline without an IP-Adapter; that is what is
  tested here (a loaded IP-Adapter needs ``image_embeds`` in every UNet call, which the engine's
  branch model does not pass: it is not supported, so not tested).
* ``SDXLControlnetCFGCutoffCallback`` also cuts ControlNet's ``image``: the engine has no ControlNet
  pipeline.
* ``pipe._interrupt = True`` in a callback: the stock loops ``continue`` over the remaining steps
  (no forward, no callback) and decode the latents as they are.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import diffusers
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionImg2ImgPipeline
from diffusers.callbacks import (IPAdapterScaleCutoffCallback, MultiPipelineCallbacks, SD3CFGCutoffCallback,
                                 SDCFGCutoffCallback, SDXLCFGCutoffCallback)

from PIL import Image

import guidance_engine.pipelines as guided_pipelines
from guidance_engine.pipelines import (GuidedFluxPipeline, GuidedStableDiffusion3Pipeline,
                                       GuidedStableDiffusionImg2ImgPipeline)
from guidance_engine.pipelines.toy.tiny_models import tiny_flux_components, tiny_sd3_components
from conftest import PROMPT, quiet, seeded

STEPS = 3
CUTOFFS = {"sd": SDCFGCutoffCallback, "sdxl": SDXLCFGCutoffCallback, "sd3": SD3CFGCutoffCallback}
#: the stock properties a callback may read (those a stock class lacks, or leaves unset, read as missing)
PROPERTIES = ("guidance_scale", "guidance_scale_2", "image_guidance_scale", "guidance_rescale",
              "do_classifier_free_guidance", "num_timesteps", "interrupt", "clip_skip", "cross_attention_kwargs",
              "joint_attention_kwargs", "attention_kwargs", "denoising_end", "current_timestep")
FLUX_CALL = {"height": 32, "width": 32, "max_sequence_length": 16}
#: the other families: (stock pipeline, guided pipeline, tiny components, a call); the classes by name
FAMILIES = {
    "qwen_image": ("QwenImagePipeline", "GuidedQwenImagePipeline", ("tiny_qwen_image", "tiny_qwen_image_components"),
                   {"max_sequence_length": 16, "negative_prompt": "blue", "true_cfg_scale": 4.0}),
    "flux2_klein": ("Flux2KleinPipeline", "GuidedFlux2KleinPipeline", ("tiny_flux2", "tiny_flux2_klein_components"),
                    {"max_sequence_length": 32}),
    "flux2_dev": ("Flux2Pipeline", "GuidedFlux2Pipeline", ("tiny_flux2_dev", "tiny_flux2_dev_components"),
                  {"max_sequence_length": 48}),
    "chroma": ("ChromaPipeline", "GuidedChromaPipeline", ("tiny_chroma", "tiny_chroma_components"),
               {"max_sequence_length": 16}),
    "z_image": ("ZImagePipeline", "GuidedZImagePipeline", ("tiny_z_image", "tiny_z_image_components"),
                {"max_sequence_length": 64}),
    "wan_2_2": ("WanPipeline", "GuidedWanPipeline", ("tiny_wan", "tiny_wan_components"),
                {"num_frames": 5, "max_sequence_length": 16}),
    "instruct_pix2pix": ("StableDiffusionInstructPix2PixPipeline", "GuidedStableDiffusionInstructPix2PixPipeline",
                         ("tiny_instruct_pix2pix", "tiny_instruct_pix2pix_components"), {}),
}


@pytest.fixture
def sd3_pair():
    stock = quiet(StableDiffusion3Pipeline(**tiny_sd3_components(0)))
    return stock, quiet(GuidedStableDiffusion3Pipeline.from_pipe(stock))


@pytest.fixture
def flux_pair():
    stock = quiet(FluxPipeline(**tiny_flux_components(0)))
    return stock, quiet(GuidedFluxPipeline.from_pipe(stock))


def _pair(request, family: str):
    return request.getfixturevalue(f"{family}_pair")


def _run(pipe, steps: int = STEPS, seed: int = 0, **kwargs):
    """The call's output (latents; ``nfe`` on the engine's)."""
    return pipe(PROMPT, num_inference_steps=steps, generator=seeded(seed), output_type="latent", **kwargs)


def _cutoff_step(callback, steps: int) -> int:
    """The step at whose end diffusers' cutoff callbacks act (their own rule, diffusers/callbacks.py)."""
    index, ratio = callback.config.cutoff_step_index, callback.config.cutoff_step_ratio
    return index if index is not None else int(steps * ratio)


def _value(value: Any) -> Any:
    """A recorded attribute, comparable with ==."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


def _state(state: Any) -> dict[str, Any]:
    """A method's per-run state (a dataclass) by field, comparable with == (its generators,
    each run's own objects, left out)."""
    return {f.name: _value(getattr(state, f.name)) for f in dataclasses.fields(state)
            if not isinstance(getattr(state, f.name), torch.Generator)}


def _read(pipe) -> dict[str, Any]:
    """Every property in PROPERTIES as ``pipe`` answers it now ("missing": AttributeError)."""
    seen = {}
    for name in PROPERTIES:
        try:
            seen[name] = _value(getattr(pipe, name))
        except AttributeError:
            seen[name] = "missing"
    return seen


class Recorder:
    """A user callback that records what the pipeline answers at each step's end."""

    tensor_inputs: list[str] = []  # as a diffusers PipelineCallback declares them (MultiPipelineCallbacks)

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, Any]]] = []

    def __call__(self, pipe, step: int, timestep, tensors: dict) -> dict:
        self.steps.append((step, _read(pipe)))
        return tensors


@pytest.mark.parametrize("form", [{"cutoff_step_ratio": 0.5}, {"cutoff_step_ratio": None, "cutoff_step_index": 0}],
                         ids=["ratio", "index"])
@pytest.mark.parametrize("family", list(CUTOFFS))
def test_the_stock_cfg_cutoff_equals_the_stock_pipeline_bit_for_bit(request, family, form) -> None:
    """The user's report: the ratio form raised (no ``num_timesteps``), the index form was
    ignored. Now both cut like stock, and the steps after the cutoff cost one forward."""
    stock, guided = _pair(request, family)
    uncut_stock, uncut = _run(stock).images, _run(guided)
    callback = CUTOFFS[family](**form)
    want = _run(stock, callback_on_step_end=callback).images
    got = _run(guided, callback_on_step_end=callback)
    assert torch.equal(got.images, want)
    assert not torch.equal(want, uncut_stock)  # the cutoff acts
    cut = _cutoff_step(callback, STEPS)
    assert got.nfe == 2 * (cut + 1) + (STEPS - cut - 1) < uncut.nfe == 2 * STEPS
    assert guided.guidance_scale == stock.guidance_scale == 0.0 and not guided.do_classifier_free_guidance


@pytest.mark.parametrize("family", list(CUTOFFS))
def test_the_attributes_during_and_after_a_call_are_the_stock_ones(request, family) -> None:
    stock, guided = _pair(request, family)
    call: dict[str, Any] = {"guidance_scale": 3.0}
    if family != "sd":  # the stock SD encoder's clip_skip path needs CLIPTextModel.text_model (transformers 4)
        call["clip_skip"] = 1
    if family != "sd3":
        call["guidance_rescale"] = 0.3
    seen = {}
    for name, pipe in (("stock", stock), ("guided", guided)):
        recorder = Recorder()
        _run(pipe, callback_on_step_end=MultiPipelineCallbacks([recorder, CUTOFFS[family](cutoff_step_ratio=0.5)]),
             **call)
        seen[name] = (recorder.steps, _read(pipe))
    assert seen["guided"] == seen["stock"]
    steps, after = seen["guided"]
    assert [step for step, _ in steps] == list(range(STEPS))
    assert steps[0][1]["guidance_scale"] == 3.0 and steps[0][1]["num_timesteps"] == STEPS
    assert steps[-1][1]["guidance_scale"] == after["guidance_scale"] == 0.0  # the cutoff at step 1 stays


def test_multiple_stock_callbacks_act_in_order(sd_pair) -> None:
    stock, guided = sd_pair
    callback = MultiPipelineCallbacks([IPAdapterScaleCutoffCallback(cutoff_step_ratio=0.0),
                                       SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1)])
    want = _run(stock, callback_on_step_end=callback).images
    got = _run(guided, callback_on_step_end=callback)
    assert torch.equal(got.images, want) and got.nfe == 2 * 2 + 1


@pytest.mark.parametrize("form", [{"cutoff_step_ratio": 0.5}, {"cutoff_step_ratio": None, "cutoff_step_index": 0}],
                         ids=["ratio", "index"])
def test_the_ip_adapter_cutoff_changes_nothing_without_an_ip_adapter(sd_pair, form) -> None:
    """No IP-Adapter acts in an engine run (module docstring): the callback runs (the ratio form
    reads ``num_timesteps``) and the result is the stock one, the uncut one."""
    stock, guided = sd_pair
    callback = IPAdapterScaleCutoffCallback(**form)
    got = _run(guided, callback_on_step_end=callback)
    assert torch.equal(got.images, _run(stock, callback_on_step_end=callback).images)
    assert torch.equal(got.images, _run(guided).images) and got.nfe == 2 * STEPS


def test_a_cutoff_call_leaves_nothing_to_the_next_call(sd_pair) -> None:
    _, guided = sd_pair
    fresh = _run(guided).images
    _run(guided, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0))
    assert guided.guidance_scale == 0.0  # what the cut call left, as stock keeps it
    again = _run(guided)
    assert torch.equal(again.images, fresh) and again.nfe == 2 * STEPS and guided.guidance_scale == 7.5


def test_the_cutoff_with_a_named_method_equals_its_stop(sd_pair) -> None:
    """A cutoff at step k is the method's own interval ending after step k (``stop=(k + 1) / n``):
    the conditional prediction alone afterwards, bit for bit."""
    _, guided = sd_pair
    cut = _run(guided, 4, guidance="apg", callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    stop = _run(guided, 4, guidance={"name": "apg", "stop": 3 / 4})
    assert torch.equal(cut.images, stop.images) and cut.nfe == stop.nfe == 2 * 3 + 1


def test_a_cutoff_with_several_images_keeps_each_prompt(sd_pair) -> None:
    """Stock's ``prompt_embeds[-1:]`` keeps one row of the stacked CFG tensor, which fits no batch
    of two (its UNet call fails); the engine's conditioning is the conditional rows already, and
    the cut to its last row keeps them all: the cutoff equals CFG stopped after that step."""
    _, guided = sd_pair
    prompts = [PROMPT, "a green triangle"]
    callback = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)
    cut = guided(prompts, num_inference_steps=STEPS, generator=seeded(0), output_type="latent",
                 callback_on_step_end=callback)
    stop = guided(prompts, num_inference_steps=STEPS, generator=seeded(0), output_type="latent",
                  guidance={"name": "cfg", "scale": 7.5, "stop": 1 / STEPS})
    assert torch.equal(cut.images, stop.images) and cut.nfe == 2 + (STEPS - 1)


def test_a_changed_guidance_scale_acts_as_in_stock(sd_pair) -> None:
    """The stock loop reads ``guidance_scale`` at every step: CFG at the written scale afterwards."""
    stock, guided = sd_pair

    def lower(pipe, step, timestep, tensors):
        if step == 0:
            pipe._guidance_scale = 3.0
        return tensors

    want = _run(stock, callback_on_step_end=lower).images
    assert torch.equal(_run(guided, callback_on_step_end=lower).images, want)
    assert not torch.equal(want, _run(stock).images)


def test_interrupt_stops_the_run_as_stock_does(sd_pair) -> None:
    """After the step whose callback sets ``_interrupt`` no forward and no callback runs; the
    latents as they are (here replaced by the same callback) are the output."""
    stock, guided = sd_pair
    seen: dict[str, list[int]] = {"stock": [], "guided": []}

    def stop_at_one(name):
        def callback(pipe, step, timestep, tensors):
            seen[name].append(step)
            if step == 1:
                pipe._interrupt = True
                return {"latents": tensors["latents"] * 0.5}
            return tensors
        return callback

    want = _run(stock, 4, callback_on_step_end=stop_at_one("stock")).images
    got = _run(guided, 4, callback_on_step_end=stop_at_one("guided"))
    assert torch.equal(got.images, want) and got.nfe == 2 * 2
    assert seen["guided"] == seen["stock"] == [0, 1] and guided.interrupt and stock.interrupt
    assert _run(guided, 4).nfe == 2 * 4  # the next call runs every step


@pytest.mark.parametrize("guidance, sampler", [({"name": "ag", "threshold": 0.9993}, None),
                                               ({"name": "fkc", "particles": 2}, "euler_ancestral")],
                         ids=["ag", "fkc"])
def test_an_interrupted_run_returns_the_loop_s_own_bookkeeping(sd_pair, guidance, sampler) -> None:
    """Interrupted at its last step, a run equals the run left alone: each image's NFE count
    (Adaptive Guidance's differ per image here), the method's state (FKC's particle weights, which
    pick the returned particle) and the output, as the core's loop keeps them."""
    _, guided = sd_pair

    def stop_at_last(pipe, step, timestep, tensors):
        pipe._interrupt = step == STEPS - 1
        return tensors

    def call(**kwargs):
        return guided([PROMPT, "a green triangle"], num_inference_steps=STEPS, generator=[seeded(0), seeded(5)],
                      output_type="latent", guidance=guidance, sampler=sampler, **kwargs)

    alone, stopped = call(), call(callback_on_step_end=stop_at_last)
    assert torch.equal(stopped.images, alone.images) and stopped.nfe_per_image == alone.nfe_per_image
    assert _state(stopped.guidance_state) == _state(alone.guidance_state) != {}
    if guidance["name"] == "ag":
        assert alone.nfe_per_image[0] != alone.nfe_per_image[1]  # one image switched guidance off earlier


def test_the_ratio_cutoff_counts_the_steps_img2img_takes(sd_pair) -> None:
    """After img2img's truncation ``num_timesteps`` is the number of steps taken (stock
    ``len(timesteps)``), so the ratio form cuts at the stock step."""
    stock_t2i, _ = sd_pair
    stock = quiet(StableDiffusionImg2ImgPipeline.from_pipe(stock_t2i))
    guided = quiet(GuidedStableDiffusionImg2ImgPipeline.from_pipe(stock_t2i))
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    recorder = Recorder()
    callback = MultiPipelineCallbacks([recorder, SDCFGCutoffCallback(cutoff_step_ratio=0.4)])
    call = {"image": image, "strength": 0.5, "num_inference_steps": 6, "output_type": "latent"}
    want = stock(PROMPT, generator=seeded(0), callback_on_step_end=callback, **call).images
    steps_stock = recorder.steps
    recorder.steps = []
    got = guided(PROMPT, generator=seeded(0), callback_on_step_end=callback, **call)
    assert torch.equal(got.images, want)
    # the engine's img2img also answers guidance_rescale (it takes one); the stock class has none
    assert [(step, {k: v for k, v in seen.items() if k != "guidance_rescale"}) for step, seen in recorder.steps] \
        == [(step, {k: v for k, v in seen.items() if k != "guidance_rescale"}) for step, seen in steps_stock]
    assert recorder.steps[0][1]["num_timesteps"] == 3 and got.nfe == 2 * 2 + 1


def test_a_flux_callback_reads_the_run_s_attributes(flux_pair) -> None:
    """On a flow family: ``num_timesteps``, the embedded ``guidance_scale``, ``current_timestep``
    and the rest answer as in stock; writing ``_guidance_scale`` changes nothing (stock Flux
    embeds it before its loop)."""
    stock, guided = flux_pair
    seen = {}
    for name, pipe in (("stock", stock), ("guided", guided)):
        recorder = Recorder()

        def callback(pipe, step, timestep, tensors):
            recorder(pipe, step, timestep, tensors)
            pipe._guidance_scale = 0.0
            return tensors

        out = _run(pipe, guidance_scale=5.0, callback_on_step_end=callback, **FLUX_CALL)
        seen[name] = (recorder.steps, _read(pipe), out.images)
    assert seen["guided"][:2] == seen["stock"][:2] and torch.equal(seen["guided"][2], seen["stock"][2])
    steps = seen["guided"][0]
    assert steps[0][1]["num_timesteps"] == STEPS and steps[0][1]["guidance_scale"] == 5.0
    assert seen["guided"][1]["current_timestep"] is None  # after the loop, as stock
    assert torch.equal(seen["guided"][2], _run(guided, guidance_scale=5.0, **FLUX_CALL).images)


def _family_pair(family: str):
    """(stock, guided) pipelines of ``family`` (FAMILIES) on one set of tiny components."""
    stock_name, guided_name, (module, builder), _ = FAMILIES[family]
    make = getattr(importlib.import_module(f"guidance_engine.pipelines.toy.{module}"), builder)
    components = make(0, two_experts=True) if family == "wan_2_2" else make(0)
    if family == "instruct_pix2pix":
        components["requires_safety_checker"] = False
    stock = quiet(getattr(diffusers, stock_name)(**components))
    return stock, quiet(getattr(guided_pipelines, guided_name).from_pipe(stock))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_answers_and_acts_on_the_attributes_as_stock(family) -> None:
    """At each step's end and after the call, the stock properties answer the stock values; a
    callback setting ``_guidance_scale = 0.0`` after step 0 turns CFG off where the stock loop
    reads it (Z-Image: s <= 0, Chroma, Flux.2 Klein, Wan's two experts) and changes nothing where
    the stock pipeline embedded it before the loop (Qwen-Image, Flux.2 dev): outputs bit for bit.
    (InstructPix2Pix's stock loop cannot run on after that write, its conditioning stays three
    rows: there the callback only records.)"""
    stock, guided = _family_pair(family)
    call = {"height": 32, "width": 32, "num_inference_steps": STEPS, "output_type": "latent", **FAMILIES[family][3]}
    if family == "instruct_pix2pix":
        call = {"image": Image.new("RGB", (32, 32), (200, 40, 40)), "num_inference_steps": STEPS,
                "output_type": "latent"}
    seen = {}
    for name, pipe in (("stock", stock), ("guided", guided)):
        recorder = Recorder()

        def callback(pipe, step, timestep, tensors):
            recorder(pipe, step, timestep, tensors)
            if step == 0 and family != "instruct_pix2pix":
                pipe._guidance_scale = 0.0
            return tensors

        out = pipe(prompt=PROMPT, generator=seeded(0), callback_on_step_end=callback, **call)
        seen[name] = (recorder.steps, _read(pipe), out.images if hasattr(out, "images") else out.frames)
    assert seen["guided"][:2] == seen["stock"][:2] and torch.equal(seen["guided"][2], seen["stock"][2])
    assert seen["guided"][0][0][1]["num_timesteps"] == STEPS


def test_two_threads_on_one_pipeline_each_see_their_own_call(sd_pair) -> None:
    """Both calls stand at the end of step 0 together: one cuts its guidance off, then the other
    reads its own scale; each result equals the same call made alone."""
    _, guided = sd_pair
    meeting = threading.Barrier(2, timeout=60)
    seen: dict[float, float] = {}  # a call's scale at step 0 -> what it reads after the other's cut

    def in_step(cutoff):
        def callback(pipe, step, timestep, tensors):
            if step == 0:
                own = pipe.guidance_scale
                meeting.wait()  # both calls are at their first callback
                if cutoff is not None:
                    tensors = cutoff(pipe, step, timestep, tensors)
                meeting.wait()  # the cut is made
                seen[own] = pipe.guidance_scale
            return tensors
        return callback

    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)
    calls = [(7.5, cutoff), (3.0, None)]
    alone = [_run(guided, guidance_scale=scale, callback_on_step_end=cut) for scale, cut in calls]

    def together(call):
        return _run(guided, guidance_scale=call[0], callback_on_step_end=in_step(call[1]),
                    callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])

    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(together, calls))
    assert seen == {7.5: 0.0, 3.0: 3.0}
    for one, other in zip(threaded, alone):
        assert torch.equal(one.images, other.images) and one.nfe == other.nfe
    assert threaded[0].nfe == 2 + (STEPS - 1) and threaded[1].nfe == 2 * STEPS
