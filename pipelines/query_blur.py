"""SEG's query blur: queries blurred by a Gaussian over their token grid, and the grid of a
level's tokens (shared by the UNet, SD3 and flow-transformer perturbations and SAG's probe)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_blur_queries", "token_grid"]


def _kernel_1d(sigma: float, length: int, like: torch.Tensor) -> torch.Tensor:
    """A Gaussian truncated at 3 sigma (odd size ceil(6 sigma) + 1, as SEG's code), at most the
    largest odd size whose reflect padding fits ``length``."""
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    size = min(size, length - (length % 2 - 1))
    half = (size - 1) / 2
    x = torch.linspace(-half, half, steps=size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(like)


def gaussian_blur_queries(query: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Blur queries [B, H*W, C] over the H x W token grid, channel by channel, with a Gaussian of
    std ``sigma`` tokens (separable, reflect padding); ``inf`` replaces them by their mean."""
    b, n, c = query.shape
    if n != height * width:
        raise ValueError(f"blur: {n} query tokens do not form a {height} x {width} grid")
    grid = query.transpose(1, 2).reshape(b, c, height, width)
    if math.isinf(sigma):
        grid = grid.mean(dim=(-2, -1), keepdim=True).expand(b, c, height, width)
    else:
        if height > 1:
            k = _kernel_1d(sigma, height, grid)
            grid = F.conv2d(F.pad(grid, (0, 0, k.numel() // 2, k.numel() // 2), mode="reflect"),
                            k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
        if width > 1:
            k = _kernel_1d(sigma, width, grid)
            grid = F.conv2d(F.pad(grid, (k.numel() // 2, k.numel() // 2, 0, 0), mode="reflect"),
                            k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return grid.reshape(b, c, n).transpose(1, 2)


def token_grid(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The token grid of a UNet level: the latent size divided by 2^l (rounded up, as the
    stride-2 convolutions do), or a square."""
    height, width = latent_hw
    for level in range(8):
        h, w = -(-height // 2 ** level), -(-width // 2 ** level)
        if h * w == tokens:
            return h, w
    side = math.isqrt(tokens)
    if side * side == tokens:
        return side, side
    raise ValueError(f"blur: cannot place {tokens} tokens on a grid of the {height} x {width} latent")
