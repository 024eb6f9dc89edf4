"""Rectified-CFG++, TPG and SWG (issue 25): identity cases bit for bit, the papers' rules
re-implemented here independently (float64), runs through the tiny SD / SD3 pipelines with NFE counts.

They run on the sampler core's in-step evaluator (``StepInfo.evaluate``) and, for TPG, the
"shuffle" alteration kind (pipelines/shuffle.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, UNet2DConditionModel

from guidance_engine import CFG, Prediction, StepInfo, resolve_guidance
from guidance_engine.guidance import Branch
from guidance_engine.methods.rectified_cfgpp import RectifiedCFGPlusPlus, flow_time
from guidance_engine.methods.swg import SWG, stitch, window_boxes
from guidance_engine.methods.tpg import SDXL_LAYERS, TPG, TokenShuffle, step_seed
from guidance_engine.pipelines import GuidedStableDiffusion3Pipeline, perturbation
from guidance_engine.pipelines.branches import NetworkBranches
from guidance_engine.pipelines.shuffle import shuffling_forward
from guidance_engine.pipelines.toy.gmm import GaussianMixture
from guidance_engine.pipelines.toy.tiny_models import tiny_sd3_components
from guidance_engine.samplers import sample
from guidance_engine.samplers.loop import normalize_requests
from conftest import PROMPT, quiet, seeded

STEPS = 3


# -- the proposed hooks, applied while the engine lacks them -------------------------------------

class StepEvaluator:
    """The in-step evaluator proposed for samplers/loop.py: branches on input ``x`` (model-input
    coordinates, every row) at this step's level, or at another level ``sigma`` (k-diffusion
    ratio) of a flow schedule, each branch and row counted as one NFE of the run."""

    def __init__(self, model, prediction_type: str, nfe: torch.Tensor, timestep: torch.Tensor,
                 alpha: torch.Tensor, sigma: torch.Tensor) -> None:
        self.model, self.prediction_type, self.nfe = model, prediction_type, nfe
        self.timestep, self.alpha, self.sigma = timestep, alpha, sigma

    def __call__(self, x: torch.Tensor, branches, sigma: float | None = None) -> dict[str, Prediction]:
        t, a, s = self.timestep, self.alpha, self.sigma
        if sigma is not None:
            if self.prediction_type != "flow":
                raise ValueError("step.evaluate: another level is available on flow schedules only")
            # the core reads num_train_timesteps off the scheduler; here it is the step's t / sigma_t
            train = float(self.timestep) / float(self.sigma)
            level = flow_time(sigma)
            t = torch.tensor(level * train, dtype=self.timestep.dtype, device=self.timestep.device)
            a, s = (torch.tensor(v, dtype=torch.float64, device=x.device) for v in (1.0 - level, level))
        requests = normalize_requests(branches)
        outputs = self.model(x, t, requests)
        preds = {}
        for name, rows in requests:
            self.nfe[slice(None) if rows is None else rows.cpu()] += 1
            preds[name] = Prediction(outputs[name], x if rows is None else x[rows], a, s, self.prediction_type)
        return preds


def _step(index: int = 1, sigma: float = 1.0, sigma_next: float = 0.5, evaluate=None) -> StepInfo:
    step = StepInfo(index=index, num_steps=4, sigma=sigma, sigma_next=sigma_next, timestep=500.0)
    if evaluate is not None:
        object.__setattr__(step, "evaluate", evaluate)
    return step


def _latents(pipe, guidance, **kwargs):
    return pipe(PROMPT, num_inference_steps=STEPS, guidance=guidance, generator=seeded(0), output_type="latent",
                **kwargs)


def _calls(module, into: list) -> None:
    """Record (batch rows, spatial shape, timestep) of every forward of ``module``."""
    def hook(_, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        into.append((x.shape[0], tuple(x.shape[-2:]), float(t.flatten()[0])))
    module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture
def sd3():
    return quiet(GuidedStableDiffusion3Pipeline.from_pipe(quiet(StableDiffusion3Pipeline(**tiny_sd3_components(0)))))


# == Rectified-CFG++ ===============================================================================

class FlowGMM:
    """The exact velocity of a labelled 2-D Gaussian mixture under x = (1 - t) x0 + t eps, as a
    branch model ("cond": class 0, "uncond": every class; t = timestep / 1000), recording its calls."""

    def __init__(self) -> None:
        mixture = GaussianMixture(torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]), torch.tensor([0.4, 0.6, 0.5]),
                                  torch.tensor([0.3, 0.4, 0.3]), torch.tensor([0, 1, 1]))
        self.mixtures = {"cond": mixture.restrict(0), "uncond": mixture}
        self.calls: list[tuple[tuple[str, ...], float]] = []

    def velocity(self, name: str, x: torch.Tensor, t: float) -> torch.Tensor:
        """v = eps - x0 = (eps - x) / (1 - t), eps the ideal noise prediction (float64)."""
        x = x.double()
        return (self.mixtures[name].eps(x, 1.0 - t, t) - x) / (1.0 - t)

    def __call__(self, x, timestep, requests):
        t = float(timestep) / 1000.0
        self.calls.append((tuple(str(name) for name, _ in requests), t))
        return {name: self.velocity(name, x if rows is None else x[rows], t).to(x.dtype) for name, rows in requests}


SIGMAS = [0.9, 0.7, 0.45, 0.2]


def _flow_run(method, sampler=None, model=None):
    model = model or FlowGMM()
    noise = torch.randn(64, 2, generator=seeded(0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    result = sample(model, noise, method, scheduler=scheduler, num_steps=len(SIGMAS), prediction_type="flow",
                    sampler=sampler, sigmas=SIGMAS, progress=False)
    return result, model, noise


def _levels() -> list[float]:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=SIGMAS)
    return scheduler.sigmas.double().tolist()  # the run's levels, ending at 0


def _algorithm_1(model: FlowGMM, x: torch.Tensor, lam: float, gamma: float = 0.0, predictor: float = 0.5
                 ) -> torch.Tensor:
    """The paper's Algorithm 1 with the Euler ODE update, in float64 (``predictor``: the fraction of
    the step the predictor takes; the paper's 1/2)."""
    x, levels = x.double(), _levels()
    for t, t_next in zip(levels[:-1], levels[1:]):
        dt = t_next - t
        v_c = model.velocity("cond", x, t)
        x_mid, t_mid = x + predictor * dt * v_c, t + predictor * dt
        difference = model.velocity("cond", x_mid, t_mid) - model.velocity("uncond", x_mid, t_mid)
        v = v_c + lam * (1 - t) ** gamma * difference
        x = x + dt * v
    return x


