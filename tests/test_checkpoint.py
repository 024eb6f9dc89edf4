"""The toy training scripts' resumable state (pipelines/toy/checkpoint.py): a resumed run
continues exactly where the saved one was, and a save that fails leaves the previous state whole."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from guidance_engine.pipelines.toy.checkpoint import load_training_state, save_training_state


def _run(steps: int, model, opt, gen) -> None:
    for _ in range(steps):
        x = torch.randn(4, 3, generator=gen)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _fresh(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1), torch.Generator().manual_seed(1)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path) -> None:
    model, opt, gen = _fresh()
    _run(6, model, opt, gen)  # uninterrupted: 6 steps

    first, first_opt, first_gen = _fresh()
    _run(3, first, first_opt, first_gen)
    save_training_state(tmp_path / "state.pt", {"model": first, "opt": first_opt}, first_gen, {"step": 3})
    other, other_opt, other_gen = _fresh(seed=5)  # other weights and stream until loaded
    state = load_training_state(tmp_path / "state.pt", {"model": other, "opt": other_opt}, other_gen)
    assert state == {"step": 3}
    _run(3, other, other_opt, other_gen)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)  # weights, Adam moments and the batches' stream all restored


def test_no_file_is_a_fresh_run_and_a_missing_part_is_named(tmp_path) -> None:
    model, opt, gen = _fresh()
    assert load_training_state(tmp_path / "none.pt", {"model": model}, gen) is None
    save_training_state(tmp_path / "state.pt", {"model": model}, gen, {"step": 1})
    with pytest.raises(KeyError, match="no saved state for opt"):
        load_training_state(tmp_path / "state.pt", {"model": model, "opt": opt}, gen)
    with pytest.raises(ValueError, match="'gen' and 'state'"):
        save_training_state(tmp_path / "state.pt", {"state": model}, gen, {})


def test_a_failed_save_leaves_the_previous_state_whole(tmp_path) -> None:
    model, opt, gen = _fresh()
    path = tmp_path / "state.pt"
    save_training_state(path, {"model": model}, gen, {"step": 1})
    before = path.read_bytes()
    with mock.patch("torch.save", side_effect=OSError("disk full")), pytest.raises(OSError):
        save_training_state(path, {"model": model}, gen, {"step": 2})
    assert path.read_bytes() == before
    assert load_training_state(path, {"model": model}, gen) == {"step": 1}
