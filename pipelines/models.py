"""Loading models: the default model that ships in the package, and any diffusers checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .shipped import default_dit_model_path, default_model_path  # noqa: F401 (their home is shipped.py)


def pipeline_class_for(model: str | os.PathLike):
    """The guided pipeline class matching a checkpoint's ``model_index.json``."""
    from .stable_diffusion import GuidedStableDiffusionPipeline
    from .stable_diffusion_xl import GuidedStableDiffusionXLPipeline

    index = Path(model) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    if "DiT" in name:
        from .dit import GuidedDiTPipeline
        return GuidedDiTPipeline
    if name == "ChromaPipeline":
        from .chroma import GuidedChromaPipeline
        return GuidedChromaPipeline
    # exactly: Qwen's edit and inpainting checkpoints hold other components; img2img ones the same
    if name in ("QwenImagePipeline", "QwenImageImg2ImgPipeline"):
        from .qwen_image import GuidedQwenImagePipeline
        return GuidedQwenImagePipeline
    if name in ("ZImagePipeline", "ZImageImg2ImgPipeline"):
        from .z_image import GuidedZImagePipeline
        return GuidedZImagePipeline
    if name.startswith("Flux2Klein"):
        from .flux2 import GuidedFlux2KleinPipeline
        return GuidedFlux2KleinPipeline
    if name == "Flux2Pipeline":  # exactly: other Flux2* pipelines hold other components
        from .flux2_dev import GuidedFlux2Pipeline
        return GuidedFlux2Pipeline
    if name == "WanPipeline":  # exactly: Wan's image-to-video, VACE and animate checkpoints hold other inputs
        from .wan import GuidedWanPipeline
        return GuidedWanPipeline
    if name == "StableDiffusion3Pipeline":
        from .stable_diffusion_3 import GuidedStableDiffusion3Pipeline
        return GuidedStableDiffusion3Pipeline
    if name == "StableDiffusionInstructPix2PixPipeline":
        from .instruct_pix2pix import GuidedStableDiffusionInstructPix2PixPipeline
        return GuidedStableDiffusionInstructPix2PixPipeline
    if name.startswith(("Flux2", "QwenImage", "Chroma", "ZImage", "Wan", "StableDiffusion3")):  # a variant not run yet
        raise ValueError(f"model: {model} is a {name} checkpoint, which the engine does not run yet; text-to-image "
                         "checkpoints of Flux.1, Flux.2 [dev], Flux.2 Klein, Chroma, Qwen-Image, Z-Image, SD 1.x/2.x, SDXL, SD3 and "
                         "DiT, text-to-video checkpoints of Wan 2.1 / 2.2 and InstructPix2Pix are taken")
    if "Flux" in name:
        from .flux import GuidedFluxPipeline
        return GuidedFluxPipeline
    return GuidedStableDiffusionXLPipeline if "XL" in name else GuidedStableDiffusionPipeline


#: ``model`` shorthand for the shipped class-conditional model (a folder of that name wins).
DIT_SHORTHAND = "dit"


def resolve_model(model: str | os.PathLike | None) -> str | os.PathLike:
    """The checkpoint ``model`` names: None is the default text-to-image model, ``"dit"`` the
    shipped class-conditional one (unless a folder named ``dit`` exists), anything else as given."""
    if model is None:
        return default_model_path()
    if str(model) == DIT_SHORTHAND and not Path(model).exists():
        return default_dit_model_path()
    return model


def is_class_conditional(model: str | os.PathLike | None) -> bool:
    """Whether ``model`` (as :func:`resolve_model` reads it) is a local class-conditional (DiT) checkpoint."""
    path = Path(resolve_model(model))
    return path.is_dir() and pipeline_class_for(path).__name__ == "GuidedDiTPipeline"


def class_label(text: str) -> int | str:
    """A class label given as text (command line, demo, batch file): digits are a class id,
    anything else a class name."""
    return int(text) if text.strip().isdigit() else text.strip()


def checkpoint_classes(model: str | os.PathLike) -> tuple[int, dict[str, int]]:
    """A local class-conditional checkpoint's class count and class names (from its config files,
    without loading weights), to check class labels before any model loads."""
    path = Path(resolve_model(model))
    names = json.loads((path / "model_index.json").read_text()).get("id2label") or {}
    config = json.loads((path / "transformer" / "config.json").read_text())
    return int(config["num_embeds_ada_norm"]), {name: int(k) for k, name in names.items()}


def check_class_label(text: str, num_classes: int, names: dict[str, int], where: str) -> None:
    """ValueError naming ``where`` unless ``text`` is a class id in [0, num_classes) or a known name."""
    label = class_label(text)
    if isinstance(label, str) and label not in names:
        raise ValueError(f"{where}: unknown class name {label!r}; known: {sorted(names)}")
    if isinstance(label, int) and not 0 <= label < num_classes:
        raise ValueError(f"{where}: class ids must be in [0, {num_classes}), got {label}")


def refuse_text_options(**options) -> None:
    """ValueError for the first text-only option (given by its display name) that is set: a
    class-conditional model generates at its own size from class labels."""
    for name, value in options.items():
        if value is not None:
            raise ValueError(f"{name}: a class-conditional model generates at its own size from a class label and "
                             f"takes no {name}; got {value!r}")


def generate_from_prompts(pipe, prompts: str | list[str], negative_prompt=None, height: int | None = None,
                          width: int | None = None, num_images_per_prompt: int = 1, **kwargs):
    """``pipe(prompts, ...)`` for a text-to-image pipeline; for a class-conditional one each prompt is
    a class name or id (:func:`class_label`), repeated ``num_images_per_prompt`` times, and the
    text-only options must be unset. ``kwargs`` (guidance, generator, steps, ...) pass through."""
    if hasattr(pipe, "class_ids"):
        refuse_text_options(negative_prompt=negative_prompt, height=height, width=width)
        prompts = [prompts] if isinstance(prompts, str) else prompts
        labels = pipe.class_ids([class_label(p) for p in prompts])
        return pipe([k for k in labels for _ in range(num_images_per_prompt)], **kwargs)
    return pipe(prompt=prompts, negative_prompt=negative_prompt, height=height, width=width,
                num_images_per_prompt=num_images_per_prompt, **kwargs)


def load_pipeline(model: str | os.PathLike | None = None, device: str = "cpu", dtype: str = "float32"):
    """A guided pipeline for ``model`` (a local directory or hub id; None = the default model,
    ``"dit"`` the shipped class-conditional one)."""
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype: must be one of {', '.join(dtypes)}, got {dtype!r}")
    path = resolve_model(model)
    if model is not None and not Path(model).exists() and os.sep in str(model):
        raise ValueError(f"model: no such directory {model!r}")
    cls = pipeline_class_for(path)
    kwargs = {"dtype": dtypes[dtype]}
    if cls.__name__ == "GuidedStableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(path, **kwargs)
    return pipe.to(device)
