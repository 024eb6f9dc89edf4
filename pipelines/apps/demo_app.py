"""Gradio demo: one prompt, several guidance methods side by side (same seed), with NFEs, wall time and
saturation under each image.

    guidance-engine demo                      # http://127.0.0.1:7860
    python demos/app.py

API (gradio_client)::

    from gradio_client import Client
    result = Client("http://127.0.0.1:7860/").predict(
        "a red circle on a blue background", ["cfg", "apg"], 20, 0, api_name="/generate")
    gallery, stats, message = result   # stats: [{"method", "scale", "nfe", "seconds", "saturation"}, ...]
    Client(...).predict(prompt="a red circle", methods=["cfgpp"], scale_cfgpp=0.8, api_name="/generate")

Parameters: prompt, methods, steps, seed, then ``scale_<method>`` for every method of :data:`METHODS`
(each optional, defaulting to the method's documented default; None: that default), then
``negative_prompt``.

Bad input is refused before any model call, never clamped nor rounded: the call raises
``gradio_client.exceptions.AppError`` whose message is one line of plain text naming the parameter,
its accepted range and the value received (``steps: must be an integer in [1, 100], got 0``), and
the page shows the same line in an error toast. The page's inputs are plain number boxes passed to
the handler as typed (a Gradio slider would clamp a typed value to its bounds without a word).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from guidance_engine.guidance import Guidance, describe_range
from guidance_engine.registry import method_class, method_names, resolve_guidance
from guidance_engine.samplers.loop import check_run

from .cli_checks import SEED_MAX

logger = logging.getLogger(__name__)

API_NAME = "generate"
UPSCALE = 4  # the shipped model draws 32x32 images; nearest-neighbour upscaling for display
DEFAULT_METHODS = ("cfg", "apg")
MAX_STEPS = 100


def sampler_for(guidance: Guidance) -> str | None:
    """The demo's solver for a method: the model's scheduler, or Euler ancestral for a method that
    needs fresh noise at every step (particle resampling)."""
    return "euler_ancestral" if guidance.requires_stochastic_sampler else None


def _scale_field(name: str):
    """The ``scale`` parameter (dataclass field) of a method, or None."""
    for f in method_class(name).parameters():
        if f.name == "scale":
            return f
    return None


def _default_scale(name: str, field) -> float:
    """The value the page's scale box starts at: the method's default (for AG's None, its inner method's)."""
    default = field.default
    if default is None:  # e.g. AG: None = the inner method's own scale
        try:
            inner = resolve_guidance(name)
            for value in vars(inner).values():
                if hasattr(value, "scale") and isinstance(value.scale, (int, float)):
                    default = float(value.scale)
                    break
        except Exception:  # noqa: BLE001 - a display default only
            default = None
    low, high = field.metadata.get("low"), field.metadata.get("high")
    if default is None:
        default = 7.5
    if low is not None:
        default = max(default, low)
    if high is not None and not math.isinf(high):
        default = min(default, high)
    return float(default)


def _usable(name: str) -> bool:
    """Methods that run with their defaults; linear_ag needs a calibration directory, fitted per model
    by ``guidance-engine calibrate-linear-ag``, so the demo leaves it out."""
    try:
        resolve_guidance(name)
    except ValueError:
        return False
    return True


def scale_sliders_spec() -> list[dict[str, Any]]:
    """One entry per method with a ``scale`` parameter: name, low, high (finite display bounds), range
    (the accepted values, as the registry's messages write them), default, doc (the registry's)."""
    specs = []
    for name in method_names():
        field = _scale_field(name)
        if field is None or not _usable(name):
            continue
        low = field.metadata.get("low")
        high = field.metadata.get("high")
        low = 0.0 if low is None else float(low)
        high = 100.0 if high is None or math.isinf(high) else float(high)
        specs.append({"name": name, "low": low, "high": high, "range": describe_range(field.metadata),
                      "default": _default_scale(name, field),
                      "doc": field.metadata.get("doc", ""), "optional": bool(field.metadata.get("optional"))})
    return specs


METHODS = [spec["name"] for spec in scale_sliders_spec()]


def check_integer(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int if it is an integer (an integral float counts) in [low, high]; otherwise
    ValueError naming ``name``, the range and the value received. Never rounds nor clamps."""
    number = int(value) if isinstance(value, float) and value.is_integer() else value
    if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
        raise ValueError(f"{name}: must be an integer in [{low}, {high}], got {value!r}")
    return number