def test_rectified_defaults_ranges_and_registry() -> None:
    method = resolve_guidance("rectified_cfgpp")
    assert isinstance(method, RectifiedCFGPlusPlus)
    assert (method.scale, method.gamma) == (4.5, 0.0)
    with pytest.raises(ValueError, match=r"rectified_cfgpp: parameter 'scale' must be \[0, 100\], got -1"):
        RectifiedCFGPlusPlus(scale=-1.0)
    with pytest.raises(ValueError, match=r"rectified_cfgpp: parameter 'gamma' must be \[0, 10\], got -0.5"):
        RectifiedCFGPlusPlus(gamma=-0.5)


def test_rectified_scale_zero_is_the_conditional_flow_euler_run_bit_for_bit() -> None:
    for sampler in (None, "euler"):
        want, _, _ = _flow_run(CFG(scale=1.0), sampler)
        got, model, _ = _flow_run(RectifiedCFGPlusPlus(scale=0.0), sampler)
        assert torch.equal(got.x, want.x) and got.nfe == len(SIGMAS)
        assert all(names == ("cond",) for names, _ in model.calls)


@pytest.mark.parametrize("lam, gamma, sampler", [(2.0, 0.0, None), (3.0, 1.5, "euler")])
def test_rectified_is_algorithm_1_on_the_exact_flow_of_a_mixture(lam, gamma, sampler) -> None:
    result, model, noise = _flow_run(RectifiedCFGPlusPlus(scale=lam, gamma=gamma), sampler)
    want = _algorithm_1(FlowGMM(), noise, lam, gamma)
    torch.testing.assert_close(result.x.double(), want, atol=2e-4, rtol=1e-4)
    # the tolerance tells the paper's half-step predictor from the authors' pipeline's full step
    assert (_algorithm_1(FlowGMM(), noise, lam, gamma, predictor=1.0) - want).abs().max() > 0.05
    assert result.nfe_per_sample == [3 * len(SIGMAS)] * noise.shape[0]  # lines 3, 6 and 7 of each step
    levels = _levels()
    assert [names for names, _ in model.calls] == [("cond",), ("uncond", "cond")] * len(SIGMAS)
    midpoints = [t for names, t in model.calls[1::2]]
    torch.testing.assert_close(torch.tensor(midpoints), 0.5 * (torch.tensor(levels[:-1]) + torch.tensor(levels[1:])),
                               atol=1e-6, rtol=0)


