"""ICG: its equality oracle (null condition == CFG), fresh independent conditions every step."""

from __future__ import annotations

import pytest
import torch

from guidance_engine import CFG
from guidance_engine.methods.icg import ICG
from conftest import PROMPT, seeded


def test_icg_with_the_null_condition_is_cfg_exactly(sd_pair) -> None:
    _, guided = sd_pair
    icg = guided(PROMPT, num_inference_steps=4, guidance=ICG(scale=5.0, condition="null"), generator=seeded(0),
                 output_type="latent")
    cfg = guided(PROMPT, num_inference_steps=4, guidance=CFG(scale=5.0), generator=seeded(0), output_type="latent")
    assert torch.equal(icg.images, cfg.images)


@pytest.mark.parametrize("condition", ["random_tokens", "noise"])
def test_independent_condition_is_redrawn_every_step_and_reproducible(sd_pair, condition) -> None:
    _, guided = sd_pair
    seen = []
    real = guided.unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kwargs):
        seen.append(encoder_hidden_states[0].clone())  # first rows: the independent branch
        return real(sample, timestep, encoder_hidden_states, **kwargs)

    guided.unet.forward = spy
    try:
        first = guided(PROMPT, num_inference_steps=3, guidance=ICG(condition=condition), generator=seeded(3),
                       output_type="latent")
    finally:
        guided.unet.forward = real
    assert len(seen) == 3 and not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    again = guided(PROMPT, num_inference_steps=3, guidance=ICG(condition=condition), generator=seeded(3),
                   output_type="latent")
    assert torch.equal(first.images, again.images) and first.nfe == 6
    cfg = guided(PROMPT, num_inference_steps=3, guidance=CFG(scale=3.0), generator=seeded(3), output_type="latent")
    assert not torch.allclose(first.images, cfg.images)


def test_sdxl_draws_random_token_prompts_through_both_encoders(sdxl_pair) -> None:
    """SDXL has no token-id provider of its own: y_hat is a prompt of random tokens encoded as the
    family encodes any prompt (pipelines/conditions.random_prompt_conditions), seeded by the call."""
    _, guided = sdxl_pair
    first = guided(PROMPT, num_inference_steps=2, guidance="icg", generator=seeded(3), output_type="latent")
    again = guided(PROMPT, num_inference_steps=2, guidance="icg", generator=seeded(3), output_type="latent")
    assert torch.equal(first.images, again.images) and first.nfe == 4
    cfg = guided(PROMPT, num_inference_steps=2, guidance=CFG(scale=3.0), generator=seeded(3), output_type="latent")
    assert not torch.equal(first.images, cfg.images)
