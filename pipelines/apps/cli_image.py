"""``guidance-engine img2img`` and ``guidance-engine edit``: the engine on existing images.

    guidance-engine img2img photo.png "a red circle on a blue background" --strength 0.6 --method apg
    guidance-engine img2img photo.png "a green square" --mask mask.png          # inpainting
    guidance-engine edit photo.png --source-prompt "a red circle" --target-prompt "a blue circle" \\
        --method cfgpp --grid edit-grid.png

Every check on the input (the image and mask can be read, sizes, strength, the method's
parameters) runs before the model is loaded. Images are written under a temporary name and
renamed when complete; ``--grid`` adds a labelled side-by-side picture.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from guidance_engine.registry import resolve_guidance
from guidance_engine.samplers import SAMPLER_NAMES

from . import cli_common


def _guidance(args: argparse.Namespace):
    params = cli_common.parse_params(args.param)
    if args.scale is not None:
        params["scale"] = args.scale
    return resolve_guidance(args.method, **params)


def _check_common(args: argparse.Namespace, outputs: list[Path], guidance, image_strength: float | None = None,
                  inversion: bool = False) -> tuple[cli_common.ModelOptions, Any]:
    """Every check of img2img and edit that needs no model, before it loads; returns the model
    options and the scheduler the run will use (None: it comes with the weights)."""
    from .cli_checks import check_device, check_model_options, check_outputs, check_run_settings, check_steps

    check_device(args.device)
    options, scheduler = check_model_options(args)
    check_steps(args.steps, args.model, scheduler)
    check_run_settings(guidance, args.model, steps=args.steps, sampler=getattr(args, "sampler", None),
                       eta=getattr(args, "eta", None), image_strength=image_strength, inversion=inversion,
                       scheduler=scheduler, karras=options.karras, timesteps=options.timesteps)
    check_outputs("-o/--output", outputs, args.overwrite)
    if args.grid:
        check_outputs("--grid", [Path(args.grid)], args.overwrite)
    return options, scheduler


def labelled_grid(images: list, labels: list[str], path: Path, zoom: int = 4) -> Path:
    """Images side by side (nearest-neighbour zoom for small ones) with a caption under each."""
    from PIL import Image, ImageDraw

    tiles = [image.convert("RGB").resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)
             if image.width < 256 else image.convert("RGB") for image in images]
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (len(tiles) * (w + 8) + 8, h + 30), "white")
    draw = ImageDraw.Draw(grid)
    for k, (tile, label) in enumerate(zip(tiles, labels)):
        grid.paste(tile, (8 + k * (w + 8), 8))
        draw.text((8 + k * (w + 8), h + 12), label[: max(8, w // 6)], fill="black")
    cli_common.atomic_save_png(grid, path, {"labels": labels})
    return path


def cmd_img2img(args: argparse.Namespace) -> int:
    import torch

    from ..image_input import load_image

    from .cli_checks import check_eta, check_int, check_seeds

    guidance = _guidance(args)
    if not 0.0 < args.strength <= 1.0:
        raise ValueError(f"--strength: must be in (0, 1], got {args.strength}")
    check_int("--num-images", args.num_images, 1, 1024)
    check_seeds("--seed", args.seed, args.num_images)
    check_eta(args.eta)
    paths = cli_common.output_paths(Path(args.output), args.num_images)
    # inpainting at strength 1 starts from pure noise; everything else from the noised image
    options, scheduler = _check_common(args, paths, guidance,
                                       None if args.mask and args.strength == 1.0 else args.strength)
    image = load_image(args.image)
    mask = load_image(args.mask, "mask") if args.mask else None
    if mask is not None and mask.size != image.size:
        raise ValueError(f"--mask: its size {mask.size[0]} x {mask.size[1]} must match the image's "
                         f"{image.size[0]} x {image.size[1]}")
    _check_image_family(options.family, args.model, inpaint=mask is not None)
    pipe = cli_common.load_quietly(args.model, args.device, args.dtype, options)
    pipe = _image_pipeline(pipe, inpaint=mask is not None)
    solver = _loaded_solver(args, guidance, pipe, options, scheduler)
    generators = [torch.Generator(device=args.device).manual_seed(args.seed + i) for i in range(args.num_images)]
    extra: dict[str, Any] = {"mask_image": mask} if mask is not None else {}
    if options.timesteps is not None:
        extra["timesteps"] = list(options.timesteps)
    start = time.perf_counter()
    out = pipe(args.prompt, image=image, strength=args.strength, negative_prompt=args.negative_prompt,
               num_images_per_prompt=args.num_images, num_inference_steps=args.steps, guidance=guidance,
               sampler=args.sampler, generator=generators, eta=args.eta, **extra)
    seconds = time.perf_counter() - start
    for i, (result, path) in enumerate(zip(out.images, paths)):
        meta = {"command": "inpaint" if mask is not None else "img2img", "image": str(args.image),
                "mask": str(args.mask) if args.mask else None, "prompt": args.prompt, "strength": args.strength,
                "guidance": guidance.to_dict(), "sampler": args.sampler or "auto", "steps": args.steps,
                "seed": args.seed + i, "model": str(args.model or "default"), **options.metadata(), "nfe": out.nfe}
        text = cli_common.png_parameters(args.prompt, args.negative_prompt, pipe=pipe, guidance=guidance.to_dict(),
                                         sampler=solver, steps=args.steps, seed=args.seed + i, size=result.size,
                                         model=args.model, options=options, strength=args.strength)
        cli_common.atomic_save_png(result, path, meta, text)
        print(f"wrote {path}")
    if args.grid:
        labels = ["input", *(f"{guidance.name} seed {args.seed + i}" for i in range(args.num_images))]
        print(f"wrote {labelled_grid([image, *out.images], labels, Path(args.grid))}")
    print(f"method {guidance.name}, {out.nfe:g} network evaluations per image, {seconds:.2f} s")
    return 0


#: The checkpoints each image command takes, by guided pipeline class.
_TEXT_TO_IMAGE_SD = {"GuidedStableDiffusionPipeline", "GuidedStableDiffusionXLPipeline"}
_IMAGE_FAMILIES = {"img2img": _TEXT_TO_IMAGE_SD | {"GuidedFluxPipeline", "GuidedQwenImagePipeline", "GuidedZImagePipeline"},
                   "inpainting": _TEXT_TO_IMAGE_SD,
                   "editing": _TEXT_TO_IMAGE_SD}


def _loaded_solver(args: argparse.Namespace, guidance, pipe, options: cli_common.ModelOptions, scheduler) -> str:
    """The solver the run steps with, on the loaded pipeline's scheduler; checked against it when
    no scheduler config was at hand before loading (a single file's configs came with it)."""
    from guidance_engine.samplers.loop import resolve_sampler

    from .cli_checks import check_schedule_support

    solver = resolve_sampler(args.sampler, guidance, pipe.scheduler)
    if scheduler is None:
        check_schedule_support(solver, pipe.scheduler, karras=options.karras, timesteps=options.timesteps)
    return solver


def _check_image_family(family: str, model, inpaint: bool, edit: bool = False) -> None:
    """Refuse, before the model loads, a checkpoint whose family (its guided pipeline class name)
    lacks this image command."""
    command = "editing" if edit else "inpainting" if inpaint else "img2img"
    if family not in _IMAGE_FAMILIES[command]:
        takes = "Stable Diffusion 1.x/2.x or SDXL" + (", Flux.1, Qwen-Image or Z-Image" if command == "img2img" else "")
        raise ValueError(f"--model: {command} needs a {takes} checkpoint here, got a {family} one ({model})")


def _image_pipeline(pipe, inpaint: bool, edit: bool = False):
    from ..img2img import GuidedStableDiffusionImg2ImgPipeline
    from ..inpaint import GuidedStableDiffusionInpaintPipeline
    from ..stable_diffusion import GuidedStableDiffusionPipeline
    from ..stable_diffusion_xl import GuidedStableDiffusionXLPipeline
    from ..xl_image import GuidedStableDiffusionXLImg2ImgPipeline, GuidedStableDiffusionXLInpaintPipeline

    from ..flux import GuidedFluxImg2ImgPipeline, GuidedFluxPipeline
    from ..qwen_image import GuidedQwenImagePipeline
    from ..qwen_image_img2img import GuidedQwenImageImg2ImgPipeline
    from ..z_image import GuidedZImagePipeline
    from ..z_image_img2img import GuidedZImageImg2ImgPipeline

    flow_image = {GuidedFluxPipeline: GuidedFluxImg2ImgPipeline, GuidedQwenImagePipeline: GuidedQwenImageImg2ImgPipeline,
                  GuidedZImagePipeline: GuidedZImageImg2ImgPipeline}
    if type(pipe) in flow_image and not (inpaint or edit):
        cls = flow_image[type(pipe)]
    elif isinstance(pipe, GuidedStableDiffusionXLPipeline):
        cls = GuidedStableDiffusionXLInpaintPipeline if inpaint else GuidedStableDiffusionXLImg2ImgPipeline
    elif isinstance(pipe, GuidedStableDiffusionPipeline):
        cls = GuidedStableDiffusionInpaintPipeline if inpaint else GuidedStableDiffusionImg2ImgPipeline
    else:
        raise ValueError(f"--model: inpainting and editing need a Stable Diffusion 1.x/2.x or SDXL checkpoint here, "
                         f"image-to-image one of those, Flux.1, Qwen-Image or Z-Image; got a {type(pipe).__name__}")
    return cls.from_pipe(pipe)


def cmd_edit(args: argparse.Namespace) -> int:
    from ..image_input import load_image

    guidance = _guidance(args)
    options, _ = _check_common(args, [Path(args.output)], guidance, inversion=True)
    image = load_image(args.image)
    _check_image_family(options.family, args.model, inpaint=False, edit=True)
    pipe = _image_pipeline(cli_common.load_quietly(args.model, args.device, args.dtype, options), inpaint=False,
                           edit=True)
    start = time.perf_counter()
    inverted = pipe.invert(image, args.source_prompt, guidance=guidance, num_inference_steps=args.steps)
    outputs = {}
    for name, prompt in (("reconstruction", args.source_prompt), ("edit", args.target_prompt)):
        outputs[name] = pipe.regenerate(prompt, inverted)
    seconds = time.perf_counter() - start
    meta = {"command": "edit", "image": str(args.image), "source_prompt": args.source_prompt,
            "target_prompt": args.target_prompt, "guidance": guidance.to_dict(), "steps": args.steps,
            "model": str(args.model or "default"), **options.metadata(), "nfe": inverted.nfe + outputs["edit"].nfe}
    edited = outputs["edit"].images[0]  # regenerate() steps with the core DDIM solver, eta 0
    text = cli_common.png_parameters(args.target_prompt, None, pipe=pipe, guidance=guidance.to_dict(),
                                     sampler="ddim", steps=args.steps, seed=None, size=edited.size,
                                     model=args.model, options=options)
    cli_common.atomic_save_png(edited, Path(args.output), meta, text)
    print(f"wrote {args.output}")
    if args.grid:
        labels = ["input", f"reconstruction ({guidance.name})", args.target_prompt]
        grid = labelled_grid([image, outputs["reconstruction"].images[0], outputs["edit"].images[0]], labels,
                             Path(args.grid))
        print(f"wrote {grid}")
    print(f"method {guidance.name}: inversion {inverted.nfe:g} + regeneration {outputs['edit'].nfe:g} network "
          f"evaluations, {seconds:.2f} s")
    return 0


def _add_common(parser: argparse.ArgumentParser, method: str, steps: int, ays: bool) -> None:
    from guidance_engine.registry import method_names

    parser.add_argument("--method", default=method, help=f"guidance method: {', '.join(method_names())}")
    parser.add_argument("--scale", type=float, default=None, help="the method's scale (default: its paper's)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="another parameter of the method (repeatable)")
    parser.add_argument("--steps", type=int, default=steps, help="denoising steps, 1 to the scheduler's training steps")
    cli_common.add_model_options(parser, ays=ays)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="weights' precision")
    parser.add_argument("--grid", default=None, help="also write a labelled side-by-side PNG here")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")


def add_image_parsers(sub) -> None:
    """Register ``img2img`` and ``edit`` on the top-level command's subparsers."""
    i2i = sub.add_parser("img2img", help="transform an image towards a prompt (with --mask: inpainting)")
    i2i.add_argument("image", help="input image (its size a multiple of the VAE factor)")
    i2i.add_argument("prompt", help="what the output should show")
    i2i.add_argument("--strength", type=float, default=0.6, help="in (0, 1]: how much of the schedule runs")
    i2i.add_argument("--mask", default=None, help="mask image of the same size: white = repaint, black = keep")
    i2i.add_argument("-n", "--negative-prompt", default=None,
                     help="what the unconditional branch sees instead of the empty prompt")
    i2i.add_argument("--sampler", default=None, choices=SAMPLER_NAMES,
                     help="solver (default: the model's scheduler, or its mirror for CFG++)")
    i2i.add_argument("--eta", type=float, default=None, help="DDIM eta in [0, 1] (default: the sampler's own)")
    i2i.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    i2i.add_argument("--num-images", type=int, default=1, help="images to generate, 1 to 1024")
    i2i.add_argument("-o", "--output", default="img2img.png", help="PNG file to write (several: img2img-0.png, ...)")
    _add_common(i2i, "cfg", 30, ays=True)
    i2i.set_defaults(func=cmd_img2img)

    edit = sub.add_parser("edit", help="invert an image with one prompt, regenerate it with another (CFG++)")
    edit.add_argument("image", help="input image (its size a multiple of the VAE factor)")
    edit.add_argument("--source-prompt", required=True, help="what the image shows")
    edit.add_argument("--target-prompt", required=True, help="what it should show")
    edit.add_argument("-o", "--output", default="edit.png", help="PNG file to write")
    _add_common(edit, "cfgpp", 10, ays=False)
    edit.set_defaults(func=cmd_edit)