def test_rectified_refuses_a_step_without_the_core_evaluator() -> None:
    """A core without StepInfo.evaluate: refused at the first step's branches(), before its forward."""
    with pytest.raises(ValueError, match=r"rectified_cfgpp: evaluates the network a second time .* in-step evaluator"):
        RectifiedCFGPlusPlus().branches(_step(index=0), None)
    assert RectifiedCFGPlusPlus(scale=0.0).branches(_step(index=0), None) == ("cond",)


def test_rectified_refuses_an_eps_model_before_any_model_call(sd_pair) -> None:
    _, guided = sd_pair
    calls: list = []
    _calls(guided.unet, calls)
    with pytest.raises(ValueError, match=r"rectified_cfgpp'?:? is defined on the velocity of a flow-matching model"):
        _latents(guided, "rectified_cfgpp")
    assert calls == []


def test_rectified_through_the_sd3_pipeline(sd3) -> None:
    calls: list = []
    _calls(sd3.transformer, calls)
    out = _latents(sd3, "rectified_cfgpp")
    assert out.nfe == 3 * STEPS and torch.isfinite(out.images).all()
    starts, mids = calls[0::2], calls[1::2]
    assert [rows for rows, _, _ in starts] == [1] * STEPS and [rows for rows, _, _ in mids] == [2] * STEPS
    t = [time for _, _, time in starts] + [0.0]
    for i, (_, _, t_mid) in enumerate(mids):  # the midpoint of each step in the model's shifted schedule
        assert t_mid == pytest.approx(0.5 * (t[i] + t[i + 1]), abs=1e-3)
    assert torch.equal(_latents(sd3, {"name": "rectified_cfgpp", "scale": 0.0}).images,
                       _latents(sd3, CFG(scale=1.0)).images)


# == SWG ===========================================================================================

def _authors_boxes(size: int, crop: int, steps: int) -> list[tuple[int, int, int, int]]:
    """The authors' ``edges``: stride (size - crop) // (steps - 1); left offsets outer, top inner."""
    stride = (size - crop) // (steps - 1)
    return [(stride * j, stride * i, crop, crop) for i in range(steps) for j in range(steps)]


@pytest.mark.parametrize("size, crop, steps", [(32, 20, 2), (64, 40, 2), (64, 40, 3), (64, 40, 5), (16, 10, 2)])
def test_swg_windows_are_the_authors(size, crop, steps) -> None:
    assert window_boxes(size, size, crop / size, steps) == _authors_boxes(size, crop, steps)


def test_swg_windows_reach_the_edge_and_a_full_window_is_one() -> None:
    boxes = window_boxes(16, 24, 0.6, 3)  # non-square, (16 - 10) / 2 and (24 - 14) / 2
    assert {(top, left) for top, left, _, _ in boxes} == {(t, l) for t in (0, 3, 6) for l in (0, 5, 10)}
    for h, w, window, n in ((17, 17, 10 / 17, 3), (16, 24, 0.6, 3), (13, 9, 0.5, 4), (64, 64, 40 / 64, 4)):
        boxes = window_boxes(h, w, window, n)  # where the authors' stride does not divide, too
        _, coverage = stitch([torch.zeros(kh, kw) for _, _, kh, kw in boxes], boxes, torch.zeros(h, w))
        assert bool((coverage >= 1).all()) and max(top + kh for top, _, kh, _ in boxes) == h
        assert max(left + kw for _, left, _, kw in boxes) == w
    assert window_boxes(16, 16, 1.0, 4) == [(0, 0, 16, 16)]


