"""A training run's resumable state, shared by the toy training scripts (train_default, train_dit,
train_distilled): every named part's ``state_dict`` (models, EMA copies, optimisers), the batch
generator's state and the run's progress dict, in one ``torch.save`` file.

Written to a temporary name beside it and renamed when complete, so that a run killed while
saving leaves the previous state whole; loaded with the same names, so a resumed run continues
from the step, the weights, the optimiser moments and the random stream it stopped at.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["load_training_state", "save_training_state"]


def save_training_state(path: str | os.PathLike, parts: Mapping[str, Any], generator: torch.Generator,
                        state: Mapping[str, Any]) -> None:
    """Write ``parts`` (name -> anything with ``state_dict()``), ``generator``'s state and
    ``state`` (the run's progress: step, losses, elapsed time) to ``path``, atomically."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    saved = {name: part.state_dict() for name, part in parts.items()}
    if "gen" in saved or "state" in saved:
        raise ValueError("parts: the names 'gen' and 'state' are the generator's and the progress's")
    torch.save({**saved, "gen": generator.get_state(), "state": dict(state)}, tmp)
    os.replace(tmp, path)


def load_training_state(path: str | os.PathLike, parts: Mapping[str, Any],
                        generator: torch.Generator) -> dict[str, Any] | None:
    """Restore ``parts`` and ``generator`` from ``path`` (written by :func:`save_training_state`
    with the same names) and return the run's progress; None when there is no such file (a fresh
    run). A part missing from the file is a KeyError naming it."""
    path = Path(path)
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=False)  # our own file: it holds the optimisers' state
    missing = sorted(set(parts) - set(saved))
    if missing:
        raise KeyError(f"{path}: no saved state for {', '.join(missing)} (saved: {', '.join(sorted(saved))})")
    for name, part in parts.items():
        part.load_state_dict(saved[name])
    generator.set_state(saved["gen"])
    return saved["state"]
