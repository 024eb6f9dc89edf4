"""Attention processors on a tiny SD pipeline: the Triton kernel (interpreted on CPU) gives SDPA's
image within the derived tolerance, shares K/V across identical contexts, switches and falls back."""

from __future__ import annotations

import logging
import os

os.environ["TRITON_INTERPRET"] = "1"  # the "triton" processor runs on CPU only under the interpreter

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from guidance_engine.cuda import attention, processors  # noqa: E402
from guidance_engine.cuda.processors import (  # noqa: E402
    ATTENTION_NAMES, TritonAttnProcessor, kv_savings, set_attention, unet_cross_attention_dims)
from guidance_engine.pipelines import GuidedStableDiffusionPipeline  # noqa: E402
from guidance_engine.pipelines.toy.tiny_models import tiny_sd_components  # noqa: E402

PROMPT = "a red circle on a blue background"


def guided(dtype=torch.float32):
    stock = StableDiffusionPipeline(**tiny_sd_components(0), requires_safety_checker=False)
    pipe = GuidedStableDiffusionPipeline.from_pipe(stock).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe):
    """Two images of one prompt, CFG: 4 rows, two distinct contexts. 16 px keeps the interpreter quick."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe(PROMPT, height=16, width=16, num_inference_steps=2, num_images_per_prompt=2, latents=latents,
                output_type="np").images


@pytest.fixture(autouse=True)
def fresh_warnings():
    processors._warned.clear()
    yield
    processors._warned.clear()


def test_triton_image_matches_sdpa_within_derived_tolerance(monkeypatch):
    """|triton - float64| <= 2 |sdpa - float64| + eps, the kernel test's rule applied to the image."""
    reference = image(guided(torch.float64))
    pipe = guided()
    sdpa = image(pipe)
    calls = []

    def spy(q, k, v, **kwargs):
        calls.append((q.shape[0], k.shape[0], kwargs["kv_index"]))
        return flash(q, k, v, **kwargs)

    flash = attention.flash_attention
    monkeypatch.setattr(attention, "flash_attention", spy)
    assert set_attention(pipe, "triton") == "triton"
    triton = image(pipe)
    sdpa_error, triton_error = abs(sdpa - reference).max(), abs(triton - reference).max()
    eps = 2 * abs((reference.astype("float32") + 0.3 - 0.3) - reference).max()
    assert triton_error <= 2 * sdpa_error + eps, (triton_error, sdpa_error, eps)
    # Cross-attention: 4 rows (uncond x2, cond x2 of one prompt) read 2 K/V rows through an index.
    cross = [(b, bk, index.tolist()) for b, bk, index in calls if index is not None]
    assert cross and all(c == (4, 2, cross[0][2]) for c in cross)
    index = cross[0][2]
    assert index[0] == index[1] and index[2] == index[3] and index[0] != index[2]
    assert any(index is None and b == bk == 4 for b, bk, index in calls)  # self-attention unshared


def test_distinct_contexts_dedupes_rows_once_per_tensor():
    processor = TritonAttnProcessor()
    uncond, cond = torch.randn(2, 1, 77, 8).unbind(0)
    context = torch.cat([uncond, uncond, cond, uncond])
    rows, index = processor.distinct_contexts(context)
    assert rows.shape == (2, 77, 8) and torch.equal(rows[index], context)
    assert processor.distinct_contexts(context)[0] is rows  # cached for the other layers of the forward
    context.mul_(1)  # in-place change: recomputed
    assert processor.distinct_contexts(context)[0] is not rows
    distinct = torch.randn(3, 77, 8)
    assert processor.distinct_contexts(distinct) == (distinct, None)