class ConvNet:
    """A position-agnostic stand-in network with a long-range part (so that a window's output
    differs from the whole latent's everywhere): tanh of a fixed 3 x 3 convolution plus the
    input's spatial mean; the in-step evaluator's "cond" branch; records its inputs' shapes."""

    prediction_type = "epsilon"

    def __init__(self) -> None:
        self.kernel = torch.randn(4, 4, 3, 3, generator=seeded(5)) * 0.3
        self.shapes: list[tuple[int, ...]] = []

    def net(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.conv2d(x, self.kernel, padding=1) + x.mean(dim=(-2, -1), keepdim=True))

    def __call__(self, x, branches, sigma=None):
        self.shapes.append(tuple(x.shape))
        return {"cond": Prediction(self.net(x), x, torch.tensor(0.8), torch.tensor(0.6), "epsilon")}


def _swg_preds(net: ConvNet) -> dict[str, Prediction]:
    x = torch.randn(2, 4, 16, 16, generator=seeded(1))
    a, s = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.6, dtype=torch.float64)
    uncond = torch.randn(x.shape, generator=seeded(2))
    return {"cond": Prediction(net.net(x), x, a, s, "epsilon"), "uncond": Prediction(uncond, x, a, s, "epsilon")}


def _independent_reference(net: ConvNet, x: torch.Tensor, boxes) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window's output zero-padded back to the latent, summed and divided by the count of
    windows covering each pixel (float64): another path than :func:`stitch`'s slices."""
    h, w = x.shape[-2:]
    total = torch.zeros(x.shape, dtype=torch.float64)
    count = torch.zeros(h, w, dtype=torch.float64)
    rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
    for top, left, kh, kw in boxes:
        out = net.net(x[..., top:top + kh, left:left + kw]).double()
        total += F.pad(out, (left, w - left - kw, top, h - top - kh))
        count += ((rows >= top) & (rows < top + kh) & (cols >= left) & (cols < left + kw)).double()
    return total / count, count


@pytest.mark.parametrize("mask, scale, swg_scale", [(True, 1.0, 0.5), (False, 1.0, 0.8), (True, 4.0, 1.5)])
def test_swg_rule_against_an_independent_stitching(mask, scale, swg_scale) -> None:
    net = ConvNet()
    preds = _swg_preds(net)
    method = SWG(scale=scale, swg_scale=swg_scale, mask=mask)
    got = method.combine(preds if scale != 1 else {"cond": preds["cond"]}, _step(evaluate=net), None).denoise.output
    c, u = preds["cond"].output.double(), preds["uncond"].output.double()
    boxes = window_boxes(16, 16, 0.625, 2)
    r, count = _independent_reference(net, preds["cond"].x, boxes)
    m = (count > 1).double() if mask else torch.ones_like(count)
    base = c if scale == 1 else u + scale * (c - u)
    torch.testing.assert_close(got.double(), base + swg_scale * m * (c - r), atol=1e-5, rtol=1e-5)
    assert net.shapes == [(2, 4, 10, 10)] * 4
    stitched, coverage = stitch([net.net(preds["cond"].x[..., t:t + kh, l:l + kw]) for t, l, kh, kw in boxes],
                                boxes, preds["cond"].output)
    assert torch.equal(coverage.double(), count)
    torch.testing.assert_close(stitched.double(), r, atol=1e-6, rtol=0)


def test_swg_identities_are_cfg_bit_for_bit_without_evaluating_windows() -> None:
    net = ConvNet()
    preds = _swg_preds(net)
    step = _step(evaluate=net)
    cfg = CFG(scale=4.0).combine(preds, step, None).denoise.output
    for method in (SWG(scale=4.0, window=1.0), SWG(scale=4.0, swg_scale=0.0), SWG(scale=4.0, start=0.5)):
        assert torch.equal(method.combine(preds, step, None).denoise.output, cfg)
    alone = SWG(window=1.0).combine({"cond": preds["cond"]}, step, None).denoise
    assert alone is preds["cond"] and net.shapes == []


