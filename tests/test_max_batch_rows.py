"""``pipe.set_max_batch_rows(n)``: a step's branches in network calls of at most n rows, equal to
the one-call run within float32 rounding, with the calls' sizes checked by a hook; providers drawn
once per step; branches that cannot be split refused before any model call."""

from __future__ import annotations

import pytest
import torch

from guidance_engine.methods import ICG, PAG, TSG, CFG
from conftest import PROMPT, seeded

CALL = dict(num_inference_steps=3, output_type="latent")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal within float32 rounding of another batch size, amplified over the steps (measured up
    to 1.1e-6 of the largest latent on the tiny SD, 3 steps, CFG 6)."""
    return torch.allclose(a, b, atol=4e-6 * float(b.abs().max()), rtol=0)


def _calls(pipe) -> list[int]:
    """The batch size of every UNet call (a forward pre-hook)."""
    sizes: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


def _run(pipe, guidance, limit, prompts=PROMPT, **kwargs):
    pipe.set_max_batch_rows(limit)
    try:
        return pipe(prompts, guidance=guidance, generator=seeded(0), **CALL, **kwargs)
    finally:
        pipe.set_max_batch_rows(None)


@pytest.mark.parametrize("guidance,branches", [(CFG(scale=6.0), 2), (PAG(scale=5.0, pag_scale=3.0), 3)])
@pytest.mark.parametrize("limit", [1, 2, 3, 5])
def test_chunked_branches_equal_one_call(sd_pair, guidance, branches, limit) -> None:
    _, guided = sd_pair
    prompts = [PROMPT, "a blue square on a red background"]
    sizes = _calls(guided)
    whole = guided(prompts, guidance=guidance, generator=seeded(0), **CALL)
    assert sizes == [2 * branches] * 3
    sizes.clear()
    chunked = _run(guided, guidance, limit, prompts)
    assert max(sizes) <= limit and sum(sizes) == 3 * 2 * branches
    assert _close(chunked.images, whole.images)
    assert chunked.nfe_per_image == whole.nfe_per_image
    if limit >= 2 * branches:
        assert torch.equal(chunked.images, whole.images)  # the same layout: bit for bit


def test_a_provider_is_drawn_once_per_step_however_the_rows_are_split(sd_pair) -> None:
    _, guided = sd_pair
    prompts = [PROMPT, "a blue square on a red background"]
    whole = guided(prompts, guidance=ICG(scale=3.0), generator=seeded(0), **CALL)
    chunked = _run(guided, ICG(scale=3.0), 1, prompts)
    assert _close(chunked.images, whole.images)


def test_unsplittable_branches_are_refused_before_any_model_call(sd_pair) -> None:
    _, guided = sd_pair
    sizes = _calls(guided)
    with pytest.raises(ValueError, match=r"max_batch_rows: 'tsg' adds noise to branch 'tsg' scaled by the std over "
                                         r"its 2 rows, which cannot be split into calls of 1"):
        _run(guided, TSG(), 1, [PROMPT, PROMPT])
    with pytest.raises(ValueError, match=r"max_batch_rows: 'sag' reads an attention map"):
        _run(guided, "sag", 1, [PROMPT, PROMPT])
    assert sizes == []
    assert _run(guided, TSG(), 2, [PROMPT, PROMPT]).nfe > 0  # whole branches fit: runs
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"max_batch_rows: must be None or an integer >= 1, got"):
            guided.set_max_batch_rows(bad)


def test_flow_family_separate_forwards_are_chunked_too() -> None:
    """Flux runs its branches as separate forwards; a batch larger than the limit is split within
    each branch."""
    from guidance_engine.pipelines import GuidedFluxPipeline
    from guidance_engine.pipelines.toy.tiny_models import tiny_flux_components

    pipe = GuidedFluxPipeline(**tiny_flux_components(0))
    pipe.set_progress_bar_config(disable=True)
    sizes: list[int] = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(
        kwargs["hidden_states"].shape[0]), with_kwargs=True)
    call = dict(height=32, width=32, max_sequence_length=16, num_inference_steps=2, output_type="latent",
                num_images_per_prompt=3, negative_prompt="blue", true_cfg_scale=4.0)
    whole = pipe(PROMPT, generator=seeded(1), **call)
    assert sizes == [3, 3] * 2
    sizes.clear()
    pipe.set_max_batch_rows(2)
    chunked = pipe(PROMPT, generator=seeded(1), **call)
    assert sizes == [2, 1, 2, 1] * 2
    assert _close(chunked.images, whole.images)
