"""Diffusers pipelines onto the sampler core, the default model and the CLI.

Attributes are imported on first use, so that ``guidance-engine methods`` and ``--help`` start
without importing diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GuidedPipelineOutput": ".common",
    "NetworkBranches": ".branches",
    "UNetBranches": ".branches",
    "GuidedStableDiffusionPipeline": ".stable_diffusion",
    "GuidedStableDiffusionImg2ImgPipeline": ".img2img",
    "GuidedStableDiffusionInpaintPipeline": ".inpaint",
    "GuidedStableDiffusionInstructPix2PixPipeline": ".instruct_pix2pix",
    "GuidedStableDiffusionXLPipeline": ".stable_diffusion_xl",
    "GuidedStableDiffusionXLImg2ImgPipeline": ".xl_image",
    "GuidedStableDiffusionXLInpaintPipeline": ".xl_image",
    "GuidedStableDiffusion3Pipeline": ".stable_diffusion_3",
    "GuidedDiTPipeline": ".dit",
    "GuidedFluxPipeline": ".flux",
    "GuidedFluxImg2ImgPipeline": ".flux",
    "FluxBranches": ".flux",
    "GuidedFlux2KleinPipeline": ".flux2",
    "Flux2Branches": ".flux2",
    "GuidedFlux2Pipeline": ".flux2_dev",
    "Flux2DevBranches": ".flux2_dev",
    "GuidedChromaPipeline": ".chroma",
    "ChromaBranches": ".chroma",
    "GuidedQwenImagePipeline": ".qwen_image",
    "QwenImageBranches": ".qwen_image",
    "GuidedQwenImageImg2ImgPipeline": ".qwen_image_img2img",
    "GuidedZImagePipeline": ".z_image",
    "ZImageBranches": ".z_image",
    "GuidedZImageImg2ImgPipeline": ".z_image_img2img",
    "GuidedWanPipeline": ".wan",
    "GuidedWanPipelineOutput": ".wan",
    "WanBranches": ".wan",
    "GuidedLTXPipeline": ".ltx",
    "GuidedLTXPipelineOutput": ".ltx",
    "LTXBranches": ".ltx",
    "GuidedHunyuanVideo15Pipeline": ".hunyuan_video15",
    "GuidedHunyuanVideo15PipelineOutput": ".hunyuan_video15",
    "HunyuanVideo15Branches": ".hunyuan_video15",
    "default_model_path": ".models",
    "load_pipeline": ".models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
