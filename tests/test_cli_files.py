"""The CLI's model options: single-file checkpoints (--model FILE, --config DIR), LoRAs (--lora),
the diffusers scheduler (--scheduler, --karras, --timestep-spacing, --ays), and the A1111
"parameters" text of the PNGs.

Oracles: a single file written here from a diffusers directory (its weights renamed to the
original LDM layout, a converter of this test's own) loads back to the directory's weights
exactly; the CLI's image from that file with a LoRA equals, pixel for pixel, the Python API's
from ``from_pretrained`` + ``load_lora_weights`` + ``set_adapters``; each scheduler flag equals the
diffusers ``Scheduler.from_config(config, ...)`` a user would write; the parameters text parses
back (with this test's own parser) to the settings of the run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guidance_engine import strict_json
from guidance_engine.pipelines import GuidedStableDiffusionPipeline, models
from guidance_engine.pipelines.apps import cli_common
from guidance_engine.pipelines.apps.cli import main
from guidance_engine.pipelines.apps.cli_checks import model_scheduler
from guidance_engine.pipelines.toy.tiny_models import save_tiny_sd
from guidance_engine.registry import resolve_guidance

PROMPT = "a red circle on a blue background"


# -- a single file in the original LDM layout, written from a diffusers directory --------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    name, _, leaf = rest.partition(".")
    return f"{_RESNET[name]}.{leaf}"


def _unet_key(key: str, layers: int, attended: set[int]) -> str:
    """A diffusers UNet2DConditionModel key in the LDM UNet's layout: input blocks (1 + i(L+1) + j,
    the downsampler at (i+1)(L+1)), the middle block (resnet, attention, resnet), output blocks
    (i(L+1) + j, the upsampler after the attention when the block has one)."""
    module, _, leaf = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    block = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if block:
        side, i, kind, j, rest = block[1], int(block[2]), block[3], int(block[4]), block[5]
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (layers + 1)}.0.op.{rest.removeprefix('conv.')}"
        if kind == "upsamplers":
            return f"output_blocks.{i * (layers + 1) + layers}.{2 if i in attended else 1}.{rest}"
        index = 1 + i * (layers + 1) + j if side == "down" else i * (layers + 1) + j
        prefix = "input_blocks" if side == "down" else "output_blocks"
        return f"{prefix}.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"{prefix}.{index}.1.{rest}"
    middle = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    kind, j, rest = middle[1], int(middle[2]), middle[3]
    return f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"


def _vae_key(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key in the LDM layout (decoder levels counted from the bottom)."""
    block = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)",
                         key)
    if block:
        part, side, i, kind, j, rest = block[1], block[2], int(block[3]), block[4], block[5], block[6]
        level = i if side == "down" else levels - 1 - i
        if kind == "resnets":
            return f"{part}.{side}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{side}.{level}.{side}sample.{rest}"
    middle = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if middle:
        part, kind, j, rest = middle[1], middle[2], int(middle[3]), middle[4]
        if kind == "resnets":
            return f"{part}.mid.block_{j + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        module, _, leaf = rest.rpartition(".")
        return f"{part}.mid.attn_1.{_VAE_ATTENTION[module]}.{leaf}"
    return key.replace("conv_norm_out", "norm_out")