def test_switch_between_processors():
    pipe = guided()
    assert ATTENTION_NAMES == ("sdpa", "xformers", "triton")
    assert set_attention(pipe, "triton") == "triton"
    assert all(isinstance(p, TritonAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert set_attention(pipe.unet, "sdpa") == "sdpa"
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    with pytest.raises(ValueError, match=r"accepted names are \['sdpa', 'xformers', 'triton'\], got 'flash'"):
        set_attention(pipe, "flash")
    pipe.unet.set_attn_processor(SlicedAttnProcessor(1))
    with pytest.raises(ValueError, match="SlicedAttnProcessor"):
        set_attention(pipe, "triton")


def fallback_records(caplog, pipe, name, times=2):
    with caplog.at_level(logging.WARNING, logger=processors.__name__):
        applied = [set_attention(pipe, name) for _ in range(times)]
    assert applied == ["sdpa"] * times
    assert all(type(p) is AttnProcessor2_0 for p in pipe.unet.attn_processors.values())
    return [r.getMessage() for r in caplog.records if r.name == processors.__name__]


def test_fallback_without_triton_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(attention, "triton", None)
    messages = fallback_records(caplog, guided(), "triton")
    assert len(messages) == 1 and "triton is not installed" in messages[0]


def test_fallback_without_gpu_warns_once(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET")
    messages = fallback_records(caplog, guided(), "triton")
    assert len(messages) == 1 and "no GPU" in messages[0]


def test_processor_falls_back_at_call_time(monkeypatch, caplog):
    """Set while the kernel could run, called where it cannot (e.g. moved): SDPA, one warning."""
    unet = UNet2DConditionModel(**guided().unet.config)
    set_attention(unet, "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 77, 32)
    with caplog.at_level(logging.WARNING, logger=processors.__name__):
        out = unet(x, t, context).sample
    set_attention(unet, "sdpa")
    assert torch.allclose(out, unet(x, t, context).sample, atol=0, rtol=0)
    assert len([r for r in caplog.records if r.name == processors.__name__]) == 1


def test_xformers_applies_or_falls_back_once(caplog):
    pipe = guided()
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        messages = fallback_records(caplog, pipe, "xformers")
        assert len(messages) == 1 and "xformers" in messages[0]
    else:  # pragma: no cover - only where xformers is installed
        assert set_attention(pipe, "xformers") in ("xformers", "sdpa")


# --------------------------------------------------------------------------- savings


def test_unet_layer_counts_match_the_published_architectures():
    """The analytic layer lists equal the attn2 modules of UNets built (on the meta device) from the
    published SD 1.5 and SDXL configs."""
    sd15 = dict(cross_attention_dim=768, attention_head_dim=8)
    sdxl = dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), use_linear_projection=True)
    for name, config in (("sd1.5", sd15), ("sdxl", sdxl)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        found = [(m.to_k.in_features, m.to_k.out_features) for n, m in unet.named_modules() if n.endswith("attn2")]
        assert sorted(found) == sorted(unet_cross_attention_dims(name))


def test_kv_savings_exact():
    sd15 = kv_savings("sd1.5", 4)
    per_row = 2 * 2 * 77 * 768 * (2 * 320 + 2 * 640 + 2 * 1280 + 1280 + 3 * 1280 + 3 * 640 + 3 * 320)
    assert (sd15["rows"], sd15["distinct_contexts"], sd15["kv_layers"]) == (8, 5, 16)
    assert sd15["kv_flops"] == 8 * per_row and sd15["kv_flops_saved"] == 3 * per_row
    assert sd15["kv_bytes_saved"] == 3 * 2 * 77 * 12480 * 2
    assert kv_savings("sdxl", 8)["kv_layers"] == 70 and kv_savings("sdxl", 8)["saved_fraction"] == 7 / 16
    assert kv_savings("sd3", 4)["kv_flops_saved"] == 3 * 2 * 2 * 333 * 1536 * 1536  # block 0 only
    assert all(kv_savings(m, 1)["kv_flops_saved"] == 0 for m in ("sd1.5", "sdxl", "sd3"))
    with pytest.raises(ValueError, match="model: accepted names"):
        kv_savings("sd2", 1)
    with pytest.raises(ValueError, match="batch: a positive integer"):
        kv_savings("sdxl", 0)
