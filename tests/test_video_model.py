"""The shipped default video model (a tiny Wan 2.1 on moving shapes), its clips and its scorer:

- the model loads as a GuidedWanPipeline and ``guidance-engine generate --model video`` writes
  complete clips (frame count, size, no temporary file left) with their settings beside them;
- the settings rebuild the clip: the same frames, byte for byte, with the same seed (a lossless
  WebP read back; a GIF written again), and another seed gives other frames;
- the GIF fallback: .mp4 is refused before any model loads when no MP4 writer is installed, and
  GIF frames that Pillow merges come back from their duration;
- the motion scorer is right on every clip of the data set (the oracle), and reversed clips
  score the opposite way, still ones as no motion;
- the training's short prompt context with its padding bias equals the stock 512-token context
  (the stock pipeline's own prompt encoding as the reference).
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from guidance_engine.pipelines.apps import cli_common, video_io
from guidance_engine.pipelines.apps.cli import main
from guidance_engine.pipelines.models import default_video_model_path, load_pipeline, pipeline_class_for
from guidance_engine.pipelines.toy import moving_shapes, train_video
from guidance_engine.pipelines.toy.video_evaluation import motion_direction, score_clips

PROMPT = "a red circle moving right on a blue background"


@pytest.fixture(scope="module")
def pipe():
    pipe = load_pipeline("video")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(tmp_path, name: str, *extra: str) -> int:
    return main(["generate", PROMPT, "--model", "video", "--steps", "2", "--out", str(tmp_path / name), *extra])


def test_shipped_model_is_a_small_wan_checkpoint() -> None:
    path = default_video_model_path()
    assert pipeline_class_for(path).__name__ == "GuidedWanPipeline"
    weights = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    assert weights < 8e6  # a few MB in the package


def test_cli_writes_a_complete_gif_with_its_settings(tmp_path, capsys) -> None:
    assert generate(tmp_path, "clip.gif") == 0
    assert "4 network evaluations per clip" in capsys.readouterr().out  # 2 CFG steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif", "clip.gif.json"]  # no temporary file
    frames = video_io.read_clip(tmp_path / "clip.gif")
    settings = json.loads((tmp_path / "clip.gif.json").read_text())
    size = (moving_shapes.NUM_FRAMES, moving_shapes.IMAGE_SIZE, moving_shapes.IMAGE_SIZE, 3)
    assert frames.shape == size and frames.dtype == np.uint8
    assert (settings["frames"], settings["height"], settings["width"]) == size[:3]
    assert settings["prompt"] == PROMPT and settings["guidance"]["name"] == "cfg" and settings["nfe"] == 4


def test_settings_rebuild_the_clip_byte_for_byte(tmp_path, pipe) -> None:
    assert generate(tmp_path, "clip.webp", "--num-images", "2", "--seed", "5") == 0
    written = [video_io.read_clip(tmp_path / f"clip-{i}.webp") for i in range(2)]
    rebuilt = video_io.rebuild_clip(tmp_path / "clip-1.webp.json", model=pipe)
    settings = json.loads((tmp_path / "clip-1.webp.json").read_text())
    assert settings["seed"] == 6
    assert np.array_equal(rebuilt, written[1])  # lossless WebP holds the generated frames
    assert video_io.frames_digest(rebuilt) == settings["frames_sha256"]
    assert not np.array_equal(written[0], written[1])  # the seed matters: the comparison can fail
    # a GIF written from the rebuilt frames is the CLI's file, byte for byte
    assert generate(tmp_path, "clip.gif", "--seed", "6") == 0
    again = video_io.write_clip(rebuilt, tmp_path / "again.gif", settings["fps"])
    assert again.read_bytes() == (tmp_path / "clip.gif").read_bytes()


def test_mp4_is_refused_before_loading_without_a_writer(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(video_io, "mp4_backend", lambda: None)

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(cli_common, "load_quietly", no_load)
    assert generate(tmp_path, "clip.mp4") == 2
    error = capsys.readouterr().err
    assert "needs an MP4 writer" in error and "guidance-engine[video]" in error and ".gif" in error
    assert list(tmp_path.iterdir()) == []


def test_video_options_are_checked_before_loading(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(cli_common, "load_quietly", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert generate(tmp_path, "clip.gif", "--num-frames", "8") == 2
    assert "--num-frames: Wan's VAE takes 4 k + 1 frames" in capsys.readouterr().err
    assert generate(tmp_path, "clip.gif", "--fps", "0") == 2
    assert "--fps: must be an integer in [1, 100], got 0" in capsys.readouterr().err
    assert generate(tmp_path, "clip.png") == 2
    assert "must end in .gif, .webp, .mp4" in capsys.readouterr().err
    assert main(["generate", "x", "--num-frames", "9", "-o", str(tmp_path / "a.png")]) == 2
    assert "--num-frames: only video models take it" in capsys.readouterr().err


def test_gif_fallback_keeps_repeated_frames(tmp_path) -> None:
    clips, _, _ = moving_shapes.make_dataset(1, seed=4)
    frames = clips[0].copy()
    frames[4] = frames[3]  # a still pair: Pillow merges the second into the first frame's duration
    path = video_io.write_clip(frames, tmp_path / "still.gif", fps=10)
    back = video_io.read_clip(path, fps=10)
    assert back.shape == frames.shape
    assert np.array_equal(back[3], back[4]) and not np.array_equal(back[4], back[5])
    # 256 colours a frame: the palette keeps the flat shapes close (a bound, not exactness)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 4


@pytest.mark.skipif(video_io.mp4_backend() is None, reason="no MP4 writer installed (the 'video' extra)")
def test_mp4_when_a_writer_is_installed(tmp_path) -> None:
    clips, _, _ = moving_shapes.make_dataset(1, seed=2)
    path = video_io.write_clip(clips[0], tmp_path / "clip.mp4", fps=10, metadata={"prompt": "x"})
    back = video_io.read_clip(path)
    assert back.shape == clips[0].shape
    assert np.abs(back.astype(int) - clips[0].astype(int)).mean() < 12  # lossy H.264 on 32 x 32
    assert motion_direction(back)[0] == motion_direction(clips[0])[0]


def test_motion_scorer_is_right_on_the_data_set() -> None:
    clips, captions, labels = moving_shapes.make_dataset(200, seed=3)
    found = np.array([motion_direction(clip)[0] for clip in clips])
    assert np.array_equal(found, labels["direction"])
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    for clip, label in zip(clips[:20], labels["direction"][:20]):
        reversed_name = opposite[moving_shapes.DIRECTIONS[label]]
        assert motion_direction(clip[::-1])[0] == moving_shapes.DIRECTIONS.index(reversed_name)
        assert motion_direction(np.repeat(clip[:1], len(clip), 0))[0] == -1  # a still clip: no motion
    rows = score_clips(clips[:1], captions[0])
    assert rows[0]["correct_direction"] and rows[0]["travel"] > moving_shapes.TRAVEL[0] - 1


def test_data_set_is_seeded_and_inside_the_frame() -> None:
    a = moving_shapes.make_dataset(20, seed=9)
    b = moving_shapes.make_dataset(20, seed=9)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    rng = np.random.default_rng(0)
    for _ in range(200):
        attrs = moving_shapes.sample_attributes(rng)
        radius = 4.5 if attrs["size"] == "small" else 8.0
        track = moving_shapes.track(attrs)
        assert (track - radius >= moving_shapes.MARGIN - 1e-9).all()
        assert (track + radius <= moving_shapes.IMAGE_SIZE - moving_shapes.MARGIN + 1e-9).all()
        parsed = moving_shapes.parse_prompt(moving_shapes.caption(attrs))
        labels = moving_shapes.labels_of(attrs)
        assert all(parsed[k] == labels[k] for k in ("shape", "color", "background", "direction"))


@pytest.mark.parametrize("weight", ["0.5", "nan", "inf"])
def test_a_bad_shape_weight_is_refused_before_any_training(tmp_path, weight) -> None:
    with pytest.raises(ValueError, match=rf"--shape-weight: must be a finite number >= 1 .*got {weight}"):
        train_video.main(["--out", str(tmp_path / "m"), "--shape-weight", weight])
    assert not (tmp_path / "m.work").exists()


@pytest.mark.parametrize("scale", ["-0.1", "nan", "inf"])
def test_a_bad_text_lr_scale_is_refused_before_any_training(tmp_path, scale) -> None:
    with pytest.raises(ValueError, match=rf"--text-lr-scale: must be a finite number >= 0 .*got {scale}"):
        train_video.main(["--out", str(tmp_path / "m"), "--text-lr-scale", scale])
    assert not (tmp_path / "m.work").exists()


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_text_lr_scale_zero_leaves_the_text_encoder_as_built(scale) -> None:
    """``--text-lr-scale 0``: two transformer-stage steps change the transformer and leave the text
    encoder (live and EMA) bit for bit as built; any other scale trains it."""
    torch.manual_seed(0)
    tokenizer = train_video.build_tokenizer()
    text_encoder, _, transformer = train_video.build_models(tokenizer)
    built_text = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    built_transformer = {k: v.clone() for k, v in transformer.state_dict().items()}
    latents = torch.randn(4, train_video.LATENT_CHANNELS, 3, 4, 4)
    captions = [PROMPT, "a large yellow triangle moving down on a white background"] * 2
    args = argparse.Namespace(lr=1e-3, text_lr_scale=scale, ema=0.998, shape_weight=1.0)
    ema_transformer, ema_text, _ = train_video.train_transformer(
        transformer, text_encoder, tokenizer, [train_video.Source(latents, captions, 2)], 2, args,
        torch.Generator().manual_seed(0), [])

    def unchanged(model, built):
        return all(torch.equal(v, built[k]) for k, v in model.state_dict().items())
    assert not unchanged(transformer, built_transformer) and not unchanged(ema_transformer, built_transformer)
    assert unchanged(text_encoder, built_text) is (scale == 0) and unchanged(ema_text, built_text) is (scale == 0)
    assert not ema_text.training


@pytest.mark.parametrize("option, value, message", [
    ("--direction-steps", "-1", r"--direction-steps: must be an integer >= 0 .*got -1"),
    ("--direction-mix", "1.0", r"--direction-mix: must be a number in \[0, 1\) .*got 1.0"),
    ("--direction-mix", "-0.1", r"--direction-mix: must be a number in \[0, 1\) .*got -0.1"),
    ("--direction-mix", "nan", r"--direction-mix: must be a number in \[0, 1\) .*got nan"),
    ("--n-direction", "0", r"--n-direction: must be an integer >= 1, got 0"),
])
def test_bad_direction_options_are_refused_before_any_training(tmp_path, option, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        train_video.main(["--out", str(tmp_path / "m"), option, value])
    assert not (tmp_path / "m.work").exists()


def test_direction_only_clips_share_everything_but_the_motion() -> None:
    """``make_dataset(..., fixed=DIRECTION_ONLY)``: every clip is the large red circle on blue, its
    caption says so (size included), the rendered direction is the caption's, all four occur; a
    fixed attribute outside the data set's classes is refused."""
    clips, captions, labels = moving_shapes.make_dataset(40, seed=2, fixed=moving_shapes.DIRECTION_ONLY)
    for name, value in moving_shapes.DIRECTION_ONLY.items():
        assert (labels[name] == moving_shapes.ATTRIBUTES[name].index(value)).all()
    assert {caption.replace(moving_shapes.DIRECTIONS[d], "{d}") for caption, d in zip(captions, labels["direction"])} \
        == {"a large red circle moving {d} on a blue background"}
    assert set(labels["direction"].tolist()) == {0, 1, 2, 3}
    found = np.array([motion_direction(clip)[0] for clip in clips])
    assert np.array_equal(found, labels["direction"])
    with pytest.raises(ValueError, match=r"fixed\['color'\]: must be one of .*got 'purple'"):
        moving_shapes.make_dataset(2, fixed={"color": "purple"})
    with pytest.raises(ValueError, match=r"background must differ from the shape colour"):
        moving_shapes.make_dataset(2, fixed={"color": "red", "background": "red"})