def write_single_file(directory: Path, path: Path) -> Path:
    """The diffusers SD directory's UNet, VAE and CLIP weights as one LDM-layout safetensors file
    (the VAE's attention projections as 1x1 convolutions, as LDM stores them)."""
    from safetensors.torch import save_file

    pipe = GuidedStableDiffusionPipeline.from_pretrained(directory)
    unet, vae = pipe.unet, pipe.vae
    attended = {i for i, name in enumerate(unet.config.up_block_types) if "CrossAttn" in name}
    tensors = {}
    for key, value in unet.state_dict().items():
        tensors[f"model.diffusion_model.{_unet_key(key, unet.config.layers_per_block, attended)}"] = value
    for key, value in vae.state_dict().items():
        name = _vae_key(key, len(vae.config.down_block_types))
        conv = ".attn_1." in name and name.endswith(".weight") and value.ndim == 2
        tensors[f"first_stage_model.{name}"] = value[:, :, None, None] if conv else value
    for key, value in pipe.text_encoder.state_dict().items():
        tensors[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = value
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


def write_lora(directory: Path, path: Path, seed: int = 0) -> Path:
    """A rank-4 LoRA on the UNet's attention projections, both factors random (peft's
    ``init_lora_weights=False``: a zero B would make the LoRA a no-op), saved as diffusers'
    training scripts save one and renamed to ``path``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(directory / "unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return (path.parent / "pytorch_lora_weights.safetensors").rename(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The shipped model as a single file, a tiny model of another architecture (directory and
    single file), and a LoRA for each."""
    root = tmp_path_factory.mktemp("files")
    tiny = save_tiny_sd(root / "tiny")
    return {"shipped": write_single_file(models.default_model_path(), root / "shipped.safetensors"),
            "tiny_dir": tiny, "tiny": write_single_file(tiny, root / "tiny.safetensors"),
            "lora": write_lora(models.default_model_path(), root / "loras" / "style.safetensors"),
            "lora_2": write_lora(models.default_model_path(), root / "loras_2" / "style.safetensors", seed=2),
            "tiny_lora": write_lora(tiny, root / "tiny_loras" / "ink.safetensors", seed=1)}


@pytest.fixture(scope="module")
def shipped() -> GuidedStableDiffusionPipeline:
    """The shipped model through the Python API, no LoRA (tests restore its scheduler)."""
    return api_pipeline(models.default_model_path())


def api_pipeline(directory: Path, loras: list[tuple[Path, str, float]] = ()) -> GuidedStableDiffusionPipeline:
    """The Python API's way: from_pretrained, then load_lora_weights and set_adapters."""
    pipe = GuidedStableDiffusionPipeline.from_pretrained(directory, safety_checker=None,
                                                         requires_safety_checker=False)
    for path, name, _ in loras:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    if loras:
        pipe.set_adapters([name for _, name, _ in loras], adapter_weights=[scale for _, _, scale in loras])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def api_image(pipe, seed: int, steps: int = 3, negative_prompt: str | None = None, **kwargs) -> np.ndarray:
    out = pipe(PROMPT, negative_prompt=negative_prompt, guidance=resolve_guidance("cfg", scale=4.0),
               num_inference_steps=steps, generator=[torch.Generator("cpu").manual_seed(seed)], **kwargs)
    return np.asarray(out.images[0])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def generate(out: Path, *options: str, steps: int = 3, seed: int = 7) -> int:
    return main(["generate", PROMPT, "--scale", "4", "--steps", str(steps), "--seed", str(seed), *options,
                 "-o", str(out)])


# -- parsing A1111's parameters text back (this test's own reader) ------------------------------

def parse_parameters(text: str) -> tuple[str, str | None, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) of an A1111 parameters text: the last line holds
    ``Key: value`` pairs separated by ``, ``, a value either a JSON string or plain text up to the
    next comma; the lines before it are the prompt, then ``Negative prompt: ...``."""
    *head, last = text.split("\n")
    pairs: dict[str, str] = {}
    decoder, at = json.JSONDecoder(), 0
    while at < len(last):
        colon = last.index(": ", at)
        key, at = last[at:colon], colon + 2
        if last[at] == '"':
            value, at = decoder.raw_decode(last, at)
        else:
            end = last.find(", ", at)
            end = len(last) if end < 0 else end
            value, at = last[at:end], end
        pairs[key] = value
        at += 2 if last.startswith(", ", at) else len(last)
    body = "\n".join(head)
    prompt, _, negative = body.partition("\nNegative prompt: ")
    return prompt, negative or None, pairs


# -- single files -----------------------------------------------------------------------------

def test_single_files_load_to_the_directory_weights(files, shipped) -> None:
    """A written single file loads (with the config directory its architecture fits) to exactly
    the diffusers directory's weights; without --config the shipped model's directory is used
    when the file fits it, and another architecture's config is refused naming the tensor."""
    for file, directory in ((files["shipped"], models.default_model_path()), (files["tiny"], files["tiny_dir"])):
        config = None if file == files["shipped"] else directory
        assert models.single_file_config(file, config) == directory
        reference = shipped if file == files["shipped"] else api_pipeline(directory)
        loaded = models.load_pipeline(file, config=config)
        for name in ("unet", "vae", "text_encoder"):
            ours, theirs = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
            assert ours.keys() == theirs.keys(), name
            assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert models.single_file_config(files["tiny"]) is None  # not the shipped architecture: diffusers infers
    with pytest.raises(ValueError, match=r"config: tiny.safetensors does not fit .*default_model: .* has shape"):
        models.single_file_config(files["tiny"], models.default_model_path())


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # peft, on a second adapter
def test_single_file_and_lora_equal_the_python_api(files, shipped, tmp_path) -> None:
    """generate --model FILE --lora FILE:SCALE --lora DIR:SCALE == from_pretrained +
    load_lora_weights + set_adapters, pixel for pixel, and the LoRAs change the image."""
    out = tmp_path / "cli.png"
    assert generate(out, "--model", str(files["shipped"]), "--lora", f"{files['lora']}:0.7",
                    "--lora", f"{files['lora_2'].parent}:-0.3") == 0
    loras = [(files["lora"], "style", 0.7), (files["lora_2"], "loras_2", -0.3)]
    pipe = api_pipeline(models.default_model_path(), loras)
    expected = api_image(pipe, seed=7)
    assert np.array_equal(pixels(out), expected)
    pipe.set_adapters(["style"], adapter_weights=[0.7])  # the first LoRA alone
    assert not np.array_equal(expected, api_image(pipe, seed=7))
    assert not np.array_equal(expected, api_image(shipped, seed=7))
    meta = json.loads(Image.open(out).text["guidance-engine"])
    assert meta["loras"] == [[str(files["lora"]), 0.7], [str(files["lora_2"].parent), -0.3]]
    params = parse_parameters(Image.open(out).text["parameters"])[2]
    assert params["LoRA"] == "style: 0.7, loras_2: -0.3"  # adapter names: a file's stem, a directory's name
    assert cli_common.lora_names([files["lora"], files["lora_2"]]) == ["style", "style_2"]  # one stem, twice
    assert meta["config"] == str(models.default_model_path())


def test_another_architecture_needs_its_config(files, tmp_path, capsys, monkeypatch) -> None:
    """A single file the shipped model does not fit: offline (and uncached) without --config the
    error names --config; with --config its directory, the CLI equals the Python API."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert generate(tmp_path / "a.png", "--model", str(files["tiny"])) == 2
    assert "--config: tiny.safetensors is not the shipped model's architecture" in capsys.readouterr().err
    out = tmp_path / "b.png"
    assert generate(out, "--model", str(files["tiny"]), "--config", str(files["tiny_dir"]),
                    "--lora", str(files["tiny_lora"]), "-n", "green") == 0
    expected = api_image(api_pipeline(files["tiny_dir"], [(files["tiny_lora"], "ink", 1.0)]), seed=7,
                         negative_prompt="green")
    assert np.array_equal(pixels(out), expected)


# -- schedulers -------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 on KDPM2's sigma tables, in diffusers
def test_scheduler_choices_are_from_config_with_the_stated_options() -> None:
    """Each --scheduler name is its class from the model's config with the entries it states;
    --karras and --timestep-spacing set use_karras_sigmas and timestep_spacing; the model's other
    entries (betas, steps offset, prediction type) are kept."""
    import diffusers

    base = model_scheduler(models.default_model_path())  # from its config alone
    for name, choice in cli_common.SCHEDULERS.items():
        made = cli_common.configure_scheduler(base, name, timestep_spacing="trailing")
        reference = getattr(diffusers, choice.class_name).from_config(base.config, **dict(choice.config),
                                                                      timestep_spacing="trailing")
        assert type(made) is type(reference) and dict(made.config) == dict(reference.config), name
        assert made.config.timestep_spacing == "trailing" and made.config.beta_end == base.config.beta_end
    karras = cli_common.configure_scheduler(base, "euler", karras=True)
    assert type(karras).__name__ == "EulerDiscreteScheduler" and karras.config.use_karras_sigmas
    assert cli_common.SCHEDULERS["dpmpp_2m_karras"].config == (("algorithm_type", "dpmsolver++"),
                                                                ("solver_order", 2), ("use_karras_sigmas", True))
    assert cli_common.configure_scheduler(base) is base  # nothing asked: the model's own


def test_scheduler_flags_through_the_cli_equal_diffusers_from_config(shipped, tmp_path) -> None:
    """--scheduler with --timestep-spacing, Karras sigmas under a core solver, and AYS timesteps:
    each image equals the Python API with the scheduler built by hand, and differs from the one
    without the flag (so the flag reached the run)."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
    from diffusers.schedulers import AysSchedules

    pipe, default = shipped, shipped.scheduler
    config = default.config
    dpmpp = dict(algorithm_type="dpmsolver++", solver_order=2)
    ays = {"timesteps": AysSchedules["StableDiffusionTimesteps"]}
    runs = [  # flags, steps, the scheduler with the flag, without it, the call's own arguments
        (["--scheduler", "dpmpp_2m", "--timestep-spacing", "trailing"], 3,
         DPMSolverMultistepScheduler.from_config(config, **dpmpp, timestep_spacing="trailing"),
         DPMSolverMultistepScheduler.from_config(config, **dpmpp), {}, {}),
        (["--scheduler", "euler", "--karras", "--sampler", "dpmpp_2m"], 3,
         EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True), EulerDiscreteScheduler.from_config(config),
         {"sampler": "dpmpp_2m"}, {"sampler": "dpmpp_2m"}),
        (["--scheduler", "euler", "--ays"], 10, EulerDiscreteScheduler.from_config(config),
         EulerDiscreteScheduler.from_config(config), ays, {}),
    ]
    for k, (flags, steps, scheduler, without, call, call_without) in enumerate(runs):
        out = tmp_path / f"s{k}.png"
        assert generate(out, *flags, steps=steps) == 0
        pipe.scheduler = scheduler
        assert np.array_equal(pixels(out), api_image(pipe, seed=7, steps=steps, **call)), flags
        pipe.scheduler = without
        assert not np.array_equal(pixels(out), api_image(pipe, seed=7, steps=steps, **call_without)), flags
        _, _, params = parse_parameters(Image.open(out).text["parameters"])
        assert params.get("Schedule type") == {0: None, 1: "Karras", 2: "Align Your Steps"}[k]
        assert params["Steps"] == str(steps) and params["Solver"] == call.get("sampler", "scheduler")
    pipe.scheduler = default


