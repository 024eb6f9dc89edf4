"""``guidance-engine generate`` on LTX-Video and HunyuanVideo 1.5 checkpoints (tiny random ones,
saved by the stock pipelines):

- ``is_video_model`` tells the three video families from an image model by ``model_index.json``
  alone (a fresh interpreter imports neither diffusers nor a pipeline module for it);
- a clip of the asked frame count and size (and, where not asked, the stock pipeline's default
  size) is written with its settings, which rebuild it bit for bit;
- each family's frame rule and side multiple equal the stock VAEs' factors (the diffusers classes
  built on the meta device from their default configs, the real checkpoints' factors: Wan and
  HunyuanVideo 1.5 4 k + 1, LTX-Video 8 k + 1) and its default clip the stock ``__call__``'s;
- ``--lora`` loads into LTX-Video (the clip equals the pipeline with the LoRA loaded by hand, and
  its settings rebuild it), and is refused for HunyuanVideo 1.5, which has no LoRA loader;
- every image-only option and every broken rule is refused before any model loads, the message
  naming the option, the rule and the value.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from accelerate import init_empty_weights
from diffusers import (AutoencoderKLHunyuanVideo15, AutoencoderKLLTXVideo, AutoencoderKLWan, HunyuanVideo15Pipeline,
                       HunyuanVideo15Transformer3DModel, LTXPipeline, LTXVideoTransformer3DModel, WanPipeline,
                       WanTransformer3DModel)
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from guidance_engine.pipelines.apps import cli_common, video_io
from guidance_engine.pipelines.apps.cli import main
from guidance_engine.pipelines.ltx import GuidedLTXPipeline
from guidance_engine.pipelines.models import default_model_path, is_video_model
from guidance_engine.pipelines.toy.tiny_hunyuan_video15 import save_tiny_hunyuan_video15
from guidance_engine.pipelines.toy.tiny_ltx import save_tiny_ltx, tiny_ltx_components
from guidance_engine.pipelines.toy.tiny_models import seeded_weights
from guidance_engine.pipelines.toy.tiny_wan import save_tiny_wan

PROMPT = "a red circle moving right on a blue background"
#: the tiny LTX-Video's smallest clip (its stock check wants sides of multiples of 32)
LTX_CLIP = ("--height", "32", "--width", "32", "--num-frames", "9")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("video_models")
    return {"ltx": save_tiny_ltx(root / "ltx"), "hunyuan_video15": save_tiny_hunyuan_video15(root / "hv"),
            "wan": save_tiny_wan(root / "wan")}


@pytest.fixture(scope="module")
def ltx_lora(tmp_path_factory) -> Path:
    """A random (non-zero) LoRA on the tiny LTX-Video transformer's self- and cross-attention
    projections, saved in diffusers' LoRA format."""
    transformer = tiny_ltx_components(0)["transformer"]
    with seeded_weights(5):
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                           init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora") / "ltx_lora"
    LTXPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                  safe_serialization=True)
    return folder


def generate(model: Path, output: Path, *extra: str) -> int:
    return main(["generate", PROMPT, "--model", str(model), "--steps", "2", "-o", str(output), *extra])


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(cli_common, "load_quietly", refuse)


