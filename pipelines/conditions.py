"""The provider table: how a pipeline fills every kind of branch a method may declare.

A method names the branches it needs (``required_branches()``, ``altered_branches()``); a model
family's pipeline knows how to encode a prompt or a class. Between the two sits this table, the
one place (with :mod:`.guide_classifier`, GFCG's provider) where a branch kind is tied to a call
input. Nothing else in ``pipelines/`` or ``samplers/`` names a method or a method's branch
(tests/test_architecture.py checks it).

==========================  =====================================  ===========================
branch                      filled from                            declared by
==========================  =====================================  ===========================
``cond``                    the prompt (or class label)            every method
``uncond``                  the negative prompt, else the empty    CFG and kin
                            prompt / the null class
``negative``                the negative prompt; ``uncond`` then   Perp-Neg
                            stays the empty prompt
``negative_<k>``            the method's own k-th prompt           Perp-Neg ``negatives``
                            (``branch_prompts()``)
``cond2``                   ``product_prompt``                     FKC ``target="product"``
``icg_random_tokens``       random token ids through the text      ICG
                            encoder (SD; other text families: a
                            prompt of random tokens through their
                            own encoding), or a random class, per
                            step
``icg_noise``               Gaussian noise at the embeddings' std  ICG ``condition="noise"``
``gfcg_class_<k>``          the prompt naming class k / label k    GFCG (:mod:`.guide_classifier`)
``image``                   the negative (else empty) prompt with  dual CFG (InstructPix2Pix)
                            the input image's latents
==========================  =====================================  ===========================

Branch *alterations* (perturbed attention, skipped blocks, time noise, probes, another network)
need no provider: the :class:`~guidance_engine.guidance.Branch` says what to do to its rows and
the family's branch model does it (:mod:`.row_plan`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


__all__ = ["DEFAULT_INVERSION_GUIDANCE", "IMAGE", "IMAGE_SCALE", "INDEPENDENT", "NEGATIVE", "SECOND_PROMPT", "add_product_branch", "add_text_branches",
           "attach_dit_gfcg", "attach_text_gfcg", "random_prompt_conditions",
           "independent_class_conditions", "independent_text_conditions", "negative_branch_inputs",
           "stock_dual_guidance", "stock_guidance", "stock_renorm_guidance", "stock_skip_layer_guidance",
           "stock_true_cfg_renorm"]

#: What ``invert`` uses unless told: CFG++ (its official inversion).
DEFAULT_INVERSION_GUIDANCE = "cfgpp"

#: A branch of its own for the negative prompt (Perp-Neg).
NEGATIVE = "negative"
#: The second prompt of a product-of-experts target.
SECOND_PROMPT = "cond2"
#: GFCG's per-class branches: ``gfcg_class_<k>``.
CLASS_BRANCH_PREFIX = "gfcg_class_"
#: Independent conditions, redrawn at every step (ICG): random tokens (or classes), or noise.
INDEPENDENT = ("icg_random_tokens", "icg_noise")
#: The image condition alone (InstructPix2Pix): the negative or empty prompt with the image latents.
IMAGE = "image"
#: The parameter of the two-condition method that the IP2P pipeline's ``image_guidance_scale`` sets.
IMAGE_SCALE = "image_scale"


def _stream(generator) -> torch.Generator:
    """A private stream seeded from the call's generator (or at random without one)."""
    first = generator[0] if isinstance(generator, list) else generator
    return torch.Generator().manual_seed(first.initial_seed() + 7919 if first is not None else
                                         int(torch.randint(0, 2**31 - 1, ()).item()))


def _asks_for_classes(guide) -> bool:
    return any(str(branch).startswith(CLASS_BRANCH_PREFIX) for branch in guide.required_branches())


def attach_text_gfcg(pipe, guide, branches, prompt, num_images_per_prompt: int, encode):
    """GFCG on a text-to-image pipeline (:mod:`.guide_classifier`: the shipped shapes classes);
    any other method passes through without loading it."""
    if not _asks_for_classes(guide):
        return guide
    from .guide_classifier import attach_text_gfcg as attach

    return attach(pipe, guide, branches, prompt, num_images_per_prompt, encode)


def attach_dit_gfcg(pipe, guide, branches, labels: torch.Tensor, classifier=None):
    """GFCG on a class-conditional pipeline (:mod:`.guide_classifier`); others pass through."""
    if not _asks_for_classes(guide):
        return guide
    from .guide_classifier import attach_dit_gfcg as attach

    return attach(pipe, guide, branches, labels, classifier)


def stock_guidance(scale: float, rescale: float = 0.0):
    """What ``guidance=None`` means: the stock pipelines' CFG (with diffusers' rescale)."""
    from guidance_engine.methods.cfg import CFG

    return CFG(scale=scale, rescale=rescale)


