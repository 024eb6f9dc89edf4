"""Calibration of LinearAG: record CFG trajectories on a prompt set, fit, save next to the model.

    guidance-engine calibrate-linear-ag --prompts prompts.txt --steps 20 --scale 7.5 --out DIR
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from guidance_engine.methods.cfg import CFG
from guidance_engine.methods.linear_ag import fit_coefficients, save_calibration


@dataclass
class Trajectory:
    eps_c: list[torch.Tensor] = field(default_factory=list)
    eps_u: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class RecordingCFG(CFG):
    """CFG that records the conditional and unconditional eps of every step in its run state."""

    def init_state(self, batch_size: int, device: torch.device) -> Trajectory:
        return Trajectory()

    def combine(self, preds, step, state: Trajectory):
        state.eps_c.append(preds["cond"].eps.float().cpu())
        state.eps_u.append(preds["uncond"].eps.float().cpu())
        return super().combine(preds, step, None)


def record_trajectories(pipe, prompts: Sequence[str], steps: int, scale: float, sampler: str | None,
                        seed: int = 0, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """eps_c, eps_u of CFG runs, shape [prompts, steps, C, H, W] (empty negative prompt)."""
    eps_c, eps_u = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="recording CFG trajectories"):
        chunk = list(prompts[start:start + batch_size])
        generators = [torch.Generator(device=pipe.device).manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance=RecordingCFG(scale=scale), sampler=sampler,
                   generator=generators, output_type="latent")
        state: Trajectory = out.guidance_state
        eps_c.append(torch.stack(state.eps_c, dim=1))
        eps_u.append(torch.stack(state.eps_u, dim=1))
    return torch.cat(eps_c), torch.cat(eps_u)


def calibrate_linear_ag(pipe, prompts: Sequence[str], out_dir: str | Path, *, steps: int = 20, scale: float = 7.5,
                        sampler: str | None = None, window: float = 0.5, period: int = 0, seed: int = 0,
                        batch_size: int = 8) -> dict[str, Any]:
    """Record CFG trajectories, fit LinearAG's coefficients, save them; returns the metadata."""
    if not 0 < window <= 1:
        raise ValueError(f"--window: must be in (0, 1], got {window}")
    if period < 0 or period == 1:
        raise ValueError(f"--period: must be 0 or an integer >= 2, got {period}")
    if len(prompts) < 2:
        raise ValueError(f"--prompts: need at least 2 prompts, got {len(prompts)}")
    start = time.perf_counter()
    eps_c, eps_u = record_trajectories(pipe, prompts, steps, scale, sampler, seed, batch_size)
    coefficients, predicted, r2 = fit_coefficients(eps_c, eps_u, window, period)
    metadata = {"num_steps": steps, "window": window, "period": period, "predicted_steps": predicted,
                "scale": scale, "sampler": sampler or "scheduler", "scheduler": type(pipe.scheduler).__name__,
                "trajectories": len(prompts), "seed": seed, "r2": r2,
                "features": ["eps_c", "eps_c_prev", "eps_u_prev", "one"], "seconds": time.perf_counter() - start}
    save_calibration(out_dir, coefficients.float(), metadata)
    return metadata
