"""Loading models: the default model that ships in the package, any diffusers checkpoint
directory, and single-file checkpoints (the original LDM / A1111 layout most users download).

A single file (``.safetensors`` or ``.ckpt``) holds weights only; diffusers' ``from_single_file``
converts them with the component configs of a diffusers model directory of the same architecture
(``config=``). Which directory, by default (:func:`single_file_config`): the shipped default model's
when the file holds its architecture (every UNet, VAE and text-encoder tensor converts to that
model's names and shapes), otherwise none: diffusers then infers the architecture from the file's
keys (SD 1.x, 2.x, SDXL, ...) and fetches that repository's config files from the hub, or its local
cache. Offline and uncached, that fails; the error then names ``config``. A ``config`` directory
that the file does not fit is refused before any weight is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .shipped import (default_dit_model_path, default_distilled_model_path,  # noqa: F401 (their home is shipped.py)
                      default_model_path)


def model_class_name(model: str | os.PathLike) -> str:
    """The stock pipeline class a checkpoint directory names in its ``model_index.json`` ("" when
    it has none); a folder our pipelines saved names ours: the stock name after "Guided"."""
    index = Path(model) / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    return name.removeprefix("Guided")


def pipeline_class_for(model: str | os.PathLike):
    """The guided pipeline class matching a checkpoint's ``model_index.json``."""
    from .stable_diffusion import GuidedStableDiffusionPipeline
    from .stable_diffusion_xl import GuidedStableDiffusionXLPipeline

    name = model_class_name(model)
    if name == "DiTPipeline":  # exactly: HunyuanDiT, PixArt and others hold other components
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
    if name == "LTXPipeline":  # exactly: LTX's image-to-video, condition and upsampling pipelines take other inputs
        from .ltx import GuidedLTXPipeline
        return GuidedLTXPipeline
    if name == "HunyuanVideo15Pipeline":  # exactly: its image-to-video checkpoints hold an image encoder
        from .hunyuan_video15 import GuidedHunyuanVideo15Pipeline
        return GuidedHunyuanVideo15Pipeline
    if name == "StableDiffusion3Pipeline":
        from .stable_diffusion_3 import GuidedStableDiffusion3Pipeline
        return GuidedStableDiffusion3Pipeline
    if name == "StableDiffusionInstructPix2PixPipeline":
        from .instruct_pix2pix import GuidedStableDiffusionInstructPix2PixPipeline
        return GuidedStableDiffusionInstructPix2PixPipeline
    if name.startswith(("Flux2", "QwenImage", "Chroma", "ZImage", "Wan", "StableDiffusion3", "LTX",
                        "HunyuanVideo15")):  # a variant not run yet
        raise ValueError(f"model: {model} is a {name} checkpoint, which the engine does not run yet; text-to-image "
                         "checkpoints of Flux.1, Flux.2 [dev], Flux.2 Klein, Chroma, Qwen-Image, Z-Image, SD 1.x/2.x, SDXL, SD3 and "
                         "DiT, text-to-video checkpoints of Wan 2.1 / 2.2, LTX-Video and HunyuanVideo 1.5, and "
                         "InstructPix2Pix are taken")
    if "Flux" in name:
        from .flux import GuidedFluxPipeline
        return GuidedFluxPipeline
    return GuidedStableDiffusionXLPipeline if "XL" in name else GuidedStableDiffusionPipeline


#: ``model`` shorthand for the shipped class-conditional model (a folder of that name wins).
DIT_SHORTHAND = "dit"
#: ``model`` shorthand for the shipped text-to-video model (a folder of that name wins).
VIDEO_SHORTHAND = "video"
#: ``model`` shorthand for the shipped guidance-distilled model (a folder of that name wins).
DISTILLED_SHORTHAND = "distilled"
_SHIPPED_VIDEO = Path(__file__).resolve().parent / "default_model_video"


def default_video_model_path() -> Path:
    """The shipped text-to-video default model (a tiny Wan 2.1, trained by ``train_video``)."""
    if not (_SHIPPED_VIDEO / "model_index.json").is_file():
        raise FileNotFoundError(f"the video default model is missing from the installation ({_SHIPPED_VIDEO}); "
                                "reinstall guidance-engine or pass --model")
    return _SHIPPED_VIDEO


def resolve_model(model: str | os.PathLike | None) -> str | os.PathLike:
    """The checkpoint ``model`` names: None is the default text-to-image model, ``"dit"`` the
    shipped class-conditional one, ``"video"`` the shipped text-to-video one, ``"distilled"`` the
    shipped guidance-distilled one (each unless a folder of that name exists), anything else as given."""
    if model is None:
        return default_model_path()
    if str(model) == DIT_SHORTHAND and not Path(model).exists():
        return default_dit_model_path()
    if str(model) == VIDEO_SHORTHAND and not Path(model).exists():
        return default_video_model_path()
    if str(model) == DISTILLED_SHORTHAND and not Path(model).exists():
        return default_distilled_model_path()
    return model


