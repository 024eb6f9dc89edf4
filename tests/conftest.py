"""Shared fixtures: tiny SD / SDXL pipelines built in code, a toy branch model for the core."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from typing import Sequence  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402

from guidance_engine.pipelines import GuidedStableDiffusionPipeline, GuidedStableDiffusionXLPipeline  # noqa: E402
from guidance_engine.pipelines.toy.tiny_models import tiny_sd_components, tiny_sdxl_components  # noqa: E402

PROMPT = "a red circle on a blue background"


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd_pair():
    """(stock, guided) SD pipelines sharing one set of tiny components."""
    stock = quiet(StableDiffusionPipeline(**tiny_sd_components(0), requires_safety_checker=False))
    return stock, quiet(GuidedStableDiffusionPipeline.from_pipe(stock))


@pytest.fixture
def sdxl_pair():
    stock = quiet(StableDiffusionXLPipeline(**tiny_sdxl_components(0)))
    return stock, quiet(GuidedStableDiffusionXLPipeline.from_pipe(stock))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


class ToyModel:
    """A closed-form stand-in for a network: per-branch affine eps predictions, counting calls."""

    def __init__(self, kind: str = "epsilon") -> None:
        self.kind = kind
        self.calls: list[tuple[str, ...]] = []
        self.rows = 0

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, requests: Sequence) -> dict[str, torch.Tensor]:
        self.calls.append(tuple(name for name, _ in requests))
        t = float(timestep) / 1000.0
        shift = {"cond": 0.7, "uncond": -0.4}
        out = {}
        for name, rows in requests:
            xr = x if rows is None else x[rows]
            self.rows += xr.shape[0]
            out[name] = 0.5 * xr + shift[name] * torch.sin(xr + 3 * t) + 0.1 * (1 + t)
        return out