def test_swg_defaults_ranges_and_the_missing_evaluator() -> None:
    method = resolve_guidance("swg")
    assert (method.scale, method.swg_scale, method.window, method.windows, method.mask) == (1.0, 0.5, 0.625, 2, True)
    with pytest.raises(ValueError, match=r"swg: parameter 'windows' must be an integer in \[2, 16\], got 1"):
        SWG(windows=1)
    with pytest.raises(ValueError, match=r"swg: parameter 'window' must be \(0, 1\], got 0"):
        SWG(window=0.0)
    with pytest.raises(ValueError, match=r"swg: evaluates the network on windows .* in-step evaluator"):
        method.branches(_step(index=0), None)  # a core without StepInfo.evaluate: before the first forward
    assert SWG(window=1.0).branches(_step(index=0), None) == ("cond",)


def test_swg_through_the_sd_pipeline(sd_pair) -> None:
    _, guided = sd_pair
    calls: list = []
    _calls(guided.unet, calls)
    out = _latents(guided, {"name": "swg", "scale": 5.0})
    assert out.nfe == STEPS * (2 + 4) and torch.isfinite(out.images).all()  # CFG's two rows, four windows
    assert [(rows, hw) for rows, hw, _ in calls] == ([(2, (16, 16))] + [(1, (10, 10))] * 4) * STEPS
    assert len({t for _, _, t in calls[:5]}) == 1  # the windows at the step's own level
    assert torch.equal(_latents(guided, {"name": "swg", "scale": 5.0, "window": 1.0}).images,
                       _latents(guided, CFG(scale=5.0)).images)


# == TPG ===========================================================================================

def _sd_branches(guided) -> NetworkBranches:
    embeds = guided.encode_prompt([PROMPT], "cpu", 1, True)
    return NetworkBranches(guided.unet, {"cond": {"encoder_hidden_states": embeds[0]},
                                         "uncond": {"encoder_hidden_states": embeds[1]}})


def _shuffled_reference(unet, seed: int, sections: tuple[str, ...] = ("down_blocks.", "up_blocks.")
                        ) -> UNet2DConditionModel:
    """A copy of ``unet`` whose transformer blocks in ``sections`` (default: the down and up blocks)
    permute their input tokens, one ``torch.randperm`` per block call from one stream, in call order
    (the authors' rule)."""
    reference = copy.deepcopy(unet)
    generator = torch.Generator().manual_seed(seed)

    def shuffle(_, args, kwargs):
        hidden = args[0]
        return (hidden[:, torch.randperm(hidden.shape[1], generator=generator)], *args[1:]), kwargs

    for name, module in reference.named_modules():
        if type(module).__name__ == "BasicTransformerBlock" and name.startswith(sections):
            module.register_forward_pre_hook(shuffle, with_kwargs=True)
    return reference


def test_tpg_defaults_ranges_and_registry() -> None:
    method = resolve_guidance("tpg")
    assert isinstance(method, TPG) and (method.scale, method.tpg_scale, method.seed) == (1.0, 3.0, 0)
    assert method.perturbation().layers == ("down",)
    with pytest.raises(ValueError, match=r"tpg: parameter 'tpg_scale' must be \[0, 100\], got -1"):
        TPG(tpg_scale=-1.0)
    with pytest.raises(ValueError, match=r"perturbation: a TokenShuffle has kind 'shuffle', got 'skip'"):
        TokenShuffle(kind="skip")


def test_tpg_zero_is_cfg_bit_for_bit(sd_pair) -> None:
    _, guided = sd_pair
    for cfg in (5.0, 1.0):
        want = _latents(guided, CFG(scale=cfg))
        got = _latents(guided, TPG(scale=cfg, tpg_scale=0.0))
        assert torch.equal(got.images, want.images) and got.nfe == want.nfe


