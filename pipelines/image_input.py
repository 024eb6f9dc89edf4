"""Input images of img2img, inpainting and inversion: loading, size checks, encoding, noise.

Everything here runs before the first network call, so bad input (a missing or unreadable file,
a size that is not a multiple of the VAE factor, a strength outside (0, 1]) fails early with the
parameter named.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import PIL.Image
import torch

from guidance_engine.samplers import StartImage

if TYPE_CHECKING:
    from .branches import NetworkBranches

ImageLike = Any  # PIL image, numpy array, torch tensor, a path, or a list of them


def load_image(image: ImageLike, name: str = "image") -> ImageLike:
    """Open a path as an RGB PIL image (a clear ``ValueError`` naming ``name`` if it cannot be read)
    and scale a ``uint8`` array to floats in [0, 1] (what diffusers expects of numpy images); float
    arrays in [0, 1], tensors in [-1, 1] and PIL images pass through. Lists are handled element by element."""
    if isinstance(image, list):
        return [load_image(item, name) for item in image]
    if isinstance(image, (str, os.PathLike)):
        try:
            with PIL.Image.open(image) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError) as error:
            raise ValueError(f"{name}: cannot read an image from {os.fspath(image)!r} ({error})") from None
    if image is None:
        raise ValueError(f"{name}: an input image is required")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        # diffusers reads numpy images as floats in [0, 1]; a uint8 array is an ordinary picture
        return image.astype(np.float32) / 255.0
    if isinstance(image, np.ndarray) and image.dtype.kind not in "f":
        raise ValueError(f"{name}: a numpy image must be uint8 (0-255) or float (0-1), got dtype {image.dtype}")
    if isinstance(image, (np.ndarray, torch.Tensor)) and image.ndim not in (2, 3, 4):
        raise ValueError(f"{name}: expected an image array of 2 to 4 dimensions (HW, HWC/CHW, NHWC/NCHW), got "
                         f"shape {tuple(image.shape)}")
    if not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        raise ValueError(f"{name}: expected a PIL image, numpy array, torch tensor or path, got {type(image).__name__}")
    return image


def image_size(image: ImageLike) -> tuple[int, int]:
    """(height, width) of a PIL image, an HWC / NHWC array or a CHW / NCHW tensor (first of a list)."""
    first = image[0] if isinstance(image, list) else image
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray):
        return tuple(first.shape[-3:-1]) if first.ndim >= 3 else tuple(first.shape[:2])
    return tuple(first.shape[-2:])


@dataclass(frozen=True)
class ImageInput:
    """The input image of one img2img call and its ``strength`` (private to the call), with the
    stock SD / SDXL img2img rules: ``int(n * strength)`` steps run, given ``latents`` are the noise
    to add, the posterior is sampled once per output image.

    ``step_rule``: how ``strength`` becomes a step count
    (:func:`guidance_engine.samplers.loop.start_index`). ``latents_are_start``: given ``latents``
    are the noised start rather than the noise to add."""

    image: ImageLike
    strength: float

    step_rule: ClassVar[str] = "run"
    latents_are_start: ClassVar[bool] = False

    def size(self, pipe, height: int | None, width: int | None) -> tuple[int, int]:
        """Validate (before any model call) and return the output size: the image's own, or
        ``height`` / ``width`` when given (the image is resized to it, as the stock pipelines do)."""
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) \
                or not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength: must be in (0, 1], got {self.strength!r}")
        h, w = image_size(self.image)
        if self.is_latents(pipe):
            h, w = h * pipe.vae_scale_factor, w * pipe.vae_scale_factor
        h, w = height or h, width or w
        factor = pipe.vae_scale_factor
        if h % factor or w % factor:
            raise ValueError(f"image: height and width must be multiples of {factor} (the VAE's downscaling "
                             f"factor), got {h} x {w}; resize or crop the image")
        return h, w

    def noised_strength(self) -> float | None:
        """The strength at which the run starts from the noised image (img2img always does)."""
        return float(self.strength)

    @staticmethod
    def latent_channels(pipe) -> int:
        """The VAE's latent channels (an input with that many channels is taken as latents)."""
        return pipe.vae.config.latent_channels

    def is_latents(self, pipe) -> bool:
        """Whether the input already is latents (a tensor with the VAE's latent channels)."""
        return isinstance(self.image, torch.Tensor) and self.image.ndim == 4 \
            and self.image.shape[1] == self.latent_channels(pipe)

    def pixels(self, pipe, height: int, width: int) -> torch.Tensor:
        """The image as a [-1, 1] NCHW tensor of the output size (stock preprocessing)."""
        return pipe.image_processor.preprocess(self.image, height=height, width=width)

    def encode(self, pipe, pixels: torch.Tensor, batch: int, dtype, device, generator) -> torch.Tensor:
        """Scaled clean latents, one row per output image, drawn as the stock ``prepare_latents`` draws
        them (the posterior is *sampled* with ``generator``; a list gives one generator per image)."""
        pixels = pixels.to(device=device, dtype=dtype)
        if pixels.shape[1] == self.latent_channels(pipe):
            latents = pixels
        else:
            if isinstance(generator, list) and pixels.shape[0] < batch and batch % pixels.shape[0] == 0:
                pixels = torch.cat([pixels] * (batch // pixels.shape[0]))
            latents = pipe.image_to_latents(pixels, generator)
        if latents.shape[0] != batch:
            if batch % latents.shape[0]:
                raise ValueError(f"image: {latents.shape[0]} images cannot be spread over {batch} outputs "
                                 "(give one image, or one per prompt)")
            latents = torch.cat([latents] * (batch // latents.shape[0]))
        return latents

    def prepare(self, pipe, branches: NetworkBranches, shape: tuple[int, ...], particles: int, *, dtype, device,
                generator, latents: torch.Tensor | None) -> tuple[StartImage, torch.Tensor | None]:
        """Encode the image, then draw the noise (the stock order). With particles the noise is
        left to the core (one draw per particle)."""
        if self.latents_are_start and latents is not None:  # the stock pipeline neither encodes nor draws then
            start = latents.to(device=device, dtype=dtype)
            return StartImage(start, float(self.strength), step_rule=self.step_rule, noised=True), start
        pixels = self.pixels(pipe, shape[2] * pipe.vae_scale_factor, shape[3] * pipe.vae_scale_factor) \
            if not self.is_latents(pipe) else self.image
        clean = self.encode(pipe, pixels, shape[0], dtype, device, generator)
        if latents is None and particles == 1:
            latents = pipe.initial_noise(shape, generator, device, dtype, None)
        return StartImage(clean, float(self.strength), step_rule=self.step_rule), latents


@dataclass(frozen=True)
class FlowImageInput(ImageInput):
    """An img2img input image with the rules of the stock SD3 and Flux img2img pipelines: the first
    ``int(n - n * strength)`` steps are skipped, given ``latents`` are the noised start (the image
    is then neither encoded nor noised), and each given image's posterior is sampled once (with
    ``generator[i]`` for image ``i`` when a list) and its latents repeated over the outputs."""

    step_rule: ClassVar[str] = "skip"
    latents_are_start: ClassVar[bool] = True

    def encode(self, pipe, pixels: torch.Tensor, batch: int, dtype, device, generator) -> torch.Tensor:
        pixels = pixels.to(device=device, dtype=dtype)
        if pixels.shape[1] == self.latent_channels(pipe):
            latents = pixels
        else:
            if isinstance(generator, list):
                generator = generator[:pixels.shape[0]]  # one per given image, as the stock encoder reads them
            latents = pipe.image_to_latents(pixels, generator)
        if batch % latents.shape[0]:
            raise ValueError(f"image: {latents.shape[0]} images cannot be spread over {batch} outputs "
                             "(give one image, or one per prompt)")
        return torch.cat([latents] * (batch // latents.shape[0]))
