"""Guidance-distilled UNets: the guidance scale is a network input, not a combination of branches.

A UNet with ``time_cond_proj_dim`` set (LCM, Meng et al.'s guided-distillation students, the shipped
distilled default model) learned classifier-free guidance at the scale it is given: the stock
Stable Diffusion pipelines (SD and SDXL, text-to-image, img2img and inpainting, diffusers 0.42.1)
then never run the unconditional branch (``do_classifier_free_guidance`` is false whatever
``guidance_scale``), feed every step ``timestep_cond = get_guidance_scale_embedding(guidance_scale
- 1)`` (one identical row per image) and do not encode the negative prompt, so it does nothing.

The engine keeps those meanings. ``guidance_scale`` is the embedded value (default 7.5, stock's),
and ``guidance=None`` is the stock recipe: the conditional prediction alone, one forward per step,
equal to stock bit for bit. A method (a name, dict or object) runs on top of the embedded guidance
at its own scale, which ``guidance_scale`` does not set here: NAG alone (its CFG ``scale`` 1) is what
makes a negative prompt act on such a model at one forward per step; CFG on top double-guides (the
unconditional branch gets the same embedded scale, as every row of a stock call does).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from guidance_engine.guidance import Guidance

from . import conditions

#: The embedded scale's accepted range (the same as CFG's ``scale``).
EMBEDDED_SCALE_RANGE = (0.0, 100.0)
#: The embedded scale when the call gives none (the stock SD / SDXL ``__call__`` default).
DEFAULT_EMBEDDED_SCALE = 7.5


def is_guidance_distilled(unet: Any) -> bool:
    """Whether ``unet`` takes an embedded guidance scale (``time_cond_proj_dim`` in its config)."""
    return getattr(unet.config, "time_cond_proj_dim", None) is not None


def embedded_scale(guidance_scale: float | None, default: float) -> float:
    """The scale to embed (``guidance_scale``, or the pipeline's default when None), range-checked."""
    scale = default if guidance_scale is None else guidance_scale
    low, high = EMBEDDED_SCALE_RANGE
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or not low <= scale <= high:
        raise ValueError(f"guidance_scale: on a guidance-distilled UNet it is the embedded guidance scale, a number "
                         f"in [{low:g}, {high:g}]; got {scale!r}")
    return float(scale)


def distilled_guidance(pipe: Any, guidance: Any, guidance_rescale: float) -> Guidance:
    """The method of a call on a guidance-distilled UNet: the conditional prediction alone for
    ``guidance=None`` (stock), else the method at its own scale (``guidance_scale`` is embedded)."""
    if guidance is None:
        return conditions.stock_guidance(1.0, guidance_rescale)  # scale 1: no uncond rows, rescale inert
    return pipe.resolve_guidance(guidance, None, guidance_rescale)


def embed_scale(pipe: Any, branches: Any, scale: float, device: torch.device, dtype: torch.dtype) -> None:
    """Give every forward of ``branches`` the stock ``timestep_cond`` for ``scale`` (one row; the
    forward repeats it for its rows, which are identical in stock's too)."""
    embedding = pipe.get_guidance_scale_embedding(torch.tensor([scale - 1.0]),
                                                  embedding_dim=pipe.unet.config.time_cond_proj_dim)
    branches.timestep_cond = embedding.to(device=device, dtype=dtype)
