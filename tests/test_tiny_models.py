"""Tests for the tiny, code-built SD / SDXL components used throughout the test suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from transformers import CLIPTokenizer

from guidance_engine.pipelines.toy.tiny_models import (
    BOS_TOKEN,
    EOS_TOKEN,
    TINY_IMAGE_SIZE,
    TINY_MODEL_MAX_LENGTH,
    TINY_VOCAB_WORDS,
    build_tiny_tokenizer,
    save_tiny_sd,
    save_tiny_sdxl,
    tiny_sd_components,
    tiny_sdxl_components,
)

PROMPT = "a red circle on a blue background"


def _run(pipe: Any, seed: int = 0, **kwargs: Any) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs.setdefault("prompt", PROMPT)
    return pipe(num_inference_steps=2, output_type="np", generator=generator, **kwargs).images


def _sd_pipe(**kwargs: Any) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(**tiny_sd_components(**kwargs), requires_safety_checker=False)


def _sdxl_pipe(**kwargs: Any) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(**tiny_sdxl_components(**kwargs))


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_writes_clip_vocab_files(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").is_file()
    assert (tmp_path / "tok" / "merges.txt").is_file()
    vocab = tokenizer.get_vocab()
    # 256 byte-level characters, plain and with "</w>", whole words, 2 specials.
    assert len(tokenizer) > 512 + 2
    assert {BOS_TOKEN, EOS_TOKEN, "a</w>", "red</w>", "background</w>"} <= set(vocab)
    assert tokenizer.model_max_length == TINY_MODEL_MAX_LENGTH


def test_tokenizer_prompt_uses_whole_word_tokens(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer(tmp_path)
    ids = tokenizer(PROMPT).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == [BOS_TOKEN] + [f"{w}</w>" for w in PROMPT.split()] + [EOS_TOKEN]
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert len(set(ids)) > 5


@pytest.mark.parametrize("word", TINY_VOCAB_WORDS)
def test_tokenizer_vocab_words_are_single_tokens(tmp_path: Path, word: str) -> None:
    tokenizer = build_tiny_tokenizer(tmp_path)
    assert tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids) == [
        BOS_TOKEN,
        f"{word}</w>",
        EOS_TOKEN,
    ]


def test_tokenizer_unknown_words_fall_back_to_characters(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer(tmp_path)
    ids = tokenizer("A squirrel, eating 3 burgers!").input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a squirrel , eating 3 burgers !"


def test_tokenizer_pads_to_max_length(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer(tmp_path)
    enc = tokenizer(
        [PROMPT, "two green triangles"],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    assert enc.input_ids.shape == (2, TINY_MODEL_MAX_LENGTH)
    n = len(PROMPT.split()) + 2
    assert enc.attention_mask[0].sum().item() == n
    assert (enc.input_ids[0, n:] == tokenizer.pad_token_id).all()
    long = tokenizer(
        " ".join(["red"] * 200), padding="max_length", max_length=77, truncation=True
    ).input_ids
    assert len(long) == 77 and long[0] == tokenizer.bos_token_id and long[-1] == tokenizer.eos_token_id


def test_tokenizer_save_load_round_trip(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "saved")
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    assert len(loaded) == len(tokenizer)
    assert loaded.model_max_length == tokenizer.model_max_length
    for text in (PROMPT, "three purple squares, top left", "A squirrel eating a burger"):
        assert loaded(text).input_ids == tokenizer(text).input_ids
        assert (
            loaded(text, padding="max_length", max_length=77).input_ids
            == tokenizer(text, padding="max_length", max_length=77).input_ids
        )


# --------------------------------------------------------------------------- components


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()


def test_components_are_deterministic_and_leave_global_rng_alone() -> None:
    rng_before = torch.get_rng_state()
    a, b, c = tiny_sd_components(seed=0), tiny_sd_components(seed=0), tiny_sd_components(seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = _state(a[name]), _state(b[name]), _state(c[name])
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_text_encoders_match_tokenizer() -> None:
    components = tiny_sdxl_components()
    tokenizer = components["tokenizer"]
    for name in ("text_encoder", "text_encoder_2"):
        config = components[name].config
        assert config.vocab_size == len(tokenizer)
        assert config.max_position_embeddings == TINY_MODEL_MAX_LENGTH
        assert config.eos_token_id == tokenizer.eos_token_id
    unet_config = components["unet"].config
    assert unet_config.cross_attention_dim == (
        components["text_encoder"].config.hidden_size + components["text_encoder_2"].config.hidden_size
    )


def test_components_write_tokenizer_files_to_given_dir(tmp_path: Path) -> None:
    components = tiny_sd_components(tokenizer_dir=tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["merges.txt", "vocab.json"]
    assert components["text_encoder"].config.vocab_size == len(components["tokenizer"])


# --------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_pipeline_runs(prediction_type: str) -> None:
    pipe = _sd_pipe(prediction_type=prediction_type)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == prediction_type
    images = _run(pipe)
    assert images.shape == (1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0
    # the prompt and the guidance scale both change the result
    assert not np.array_equal(images, _run(pipe, prompt="two green squares"))
    assert not np.array_equal(images, _run(pipe, guidance_scale=1.0))


def test_sdxl_pipeline_runs() -> None:
    pipe = _sdxl_pipe()
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    images = _run(pipe)
    assert images.shape == (1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0
    assert not np.array_equal(images, _run(pipe, prompt="two green squares"))
    assert np.array_equal(images, _run(pipe))


def _modules(pipe: Any) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _realign(pipe: Any) -> None:
    """Copy every parameter/buffer into freshly allocated (64-byte aligned) memory.

    transformers 5 keeps safetensors-loaded weights memory-mapped at file offsets that are
    not SIMD aligned; CPU BLAS then takes a different code path for small matmuls (e.g.
    ``text_projection`` on the pooled token) and results differ by ~1 ulp.  Weights are
    bit-identical, so after copying them the outputs are bit-identical as well.
    """
    for module in _modules(pipe).values():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone()


def _assert_round_trip(loaded: Any, again: Any, fresh: Any) -> None:
    loaded_modules, fresh_modules = _modules(loaded), _modules(fresh)
    assert loaded_modules.keys() == fresh_modules.keys()
    for name, module in fresh_modules.items():
        expected, actual = module.state_dict(), loaded_modules[name].state_dict()
        assert expected.keys() == actual.keys(), name
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name
    image = _run(loaded, seed=7)
    assert np.array_equal(image, _run(again, seed=7))
    np.testing.assert_allclose(image, _run(fresh, seed=7), rtol=0, atol=1e-5)
    _realign(loaded)
    assert np.array_equal(_run(loaded, seed=7), _run(fresh, seed=7))


def test_save_tiny_sd_round_trip(tmp_path: Path) -> None:
    path = save_tiny_sd(tmp_path / "sd", seed=3, prediction_type="v_prediction")
    assert path == tmp_path / "sd"
    assert (path / "model_index.json").is_file()
    assert list((path / "unet").glob("*.safetensors"))
    assert not list(path.rglob("*.bin"))
    loaded = StableDiffusionPipeline.from_pretrained(path)
    assert loaded.safety_checker is None
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    again = StableDiffusionPipeline.from_pretrained(path)
    _assert_round_trip(loaded, again, _sd_pipe(seed=3, prediction_type="v_prediction"))


def test_save_tiny_sdxl_round_trip(tmp_path: Path) -> None:
    path = save_tiny_sdxl(tmp_path / "sdxl", seed=5)
    assert path == tmp_path / "sdxl"
    assert not list(path.rglob("*.bin"))
    loaded = StableDiffusionXLPipeline.from_pretrained(path)
    assert isinstance(loaded.scheduler, EulerDiscreteScheduler)
    assert loaded.scheduler.config.timestep_spacing == "leading"
    again = StableDiffusionXLPipeline.from_pretrained(path)
    _assert_round_trip(loaded, again, _sdxl_pipe(seed=5))