def test_each_step_draws_one_permutation_per_block() -> None:
    method = TPG(seed=3)
    steps = [method.branches(_step(index=i), None)[-1].perturb for i in range(3)]
    blocks = [object(), object()]
    first = [steps[0].permutation(block, 12, "cpu") for block in blocks]
    assert all(torch.equal(steps[0].permutation(block, 12, "cpu"), p) for block, p in zip(blocks, first))
    stream = torch.Generator().manual_seed(step_seed(3, 0))
    assert all(torch.equal(p, torch.randperm(12, generator=stream)) for p in first)  # one stream, in call order
    assert not torch.equal(steps[1].permutation(blocks[0], 12, "cpu"), first[0])
    assert len({step_seed(s, i) for s in range(3) for i in range(50)}) == 150


def test_the_shuffled_block_rows_are_the_block_on_permuted_tokens(sd_pair) -> None:
    _, guided = sd_pair
    block = guided.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    hidden = torch.randn(3, 64, block.norm1.normalized_shape[0], generator=seeded(0))
    context = torch.randn(3, 77, 32, generator=seeded(1))
    spec = TokenShuffle(layers=("down",), seed=5)
    got = shuffling_forward(block, block.forward, [(2, 3, spec)])(hidden, encoder_hidden_states=context)
    perm = spec.permutation(block, 64, "cpu")
    torch.testing.assert_close(got[2:], block(hidden[2:, perm], encoder_hidden_states=context[2:]), atol=1e-6, rtol=0)
    assert torch.equal(got[:2], block(hidden, encoder_hidden_states=context)[:2])  # the other rows untouched


def test_tpg_rows_equal_the_authors_shuffle_on_a_copy(sd_pair) -> None:
    _, guided = sd_pair
    branches = _sd_branches(guided)
    x, t = torch.randn(1, 4, 16, 16, generator=seeded(0)), torch.tensor(500)
    plain = branches(x, t, [("uncond", None), ("cond", None)])
    shuffled = TPG(scale=5.0, seed=11, layers=("down", "up")).branches(_step(index=2), None)[-1]
    mixed = branches(x, t, [("uncond", None), ("cond", None), (shuffled, None)])
    reference = _shuffled_reference(guided.unet, step_seed(11, 2))
    want = reference(x, t, encoder_hidden_states=branches.conditions["cond"]["encoder_hidden_states"]).sample
    torch.testing.assert_close(mixed["tpg"], want, atol=1e-5, rtol=1e-5)
    assert (mixed["tpg"] - plain["cond"]).abs().max() > 1e-3
    for name in ("uncond", "cond"):
        torch.testing.assert_close(mixed[name], plain[name], atol=1e-6, rtol=0)


def _block_tokens(model, run) -> dict[str, int]:
    """The number of tokens entering every ``BasicTransformerBlock`` of ``model`` during ``run()``."""
    seen: dict[str, int] = {}

    def record(name: str):
        def hook(_, args, kwargs) -> None:
            seen.setdefault(name, (args[0] if args else kwargs["hidden_states"]).shape[1])
        return hook

    hooks = [module.register_forward_pre_hook(record(name), with_kwargs=True)
             for name, module in model.named_modules() if type(module).__name__ == "BasicTransformerBlock"]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


@pytest.mark.parametrize("size", [(16, 16), (13, 11), (1, 5)])
def test_token_counts_before_the_forward_are_the_forwards(sd_pair, size) -> None:
    """What :func:`token_counts` predicts from the latent size is what every block of a UNet (its
    down, mid and up sections, odd sizes included) and of a DiT receives."""
    from guidance_engine.pipelines.shuffle import token_counts
    from guidance_engine.pipelines.toy.tiny_models import tiny_dit_components
    unet = sd_pair[1].unet
    x = torch.randn(1, 4, *size, generator=seeded(0))
    seen = _block_tokens(unet, lambda: unet(x, torch.tensor(500), encoder_hidden_states=torch.zeros(1, 77, 32)))
    assert {"down", "mid", "up"} <= {name.split("_")[0] for name in seen}
    assert token_counts(unet, size, list(seen)) == seen
    dit = tiny_dit_components()["transformer"]
    if all(n % dit.config.patch_size == 0 for n in size):
        z = torch.randn(1, dit.config.in_channels, *size, generator=seeded(1))
        seen = _block_tokens(dit, lambda: dit(z, timestep=torch.tensor([500]), class_labels=torch.tensor([3])))
        assert seen and token_counts(dit, size, list(seen)) == seen
    else:
        assert token_counts(dit, size, ["transformer_blocks.0"]) is None  # not whole patches: drawn in the forward


