"""Layer-level methods on the flow transformers Chroma, Flux.2 Klein, Qwen-Image and Z-Image:
PAG's identity attention, SEG's blurred queries, skipped blocks (SLG) and TSG's time-embedding
noise, each against an independent construction on a deep copy of the tiny transformer:

- PAG: the layer's stock processor with a boolean mask built here from the token positions
  (combined with the mask the model passes: Chroma's text padding, Qwen-Image's text padding, by
  patching its attention function; Z-Image's batch padding, per row);
- SEG: the model run with a forward hook that blurs the image grid's part of the query
  projection's output (Flux.2's single-stream query columns of its fused projection);
- SLG: the block's forward replaced by the identity on its streams;
- TSG: a forward hook adding the noise to the time-step module's output;

plus pipeline runs and the refusals that come before any forward."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers.models.transformers import transformer_qwenimage
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor
from PIL import Image

from guidance_engine.guidance import Branch, Perturbation
from guidance_engine.pipelines.chroma import GuidedChromaPipeline
from guidance_engine.pipelines.flux2 import GuidedFlux2KleinPipeline
from guidance_engine.pipelines.perturbation import gaussian_blur_queries, resolve_layers
from guidance_engine.pipelines.qwen_image import MASK_KEY, GuidedQwenImagePipeline
from guidance_engine.pipelines.toy.tiny_chroma import tiny_chroma_components
from guidance_engine.pipelines.toy.tiny_flux2 import tiny_flux2_klein_components
from guidance_engine.pipelines.toy.tiny_qwen_image import tiny_qwen_image_components
from guidance_engine.pipelines.toy.tiny_z_image import tiny_z_image_components
from guidance_engine.pipelines.z_image import GuidedZImagePipeline
from conftest import PROMPT, quiet, seeded

STEPS = {"height": 32, "width": 32, "num_inference_steps": 3, "output_type": "latent"}
#: each family's tiny guided pipeline and the text length its calls use
FAMILIES: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "chroma": (lambda: GuidedChromaPipeline(**tiny_chroma_components(0)), {"max_sequence_length": 16}),
    "flux2": (lambda: GuidedFlux2KleinPipeline(**tiny_flux2_klein_components(0), is_distilled=False),
              {"max_sequence_length": 32}),
    "qwen": (lambda: GuidedQwenImagePipeline(**tiny_qwen_image_components(0)), {"max_sequence_length": 16}),
    "z_image": (lambda: GuidedZImagePipeline(**tiny_z_image_components(0)), {"max_sequence_length": 64}),
}
#: the generated image's tokens in the tiny models at 32 x 32 pixels: an 8 x 8 grid
GRID = 64
T = torch.tensor(600.0)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def pipeline(family: str):
    return quiet(FAMILIES[family][0]())


class _Captured(Exception):
    def __init__(self, branches) -> None:
        super().__init__("captured")
        self.branches = branches


def branches_of(pipe, family: str, **call: Any):
    """The branch model a pipeline call builds (its conditions are the stock ones), taken from
    the call before any denoising step."""
    def denoise(branches, *args, **kwargs):
        raise _Captured(branches)

    pipe.denoise = denoise
    try:
        pipe(**{"prompt": PROMPT, **STEPS, **FAMILIES[family][1], **call})
    except _Captured as captured:
        return captured.branches
    finally:
        del pipe.denoise
    raise AssertionError("the pipeline did not reach its denoising loop")


@pytest.fixture(scope="module")
def chroma():
    return branches_of(pipeline("chroma"), "chroma")


@pytest.fixture(scope="module")
def flux2():
    """With two reference images: their tokens follow the latents' in the image stream."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    reference = Image.fromarray(pixels)
    branches = branches_of(pipeline("flux2"), "flux2", image=[reference, reference.rotate(90)])
    assert branches.reference_tokens.shape[1] > 0
    return branches


@pytest.fixture(scope="module")
def qwen():
    """Two prompts of different lengths: the text padding mask is passed."""
    branches = branches_of(pipeline("qwen"), "qwen", prompt=[PROMPT, "blue"])
    assert MASK_KEY in branches.conditions["cond"]
    return branches


