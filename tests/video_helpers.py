"""Helpers of the video families' tests (test_wan, test_ltx, test_hunyuan_video15): a transformer
that must not run, the branch model a pipeline call builds, and an altered branch."""

from __future__ import annotations

import math
from typing import Any

from guidance_engine.guidance import Branch, Perturbation


def no_forward(pipe) -> list:
    """Replace the transformer's forward by one that records the call and raises; returns the
    record (empty while the transformer has not run)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the transformer ran")

    pipe.transformer.forward = refuse
    return calls


class _Captured(Exception):
    def __init__(self, branches) -> None:
        super().__init__("captured")
        self.branches = branches


def captured_branches(pipe, **call: Any):
    """The branch model ``pipe(**call)`` builds, taken before its first denoising step."""
    def denoise(branches, *args, **kwargs):
        raise _Captured(branches)

    pipe.denoise = denoise
    try:
        pipe(**call)
    except _Captured as captured:
        return captured.branches
    finally:
        del pipe.denoise
    raise AssertionError("the pipeline did not reach its denoising loop")


def altered(kind: str, layer: int | str, sigma: float = math.inf) -> Branch:
    """The conditional branch with perturbation ``kind`` on ``layer``."""
    return Branch(f"altered_{kind}_{layer}", base="cond", perturb=Perturbation(kind, (layer,), sigma=sigma))