def test_tpg_permutations_drawn_before_the_forward_are_the_authors_in_call_order(sd_pair) -> None:
    """With the mid block chosen too, named out of order: drawn before the forward in the order
    the forward calls the blocks (down, mid, up), the same stream as the authors' draws inside it."""
    _, guided = sd_pair
    branches = _sd_branches(guided)
    x, t = torch.randn(1, 4, 16, 16, generator=seeded(0)), torch.tensor(500)
    shuffled = TPG(scale=5.0, seed=11, layers=("up", "mid", "down")).branches(_step(index=2), None)[-1]
    mixed = branches(x, t, [("cond", None), (shuffled, None)])
    assert len(shuffled.perturb._drawn) == sum(type(m).__name__ == "BasicTransformerBlock" for m in guided.unet.modules())
    reference = _shuffled_reference(guided.unet, step_seed(11, 2), ("down_blocks.", "mid_block.", "up_blocks."))
    want = reference(x, t, encoder_hidden_states=branches.conditions["cond"]["encoder_hidden_states"]).sample
    torch.testing.assert_close(mixed["tpg"], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match=r"tpg: block BasicTransformerBlock has 16 tokens in this forward, but its "
                                           r"permutation of this step was drawn for 256"):
        shuffled.perturb.permutation(next(iter(shuffled.perturb._drawn)), 16, "cpu")


def test_tpg_through_the_sd_pipeline(sd_pair) -> None:
    _, guided = sd_pair
    with_cfg = _latents(guided, TPG(scale=4.0))
    alone = _latents(guided, "tpg")
    assert with_cfg.nfe == 3 * STEPS and alone.nfe == 2 * STEPS
    assert torch.isfinite(with_cfg.images).all()
    assert not torch.equal(with_cfg.images, _latents(guided, CFG(scale=4.0)).images)
    rounding = 4e-6 * float(with_cfg.images.abs().max())  # test_max_batch_rows' bound
    assert (_latents(guided, TPG(scale=4.0, seed=1)).images - with_cfg.images).abs().max() > 100 * rounding
    guided.set_max_batch_rows(1)  # every branch its own call: each block keeps its step's permutation
    torch.testing.assert_close(_latents(guided, TPG(scale=4.0)).images, with_cfg.images, atol=rounding, rtol=0)


def test_tpg_layers_the_authors_sdxl_selection_and_refusals(sd3) -> None:
    """SDXL_LAYERS select the authors' d6..d23 on a UNet laid out as SDXL's (tiny widths)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8, 8), norm_num_groups=4,
            layers_per_block=2, transformer_layers_per_block=(1, 2, 10), cross_attention_dim=8, attention_head_dim=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    down = [name for name, module in unet.named_modules()  # the authors' enumeration of the down blocks
            if type(module).__name__ == "BasicTransformerBlock" and name.split(".")[0].split("_")[0] == "down"]
    chosen = perturbation.resolve_layers(unet, TPG(layers=SDXL_LAYERS).perturbation())
    assert sorted(name for name, _ in chosen) == sorted(down[6:24]) and len(down) == 24
    calls: list = []
    _calls(sd3.transformer, calls)
    with pytest.raises(ValueError, match=r"tpg: cannot shuffle the tokens of block transformer_blocks.0 of type "
                                         r"JointTransformerBlock"):
        _latents(sd3, {"name": "tpg", "layers": [0]})
    assert calls == []


def test_tpg_branch_is_declared_for_the_pipeline_checks() -> None:
    method = TPG(scale=3.0, layers="mid")
    (declared,) = method.altered_branches()
    assert isinstance(declared, Branch) and declared.perturb.kind == "shuffle" and declared.perturb.layers == ("mid",)
    assert method.branches(_step(), None) == ("uncond", "cond", "tpg")
    assert TPG(tpg_scale=0.0).altered_branches() == () and math.isinf(declared.perturb.sigma)