def test_a_mixed_batch_takes_its_rows_from_each_source(monkeypatch) -> None:
    """``--direction-mix``: every transformer-stage batch is ``rows`` rows of the data set followed
    by ``rows`` of the direction-only clips (captions as drawn, some emptied for CFG), and the
    step's latents are those rows'."""
    tokenizer = train_video.build_tokenizer()
    text_encoder, _, transformer = train_video.build_models(tokenizer)
    data = train_video.Source(torch.zeros(5, train_video.LATENT_CHANNELS, 3, 4, 4), ["a red square"] * 5, 3)
    focus = train_video.Source(torch.ones(4, train_video.LATENT_CHANNELS, 3, 4, 4), ["a large red circle"] * 4, 1)
    seen, encode, forward = [], train_video.encode_captions, train_video._padded_forward

    def record_texts(tokenizer, text_encoder, texts, *rest, **kwargs):
        seen.append(list(texts))
        return encode(tokenizer, text_encoder, texts, *rest, **kwargs)

    inputs = []

    def record_inputs(transformer, processors, x, sigma, context, bias):
        inputs.append((x.detach().clone(), sigma.clone()))
        return forward(transformer, processors, x, sigma, context, bias)
    monkeypatch.setattr(train_video, "encode_captions", record_texts)
    monkeypatch.setattr(train_video, "_padded_forward", record_inputs)
    args = argparse.Namespace(lr=1e-3, text_lr_scale=0.0, ema=0.998, shape_weight=1.0)
    train_video.train_transformer(transformer, text_encoder, tokenizer, [data, focus], 6, args,
                                  torch.Generator().manual_seed(0), [])
    assert len(seen) == 6 and all(len(texts) == 4 for texts in seen)
    assert all(t in ("", "a red square") for texts in seen for t in texts[:3])
    assert all(texts[3] in ("", "a large red circle") for texts in seen)
    assert any(texts[3] for texts in seen) and any(t for texts in seen for t in texts[:3])
    # x = (1 - s) x0 + s eps with x0 = 0 in the data rows, 1 in the focus row: a row's mean is
    # (1 - s) x0 up to s times the mean of 768 normal draws (sd 0.036)
    assert all(x.shape[0] == 4 for x, _ in inputs)
    for x, sigma in inputs:
        expected = (1 - sigma) * torch.tensor([0.0, 0.0, 0.0, 1.0])
        assert torch.allclose(x.mean(dim=(1, 2, 3, 4)), expected, atol=0.15)
    assert any(float(sigma[3]) < 0.6 for _, sigma in inputs)  # some steps tell the rows apart