@pytest.fixture(scope="module")
def z_image():
    return branches_of(pipeline("z_image"), "z_image")


def evaluate(branches, x: torch.Tensor, requests, model=None) -> dict[str, torch.Tensor]:
    """The branch model's outputs, on ``model`` (a copy of its transformer) when given."""
    if model is not None:
        branches = copy.copy(branches)
        branches.model = model
    return branches(x, T, requests)


def branch(kind: str, layer, sigma: float = math.inf) -> Branch:
    return Branch(f"altered_{kind}", base="cond", perturb=Perturbation(kind, (layer,), sigma=sigma))


def kept(tokens: int, image: range) -> torch.Tensor:
    """PAG's rule as a boolean map (query, key), from scratch: an image token attends to itself
    and to every token outside the image; the others attend to everything."""
    i = torch.arange(tokens)
    inside = (i >= image.start) & (i < image.stop)
    return ~(inside[:, None] & inside[None, :]) | (i[:, None] == i[None, :])


def blur_hook(model, path: str, first: Callable[[int], int], rows: int, columns: int, sigma: float,
              queries: int | None = None) -> None:
    """Blur the output of projection ``path`` on the image grid (``first(tokens)``: where it
    starts; ``queries``: the query columns of a fused projection, else all)."""
    def hook(module, inputs, out):
        out = out.clone()
        start = first(out.shape[1])
        grid = slice(start, start + rows * columns)
        out[:, grid, :queries] = gaussian_blur_queries(out[:, grid, :queries], rows, columns, sigma)
        return out

    model.get_submodule(path).register_forward_hook(hook)


def noise_hook(model, path: str, seed: int) -> None:
    """Add std(emb) * n (n drawn from ``seed``) to the output of the time module ``path``."""
    def hook(module, inputs, emb):
        return emb + emb.float().std() * torch.randn(emb.shape, generator=seeded(seed))

    model.get_submodule(path).register_forward_hook(hook)


def check_blur(branches, x: torch.Tensor, layer, reference, requests=None) -> None:
    """SEG's rows equal ``reference`` (a hooked copy); a visible change; a 1-tap kernel is the model."""
    altered = branch("blur", layer, sigma=2.0)
    got = evaluate(branches, x, [(altered, None)])[altered]
    want = evaluate(branches, x, [("cond", None)], reference)["cond"]
    plain = evaluate(branches, x, [("cond", None)])["cond"]
    assert torch.allclose(got, want, atol=1e-5, rtol=0) and not torch.allclose(got, plain, atol=1e-3)
    tiny = branch("blur", layer, sigma=0.01)
    assert torch.allclose(evaluate(branches, x, [(tiny, None)])[tiny], plain, atol=1e-6, rtol=0)


def check_skip(branches, x: torch.Tensor, layer, block: str, identity: Callable) -> None:
    altered = branch("skip", layer)
    got = evaluate(branches, x, [(altered, None)])[altered]
    reference = copy.deepcopy(branches.model)
    reference.get_submodule(block).forward = identity
    assert torch.equal(got, evaluate(branches, x, [("cond", None)], reference)["cond"])
    assert not torch.allclose(got, evaluate(branches, x, [("cond", None)])["cond"], atol=1e-4)


def check_time_noise(branches, x: torch.Tensor, module: str) -> None:
    altered = Branch("noised", base="cond", time_noise=1.0, generator=seeded(4))
    got = evaluate(branches, x, [(altered, None)])[altered]
    reference = copy.deepcopy(branches.model)
    noise_hook(reference, module, 4)
    assert torch.equal(got, evaluate(branches, x, [("cond", None)], reference)["cond"])
    assert not torch.allclose(got, evaluate(branches, x, [("cond", None)])["cond"], atol=1e-4)