def stock_dual_guidance(scale: float, image_scale: float):
    """What ``guidance=None`` means on InstructPix2Pix: the stock two-condition CFG, which guides
    only when ``scale > 1`` and ``image_scale >= 1`` and is the conditional prediction alone
    otherwise (``dual_cfg`` at (1, 1)). Both scales are range-checked either way."""
    from guidance_engine.methods.dual_cfg import DualCFG

    method = DualCFG(scale=scale, image_scale=image_scale)
    if scale > 1.0 and image_scale >= 1.0:
        return method
    return method.new(scale=1.0, image_scale=1.0)


def stock_true_cfg_renorm(scale: float):
    """What Qwen-Image's ``guidance=None`` means with a negative prompt and ``true_cfg_scale`` > 1:
    its stock true CFG, each 2 x 2 token's guided output rescaled to the conditional token's norm."""
    from guidance_engine.methods.cfg_renorm import CFGRenorm

    return CFGRenorm(scale=scale)


def stock_renorm_guidance(scale: float, renorm: float, truncation: float):
    """What ``guidance=None`` means on Z-Image: its stock CFG ``pos + s (pos - neg)`` with the norm
    cap ``cfg_normalization`` (0 = off) and ``cfg_truncation``, as RenormCFG at w = s + 1."""
    from guidance_engine.methods.renorm_cfg import RenormCFG

    return RenormCFG(scale=scale, renorm=renorm, truncation=truncation)


def negative_branch_inputs(guide, negative_prompt, negative_prompt_embeds, batch_size: int) -> tuple | None:
    """(negative prompts, negative embeddings) when the method gives the negative prompt a branch
    of its own (then "uncond" stays the empty prompt), checked before any model call: one negative
    prompt per prompt (a string is repeated). None when the method has no such branch."""
    if NEGATIVE not in guide.required_branches():
        return None
    if negative_prompt is None and negative_prompt_embeds is None:
        raise ValueError("negative_prompt: this guidance method (Perp-Neg) needs a negative prompt for its "
                         "'negative' branch; pass negative_prompt= (or negative_prompt_embeds=)")
    if negative_prompt is not None:
        texts = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else negative_prompt
        if not isinstance(texts, list) or len(texts) != batch_size or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"negative_prompt: expected a string or a list of {batch_size} strings (one per "
                             f"prompt), got {negative_prompt!r}")
        return texts, None
    if negative_prompt_embeds.shape[0] != batch_size:
        raise ValueError(f"negative_prompt_embeds: expected {batch_size} rows (one per prompt), "
                         f"got {negative_prompt_embeds.shape[0]}")
    return None, negative_prompt_embeds


def add_negative_branch(branches, condition: dict[str, torch.Tensor]) -> None:
    """The negative prompt's own branch (Perp-Neg), encoded by the family."""
    branches.conditions[NEGATIVE] = condition


def add_product_branch(branches, product_prompt, encode: Callable[[Any], torch.Tensor], batch_size: int,
                       num_images_per_prompt: int, key: str = "encoder_hidden_states") -> None:
    """The second prompt of a product target, encoded like the prompt (one per prompt)."""
    if product_prompt is None:
        return
    second = encode(product_prompt)
    rows = branches.conditions["cond"][key].shape[0]
    if second.shape[0] != rows:
        raise ValueError(f"product_prompt: needs one prompt per prompt ({batch_size}), got "
                         f"{second.shape[0] // num_images_per_prompt}")
    branches.conditions[SECOND_PROMPT] = {key: second}


def independent_text_conditions(pipe, prompt_embeds: torch.Tensor, generator) -> dict[str, Callable[[], dict]]:
    """ICG's y_hat for text models, drawn afresh at every step: the text encoding of uniformly
    random token ids over the full maximum length (no attention mask), or Gaussian noise scaled by
    the global std of the real embeddings. Seeded from the call's generator (a private stream)."""
    stream = _stream(generator)
    rows, length = prompt_embeds.shape[0], pipe.tokenizer.model_max_length
    std = float(prompt_embeds.float().std())

    def random_tokens() -> dict[str, torch.Tensor]:
        ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (rows, length), generator=stream)
        hidden = pipe.text_encoder(ids.to(pipe.text_encoder.device), attention_mask=None)[0]
        return {"encoder_hidden_states": hidden.to(prompt_embeds.dtype)}

    def noise() -> dict[str, torch.Tensor]:
        draw = torch.randn(prompt_embeds.shape, generator=stream, dtype=torch.float32) * std
        return {"encoder_hidden_states": draw.to(prompt_embeds.device, prompt_embeds.dtype)}

    return dict(zip(INDEPENDENT, (random_tokens, noise)))


#: The conditioning keys that hold text embeddings (hidden states, pooled projections), by family.
TEXT_EMBEDDING_KEYS = frozenset({"encoder_hidden_states", "pooled_projections", "text_embeds", "cap_feats"})