BAD = [
    (["--scheduler", "dpm_fast"], "--scheduler: must be one of ddim, ddpm, pndm, lms, euler, euler_a, heun, dpm2, "
     "dpm2_a, dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde, dpmpp_2m_sde_karras, unipc, deis, lcm, got 'dpm_fast'"),
    (["--timestep-spacing", "even"], "--timestep-spacing: must be one of leading, trailing, linspace, got 'even'"),
    (["--scheduler", "euler_a", "--karras"], "--karras: EulerAncestralDiscreteScheduler has no Karras sigmas"),
    (["--scheduler", "dpmpp_2m_karras", "--sampler", "ddim"],
     "--karras: sampler 'ddim' visits the levels of DDIMScheduler, which has no Karras sigmas"),
    (["--ays"], "--steps: --ays runs the 10 timesteps of diffusers' AYS schedule; pass --steps 10, got 3"),
    (["--ays", "--steps", "10"], "--ays: sampler 'scheduler' steps with DDIMScheduler, which takes no explicit"),
    (["--ays", "--steps", "10", "--scheduler", "euler", "--karras"], "--ays: sets the timesteps itself; drop --karras"),
    (["--lora", "{tmp}/missing.safetensors"], "--lora: no such file or directory '{tmp}/missing.safetensors'"),
    (["--lora", "{lora}:inf"], "--lora: the scale after ':' must be a finite number, got 'inf'"),
    (["--config", "{tmp}"], "--config: only a single-file --model takes a config directory"),
    (["--model", "{tmp}/absent.ckpt"], "--model: no such file '{tmp}/absent.ckpt'"),
    (["--model", "{tmp}/cut.safetensors"], "--model: cut.safetensors is truncated"),
    (["--model", "{tiny}", "--config", "{shipped_dir}"], "--config: tiny.safetensors does not fit"),
    (["--model", "{tiny}", "--config", "{tmp}"], "--config: must be a diffusers model directory"),
]