# --------------------------------------------------------------------------- Chroma
class _ChromaMask:
    """Flux's processor (Chroma's) with the model's 0 / 1 padding mask and PAG's entries removed;
    text first, then the 64 image tokens."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        assert attention_mask is not None  # the model's mask is there to be combined
        tokens = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
        mask = attention_mask.masked_fill(~kept(tokens, range(tokens - GRID, tokens)), float("-inf"))
        return FluxAttnProcessor()(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


CHROMA_X = (1, 1, 16, 16)


@pytest.mark.parametrize("layer, module", [(0, "transformer_blocks.0.attn"),
                                           ("single.0", "single_transformer_blocks.0.attn")])
def test_chroma_pag_keeps_the_models_padding_mask(chroma, layer, module) -> None:
    x = torch.randn(CHROMA_X, generator=seeded(1))
    altered = branch("identity", layer)
    got = evaluate(chroma, x, [("cond", None), (altered, None)])
    reference = copy.deepcopy(chroma.model)
    reference.get_submodule(module).set_processor(_ChromaMask())
    plain = evaluate(chroma, x, [("cond", None)])["cond"]
    assert torch.allclose(got[altered], evaluate(chroma, x, [("cond", None)], reference)["cond"], atol=1e-6, rtol=0)
    assert not torch.allclose(got[altered], plain, atol=1e-5) and torch.equal(got["cond"], plain)


@pytest.mark.parametrize("layer, projection, first", [(0, "transformer_blocks.0.attn.to_q", lambda n: 0),
                                                      ("single.0", "single_transformer_blocks.0.attn.to_q",
                                                       lambda n: n - GRID)])
def test_chroma_seg_blurs_the_image_queries(chroma, layer, projection, first) -> None:
    reference = copy.deepcopy(chroma.model)
    blur_hook(reference, projection, first, 8, 8, 2.0)
    check_blur(chroma, torch.randn(CHROMA_X, generator=seeded(2)), layer, reference)


@pytest.mark.parametrize("layer, block, identity", [
    (0, "transformer_blocks.0", lambda hidden_states, encoder_hidden_states, *a, **k: (encoder_hidden_states,
                                                                                        hidden_states)),
    ("single.0", "single_transformer_blocks.0", lambda hidden_states, *a, **k: hidden_states)])
def test_chroma_skipped_blocks_are_the_identity(chroma, layer, block, identity) -> None:
    check_skip(chroma, torch.randn(CHROMA_X, generator=seeded(3)), layer, block, identity)


def test_chroma_time_noise_is_on_the_approximators_output(chroma) -> None:
    check_time_noise(chroma, torch.randn(CHROMA_X, generator=seeded(5)), "distilled_guidance_layer")


# --------------------------------------------------------------------------- Flux.2 Klein
class _Flux2DoubleMask:
    """Flux.2's double-stream processor with PAG's mask: text, then the 64 latent tokens, then
    the reference images' tokens (conditioning, as the text)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        text = encoder_hidden_states.shape[1]
        mask = kept(text + hidden_states.shape[1], range(text, text + GRID))[None, None]
        return Flux2AttnProcessor()(attn, hidden_states, encoder_hidden_states, mask, image_rotary_emb)


class _Flux2SingleMask:
    """Flux.2's single-stream processor with PAG's mask on [text, latents, references]."""

    def __init__(self, references: int) -> None:
        self.references = references

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        tokens = hidden_states.shape[1]
        text = tokens - GRID - self.references
        mask = kept(tokens, range(text, text + GRID))[None, None]
        return Flux2ParallelSelfAttnProcessor()(attn, hidden_states, mask, image_rotary_emb)


FLUX2_X = (1, 8, 8, 8)  # patchified latents: one token per position


@pytest.mark.parametrize("layer, module", [(0, "transformer_blocks.0.attn"),
                                           ("single.0", "single_transformer_blocks.0.attn")])
