"""Dual classifier-free guidance: two conditions, each with its own scale (InstructPix2Pix,
Brooks et al., CVPR 2023, arXiv 2211.09800; ComfyUI's DualCFGGuider).

InstructPix2Pix conditions on an input image c_I and an instruction c_T and guides with both; the
authors' code (timothybrooks/instruct-pix2pix, edit_cli.py ``CFGDenoiser``) and the diffusers
``StableDiffusionInstructPix2PixPipeline`` write it as (the paper's own equation was not read here)

    e = e(0, 0) + s_T (e(c_I, c_T) - e(c_I, 0)) + s_I (e(c_I, 0) - e(0, 0))

In the engine's branches, c = "cond" (text + image), i = "image" (the image with the negative or
empty text), u = "uncond" (the empty text, zero image latents), s = ``scale``, s_img =
``image_scale``:

    regular:  g = u + s (c - i) + s_img (i - u)          IP2P's rule (default)
    nested:   g = u + s_img ((i + s (c - i)) - u)         ComfyUI's "nested" style

"regular" is summed in the stock order, ``(u + s (c - i)) + s_img (i - u)``, so that the engine
reproduces the stock pipeline bit for bit. "nested" is CFG at s_img around the text-guided
prediction i + s (c - i); it equals "regular" at (s s_img, s_img) up to float rounding.

ComfyUI's DualCFGGuider (comfy_extras/nodes_custom_sampler.py, ``Guider_DualCFG``) takes cond1 =
c, cond2 = i (marked as a negative prompt), negative = u, ``cfg_conds`` = s and
``cfg_cond2_negative`` = s_img: its "regular" style is n + cfg2 (m - n) + cfg1 (p - m), the same
rule with the image term summed first; its "nested" style is ours. Its defaults (8, 8) are not
taken here.

Space: the weights (1 - s_img on u, s_img - s on i, s on c) sum to one, so both rules are the
same in eps, x0, v and flow space; they act on the raw network output as diffusers does (the
authors' code and ComfyUI combine denoised x0, which is the same up to float rounding).

Defaults: s = 7.5, s_img = 1.5, the diffusers pipeline's ``guidance_scale`` and
``image_guidance_scale`` (the authors' CLI uses 7.5 and 1.2).

Identities (tests/test_instruct_pix2pix.py):
- s = s_img = 1: the conditional prediction alone; only "cond" is evaluated (1 NFE).
- s = 0: u + s_img (i - u), CFG at s_img with "image" as the conditional branch, bit for bit
  (both styles: the text term adds an exact zero).
- i = u (an image that changes nothing): CFG at s between c and u, bit for bit; c = i: CFG at
  s_img between c and u, bit for bit (regular).
- s_img = 1: CFG at s between c and i; s = s_img: CFG at s between c and u (regular); nested s = 1:
  CFG at s_img between c and u; nested s_img = 1: CFG at s between c and i. These hold within
  float32 rounding only: the three-term sum rounds each term and then cancels u (or i) in float,
  where CFG's lerp never forms it.

Deviations from the peers:
- The stock pipeline guides only when guidance_scale > 1 and image_guidance_scale >= 1 and else
  returns the conditional prediction alone; this method applies its rule at every (s, s_img) but
  (1, 1). The IP2P pipeline's ``guidance=None`` keeps the stock rule.
- At s_img = 1 the weight of u is zero, yet u is evaluated, as in the stock pipeline and the
  authors' code (the forward stays theirs); ComfyUI's regular style skips the negative there
  (and the middle condition too when both scales are 1).
- Forward order: [cond, image, uncond], the stock and authors' row order (the engine's two-branch
  methods put "uncond" first); ComfyUI batches [negative, middle, positive].
- ``schedule`` shapes both scales around 1; outside the interval both are 1: the conditional
  prediction alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from ..guidance import Guidance, GuidedPrediction, StepInfo, param
from ..prediction import Prediction
from ..registry import register

#: The branch of the second condition alone: the input image with the negative (empty) text.
IMAGE = "image"
#: "regular": IP2P's u + s (c - i) + s_img (i - u); "nested": ComfyUI's u + s_img (i + s (c - i) - u).
STYLES: tuple[str, ...] = ("regular", "nested")


def dual_cfg(cond: torch.Tensor, image: torch.Tensor, uncond: torch.Tensor, scale: float,
             image_scale: float) -> torch.Tensor:
    """``u + s (c - i) + s_img (i - u)``, summed in the stock pipeline's order (bit for bit)."""
    return uncond + scale * (cond - image) + image_scale * (image - uncond)


def nested_dual_cfg(cond: torch.Tensor, image: torch.Tensor, uncond: torch.Tensor, scale: float,
                    image_scale: float) -> torch.Tensor:
    """``u + s_img (t - u)`` with ``t = i + s (c - i)``: CFG on the image around text CFG."""
    text_guided = image + scale * (cond - image)
    return uncond + image_scale * (text_guided - uncond)


@register
@dataclass(frozen=True, kw_only=True)
class DualCFG(Guidance):
    """Two-condition CFG: text guidance (c - i) at ``scale``, image guidance (i - u) at
    ``image_scale`` (InstructPix2Pix's rule, or ComfyUI's nested style)."""

    name: ClassVar[str] = "dual_cfg"
    paper: ClassVar[str] = ("Brooks et al., InstructPix2Pix: Learning to Follow Image Editing Instructions "
                            "(CVPR 2023, arXiv 2211.09800); styles: ComfyUI's DualCFGGuider")
    shaped_scales: ClassVar[tuple[str, ...]] = ("scale", "image_scale")

    scale: float = param(7.5, low=0.0, high=100.0,
                         doc="s: text guidance, the weight of (cond - image); s = image_scale = 1: cond alone")
    image_scale: float = param(1.5, low=0.0, high=100.0,
                               doc="s_img: image guidance, the weight of (image - uncond)")
    style: str = param("regular", choices=STYLES,
                       doc="'regular': u + s (c - i) + s_img (i - u) (IP2P); 'nested': u + s_img (i + s (c - i) - u)")

    def scales_at(self, step: StepInfo) -> tuple[float, float]:
        """(s, s_img) at this step, both shaped by the schedule; (1, 1) outside the interval."""
        return self.scale_at(step), self.shaped("image_scale", step)

    def required_branches(self) -> set[str]:
        return {"cond", IMAGE, "uncond"}

    def branches(self, step: StepInfo, state: Any) -> tuple[str, ...]:
        if self.scales_at(step) == (self.neutral_scale, self.neutral_scale):
            return ("cond",)
        return ("cond", IMAGE, "uncond")  # the stock pipeline's row order, so that its forward is ours

    def combine(self, preds: Mapping[str, Prediction], step: StepInfo, state: Any) -> GuidedPrediction:
        cond = preds["cond"]
        if IMAGE not in preds:  # both scales neutral
            return GuidedPrediction.single(cond)
        rule = dual_cfg if self.style == "regular" else nested_dual_cfg
        guided = rule(cond.output, preds[IMAGE].output, preds["uncond"].output, *self.scales_at(step))
        return GuidedPrediction.single(cond.with_output(guided))