def is_class_conditional(model: str | os.PathLike | None) -> bool:
    """Whether ``model`` (as :func:`resolve_model` reads it) is a local class-conditional (DiT) checkpoint."""
    path = Path(resolve_model(model))
    return path.is_dir() and pipeline_class_for(path).__name__ == "GuidedDiTPipeline"


#: The text-to-video pipelines the engine runs, by the class name a checkpoint's model_index.json gives.
VIDEO_PIPELINES = ("WanPipeline", "LTXPipeline", "HunyuanVideo15Pipeline")


def is_video_model(model: str | os.PathLike | None) -> bool:
    """Whether ``model`` (as :func:`resolve_model` reads it) is a local text-to-video checkpoint
    (Wan 2.1 / 2.2, LTX-Video, HunyuanVideo 1.5)."""
    path = Path(resolve_model(model))
    try:
        return path.is_dir() and model_class_name(path) in VIDEO_PIPELINES  # read alone: no model stack imported
    except json.JSONDecodeError:  # not a readable checkpoint: the image commands' checks say why
        return False


def is_distilled_model(model: str | os.PathLike | None) -> bool:
    """Whether ``model`` (as :func:`resolve_model` reads it) is a local guidance-distilled checkpoint:
    its UNet's config sets ``time_cond_proj_dim`` (the embedded guidance scale), read as JSON alone."""
    config = Path(resolve_model(model)) / "unet" / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("time_cond_proj_dim") is not None
    except json.JSONDecodeError:  # not a readable checkpoint: the image commands' checks say why
        return False


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


#: Suffixes of single-file checkpoints, loaded through diffusers' ``from_single_file``.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: Without ``config``, the architectures diffusers infers from a single file's keys that the engine
#: loads, and the guided pipeline of each (the names are diffusers' ``infer_diffusers_model_type``).
_INFERRED_FAMILIES = {"v1": "GuidedStableDiffusionPipeline", "v2": "GuidedStableDiffusionPipeline",
                      "xl_base": "GuidedStableDiffusionXLPipeline"}


def is_single_file(model: str | os.PathLike | None) -> bool:
    """Whether ``model`` names a single-file checkpoint (by its suffix, whether or not it exists)."""
    return model is not None and Path(model).suffix.lower() in SINGLE_FILE_SUFFIXES