# --------------------------------------------------------------------------- detection
def test_is_video_model_reads_the_index_alone(models) -> None:
    assert all(is_video_model(path) for path in models.values())
    assert not is_video_model(default_model_path()) and not is_video_model(None)
    script = ("import sys; from guidance_engine.pipelines.models import is_video_model; "
              f"print(is_video_model({str(models['ltx'])!r}), is_video_model({str(models['hunyuan_video15'])!r}), "
              "any(m == 'diffusers' or m.startswith(('diffusers.', 'guidance_engine.pipelines.ltx', "
              "'guidance_engine.pipelines.hunyuan')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "False"]


# --------------------------------------------------------------------------- clips
@pytest.mark.parametrize("family, extra, frames", [
    ("ltx", LTX_CLIP, 9),
    ("hunyuan_video15", ("--num-frames", "5"), 5),  # the stock default size
    ("hunyuan_video15", ("--height", "16", "--width", "32", "--num-frames", "3"), 3),
])
def test_a_clip_of_the_asked_size_whose_settings_rebuild_it(models, tmp_path, capsys, family, extra, frames) -> None:
    assert generate(models[family], tmp_path / "clip.webp", *extra) == 0
    assert "4 network evaluations per clip" in capsys.readouterr().out  # 2 CFG steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.webp", "clip.webp.json"]
    clip = video_io.read_clip(tmp_path / "clip.webp")
    settings = json.loads((tmp_path / "clip.webp.json").read_text())
    if "--height" in extra:
        size = (int(extra[extra.index("--height") + 1]), int(extra[extra.index("--width") + 1]))
    else:  # the stock pipeline's own default for its transformer's target size
        stock = HunyuanVideo15Pipeline.from_pretrained(models[family])
        size = stock.video_processor.calculate_default_height_width(
            stock.default_aspect_ratio[1], stock.default_aspect_ratio[0], stock.target_size)
    assert clip.shape == (frames, *size, 3) and clip.dtype == np.uint8
    assert (settings["num_frames"], settings["height"], settings["width"]) == (frames, *size)
    rebuilt = video_io.rebuild_clip(tmp_path / "clip.webp.json")
    assert np.array_equal(rebuilt, clip) and video_io.frames_digest(rebuilt) == settings["frames_sha256"]
    other = video_io.rebuild_clip({**settings, "seed": settings["seed"] + 1})
    assert not np.array_equal(other, clip)  # the comparison can fail: the seed shows


def _saved(tmp_path: Path, pipeline: str, **components) -> Path:
    """A checkpoint directory holding only ``model_index.json`` and the components' configs."""
    for name, model in components.items():
        model.save_config(tmp_path / name)
    index = {"_class_name": pipeline, **{name: ["diffusers", type(m).__name__] for name, m in components.items()}}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    return tmp_path


def _defaults(pipeline: type) -> dict[str, int]:
    parameters = inspect.signature(pipeline.__call__).parameters
    return {key: parameters[key].default for key in ("height", "width", "num_frames")}


def test_the_frame_rules_and_defaults_are_the_stock_vaes_and_pipelines(tmp_path) -> None:
    """The real checkpoints' factors (the classes' default configs, built on the meta device):
    the families' rules are the VAEs' own compression ratios, the stock default clips the
    ``__call__`` defaults (HunyuanVideo 1.5's size: the stock processor's for target size 640)."""
    with init_empty_weights():
        ltx_vae, ltx = AutoencoderKLLTXVideo(), LTXVideoTransformer3DModel()
        hv_vae, hv = AutoencoderKLHunyuanVideo15(), HunyuanVideo15Transformer3DModel()
        wan_vae, wan = AutoencoderKLWan(), WanTransformer3DModel()
    family = video_io.video_family(_saved(tmp_path / "ltx", "LTXPipeline", vae=ltx_vae, transformer=ltx))
    assert (family.temporal, family.spatial) == (ltx_vae.temporal_compression_ratio, 32) == (8, 32)
    assert family.default == _defaults(LTXPipeline)
    family = video_io.video_family(_saved(tmp_path / "hv", "HunyuanVideo15Pipeline", vae=hv_vae, transformer=hv))
    assert (family.temporal, family.spatial) == (hv_vae.temporal_compression_ratio,
                                                 hv_vae.spatial_compression_ratio * hv.config.patch_size) == (4, 16)
    assert family.default == {"height": 480, "width": 848,
                              "num_frames": inspect.signature(HunyuanVideo15Pipeline.__call__).parameters[
                                  "num_frames"].default}
    family = video_io.video_family(_saved(tmp_path / "wan", "WanPipeline", vae=wan_vae, transformer=wan))
    assert (family.temporal, family.spatial) == (wan_vae.config.scale_factor_temporal,
                                                 wan_vae.config.scale_factor_spatial * wan.config.patch_size[1])
    assert family.temporal == 4 and family.default == _defaults(WanPipeline)


def test_the_tiny_checkpoints_rules_are_their_loaded_pipelines(models) -> None:
    """What the CLI reads from configs equals the factors the loaded stock pipelines use."""
    stock = {"ltx": LTXPipeline, "hunyuan_video15": HunyuanVideo15Pipeline, "wan": WanPipeline}
    for name, path in models.items():
        pipe = stock[name].from_pretrained(path)
        temporal = getattr(pipe, "vae_temporal_compression_ratio", None) or pipe.vae_scale_factor_temporal
        assert video_io.video_family(path).temporal == temporal, name


# --------------------------------------------------------------------------- LoRAs
def test_a_lora_loads_into_ltx_and_its_settings_rebuild_the_clip(models, ltx_lora, tmp_path) -> None:
    assert generate(models["ltx"], tmp_path / "plain.webp", *LTX_CLIP) == 0
    assert generate(models["ltx"], tmp_path / "lora.webp", *LTX_CLIP, "--lora", f"{ltx_lora}:0.5") == 0
    clip, plain = video_io.read_clip(tmp_path / "lora.webp"), video_io.read_clip(tmp_path / "plain.webp")
    settings = json.loads((tmp_path / "lora.webp.json").read_text())
    assert settings["loras"] == [[str(ltx_lora), 0.5]] and not np.array_equal(clip, plain)
    pipe = GuidedLTXPipeline.from_pretrained(models["ltx"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(ltx_lora), adapter_name="by_hand")
    pipe.set_adapters(["by_hand"], adapter_weights=[0.5])
    by_hand = video_io.to_uint8(video_io.clip_call(pipe, settings).frames[0])
    assert np.array_equal(by_hand, clip)
    assert np.array_equal(video_io.rebuild_clip(tmp_path / "lora.webp.json"), clip)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("family, extra, message", [
    ("ltx", ("--config", "somewhere"), "--config: video models do not take it; video models load from diffusers "
                                       "directories, which hold their own configs; got 'somewhere'"),
    ("ltx", ("--scheduler", "ddim"), "--scheduler: video models do not take it; their flow-matching scheduler is "
                                     "the checkpoint's, and --sampler picks the engine's solver; got 'ddim'"),
    ("hunyuan_video15", ("--karras",), "--karras: video models do not take it; Karras sigmas are for DDPM-trained "
                                       "schedulers; theirs is a flow-matching one; got True"),
    ("ltx", ("--timestep-spacing", "trailing"), "--timestep-spacing: video models do not take it; their "
                                                "flow-matching scheduler sets its own levels; got 'trailing'"),
    ("hunyuan_video15", ("--ays",), "--ays: video models do not take it; AYS timesteps exist for SD 1.x/2.x and "
                                    "SDXL only; got True"),
    ("ltx", ("--guidance-scale", "3"), "--guidance-scale: video models do not take it; it is the embedded scale of "
                                       "guidance-distilled image models; --scale sets the method's; got 3.0"),
    ("hunyuan_video15", ("--lora", "x.safetensors"), "--lora: no such file or directory 'x.safetensors'"),
    ("ltx", ("--num-frames", "7"), "--num-frames: LTX-Video's VAE takes 4 k + 1 frames (1, 5, 9, ..., at most 1025), "
                                   "got 7"),
    ("hunyuan_video15", ("--num-frames", "4"), "--num-frames: HunyuanVideo 1.5's VAE takes 2 k + 1 frames (1, 3, 5, "
                                               "..., at most 1025), got 4"),
    ("ltx", ("--height", "48"), "--height: LTX-Video takes sides that are multiples of 32 (its VAE's spatial factor "
                                "times the transformer's patch, 4, and the stock pipeline's 32), got 48"),
    ("hunyuan_video15", ("--width", "12"), "--width: must be a multiple of 8 in [8, 4096], got 12"),
    ("ltx", ("--num-frames", "0"), "--num-frames: must be an integer in [1, 1025], got 0"),
])
def test_refusals_come_before_the_model_loads(models, tmp_path, capsys, no_load, family, extra, message) -> None:
    assert generate(models[family], tmp_path / "clip.gif", *extra) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_lora_for_hunyuan_video15_is_refused_before_loading(models, ltx_lora, tmp_path, capsys, no_load) -> None:
    assert generate(models["hunyuan_video15"], tmp_path / "clip.gif", "--lora", str(ltx_lora)) == 2
    assert "--lora: GuidedHunyuanVideo15Pipeline has no LoRA loader (load_lora_weights)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_rescale_of_stg_goes_through_the_cli(models, tmp_path) -> None:
    """PAG on LTX's block 1 with ``--param rescale=0.7`` (STG-A with their rescaling) is recorded
    and rebuilt; without it the clip differs."""
    common = (*LTX_CLIP, "--method", "pag", "--param", "layers=1", "--param", "scale=3")
    assert generate(models["ltx"], tmp_path / "stg.webp", *common, "--param", "rescale=0.7") == 0
    assert generate(models["ltx"], tmp_path / "plain.webp", *common) == 0
    settings = json.loads((tmp_path / "stg.webp.json").read_text())
    assert settings["guidance"]["rescale"] == 0.7 and settings["nfe"] == 6
    clip = video_io.read_clip(tmp_path / "stg.webp")
    assert np.array_equal(video_io.rebuild_clip(tmp_path / "stg.webp.json"), clip)
    assert not np.array_equal(clip, video_io.read_clip(tmp_path / "plain.webp"))