def test_the_script_runs_its_stages_and_saves_a_loadable_pipeline(tmp_path) -> None:
    """``train_video`` end to end on a few clips and steps, with the direction-only stage and a
    mixed main stage: each stage's losses are logged, the settings recorded, and the saved folder
    loads as a GuidedWanPipeline that generates a clip of the data set's size."""
    out = tmp_path / "m"
    argv = ["--out", str(out), "--vae-steps", "1", "--steps", "2", "--decoder-steps", "1", "--n-train", "8",
            "--batch", "4", "--direction-steps", "2", "--direction-mix", "0.25", "--n-direction", "4",
            "--text-lr-scale", "0", "--no-fp16"]
    train_video.main(argv)
    stages = [row.split(",")[0] for row in (tmp_path / "m.work" / "losses.csv").read_text().split()[1:]]
    assert stages == ["vae", "direction", "direction", "transformer", "transformer", "decoder"]
    info = json.loads((tmp_path / "m.work" / "train_info.json").read_text())
    assert (info["direction_steps"], info["direction_mix"], info["direction_rows"]) == (2, 0.25, 1)
    assert set(info["final_losses_last100"]) == {"vae", "direction", "transformer", "decoder"}
    # the main stage trains the transformer the direction stage handed over (a frozen text encoder
    # gives the loss no other path to a gradient)
    direction = torch.load(tmp_path / "m.work" / "direction_stage.pt", weights_only=False)["transformer"]
    saved, _ = train_video._saved_networks(out)
    assert any(not torch.equal(v, direction[k]) for k, v in saved.state_dict().items())
    # --resume reuses the VAE, direction and decoder stages and gives the same transformer
    train_video.main([*argv, "--resume"])
    again, _ = train_video._saved_networks(out)
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in again.state_dict().items())
    # a continuation (--init-from) goes on with the main stage: no second direction-only stage
    train_video.main([*argv, "--resume", "--init-from", str(out), "--out", str(tmp_path / "continued"),
                      "--work", str(tmp_path / "m.work")])
    stages = [row.split(",")[0] for row in (tmp_path / "m.work" / "losses.csv").read_text().split()[1:]]
    assert stages == ["vae", "transformer", "transformer", "decoder"]
    trained = load_pipeline(str(out))
    trained.set_progress_bar_config(disable=True)
    frames = trained(PROMPT, num_inference_steps=1, num_frames=moving_shapes.NUM_FRAMES, height=32, width=32,
                     output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape[1:] == (moving_shapes.NUM_FRAMES, 32, 32, 3) and np.isfinite(frames).all()


def test_latent_shape_mask_marks_the_cells_the_shape_crosses() -> None:
    """The transformer stage's ``--shape-weight`` mask: a blank clip has none; a data-set clip's
    mask follows its shape (latent frame 0 = frame 0, spatial factor 4) and covers a part only."""
    clips, _, _ = moving_shapes.make_dataset(4, seed=0)
    blank = np.full_like(clips[:1], 128)
    assert not train_video.latent_shape_mask(blank, (8, 8)).any()
    mask = train_video.latent_shape_mask(clips, (8, 8))
    assert mask.shape == (4, 1, 3, 8, 8) and 0 < mask.float().mean() < 0.5
    for clip, cells in zip(clips, mask):
        x, y = np.nonzero(np.abs(clip[0].astype(int) - np.median(clip[0].reshape(-1, 3), 0)).max(-1) > 12.75)[::-1]
        assert cells[0, 0, y // 4, x // 4].all()  # every shape pixel of frame 0 lies in a marked cell


def test_training_context_equals_the_stock_512_token_context(pipe) -> None:
    texts = [PROMPT, "", "a large yellow triangle moving down on a white background"]
    short, bias = train_video.encode_captions(pipe.tokenizer, pipe.text_encoder, texts)
    stock, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False, max_sequence_length=512)
    n = short.shape[1]
    torch.testing.assert_close(short, stock[:, :n], rtol=0, atol=1e-5)
    assert torch.equal(stock[:, n:], torch.zeros_like(stock[:, n:]))
    real = (bias == 0).sum(1)
    for row, k in zip(bias, real.tolist()):  # the pad rows weigh as the stock's 512 - k zeros
        assert math.isclose(math.exp(float(row[-1])) * (n - k), 512 - k, rel_tol=1e-5)
    error = train_video.check_padded_context(pipe.tokenizer, pipe.text_encoder, pipe.transformer, texts)
    assert error <= 1e-4


def test_vae_factors_give_their_latent_grids_and_reconstructions_are_scored(pipe) -> None:
    tokenizer = train_video.build_tokenizer()
    for factor, side in ((4, 8), (8, 4)):
        _, vae, _ = train_video.build_models(tokenizer, spatial_factor=factor)
        clip = torch.zeros(1, 3, moving_shapes.NUM_FRAMES, moving_shapes.IMAGE_SIZE, moving_shapes.IMAGE_SIZE)
        with torch.no_grad():
            latents = vae.encode(clip).latent_dist.mode()
        assert tuple(latents.shape) == (1, train_video.LATENT_CHANNELS, 3, side, side)
        assert vae.config.scale_factor_spatial == factor
    with pytest.raises(ValueError, match=r"spatial_factor: must be one of \(4, 8\), got 2"):
        train_video.build_models(tokenizer, spatial_factor=2)
    with pytest.raises(ValueError, match=r"head_dim: must be one of \(16, 32, 64\), got 8"):
        train_video.build_models(tokenizer, head_dim=8)
    assert train_video.build_models(tokenizer, head_dim=32)[2].config.num_attention_heads == 2
    # the shipped VAE on held-out clips keeps the direction (docs/video.md: 0.82 on 96 clips); an
    # untrained one does not
    assert train_video.reconstruction_scores(pipe.vae, n=32)["acc_direction"] >= 0.7
    assert train_video.reconstruction_scores(vae, n=32)["acc_direction"] < 0.5