@pytest.mark.parametrize("flags, message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_model_options_are_refused_before_the_model_loads(flags, message, files, tmp_path, capsys,
                                                              monkeypatch) -> None:
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli_common, "load_quietly", no_model)
    monkeypatch.setattr(models, "load_pipeline", no_model)
    full = files["shipped"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(full[: len(full) // 2])
    names = {"{tmp}": str(tmp_path), "{lora}": str(files["lora"]), "{tiny}": str(files["tiny"]),
             "{shipped_dir}": str(models.default_model_path())}
    swap = lambda text: re.sub("|".join(re.escape(k) for k in names), lambda m: names[m[0]], text)  # noqa: E731
    assert generate(tmp_path / "x.png", *map(swap, flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("guidance-engine: error: ") and err.count("\n") == 1, err
    assert swap(message) in err, err
    assert not (tmp_path / "x.png").exists()


def test_lora_without_peft_names_the_flag(files, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    assert generate(tmp_path / "x.png", "--lora", str(files["lora"])) == 2
    assert "--lora: loading LoRAs needs peft, which is not installed: pip install 'guidance-engine[lora]'" \
        in capsys.readouterr().err


# -- the A1111 parameters text ----------------------------------------------------------------

def test_png_parameters_parse_back_to_the_settings(files, tmp_path) -> None:
    out = tmp_path / "p.png"
    assert main(["generate", PROMPT, "-n", "green, yellow", "--method", "apg", "--scale", "5", "--param",
                 "momentum=-0.25", "--steps", "3", "--seed", "11", "--model", str(files["shipped"]),
                 "--lora", f"{files['lora']}:0.5", "--scheduler", "dpmpp_2m_karras", "--timestep-spacing", "trailing",
                 "-o", str(out)]) == 0
    chunks = Image.open(out).text
    prompt, negative, params = parse_parameters(chunks["parameters"])
    meta = json.loads(chunks["guidance-engine"])
    assert (prompt, negative) == (PROMPT, "green, yellow")
    assert list(params) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Solver",
                            "Scheduler", "Timestep spacing", "LoRA", "Guidance"]  # A1111's order, then ours
    assert params["Steps"] == "3" and params["Seed"] == "11" and params["Size"] == "32x32"
    assert params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras" and params["Solver"] == "scheduler"
    assert float(params["CFG scale"]) == 5.0 and params["Model"] == "shipped" and params["LoRA"] == "style: 0.5"
    assert (params["Scheduler"], params["Timestep spacing"]) == ("dpmpp_2m_karras", "trailing")
    assert json.loads(params["Guidance"]) == json.loads(strict_json.dumps(meta["guidance"]))
    assert resolve_guidance(json.loads(params["Guidance"])) == resolve_guidance("apg", scale=5, momentum=-0.25)


def test_img2img_parameters_carry_the_strength(files, tmp_path) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(source)
    out = tmp_path / "i2i.png"
    assert main(["img2img", str(source), PROMPT, "--strength", "0.6", "--steps", "3", "--model", str(files["shipped"]),
                 "--scheduler", "euler", "-o", str(out)]) == 0
    prompt, negative, params = parse_parameters(Image.open(out).text["parameters"])
    assert (prompt, negative, params["Denoising strength"], params["Sampler"]) == (PROMPT, None, "0.6", "Euler")
    assert "Seed" in params and "Schedule type" not in params


def test_batch_pngs_carry_parameters(tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n")
    out = tmp_path / "run"
    assert main(["batch", str(prompts), "--out", str(out), "--steps", "2", "--seed", "3", "--no-progress"]) == 0
    image = Image.open(out / "00000-00.png")
    meta = json.loads(image.text["guidance-engine"])
    prompt, negative, params = parse_parameters(image.text["parameters"])
    assert (prompt, negative, params["Seed"], params["Steps"]) == (PROMPT, None, str(meta["seed"]), "2")
    assert params["Sampler"] == "DDIM" and json.loads(params["Guidance"]) == meta["guidance"]