def test_flux2_pag_leaves_the_reference_images_to_every_token(flux2, layer, module) -> None:
    x = torch.randn(FLUX2_X, generator=seeded(1))
    altered = branch("identity", layer)
    got = evaluate(flux2, x, [("cond", None), (altered, None)])
    reference = copy.deepcopy(flux2.model)
    references = flux2.reference_tokens.shape[1]
    reference.get_submodule(module).set_processor(_Flux2DoubleMask() if layer == 0 else _Flux2SingleMask(references))
    plain = evaluate(flux2, x, [("cond", None)])["cond"]
    assert torch.allclose(got[altered], evaluate(flux2, x, [("cond", None)], reference)["cond"], atol=1e-6, rtol=0)
    assert not torch.allclose(got[altered], plain, atol=1e-5) and torch.equal(got["cond"], plain)


@pytest.mark.parametrize("layer", [0, "single.0"])
def test_flux2_seg_blurs_the_latent_queries(flux2, layer) -> None:
    """The single-stream layers project queries with keys, values and the MLP input in one
    matrix: its first 32 columns (2 heads of 16) are the queries."""
    references = flux2.reference_tokens.shape[1]
    reference = copy.deepcopy(flux2.model)
    if layer == 0:
        blur_hook(reference, "transformer_blocks.0.attn.to_q", lambda n: 0, 8, 8, 2.0)
    else:
        blur_hook(reference, "single_transformer_blocks.0.attn.to_qkv_mlp_proj", lambda n: n - GRID - references,
                  8, 8, 2.0, queries=32)
    check_blur(flux2, torch.randn(FLUX2_X, generator=seeded(2)), layer, reference)


@pytest.mark.parametrize("layer, block, identity", [
    (0, "transformer_blocks.0", lambda hidden_states, encoder_hidden_states, *a, **k: (encoder_hidden_states,
                                                                                        hidden_states)),
    ("single.0", "single_transformer_blocks.0", lambda hidden_states, *a, **k: hidden_states)])
def test_flux2_skipped_blocks_are_the_identity(flux2, layer, block, identity) -> None:
    check_skip(flux2, torch.randn(FLUX2_X, generator=seeded(3)), layer, block, identity)


def test_flux2_time_noise_is_on_the_time_step_mlp(flux2) -> None:
    check_time_noise(flux2, torch.randn(FLUX2_X, generator=seeded(5)), "time_guidance_embed.timestep_embedder")


# --------------------------------------------------------------------------- Qwen-Image
class _QwenMask:
    """Qwen-Image's processor, its attention function patched to AND PAG's boolean rule (text
    first, then the 64 image tokens) into the padding mask the processor builds."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        text = encoder_hidden_states.shape[1]
        rule = kept(text + hidden_states.shape[1], range(text, text + GRID))
        stock = transformer_qwenimage.dispatch_attention_fn

        def masked(query, key, value, attn_mask=None, **kwargs):
            assert attn_mask is not None  # the padding mask is there to be combined
            return stock(query, key, value, attn_mask=attn_mask & rule, **kwargs)

        with mock.patch.object(transformer_qwenimage, "dispatch_attention_fn", masked):
            return QwenDoubleStreamAttnProcessor2_0()(attn, hidden_states, encoder_hidden_states,
                                                      encoder_hidden_states_mask, None, image_rotary_emb)


QWEN_X = (2, 4, 16, 16)  # two prompts


def test_qwen_pag_keeps_the_text_padding_mask(qwen) -> None:
    x = torch.randn(QWEN_X, generator=seeded(1))
    altered = branch("identity", 0)
    got = evaluate(qwen, x, [("cond", None), (altered, None)])
    reference = copy.deepcopy(qwen.model)
    reference.transformer_blocks[0].attn.set_processor(_QwenMask())
    plain = evaluate(qwen, x, [("cond", None)])["cond"]
    assert torch.allclose(got[altered], evaluate(qwen, x, [("cond", None)], reference)["cond"], atol=1e-6, rtol=0)
    assert not torch.allclose(got[altered], plain, atol=1e-5) and torch.equal(got["cond"], plain)


def test_qwen_seg_blurs_the_image_queries(qwen) -> None:
    reference = copy.deepcopy(qwen.model)
    blur_hook(reference, "transformer_blocks.0.attn.to_q", lambda n: 0, 8, 8, 2.0)
    check_blur(qwen, torch.randn(QWEN_X, generator=seeded(2)), 0, reference)


def test_qwen_skipped_blocks_are_the_identity(qwen) -> None:
    check_skip(qwen, torch.randn(QWEN_X, generator=seeded(3)), 0, "transformer_blocks.0",
               lambda hidden_states, encoder_hidden_states, *a, **k: (encoder_hidden_states, hidden_states))


def test_qwen_time_noise_is_on_the_time_step_mlp(qwen) -> None:
    check_time_noise(qwen, torch.randn(QWEN_X, generator=seeded(5)), "time_text_embed.timestep_embedder")


# --------------------------------------------------------------------------- Z-Image
class _ZImageMask:
    """Z-Image's processor with one boolean mask per row built here: the model's key padding
    mask for every row, and on row 1 PAG's rule over the first ``image`` tokens (the image and
    its padding come first in Z-Image's sequences)."""

    def __init__(self, image: int) -> None:
        self.image = image
        self.padded = False  # whether the model passed a key padding mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        batch, tokens = hidden_states.shape[:2]
        self.padded = attention_mask is not None
        keys = torch.ones(batch, tokens, dtype=torch.bool) if attention_mask is None else attention_mask
        mask = keys[:, None, None, :].expand(batch, 1, tokens, tokens).clone()
        mask[1, 0] &= kept(tokens, range(self.image))
        return ZSingleStreamAttnProcessor()(attn, hidden_states, None, mask, freqs_cis)