class Generator:
    """The demo's callback, usable without Gradio (the tests call it directly too)."""

    def __init__(self, pipe, device: str = "cpu"):
        self.pipe = pipe
        self.device = device
        #: a class-conditional (DiT) pipeline: the prompt is a class name or id, no negative prompt
        self.class_conditional = hasattr(pipe, "class_ids")
        # No lock: a pipeline serves concurrent calls (per-forward row plans, a tokenizer lock;
        # tests/test_concurrency.py), so the queue's concurrency limit is how many run at once.

    def validate(self, prompt: Any, methods: Any, steps: Any, seed: Any, scales: dict[str, Any],
                 negative_prompt: str | None = None) -> list[tuple[str, Guidance]]:
        """Every check of a request, before any model call: the (method, guidance) pairs to run, or
        ValueError naming the parameter, its accepted range and the value received."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt: please enter a prompt (a non-empty text), got {prompt!r}")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt: must be a text, got {negative_prompt!r}")
        if self.class_conditional:
            from ..models import class_label, refuse_text_options

            self.pipe.class_ids(class_label(prompt))  # ValueError naming the known classes
            refuse_text_options(**{"negative prompt": negative_prompt})
        known = ", ".join(METHODS)
        if not isinstance(methods, (list, tuple)):
            raise ValueError(f"methods: must be a list of method names among {known}, got {methods!r}")
        if not methods:
            raise ValueError(f"methods: select at least one method among {known}, got {list(methods)!r}")
        for name in methods:
            if name not in METHODS:
                raise ValueError(f"methods: must be among {known}, got {name!r}")
        steps = check_integer("steps", steps, 1, MAX_STEPS)
        check_integer("seed", seed, 0, SEED_MAX)
        guidances = []
        for name in methods:
            scale = scales.get(name)
            guidance = resolve_guidance(name, **({} if scale is None else {"scale": scale}))  # names the range
            if "negative" in guidance.required_branches() and not negative_prompt:
                if self.class_conditional:
                    raise ValueError(f"methods: {name!r} needs a negative prompt, which a class-conditional model "
                                     f"does not take; choose another method")
                raise ValueError(f"negative_prompt: method {name!r} (Perp-Neg) needs a non-empty negative prompt "
                                 f"for its 'negative' branch, got {negative_prompt or ''!r}")
            check_run(guidance, self.pipe.scheduler, num_steps=steps, sampler=sampler_for(guidance))
            guidances.append((name, guidance))
        return guidances

    def __call__(self, prompt: Any, methods: Any, steps: Any, seed: Any, *scale_values: Any,
                 negative_prompt: str | None = None):
        """(gallery, stats, message) of one image per method. ``scale_values``: one per :data:`METHODS`
        (None: the method's default). ``negative_prompt``: replaces the empty prompt of the
        unconditional branch (CFG and kin); Perp-Neg gives it a branch of its own and needs it.
        A bad request raises ValueError (see :meth:`validate`) before any model call."""
        import torch
        from PIL import Image

        from ..toy.evaluation import image_stats
        from ..models import generate_from_prompts

        if isinstance(negative_prompt, str):
            negative_prompt = negative_prompt.strip() or None
        guidances = self.validate(prompt, methods, steps, seed, dict(zip(METHODS, scale_values)), negative_prompt)
        steps, seed = int(steps), int(seed)  # checked: integers, or integral floats
        gallery, stats, notes = [], [], []
        for name, guidance in guidances:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            start = time.perf_counter()
            out = generate_from_prompts(self.pipe, prompt, negative_prompt=negative_prompt,
                                        num_inference_steps=steps, guidance=guidance,
                                        generator=generator, sampler=sampler_for(guidance))
            seconds = time.perf_counter() - start
            notes += [note for note in getattr(out, "warnings", []) if note not in notes]
            image = out.images[0]
            saturation = image_stats(np.asarray(image.convert("RGB"))[None])["saturation"]
            scale = getattr(guidance, "scale", None)
            row = {"method": name, "scale": scale, "nfe": float(out.nfe), "seconds": round(seconds, 3),
                   "saturation": round(saturation, 4)}
            stats.append(row)
            big = image.resize((image.width * UPSCALE, image.height * UPSCALE), Image.NEAREST)
            scale_text = "" if scale is None else f" (scale {scale:g})"
            gallery.append((big, f"{name}{scale_text} | NFEs {out.nfe:g} | {seconds:.2f} s | "
                                 f"saturation {saturation:.3f}"))
        lines = " ".join(f"`{r['method']}`: {r['nfe']:g} NFEs, {r['seconds']:.2f} s, "
                         f"saturation {r['saturation']:.3f}." for r in stats)
        said = "".join(f"\n\n**Warning:** {note}" for note in notes)  # e.g. a prompt the text encoder cuts
        return gallery, stats, f"Seed {seed}, {steps} steps. {lines}{said}"


def refusal(message: str) -> Exception:
    """``gr.Error`` carrying ``message`` as is: the API's error (gradio_client raises AppError with
    this text) and the page's error toast, shown until closed; no traceback in the server's log."""
    import gradio as gr

    return gr.Error(message, duration=None, print_exception=False)


def _named_api(generate: Generator):
    """The callback with a signature naming every input (``scale_cfg``, ...), so the API's parameters
    have stable names usable as keyword arguments from gradio_client; errors become :func:`refusal`."""
    import inspect

    names = ["prompt", "methods", "steps", "seed", *(f"scale_{name}" for name in METHODS)]

    def generate_api(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        try:
            return generate(*(bound.arguments[name] for name in names),
                            negative_prompt=bound.arguments["negative_prompt"])
        except ValueError as error:  # a bad request (or a method this model cannot run): its message
            logger.info("demo: refused: %s", error)
            raise refusal(str(error)) from None
        except Exception as error:  # noqa: BLE001 - the message in the page, the traceback in the log
            logger.exception("demo: generation failed")
            raise refusal(f"{type(error).__name__}: {error}") from None

    signature = inspect.Signature([*(inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names),
                                   inspect.Parameter("negative_prompt", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     default="")])
    generate_api.__signature__ = signature
    generate_api.__name__ = API_NAME
    return generate_api


def _load_pipe(model: str | None, device: str):
    """The guided pipeline of ``model`` (None: the shipped one) on ``device``, without progress bars."""
    from .cli_common import load_quietly

    pipe = load_quietly(model, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_demo(pipe=None, model: str | None = None, device: str = "cpu"):
    """The Gradio Blocks app; ``pipe`` (a guided pipeline) or ``model`` (a checkpoint, None: the shipped one)."""
    import gradio as gr

    def as_sent(component):
        """``component`` passing its value to the handler as the page or the API sent it: Gradio's own
        preprocessing would round a number to its precision, or refuse an unknown method or an
        out-of-bounds number with a message naming no parameter; the handler checks and names them.
        (An instance override: a subclass would make Gradio write a .pyi stub next to this module.)"""
        component.preprocess = lambda payload: payload
        return component

    if pipe is None:
        pipe = _load_pipe(model, device)
    generate = Generator(pipe, device=device)
    specs = scale_sliders_spec()

    with gr.Blocks(title="guidance-engine demo") as demo:
        # 32x32 images shown large: keep the pixels sharp (the browser would blur them)
        gr.HTML("<style>#gallery img { image-rendering: pixelated; }</style>", padding=False)
        gr.Markdown("# guidance-engine\nOne prompt, several guidance methods, the same seed. "
                    "Under each image: network evaluations (NFEs), wall time and mean saturation.")
        with gr.Row():
            with gr.Column(scale=1):
                if generate.class_conditional:
                    first = pipe.class_name(0)
                    prompt = gr.Textbox(label=f"class (a name or an id of this class-conditional model, e.g. {first})",
                                        value=first, elem_id="prompt")
                else:
                    prompt = gr.Textbox(label="prompt", value="a red circle on a blue background",
                                        elem_id="prompt")
                negative = gr.Textbox(label="negative prompt (optional; Perp-Neg needs one)", value="",
                                      elem_id="negative-prompt", visible=not generate.class_conditional)
                methods = as_sent(gr.CheckboxGroup(choices=METHODS, value=list(DEFAULT_METHODS), label="methods",
                                                   elem_id="methods"))
                # number boxes, not sliders: the page's slider clamps a typed value to its bounds
                with gr.Row():
                    steps = as_sent(gr.Number(value=20, precision=0, step=1, label=f"steps, 1 to {MAX_STEPS}",
                                              elem_id="steps"))
                    seed = as_sent(gr.Number(value=0, precision=0, step=1, label="seed, 0 to 2^63 - 1",
                                             elem_id="seed"))
                scales = []
                for spec in specs:
                    step = 0.01 if spec["high"] <= 1 else 0.1
                    info = spec["doc"] + (" (default: the inner method's)" if spec["optional"] else "")
                    scales.append(as_sent(gr.Number(value=spec["default"], step=step,
                                                    label=f"{spec['name']} scale, in {spec['range']}", info=info,
                                                    visible=spec["name"] in DEFAULT_METHODS,
                                                    elem_id=f"scale-{spec['name']}")))
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                message = gr.Markdown(label="message", elem_id="message")
                gallery = gr.Gallery(label="results", columns=4, object_fit="contain", elem_id="gallery",
                                     format="png")
                stats = gr.JSON(label="numbers", elem_id="stats")

        def show_scales(selected):
            """The scale boxes of the selected methods."""
            return [gr.update(visible=spec["name"] in (selected or [])) for spec in specs]

        methods.change(show_scales, inputs=methods, outputs=scales, api_name=False, queue=False)
        button.click(_named_api(generate), inputs=[prompt, methods, steps, seed, *scales, negative],
                     outputs=[gallery, stats, message], api_name=API_NAME)
    demo.generator = generate  # for tests and scripting
    return demo


def launch(model: str | None = None, host: str = "127.0.0.1", port: int | None = None, concurrency: int = 1,
           device: str = "cpu", **launch_kwargs):
    """Build and serve the demo (blocks until interrupted unless ``prevent_thread_lock=True``).
    ``concurrency``: requests served at once, each with its own model calls on the one shared
    pipeline (memory grows with it: one batch of activations per request)."""
    if concurrency < 1:
        raise ValueError(f"--concurrency: must be an integer >= 1, got {concurrency}")
    demo = build_demo(model=model, device=device)
    demo.queue(default_concurrency_limit=concurrency)
    demo.launch(server_name=host, server_port=port, **launch_kwargs)
    return demo
