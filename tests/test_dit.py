"""GuidedDiTPipeline against the stock DiTPipeline on tiny DiTs built in code; the null class
read from the model config; class checks; save/load with id2label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DPMSolverMultistepScheduler

from guidance_engine.pipelines import GuidedDiTPipeline
from guidance_engine.pipelines.dit import null_class_label
from guidance_engine.pipelines.toy.tiny_models import tiny_dit_components
from conftest import quiet, seeded


def _pair(**kwargs):
    stock = quiet(DiTPipeline(**tiny_dit_components(**kwargs)))
    return stock, quiet(GuidedDiTPipeline.from_pipe(stock))


def _labels_seen(pipe) -> list[list[int]]:
    seen: list[list[int]] = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["class_labels"].tolist()), with_kwargs=True)
    return seen


@pytest.mark.parametrize("scheduler", [DDIMScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("learned_sigma", [True, False])
def test_cfg_reproduces_stock_dit_bit_for_bit(scheduler, learned_sigma) -> None:
    stock, guided = _pair(num_classes=1000, learned_sigma=learned_sigma, scheduler=scheduler())
    for scale, nfe in ((4.0, 10), (1.0, 5)):  # stock guides only above 1; at 1 both run the class branch alone
        want = stock([1, 7, 999], guidance_scale=scale, num_inference_steps=5, generator=seeded(0),
                     output_type="np").images
        got = guided([1, 7, 999], guidance_scale=scale, num_inference_steps=5, generator=seeded(0), output_type="np")
        assert np.array_equal(got.images, want) and got.nfe == nfe


def test_rows_follow_the_stock_order_and_the_null_class_of_imagenet_dit() -> None:
    _, guided = _pair(num_classes=1000)
    seen = _labels_seen(guided)
    guided([3, 4], num_inference_steps=2, generator=seeded(0), output_type="latent")
    assert guided.null_class == 1000 and seen == [[3, 4, 1000, 1000]] * 2


def test_null_class_comes_from_the_config_where_stock_hard_codes_1000() -> None:
    stock, guided = _pair(num_classes=12, learned_sigma=False)
    assert null_class_label(guided.transformer) == 12 == guided.null_class
    seen = _labels_seen(guided)
    out = guided([0, 11], guidance_scale=3.0, num_inference_steps=3, generator=seeded(0), output_type="np")
    assert seen == [[0, 11, 12, 12]] * 3 and out.nfe == 6 and np.isfinite(out.images).all()
    with pytest.raises(IndexError):  # the stock pipeline's null label 1000 is outside a 13-row embedding
        stock([0, 11], guidance_scale=3.0, num_inference_steps=2, generator=seeded(0))


def test_class_labels_are_checked_before_any_model_call() -> None:
    _, guided = _pair(num_classes=12, learned_sigma=False)
    seen = _labels_seen(guided)
    with pytest.raises(ValueError, match=r"class_labels: must be integers in \[0, 12\) or class names, got 12"):
        guided([0, 12], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"unknown class name 'cat'"):
        guided(["cat"], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"output_type: must be"):
        guided([0], num_inference_steps=2, output_type="jpg")
    with pytest.raises(ValueError, match=r"sag: parameter 'layers' must be"):
        guided([0], num_inference_steps=2, guidance={"name": "sag"})  # the UNet default "mid"
    assert seen == []


def test_save_load_with_names_and_methods_run(tmp_path) -> None:
    components = tiny_dit_components(num_classes=3, learned_sigma=False)
    pipe = quiet(GuidedDiTPipeline(**components, id2label={0: "red circle", 1: "green circle", 2: "blue circle"}))
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["id2label"]["2"] == "blue circle"
    loaded = quiet(GuidedDiTPipeline.from_pretrained(tmp_path))
    by_name = loaded(["green circle", "blue circle"], num_inference_steps=3, generator=seeded(0), output_type="latent")
    by_id = loaded([1, 2], num_inference_steps=3, generator=seeded(0), output_type="latent")
    assert torch.equal(by_name.images, by_id.images)
    for guidance, nfe in (("cfgpp", 6), ("apg", 6), ({"name": "icg", "scale": 1.4}, 6), ({"name": "ag", "threshold": 2.0}, 6)):
        out = loaded([0, 1], num_inference_steps=3, guidance=guidance, generator=seeded(0), output_type="np")
        assert out.images.shape == (2, 32, 32, 3) and np.isfinite(out.images).all() and out.nfe == nfe


@pytest.mark.parametrize("kind", ["identity", "skip"])
def test_perturbed_rows_on_dit_equal_the_altered_network(kind) -> None:
    """PAG's identity attention / SLG's skipped block, as rows of the one forward, equal the
    transformer altered by hand (an identity processor on block 1's self-attention, or block 1
    replaced by the identity)."""
    from guidance_engine.guidance import Branch, Perturbation
    from guidance_engine.pipelines.dit import DiTBranches

    transformer = tiny_dit_components(num_classes=12, learned_sigma=False)["transformer"]
    labels = torch.tensor([3, 7])
    branches = DiTBranches(transformer, {"cond": {"class_labels": labels}}, latent_channels=4)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    altered = Branch("p", base="cond", perturb=Perturbation(kind, (1,)))
    out = branches(x, t, [("cond", None), (altered, None)])
    block = transformer.transformer_blocks[1]
    with torch.no_grad():
        if kind == "identity":
            original = block.attn1.processor
            block.attn1.processor = lambda attn, hidden_states, *a, **k: attn.to_out[1](attn.to_out[0](
                attn.to_v(hidden_states)))
            try:
                want = transformer(x, timestep=t.expand(2), class_labels=labels).sample
            finally:
                block.attn1.processor = original
        else:
            forward = block.forward
            block.forward = lambda hidden_states, *a, **k: hidden_states
            try:
                want = transformer(x, timestep=t.expand(2), class_labels=labels).sample
            finally:
                block.forward = forward
        plain = transformer(x, timestep=t.expand(2), class_labels=labels).sample
    torch.testing.assert_close(out["p"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["cond"], plain, rtol=1e-6, atol=1e-6)  # batch of 4 vs 2: rounding only
    assert not torch.allclose(out["p"], plain)


def test_pag_and_slg_run_on_the_dit_pipeline_and_scale_zero_is_cfg() -> None:
    _, guided = _pair(num_classes=12, learned_sigma=False)
    def run(guidance):
        return guided([0, 5], guidance=guidance, num_inference_steps=3, generator=seeded(0), output_type="np")

    cfg = run({"name": "cfg", "scale": 3.0})
    zero = run({"name": "pag", "scale": 3.0, "pag_scale": 0.0, "layers": [1]})
    assert np.array_equal(zero.images, cfg.images) and zero.nfe == 6
    pag = run({"name": "pag", "scale": 3.0, "pag_scale": 2.0, "layers": [1]})
    slg = run({"name": "slg", "scale": 3.0, "layers": [1], "start": 0.0, "stop": 1.0})
    assert pag.nfe == 9 and slg.nfe == 9 and not np.array_equal(pag.images, cfg.images)



def test_tsg_rows_on_dit_equal_the_transformer_with_a_noisy_time_embedding() -> None:
    """TSG's rows of the one forward equal the transformer run alone with ONE noise draw added to
    every block's time-step embedding (scaled by its std, before the class embedding); the other
    rows are the unaltered transformer; noise_scale 0 is the conditional prediction."""
    from guidance_engine.guidance import Branch
    from guidance_engine.methods.tsg import TSG
    from guidance_engine.pipelines.dit import DiTBranches

    transformer = tiny_dit_components(num_classes=12, learned_sigma=False)["transformer"]
    labels = torch.tensor([3, 7])
    branches = DiTBranches(transformer, {"cond": {"class_labels": labels}}, latent_channels=4)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    noisy = Branch("tsg", base="cond", time_noise=0.7, generator=torch.Generator().manual_seed(5))
    out = branches(x, t, [("cond", None), (noisy, None)])

    z = None

    def add_noise(module, inputs, emb):
        nonlocal z
        if z is None:
            z = torch.randn(emb.shape, generator=torch.Generator().manual_seed(5))
        return emb + 0.7 * emb.std() * z

    embedders = [block.norm1.emb.timestep_embedder for block in transformer.transformer_blocks]
    handles = [m.register_forward_hook(add_noise) for m in embedders]
    try:
        with torch.no_grad():
            want = transformer(x, timestep=t.expand(2), class_labels=labels).sample
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        plain = transformer(x, timestep=t.expand(2), class_labels=labels).sample
    torch.testing.assert_close(out["tsg"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["cond"], plain, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out["tsg"], plain, atol=1e-4)

    _, guided = _pair(num_classes=12, learned_sigma=False)
    def run(guidance):
        return guided([0, 5], guidance=guidance, num_inference_steps=3, generator=seeded(0), output_type="np")
    torch.testing.assert_close(torch.as_tensor(run(TSG(noise_scale=0.0, t_min=0.0)).images),
                               torch.as_tensor(run({"name": "cfg", "scale": 1.0}).images),
                               atol=1e-5, rtol=1e-5)
    out = run(TSG(t_min=0.0))
    assert out.nfe == 6 and np.isfinite(out.images).all()


def test_sag_on_dit_reads_the_block_attention_of_its_source_rows() -> None:
    """SAG's probe on a DiT block records softmax(Q K^T * scale) of that block's self-attention on
    the source (cond) rows only, on the 8 x 8 token grid of the 16 x 16 latent; through the
    pipeline, its degraded branch is one more evaluation a step and sag_scale 0 is CFG."""
    from guidance_engine.guidance import Branch
    from guidance_engine.methods.sag import SAG, AttentionProbe
    from guidance_engine.pipelines.dit import DiTBranches

    transformer = tiny_dit_components(num_classes=12, learned_sigma=False)["transformer"]
    conditions = {"cond": {"class_labels": torch.tensor([3, 7])}, "uncond": {"class_labels": torch.tensor([2, 2])}}
    branches = DiTBranches(transformer, conditions, latent_channels=4)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    probe = AttentionProbe((1,))
    seen = []
    attn = transformer.transformer_blocks[1].attn1
    handle = attn.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else
                                                                                kwargs["hidden_states"]),
                                            with_kwargs=True)
    try:
        branches(x, t, [("cond", None), ("uncond", None), (Branch("sag", base="cond", probe=probe), None)])
    finally:
        handle.remove()
    tokens = seen[0][:2]  # the forward's rows: cond first (stock DiT order), then uncond
    heads, dim = attn.heads, tokens.shape[-1] // attn.heads
    with torch.no_grad():
        q = attn.to_q(tokens).view(2, -1, heads, dim).transpose(1, 2)
        k = attn.to_k(tokens).view(2, -1, heads, dim).transpose(1, 2)
        received = torch.softmax(q @ k.transpose(-1, -2) / dim ** 0.5, dim=-1).mean(dim=1).sum(dim=1)
    assert probe.grid == (8, 8)
    torch.testing.assert_close(probe.mass, received, rtol=1e-5, atol=1e-5)

    _, guided = _pair(num_classes=12, learned_sigma=False)
    def run(guidance):
        return guided([0, 5], guidance=guidance, num_inference_steps=3, generator=seeded(0), output_type="latent")
    assert torch.equal(run(SAG(scale=3.0, sag_scale=0.0, layers=[1])).images, run({"name": "cfg", "scale": 3.0}).images)
    out = run(SAG(scale=3.0, sag_scale=0.75, layers=[1]))
    assert out.nfe == 9 and torch.isfinite(out.images).all()
    assert not torch.equal(out.images, run({"name": "cfg", "scale": 3.0}).images)