def add_text_branches(pipe, branches, guide, encode_texts: Callable[[list[str]], dict[str, torch.Tensor]], *,
                      batch_size: int, generator) -> None:
    """The text branches any text family fills the same way, given ``encode_texts`` (one prompt
    per call prompt -> that family's condition dict, one row per image, as its "cond" holds):
    the method's own prompts (``branch_prompts()``: Perp-Neg's weighted negatives) and, unless the
    family provides its own, ICG's independent conditions (:func:`random_prompt_conditions`).
    GFCG's class branches come from :func:`attach_text_gfcg` (the shapes classes of the SD default
    model); a family without them refuses GFCG here, with the reason."""
    if _asks_for_classes(guide) and not any(str(name).startswith(CLASS_BRANCH_PREFIX) for name in branches.available()):
        raise ValueError(f"gfcg: GFCG needs a guide classifier of this model's classes and a prompt per class; the "
                         f"engine has one for the shapes classes of the SD 1.x default model (and the DiT one), not "
                         f"for {type(pipe).__name__}")
    for name, text in getattr(guide, "branch_prompts", dict)().items():
        branches.conditions[name] = encode_texts([text] * batch_size)
    for name, provider in random_prompt_conditions(pipe, branches.conditions["cond"], encode_texts,
                                                   batch_size=batch_size, generator=generator).items():
        branches.providers.setdefault(name, provider)


def random_prompt_conditions(pipe, cond: dict[str, torch.Tensor], encode_texts, *, batch_size: int,
                             generator) -> dict[str, Callable[[], dict]]:
    """ICG's y_hat for a text family whose encoding is more than one encoder's hidden states
    (several encoders, pooled projections, attention masks, chat templates): a prompt of uniformly
    random tokens of its first tokenizer (as many as that tokenizer's model_max_length allows, at
    most 77 words' worth), decoded to text and encoded as the family encodes any prompt, one per
    call prompt, redrawn every step; or, for ``icg_noise``, every text-embedding tensor
    (:data:`TEXT_EMBEDDING_KEYS`) replaced by Gaussian noise at that tensor's global std (masks,
    lengths, positions, time ids and embedded guidance kept). Seeded from the call's generator (a
    private stream)."""
    stream = _stream(generator)
    tokenizer = getattr(pipe, "tokenizer", None)

    def random_tokens() -> dict[str, torch.Tensor]:
        vocab = len(tokenizer)
        length = min(int(getattr(tokenizer, "model_max_length", 77) or 77), 77) - 2  # room for BOS/EOS
        ids = torch.randint(0, vocab, (batch_size, length), generator=stream)
        texts = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in ids]
        return encode_texts(texts)

    stds = {key: float(value.float().std()) for key, value in cond.items() if key in TEXT_EMBEDDING_KEYS}

    def noise() -> dict[str, torch.Tensor]:
        out = {}
        for key, value in cond.items():
            if key in stds:
                draw = torch.randn(value.shape, generator=stream, dtype=torch.float32) * stds[key]
                out[key] = draw.to(value.device, value.dtype)
            else:
                out[key] = value
        return out

    providers = {INDEPENDENT[1]: noise}
    if tokenizer is not None:
        providers[INDEPENDENT[0]] = random_tokens
    return providers


def independent_class_conditions(num_classes: int, rows: int, generator, device) -> dict[str, Callable[[], dict]]:
    """ICG's independent condition for class models: a uniformly random class per row, redrawn
    at every step (SPEC 7), from a private stream seeded by the call's generator."""
    stream = _stream(generator)

    def draw() -> dict[str, torch.Tensor]:
        return {"class_labels": torch.randint(0, num_classes, (rows,), generator=stream).to(device)}

    return {INDEPENDENT[0]: draw}


def stock_skip_layer_guidance(guidance, guidance_scale: float | None, default_scale: float, layers: list[int],
                              scale: float, start: float, stop: float, num_steps: int):
    """SD3's stock ``skip_guidance_layers`` arguments as the engine's SLG (equal to the stock
    pipeline: tests/test_perturbation.py): the stock rule ``n start < i < n stop`` as SLG's window,
    skipped layers only together with CFG (scale > 1), as the stock pipeline."""
    from guidance_engine.methods.perturbed import sd3_pipeline_window
    from guidance_engine.methods.slg import SLG

    if guidance is not None:
        raise ValueError("skip_guidance_layers: the stock skip-layer arguments go with guidance=None; with a "
                         f"guidance method use guidance=SLG(layers=...), got guidance={guidance!r}")
    cfg = default_scale if guidance_scale is None else guidance_scale
    ours_start, ours_stop = sd3_pipeline_window(start, stop, num_steps)
    return SLG(scale=cfg, slg_scale=scale if cfg > 1 else 0.0, layers=list(layers),
               start=min(ours_start, ours_stop), stop=ours_stop)
