"""The contract every registered method keeps, checked for each one on the sampler core.

A toy branch model stands in for the network: every branch (plain names, a perturbed or
time-noised :class:`~guidance_engine.guidance.Branch`, another network's, SAG's probe) gets its
own smooth function of x and t, row by row, so any difference between a sample in a batch and the
same sample alone comes from the method. Checked for every method of the registry:

- its config survives ``to_dict`` -> strict JSON -> ``resolve_guidance``;
- every branch it requests is declared (``required_branches`` / ``altered_branches``), every
  altered one in ``altered_branches``, so a pipeline checks it before the first model call;
- seeded runs repeat exactly;
- each sample of a batch equals the same sample run alone (AG with every inner method; FKC with
  one particle per group);
- the method object is the same after a run (per-run state lives in the run);
- outside its interval it is the conditional prediction alone.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from guidance_engine import method_names, resolve_guidance, strict_json
from guidance_engine.guidance import Branch, Guidance
from guidance_engine.methods.cfg import CFG
from guidance_engine.samplers import sample

STEPS = 6
SHAPE = (3, 4, 8, 8)


class ToyBranches:
    """Every branch a row-wise function ``0.5 x + c sin(x + 3t) + 0.1 (1 + t)`` whose ``c`` depends
    on the branch (its name, base, alteration, network), never on the other rows."""

    def __init__(self) -> None:
        self.requested: list[str] = []

    @staticmethod
    def _coefficient(name: str) -> float:
        key = "|".join(str(part) for part in (str(name), getattr(name, "base", ""), getattr(name, "time_noise", 0),
                                              getattr(name, "perturb", None), getattr(name, "network", None)))
        return 0.2 + (sum(map(ord, key)) % 89) / 89.0

    def _output(self, name: str, x: torch.Tensor, t: float) -> torch.Tensor:
        return 0.5 * x + self._coefficient(name) * torch.sin(x + 3 * t) + 0.1 * (1 + t)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, requests) -> dict[str, torch.Tensor]:
        t = float(timestep) / 1000.0
        out = {}
        for name, rows in requests:
            self.requested.append(name)
            xr = x if rows is None else x[rows]
            probe = getattr(name, "probe", None)
            if probe is None:
                out[name] = self._output(name, xr, t)
                continue
            # SAG: the attention mass of the base rows (row-wise, mean 1) and the network on a new input
            mass = xr.abs().mean(dim=1).flatten(1)
            probe.record(mass / mass.mean(dim=1, keepdim=True), tuple(xr.shape[-2:]))
            probe.evaluate = lambda x_new, base=name.base: self._output(base, x_new, t)
            out[name] = torch.full_like(xr, float("nan"))
        return out


class ToyClassifier:
    """GFCG's guide classifier on the toy: three classes, probabilities from each row's x0 alone."""

    num_classes = 3

    def __init__(self, targets: list[int]) -> None:
        self.targets = torch.tensor(targets)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        features = torch.stack([x0[:, 0].mean((1, 2)), x0[:, 1].mean((1, 2)), x0[:, 2].mean((1, 2))], dim=1)
        return (4 * features).softmax(dim=1)


def _method(name: str, tmp_path) -> Guidance:
    """The registered method ``name`` at its defaults (FKC with one particle, so that a batch row
    is one image; LinearAG with a calibration made here)."""
    spec: dict[str, Any] = {"name": name}
    if name == "fkc":
        spec["particles"] = 1
    if name == "linear_ag":
        from guidance_engine.methods.linear_ag import save_calibration

        coefficients = torch.tensor([[0.6, 0.2, 0.1, 0.05]] * STEPS)  # one row per step
        save_calibration(tmp_path, coefficients, {"num_steps": STEPS, "window": 0.5, "period": 0,
                                                  "predicted_steps": [1, 2]})  # step 0 real, 1 and 2 predicted
        spec["calibration"] = str(tmp_path)
    return resolve_guidance(spec)


def _noise() -> torch.Tensor:
    """A fixed batch whose samples differ in scale too (so that per-sample decisions differ)."""
    scales = torch.tensor([0.6, 1.0, 1.6]).view(-1, 1, 1, 1)
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * scales


def _sampler(method: Guidance) -> str:
    return "euler_ancestral" if method.requires_stochastic_sampler else "ddim"


def _schedule(method: Guidance) -> dict[str, Any]:
    """The run's schedule: DDIM on eps, or a flow schedule without a pure-noise step for a method
    defined on flow velocities only (Rectified-CFG++)."""
    if method.requires_flow:
        return {"scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0), "prediction_type": "flow",
                "sigmas": [0.95, 0.8, 0.6, 0.4, 0.25, 0.1]}
    return {"scheduler": DDIMScheduler(steps_offset=1, set_alpha_to_one=False, clip_sample=False),
            "prediction_type": "epsilon"}


def _run(method: Guidance, rows: list[int], model: ToyBranches | None = None) -> tuple[torch.Tensor, Any]:
    """Samples ``rows`` of a fixed noise batch, each with its own generator (seed = its row)."""
    noise = _noise()[rows]
    if hasattr(method, "with_classifier"):
        method = method.with_classifier(ToyClassifier([row % 3 for row in rows]))
    result = sample(model or ToyBranches(), noise, method, num_steps=STEPS, sampler=_sampler(method),
                    generator=[torch.Generator().manual_seed(row) for row in rows], progress=False,
                    **_schedule(method))
    return result.x, result.state


NAMES = method_names()


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name, tmp_path) -> None:
    method = _method(name, tmp_path)
    text = strict_json.dumps(method.to_dict())
    json.loads(text)  # strict JSON: no Infinity / NaN tokens
    assert resolve_guidance(json.loads(text)) == method


@pytest.mark.parametrize("name", NAMES)
def test_every_requested_branch_is_declared(name, tmp_path) -> None:
    method = _method(name, tmp_path)
    model = ToyBranches()
    _run(method, [0, 1, 2], model)
    if hasattr(method, "with_classifier"):
        method = method.with_classifier(ToyClassifier([0, 1, 2]))
    altered = {str(branch) for branch in method.altered_branches()}
    declared = method.required_branches() | altered
    for branch in model.requested:
        assert str(branch) in declared, f"{name} requested {branch!r}, declared {sorted(declared)}"
        is_altered = isinstance(branch, Branch) and (branch.time_noise > 0 or branch.perturb is not None
                                                     or branch.network is not None or branch.probe is not None)
        if is_altered:
            assert str(branch) in altered, f"{name}: altered branch {branch!r} missing from altered_branches()"


@pytest.mark.parametrize("name", NAMES)
def test_seeded_runs_repeat_exactly(name, tmp_path) -> None:
    method = _method(name, tmp_path)
    assert torch.equal(_run(method, [0, 1, 2])[0], _run(method, [0, 1, 2])[0])


def _batch_equals_alone(method: Guidance) -> None:
    batch, _ = _run(method, [0, 1, 2])
    for row in range(SHAPE[0]):
        alone, _ = _run(method, [row])
        torch.testing.assert_close(batch[row:row + 1], alone, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, row=row: f"{method.name}: sample {row} in a batch != alone: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_each_sample_of_a_batch_equals_the_sample_alone(name, tmp_path) -> None:
    _batch_equals_alone(_method(name, tmp_path))


@pytest.mark.parametrize("inner", ["cfg", "apg", "cfgpp", "cfg_zero_star", "tcfg", "mambo_g"])
def test_adaptive_guidance_per_sample_with_every_inner_method(inner) -> None:
    """AG switches each sample on its own: with a threshold that the samples reach at different
    steps, a sample in a batch equals the sample alone, for every inner method (CFG++'s renoise
    split kept by the samples that have not switched)."""
    for threshold in (0.999, 0.9995, 0.998, 0.9999, 0.995, 0.99, 0.99995, 0.9):
        method = resolve_guidance({"name": "ag", "inner": inner, "threshold": threshold})
        switched = _run(method, [0, 1, 2])[1].switched_at.tolist()
        if len(set(switched)) > 1:  # the samples switch at different steps: the batch really is mixed
            break
    else:
        pytest.fail(f"no threshold makes the samples switch at different steps with inner {inner!r}")
    _batch_equals_alone(method)


@pytest.mark.parametrize("name", NAMES)
def test_the_method_object_is_the_same_after_a_run(name, tmp_path) -> None:
    method = _method(name, tmp_path)
    before, attributes = copy.deepcopy(method.to_dict()), set(vars(method))
    _run(method, [0, 1, 2])
    assert strict_json.dumps(method.to_dict()) == strict_json.dumps(before) and set(vars(method)) == attributes


@pytest.mark.parametrize("name", NAMES)
def test_outside_its_interval_a_method_is_the_conditional_prediction(name, tmp_path) -> None:
    """The interval (no step has sigma = inf here) turns the method's guidance off, with what each
    method keeps outside it (``off_outside_interval``: PAG/SEG/SLG/SAG their CFG part, as diffusers
    runs it at every step; CFG-Zero* its zero-init)."""
    method = _method(name, tmp_path)
    try:
        off = method.new(sigma_min=math.inf, sigma_max=math.inf, **type(method).off_outside_interval)
    except ValueError as error:  # a method whose run the interval cannot bound refuses it (LinearAG)
        assert "do not apply" in str(error)
        pytest.skip(str(error))
    got, _ = _run(off, [0, 1, 2])
    want, _ = _run_with_sampler(CFG(scale=1.0), _sampler(method), _schedule(method))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _run_with_sampler(method: Guidance, sampler: str, schedule: dict[str, Any] | None = None
                      ) -> tuple[torch.Tensor, Any]:
    noise = _noise()
    result = sample(ToyBranches(), noise, method, num_steps=STEPS, sampler=sampler,
                    generator=[torch.Generator().manual_seed(row) for row in range(SHAPE[0])], progress=False,
                    **(schedule or _schedule(method)))
    return result.x, result.state