def checkpoint_shapes(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A single-file checkpoint's tensors as meta tensors of their shapes, no weight read: the
    safetensors header, or a ``.ckpt`` unpickled onto the meta device (its ``state_dict`` entry
    when it nests one, as LDM training checkpoints do)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
        checkpoint = torch.load(path, map_location="meta", weights_only=True)
    except Exception as error:  # safetensors, pickle and zip each raise their own kinds
        raise ValueError(f"model: cannot read {path.name} as a checkpoint ({type(error).__name__}: {error})") from None
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    return {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def _component_shapes(folder: Path, class_name: str) -> dict[str, tuple[int, ...]] | None:
    """Parameter shapes of a diffusers directory's component, built on the meta device from its
    config; None for the classes the fit check leaves to diffusers (SDXL's second encoder, ...)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if class_name in ("UNet2DConditionModel", "AutoencoderKL"):
            import diffusers

            cls = getattr(diffusers, class_name)
            model = cls.from_config(cls.load_config(folder))
        elif class_name == "CLIPTextModel":
            from transformers import CLIPTextConfig, CLIPTextModel

            model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder))
        else:
            return None
    # transformers >= 5.6 drops CLIPTextModel's ``text_model.`` level: compare without it
    return {key.removeprefix("text_model."): tuple(v.shape) for key, v in model.state_dict().items()}


def _converted_shapes(shapes: dict[str, torch.Tensor], folder: Path, class_name: str) -> dict[str, tuple[int, ...]]:
    """The diffusers names and shapes diffusers' own single-file conversion gives the file's tensors."""
    from diffusers.loaders import single_file_utils as convert

    if class_name == "UNet2DConditionModel":
        converted = convert.convert_ldm_unet_checkpoint(shapes, json.loads((folder / "config.json").read_text()))
    elif class_name == "AutoencoderKL":
        converted = convert.convert_ldm_vae_checkpoint(shapes, json.loads((folder / "config.json").read_text()))
    else:
        converted = convert.convert_ldm_clip_checkpoint(shapes)
    return {key.removeprefix("text_model."): tuple(v.shape) for key, v in converted.items() if v is not None}


def single_file_mismatch(shapes: dict[str, torch.Tensor], directory: str | os.PathLike) -> str | None:
    """Why a single file's tensors (:func:`checkpoint_shapes`) do not fit a diffusers directory:
    the first tensor of its UNet, VAE or CLIP text encoder that is missing or misshapen after
    diffusers' conversion; None when they fit. Extra tensors (EMA weights, ids) are allowed."""
    directory = Path(directory)
    index = json.loads((directory / "model_index.json").read_text())
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue
        expected = _component_shapes(directory / name, spec[1])
        if expected is None:
            continue
        try:
            found = _converted_shapes(shapes, directory / name, spec[1])
        except (KeyError, IndexError, ValueError) as error:  # keys of another layout altogether
            return f"its {name} tensors do not convert ({type(error).__name__}: {error})"
        for key, shape in expected.items():
            if key not in found:
                return f"{name} tensor {key!r} is missing"
            if found[key] != shape:
                return f"{name} tensor {key!r} has shape {list(found[key])}, {directory.name} needs {list(shape)}"
    return None


def single_file_config(model: str | os.PathLike, config: str | os.PathLike | None = None) -> Path | None:
    """The diffusers directory whose configs the single file ``model`` loads with: ``config``
    (which it must fit, :func:`single_file_mismatch`); without it the shipped default model's
    directory when the file fits that, else None (diffusers infers the architecture, and fetches
    its configs from the hub or its cache). ValueError naming ``config`` before any weight is read."""
    shapes = checkpoint_shapes(model)
    if config is None:
        shipped = default_model_path()
        return shipped if single_file_mismatch(shapes, shipped) is None else None
    directory = Path(config)
    if not (directory / "model_index.json").is_file():
        raise ValueError(f"config: must be a diffusers model directory (with model_index.json) of the file's "
                         f"architecture, got {str(config)!r}")
    problem = single_file_mismatch(shapes, directory)
    if problem is not None:
        raise ValueError(f"config: {Path(model).name} does not fit {directory}: {problem}")
    return directory


def single_file_pipeline_class(model: str | os.PathLike, directory: Path | None):
    """The guided pipeline class a single file loads into: the one ``directory``'s
    ``model_index.json`` names, or (no directory) the one of the architecture diffusers infers
    from the file's keys, SD 1.x/2.x or SDXL; ValueError naming ``model`` for the others."""
    if directory is not None:
        cls = pipeline_class_for(directory)
    else:
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type

        kind = infer_diffusers_model_type(checkpoint_shapes(model))
        if kind not in _INFERRED_FAMILIES:
            raise ValueError(f"model: diffusers reads {Path(model).name} as a {kind!r} checkpoint; without a config "
                             "directory the engine loads SD 1.x/2.x and SDXL base single files; pass config= "
                             "(CLI: --config) a diffusers model directory of its architecture")
        from . import stable_diffusion, stable_diffusion_xl

        module = stable_diffusion_xl if kind.startswith("xl") else stable_diffusion
        cls = getattr(module, _INFERRED_FAMILIES[kind])
    if not hasattr(cls, "from_single_file"):
        raise ValueError(f"model: {cls.__name__} checkpoints load from diffusers directories only, not single files")
    return cls


def _load_single_file(model: Path, config: str | os.PathLike | None, dtype: torch.dtype):
    directory = single_file_config(model, config)
    cls = single_file_pipeline_class(model, directory)
    kwargs: dict = {"dtype": dtype}
    if cls.__name__ == "GuidedStableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if directory is not None:
        return cls.from_single_file(str(model), config=str(directory), local_files_only=True, **kwargs)
    try:
        return cls.from_single_file(str(model), **kwargs)
    except OSError as error:  # huggingface_hub's offline / not-found errors are OSErrors
        raise ValueError(f"config: {model.name} is not the shipped model's architecture, and diffusers could not "
                         f"get the config files of the architecture it infers ({type(error).__name__}: "
                         f"{str(error).splitlines()[0]}); pass config= (CLI: --config) a diffusers model "
                         "directory of that architecture (its JSON and tokenizer files suffice)") from None


def load_pipeline(model: str | os.PathLike | None = None, device: str = "cpu", dtype: str = "float32",
                  config: str | os.PathLike | None = None):
    """A guided pipeline for ``model``: a local directory or hub id, a single-file checkpoint
    (``.safetensors``/``.ckpt``, converted with the configs of ``config`` or the default directory
    :func:`single_file_config` picks), None for the default model, ``"dit"`` for the shipped
    class-conditional one. ``config`` is for single files only."""
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype: must be one of {', '.join(dtypes)}, got {dtype!r}")
    if is_single_file(model):
        if not Path(model).is_file():
            raise ValueError(f"model: no such file {str(model)!r}")
        return _load_single_file(Path(model), config, dtypes[dtype]).to(device)
    if config is not None:
        raise ValueError(f"config: only a single-file model takes a config directory; {model or 'the default model'!s} "
                         "is a diffusers directory, which holds its own configs")
    path = resolve_model(model)
    if model is not None and not Path(model).exists() and os.sep in str(model):
        raise ValueError(f"model: no such directory {model!r}")
    cls = pipeline_class_for(path)
    kwargs = {"dtype": dtypes[dtype]}
    if cls.__name__ == "GuidedStableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(path, **kwargs)
    return pipe.to(device)