#: a 20 x 20 latent: a 10 x 10 grid of 2 x 2 patches, padded by the model to 128 image tokens
Z_X = (1, 4, 20, 20)


@pytest.mark.parametrize("layer, module", [(0, "layers.0.attention"), ("refiner.0", "noise_refiner.0.attention")])
def test_z_image_pag_covers_the_image_padding_and_keeps_the_batch_mask(z_image, layer, module) -> None:
    """PAG on the unconditional rows, in one forward after the conditional rows: their shorter
    caption makes the model pad them in its main layers and pass a key mask (the refiner sees
    image tokens only)."""
    x = torch.randn(Z_X, generator=seeded(1))
    altered = Branch("altered_identity", base="uncond", perturb=Perturbation("identity", (layer,)))
    got = evaluate(z_image, x, [("cond", None), (altered, None)])
    reference = copy.deepcopy(z_image.model)
    processor = _ZImageMask(128)
    reference.get_submodule(module).set_processor(processor)
    want = evaluate(z_image, x, [("cond", None), ("uncond", None)], reference)
    assert processor.padded == (layer == 0)
    plain = evaluate(z_image, x, [("cond", None), ("uncond", None)])
    assert torch.allclose(got[altered], want["uncond"], atol=1e-5, rtol=0)
    assert not torch.allclose(got[altered], plain["uncond"], atol=1e-3)
    assert torch.allclose(got["cond"], plain["cond"], atol=1e-5, rtol=0)  # the other rows are the model's


@pytest.mark.parametrize("layer, projection", [(0, "layers.0.attention.to_q"),
                                               ("refiner.0", "noise_refiner.0.attention.to_q")])
def test_z_image_seg_blurs_the_grid_not_its_padding(z_image, layer, projection) -> None:
    reference = copy.deepcopy(z_image.model)
    blur_hook(reference, projection, lambda n: 0, 10, 10, 2.0)
    check_blur(z_image, torch.randn(Z_X, generator=seeded(2)), layer, reference)


@pytest.mark.parametrize("layer, block", [(0, "layers.0"), ("refiner.0", "noise_refiner.0")])
def test_z_image_skipped_blocks_are_the_identity(z_image, layer, block) -> None:
    check_skip(z_image, torch.randn(Z_X, generator=seeded(3)), layer, block, lambda x, *a, **k: x)


