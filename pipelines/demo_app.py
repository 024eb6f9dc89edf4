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
(each optional, defaulting to the method's documented default). A bad parameter returns empty
results and the message (an error box), never a stack trace.
"""

from __future__ import annotations

import html
import logging
import math
import threading
import time
from typing import Any, Sequence

import numpy as np

from guidance_engine.registry import method_class, method_names, resolve_guidance

logger = logging.getLogger(__name__)

API_NAME = "generate"
UPSCALE = 4  # the shipped model draws 32x32 images; nearest-neighbour upscaling for display
DEFAULT_METHODS = ("cfg", "apg")
MAX_STEPS = 100
# methods that need a particular solver (the others use the model's scheduler)
SAMPLER_FOR = {"fkc": "euler_ancestral"}


def _scale_field(name: str):
    for f in method_class(name).parameters():
        if f.name == "scale":
            return f
    return None


def _default_scale(name: str, field) -> float:
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
    """One entry per method with a ``scale`` parameter: name, low, high, default, doc (the registry's)."""
    specs = []
    for name in method_names():
        field = _scale_field(name)
        if field is None or not _usable(name):
            continue
        low = field.metadata.get("low")
        high = field.metadata.get("high")
        low = 0.0 if low is None else float(low)
        high = 100.0 if high is None or math.isinf(high) else float(high)
        specs.append({"name": name, "low": low, "high": high, "default": _default_scale(name, field),
                      "doc": field.metadata.get("doc", ""), "optional": bool(field.metadata.get("optional"))})
    return specs


METHODS = [spec["name"] for spec in scale_sliders_spec()]


def _error_box(message: str) -> str:
    return f"<div class='ge-error' style='color:#b00020'><b>Error:</b> {html.escape(message, quote=False)}</div>"


class Generator:
    """The demo's callback, usable without Gradio (the tests call it directly too)."""

    def __init__(self, pipe, device: str = "cpu"):
        self.pipe = pipe
        self.device = device
        #: a class-conditional (DiT) pipeline: the prompt is a class name or id, no negative prompt
        self.class_conditional = hasattr(pipe, "class_ids")
        # the pipeline keeps per-call state (guidance hooks, progress bar): one call at a time; the
        # queue's concurrency limit bounds how many requests wait here.
        self.lock = threading.Lock()

    def validate(self, prompt: str, methods: Sequence[str], steps: Any, seed: Any,
                 scales: dict[str, float]) -> list[tuple[str, Any]]:
        if not prompt or not str(prompt).strip():
            raise ValueError("prompt: please enter a prompt")
        if self.class_conditional:
            from .models import class_label

            self.pipe.class_ids(class_label(str(prompt)))  # ValueError naming the known classes
        if not methods:
            raise ValueError("methods: select at least one method")
        try:
            steps_i = int(steps)
        except (TypeError, ValueError):
            raise ValueError(f"steps: expected an integer, got {steps!r}") from None
        if steps_i != steps or not 1 <= steps_i <= MAX_STEPS:
            raise ValueError(f"steps: must be an integer in [1, {MAX_STEPS}], got {steps}")
        try:
            seed_i = int(seed)
        except (TypeError, ValueError):
            raise ValueError(f"seed: expected an integer, got {seed!r}") from None
        if seed_i != seed or seed_i < 0:
            raise ValueError(f"seed: must be an integer >= 0, got {seed}")
        guidances = []
        for name in methods:
            params = {"scale": float(scales[name])} if name in scales and scales[name] is not None else {}
            guidances.append((name, resolve_guidance(name, **params)))  # ValueError with the range
        return guidances

    def __call__(self, prompt: str, methods: Sequence[str], steps: Any, seed: Any, *scale_values: float,
                 negative_prompt: str | None = None):
        """``negative_prompt``: replaces the empty prompt of the unconditional branch (CFG and kin);
        Perp-Neg gives it a branch of its own and needs it."""
        import torch
        from PIL import Image

        from .evaluation import image_stats
        from .models import generate_from_prompts, refuse_text_options

        scales = dict(zip(METHODS, scale_values))
        negative_prompt = str(negative_prompt).strip() if negative_prompt else None
        try:
            guidances = self.validate(prompt, methods or [], steps, seed, scales)
            if self.class_conditional:
                refuse_text_options(**{"negative prompt": negative_prompt})
        except ValueError as error:
            return self._fail(str(error))
        gallery, stats = [], []
        try:
            for name, guidance in guidances:
                generator = torch.Generator(device=self.device).manual_seed(int(seed))
                with self.lock:
                    start = time.perf_counter()
                    out = generate_from_prompts(self.pipe, str(prompt), negative_prompt=negative_prompt,
                                                num_inference_steps=int(steps), guidance=guidance,
                                                generator=generator, sampler=SAMPLER_FOR.get(name))
                    seconds = time.perf_counter() - start
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
        except ValueError as error:  # e.g. a method that needs a calibration this model lacks
            return self._fail(str(error))
        except Exception as error:  # noqa: BLE001 - never a stack trace in the page
            logger.exception("demo: generation failed")
            return self._fail(f"{type(error).__name__}: {error}")
        lines = " ".join(f"`{r['method']}`: {r['nfe']:g} NFEs, {r['seconds']:.2f} s, "
                         f"saturation {r['saturation']:.3f}." for r in stats)
        return gallery, stats, f"Seed {int(seed)}, {int(steps)} steps. {lines}"

    @staticmethod
    def _fail(message: str):
        try:
            import gradio as gr
            gr.Warning(message)
        except Exception:  # noqa: BLE001 - outside a Gradio request
            pass
        return [], [], _error_box(message)


def _named_api(generate: Generator):
    """The callback with a signature naming every input (``scale_cfg``, ...), so the API's parameters
    have stable names usable as keyword arguments from gradio_client."""
    import inspect

    names = ["prompt", "methods", "steps", "seed", *(f"scale_{name}" for name in METHODS)]

    def generate_api(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return generate(*(bound.arguments[name] for name in names),
                        negative_prompt=bound.arguments["negative_prompt"])

    signature = inspect.Signature([*(inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names),
                                   inspect.Parameter("negative_prompt", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                     default="")])
    generate_api.__signature__ = signature
    generate_api.__name__ = API_NAME
    return generate_api


def _load_pipe(model: str | None, device: str):
    from .cli import _load

    pipe = _load(model, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_demo(pipe=None, model: str | None = None, device: str = "cpu"):
    """The Gradio Blocks app; ``pipe`` (a guided pipeline) or ``model`` (a checkpoint, None: the shipped one)."""
    import gradio as gr

    def Slider(*args, **kwargs):  # noqa: N802
        """A slider whose out-of-range values (from the API) reach the registry, which names the method
        and its documented range, instead of Gradio's generic bounds error. (An instance override: a
        gr.Slider subclass would make Gradio write a .pyi stub next to this module.)"""
        slider = gr.Slider(*args, **kwargs)
        slider.preprocess = lambda payload: payload
        return slider

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
                methods = gr.CheckboxGroup(choices=METHODS, value=list(DEFAULT_METHODS), label="methods",
                                           elem_id="methods")
                with gr.Row():
                    steps = Slider(1, MAX_STEPS, value=20, step=1, label="steps", elem_id="steps")
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                sliders = []
                for spec in specs:
                    step = 0.01 if spec["high"] <= 1 else 0.1
                    info = spec["doc"] + (" (default: the inner method's)" if spec["optional"] else "")
                    sliders.append(Slider(spec["low"], spec["high"], value=spec["default"], step=step,
                                             label=f"{spec['name']} scale", info=info,
                                             visible=spec["name"] in DEFAULT_METHODS,
                                             elem_id=f"scale-{spec['name']}"))
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                message = gr.Markdown(label="message", elem_id="message")
                gallery = gr.Gallery(label="results", columns=4, object_fit="contain", elem_id="gallery",
                                     format="png")
                stats = gr.JSON(label="numbers", elem_id="stats")

        def show_sliders(selected):
            return [gr.update(visible=spec["name"] in (selected or [])) for spec in specs]

        methods.change(show_sliders, inputs=methods, outputs=sliders, api_name=False, queue=False)
        button.click(_named_api(generate), inputs=[prompt, methods, steps, seed, *sliders, negative],
                     outputs=[gallery, stats, message], api_name=API_NAME)
    demo.generator = generate  # for tests and scripting
    return demo


def launch(model: str | None = None, host: str = "127.0.0.1", port: int | None = None, concurrency: int = 1,
           device: str = "cpu", **launch_kwargs):
    """Build and serve the demo (blocks until interrupted unless ``prevent_thread_lock=True``)."""
    if concurrency < 1:
        raise ValueError(f"--concurrency: must be an integer >= 1, got {concurrency}")
    demo = build_demo(model=model, device=device)
    demo.queue(default_concurrency_limit=concurrency)
    demo.launch(server_name=host, server_port=port, **launch_kwargs)
    return demo