def test_z_image_time_noise_is_on_the_time_step_mlp_of_its_rows_only(z_image) -> None:
    x = torch.randn(Z_X, generator=seeded(5))
    check_time_noise(z_image, x, "t_embedder")
    altered = Branch("noised", base="cond", time_noise=1.0, generator=seeded(4))
    both = evaluate(z_image, x, [("cond", None), (altered, None)])
    assert torch.allclose(both["cond"], evaluate(z_image, x, [("cond", None)])["cond"], atol=1e-5, rtol=0)
    assert not torch.allclose(both[altered], both["cond"], atol=1e-4)


# --------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def pipes():
    return {family: pipeline(family) for family in FAMILIES}


SINGLE = {"chroma": ["single.0"], "flux2": ["single.0"], "qwen": [], "z_image": []}
#: 3 steps of: the perturbed branch with the conditional (PAG, SLG: and the unconditional for their CFG)
NFE = {"pag": 9, "seg": 6, "slg": 9, "tsg": 6}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["pag", "seg", "slg", "tsg"])
def test_layer_methods_run_through_the_pipelines_and_leave_the_model_as_it_was(pipes, family, method) -> None:
    pipe, call = pipes[family], {"prompt": PROMPT, **STEPS, **FAMILIES[family][1]}
    spec = {"name": method, "t_min": 0.0} if method == "tsg" else \
        {"name": method, "layers": [0, *SINGLE[family]], "start": 0.0, "stop": 1.0}  # every step (SLG's window)
    before = pipe(generator=seeded(0), **call).images
    out = pipe(guidance=spec, generator=seeded(0), **call)
    assert torch.isfinite(out.images).all() and out.nfe == NFE[method] and not torch.equal(out.images, before)
    assert torch.equal(pipe(generator=seeded(0), **call).images, before)


def refuse_forwards(pipe) -> None:
    pipe.transformer.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the transformer ran"))


@pytest.mark.parametrize("family, message", [
    ("chroma", r"transformer block indices 0\.\.0 \(double-stream\) or 'single\.0'\.\.'single\.0'"),
    ("flux2", r"transformer block indices 0\.\.0 \(double-stream\) or 'single\.0'\.\.'single\.0'"),
    ("qwen", r"transformer block indices 0\.\.0; 7 selects nothing"),
    ("z_image", r"transformer block indices 0\.\.0 \(main layers\) or 'refiner\.0'\.\.'refiner\.0'")])
def test_a_block_the_model_lacks_is_refused_before_any_forward(family, message) -> None:
    pipe = pipeline(family)
    refuse_forwards(pipe)
    with pytest.raises(ValueError, match=message):  # the default layers 7, 8, 9 of a one-block model
        pipe(prompt=PROMPT, guidance="slg", generator=seeded(0), **STEPS, **FAMILIES[family][1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sag_is_refused_before_any_forward(family) -> None:
    pipe = pipeline(family)
    refuse_forwards(pipe)
    with pytest.raises(ValueError, match=r"method 'sag' reads a plain self-attention map"):
        pipe(prompt=PROMPT, guidance="sag", generator=seeded(0), **STEPS, **FAMILIES[family][1])


def test_qwen_blocks_with_two_time_embeddings_per_row_are_not_skipped() -> None:
    pipe = pipeline("qwen")
    pipe.transformer.register_to_config(zero_cond_t=True)
    refuse_forwards(pipe)
    with pytest.raises(ValueError, match=r"cannot skip blocks of a QwenImageTransformer2DModel with zero_cond_t"):
        pipe(prompt=PROMPT, guidance={"name": "slg", "layers": [0]}, generator=seeded(0), **STEPS,
             **FAMILIES["qwen"][1])


@pytest.mark.parametrize("kind", ["identity", "blur", "skip"])
def test_z_image_caption_refiner_is_not_a_layer_to_alter(z_image, kind) -> None:
    """It holds no image token: a path into it selects nothing."""
    with pytest.raises(ValueError, match=r"'context_refiner\.0' selects nothing"):
        resolve_layers(z_image.model, Perturbation(kind, ("context_refiner.0",)))
    assert [name for name, _ in resolve_layers(z_image.model, Perturbation(kind, ("refiner.0",)))][0].startswith(
        "noise_refiner.0")
