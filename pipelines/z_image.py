"""``GuidedZImagePipeline``: the stock Z-Image pipeline (flow matching; a single-stream transformer
that takes per-sample lists of latents and of unpadded Qwen3 text embeddings and predicts the
negative velocity) with the engine's sampler core.

Prompt encoding (the chat template, Qwen3's second-to-last hidden states, each prompt's embedding
without its padding), the schedule (``get_default_z_image_sigmas`` with the shift ``mu``) and
decoding are the stock pipeline's; the loop is the core's. The core selects and concatenates
branch conditions as row tensors, so every branch keeps its text embeddings padded with zeros to
one common length, with each row's length; the branch model unpads them into the list the
transformer takes, and negates its output into the velocity the flow schedule steps with (as the
stock pipeline does; a negation is exact, so the stock arithmetic is unchanged)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from diffusers import ZImagePipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

from guidance_engine.guidance import Guidance

from . import conditions
from .common import TEXT_LOCK, GuidanceSpec, GuidedPipelineMixin, GuidedPipelineOutput
from .flow_transformer import TransformerBranches, negative_prompt_texts
from .joint_context_attention import JointContextBranches
from .messages import PromptTruncatedWarning
from .perturbation import ImageTokens
from .row_plan import image_tokens

__all__ = ["GuidedZImagePipeline", "ZImageBranches", "pad_texts", "unpad_texts"]

#: The branch conditions: text embeddings padded to a common length, and each row's length.
TEXT_KEY, LENGTH_KEY = "cap_feats", "cap_lengths"
#: The stock pipeline's time scale: the transformer sees (1000 - t) / 1000, 0 at pure noise.
TRAIN_TIMESTEPS = 1000
#: The stock ``guidance_scale`` (s in pos + s (pos - neg); s <= 0: the conditional alone).
STOCK_GUIDANCE_SCALE = 5.0
#: The callback names of per-image text embeddings (lists, as the stock pipeline keeps them), by branch.
CALLBACK_TEXTS = {"prompt_embeds": "cond", "negative_prompt_embeds": "uncond"}


def text_rows(embeds: Any, name: str, rows: int | None = None) -> list[torch.Tensor]:
    """``embeds`` (a list of (length, width) tensors, one per prompt, as the stock pipeline takes
    them) as a list; ValueError naming ``name`` unless it is one, with ``rows`` entries when given."""
    if not isinstance(embeds, (list, tuple)) or not embeds or \
            not all(isinstance(e, torch.Tensor) and e.ndim == 2 and e.shape[0] > 0 for e in embeds) or \
            len({e.shape[1] for e in embeds}) != 1:
        raise ValueError(f"{name}: expected a non-empty list of (length, width) tensors of one width (one per "
                         f"prompt), got {_describe(embeds)}")
    if rows is not None and len(embeds) != rows:
        raise ValueError(f"{name}: expected {rows} entries (one per prompt), got {len(embeds)}")
    return list(embeds)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_describe(v) if isinstance(v, torch.Tensor) else repr(v) for v in value) + "]"
    return repr(value)


def pad_texts(branches: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Each branch's per-row embeddings zero-padded to the longest row of ALL branches (so that the
    core can concatenate any branches' rows), with the rows' lengths."""
    longest = max(len(e) for texts in branches.values() for e in texts)
    padded = {}
    for name, texts in branches.items():
        feats = texts[0].new_zeros((len(texts), longest, texts[0].shape[1]))
        for row, embedding in enumerate(texts):
            feats[row, :len(embedding)] = embedding
        lengths = torch.tensor([len(e) for e in texts], device=feats.device)
        padded[name] = {TEXT_KEY: feats, LENGTH_KEY: lengths}
    return padded


def unpad_texts(feats: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    """The per-row embeddings without their padding (the list the stock pipeline passes)."""
    return [row[:length] for row, length in zip(feats, lengths.tolist())]


class ZImageBranches(JointContextBranches, TransformerBranches):
    """The branch model over a Z-Image transformer. ``conditions[b]`` holds branch ``b``'s text
    embeddings padded to one common length (``cap_feats``) and each row's length
    (``cap_lengths``). The branches run in ONE forward, the conditional rows first, as the stock
    pipeline batches its CFG ([cond rows..., uncond rows...]): the transformer pads every sample's
    sequence to the batch's longest, so its float rounding may depend on the rows a forward
    batches; they are the stock ones."""

    family = "GuidedZImagePipeline"
    separate_forwards = False
    # PAG's identity attention (with the model's padding mask) and SEG's blurred queries on the
    # image tokens of the main layers and the image refiner, skipped blocks (SLG), NAG's second text
    # stream (partner rows after all others, their captions the negative's; the main layers are
    # single-stream: both rows get the guided image tokens), TSG's noise on the time-step
    # embedding; SAG's map is not available.
    perturbations = frozenset({"identity", "blur", "skip", "extrapolate"})
    time_noise = True

    def _evaluate(self, model, x: torch.Tensor, timestep: torch.Tensor,
                  requests: Sequence[tuple[str, torch.Tensor | None]], probes: Sequence[Any] = (),
                  plain: bool = False) -> dict[str, torch.Tensor]:
        # Rows follow the request order; the conditional first (stable: the rest keep theirs). The
        # outputs come back by branch name, whatever the order.
        ordered = sorted(requests, key=lambda request: request[0] != self.first)
        return super()._evaluate(model, x, timestep, ordered, probes, plain)

    def time_embeddings(self, model) -> list[Any]:
        """TSG's noise goes on the time-step MLP's output (``t_embedder``: the modulation input of
        every block and of the final layer)."""
        return [model.t_embedder]

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        model = self.model if model is None else model
        for _, _, branch in spans:
            self.check_alterations(branch)
        kept = x_in.shape[0]
        # The image first in every sequence: its 2 x 2 patches, padded to a multiple of SEQ_MULTI_OF tokens.
        rows, columns = x_in.shape[-2] // 2, x_in.shape[-1] // 2
        layout = ImageTokens(rows, columns, padding=-(rows * columns) % SEQ_MULTI_OF)
        x_in, stacked, spans, negative_text = self.carry_negative_text(model, x_in, stacked, spans,
                                                                       image=slice(0, layout.image))
        captions = unpad_texts(stacked(TEXT_KEY), stacked(LENGTH_KEY))
        t = (TRAIN_TIMESTEPS - timestep.expand(x_in.shape[0])) / TRAIN_TIMESTEPS  # as the stock loop
        latents = list(x_in.to(model.dtype).unsqueeze(2).unbind(0))  # (C, 1, H, W) per sample
        with negative_text, self.altered(model, x_in, spans), image_tokens(layout):
            out = model(latents, t, captions, joint_attention_kwargs=self.cross_attention_kwargs,
                        return_dict=False)[0]
        return -torch.stack([o.float() for o in out[:kept]]).squeeze(2)


def listed_callback(callback, branches: ZImageBranches):
    """``callback_on_step_end`` seeing ``prompt_embeds`` and returning ``prompt_embeds`` /
    ``negative_prompt_embeds`` as the stock pipeline's lists of per-image embeddings (the branches
    keep them padded; replaced ones are padded again with every branch)."""
    def listed(pipe, index, timestep, tensors):
        if "prompt_embeds" in tensors:
            cond = branches.conditions["cond"]
            tensors = {**tensors, "prompt_embeds": unpad_texts(cond[TEXT_KEY], cond[LENGTH_KEY])}
        outputs = dict(callback(pipe, index, timestep, tensors) or {})
        replaced = [name for name in CALLBACK_TEXTS if outputs.get(name) is not None]
        if replaced:
            texts = {name: unpad_texts(c[TEXT_KEY], c[LENGTH_KEY]) for name, c in branches.conditions.items()}
            for name in replaced:
                branch = CALLBACK_TEXTS[name]
                texts[branch] = text_rows(outputs.pop(name), f"callback_on_step_end: {name}", len(texts[branch]))
            branches.conditions.update(pad_texts(texts))
        return outputs
    return listed


class GuidedZImagePipeline(GuidedPipelineMixin, ZImagePipeline):
    """Z-Image text-to-image with any guidance method of the engine.

    ``guidance=None`` is the stock recipe: the conditional alone where the stock pipeline runs no
    CFG (``guidance_scale <= 0``), else its CFG ``pos + s (pos - neg)`` with the optional norm cap
    (``cfg_normalization``) and truncation (``cfg_truncation``), as the engine's RenormCFG at
    w = s + 1. A named method (``guidance="apg"`` or a dict) gets ``scale = guidance_scale + 1``
    (the engine's convention u + w (c - u), in which the stock s is w - 1): the same number means
    the same strength as in the stock recipe; without ``guidance_scale`` the method keeps its own
    scale. The unconditional branch is the negative prompt, else the empty prompt (the stock
    default)."""

    stock_scale_offset = 1.0  # the method's scale w is the stock s + 1 (pipe.guidance_scale reads s)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        cfg_normalization: bool | float = False,
        cfg_truncation: float | None = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        max_sequence_length: int = 512,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        eta: float | None = None,
        particle_output: str = "draw",
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Generate images. Arguments are the stock Z-Image pipeline's plus ``guidance``,
        ``sampler``, ``eta`` and ``particle_output`` as in :meth:`GuidedFluxPipeline.__call__`.

        Args:
            guidance_scale: the stock s (None: the stock 5.0); s <= 0 runs the conditional alone.
                With a named method, its ``scale`` is s + 1 (see the class docstring).
            cfg_normalization: the stock norm cap k >= 0 (True = 1, False / 0 = off): each
                sample's guided norm is capped at k times its conditional norm (guidance=None only).
            cfg_truncation: the stock truncation c: steps with (1000 - t) / 1000 > c run the
                conditional alone; c >= 1 or None never truncates (guidance=None only).
            prompt_embeds, negative_prompt_embeds: lists of (length, width) embeddings, one per
                prompt, as the stock pipeline takes them.
            latents: (B, C, H, W) start noise at latent size, as the stock pipeline takes it.
            callback_on_step_end: sees ``latents`` (B, C, H, W) and ``prompt_embeds`` (the list);
                may return ``latents``, ``prompt_embeds`` and ``negative_prompt_embeds``.
            reference_unet (keyword): autoguidance's reference network, a weaker Z-Image
                transformer taking the same conditioning.
        """
        reference = kwargs.pop("reference_unet", None)
        if kwargs:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {sorted(kwargs)}")
        height, width = (self._check_size(name, value) for name, value in (("height", height), ("width", width)))
        self._check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or \
                max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: must be an integer >= 1, got {max_sequence_length!r}")
        particle_output = self.check_particle_output(particle_output)
        guide = self.for_prompts(self._guidance(guidance, guidance_scale, cfg_normalization, cfg_truncation),
                                 negative_prompt, negative_prompt_embeds)
        ZImageBranches.check_method(guide)
        latent_h, latent_w = (2 * (size // (self.vae_scale_factor * 2)) for size in (height, width))
        channels = self.transformer.in_channels
        batch_size, shape = self.check_prompted_call(
            guide, prompt, prompt_embeds, (channels, latent_h, latent_w), num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps, sigmas=sigmas, sampler=sampler, eta=eta, generator=generator,
            latents=latents, output_type=output_type)
        texts, cut = self._branch_texts(guide, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                                        batch_size, num_images_per_prompt, max_sequence_length)
        for name, text in getattr(guide, "branch_prompts", dict)().items():  # padded with the others
            texts[name] = self._encode_rows([text] * batch_size, None, num_images_per_prompt, max_sequence_length)
        device = self._execution_device
        branches = ZImageBranches(self.transformer, pad_texts(texts), joint_attention_kwargs,
                                  networks={"reference": self.reference_network(guide, reference)})
        length = branches.conditions["cond"][TEXT_KEY].shape[1]

        def encode_texts(new_texts: list[str]) -> dict[str, torch.Tensor]:
            """Other prompts' rows (ICG's random ones, drawn per step) at the branches' common
            padded length, so that they batch with them: longer rows are cut to it."""
            rows = [e[:length] for e in self._encode_rows(new_texts, None, num_images_per_prompt,
                                                          max_sequence_length)]
            padded = pad_texts({"rows": rows + [rows[0].new_zeros((length, rows[0].shape[1]))]})["rows"]
            return {TEXT_KEY: padded[TEXT_KEY][:-1], LENGTH_KEY: padded[LENGTH_KEY][:-1]}

        conditions.add_text_branches(self, branches, guide, encode_texts, batch_size=batch_size, generator=generator)

        if sigmas is None:
            sigmas = get_default_z_image_sigmas(num_inference_steps)
        config = self.scheduler.config
        mu = calculate_shift((latent_h // 2) * (latent_w // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        if callback_on_step_end is not None:
            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
            callback_on_step_end = listed_callback(callback_on_step_end, branches)
        latents, nfe_per_image, state = self.denoise(
            branches, guide, shape, dtype=torch.float32, device=device, generator=generator, latents=latents,
            particle_output=particle_output, sampler=sampler, num_inference_steps=num_inference_steps,
            timesteps=None, sigmas=sigmas, eta=eta, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={"prompt_embeds": ("cond", TEXT_KEY)}, set_timesteps_kwargs={"mu": mu},
            call_attributes={"_cfg_normalization": cfg_normalization, "_cfg_truncation": cfg_truncation})
        if output_type == "latent":
            image = latents
        else:
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return self.guided_output(image, nfe_per_image, state, guide, sampler, warnings=cut)

    def _branch_texts(self, guide: Guidance, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                      batch_size: int, num_images_per_prompt: int, max_sequence_length: int
                      ) -> tuple[dict[str, list[torch.Tensor]], list[str]]:
        """Every branch's text embeddings, one per image (each prompt's repeated, as the stock
        pipeline), and the warnings of prompts cut: "cond" the prompt, "uncond" the negative
        prompt (else the empty prompt), or, for a method that gives the negative prompt a branch
        of its own, that branch (and "uncond" the empty prompt)."""
        negative_rows = None if negative_prompt_embeds is None else \
            text_rows(negative_prompt_embeds, "negative_prompt_embeds", batch_size)
        own_negative = conditions.negative_branch_inputs(  # it counts a tensor's rows: a stand-in of the list's
            guide, negative_prompt, None if negative_rows is None else torch.stack([e[:1] for e in negative_rows]),
            batch_size)
        if own_negative is not None:
            own_negative = (own_negative[0], negative_rows)
            negative_prompt = negative_rows = None
        negative = negative_prompt_texts(negative_prompt, negative_rows, batch_size)
        cut = self._cut_prompts(max_sequence_length, prompt=None if prompt_embeds is not None else prompt,
                                negative_prompt=negative if own_negative is None else own_negative[0])

        def encode(texts: list[str] | None, rows: list[torch.Tensor] | None) -> list[torch.Tensor]:
            return self._encode_rows(texts, rows, num_images_per_prompt, max_sequence_length)

        texts = {"cond": encode(None if prompt is None else [prompt] if isinstance(prompt, str) else prompt,
                                None if prompt_embeds is None else text_rows(prompt_embeds, "prompt_embeds")),
                 "uncond": encode(negative, negative_rows)}
        if own_negative is not None:
            texts[conditions.NEGATIVE] = encode(*own_negative)
        return texts, cut

    def _encode_rows(self, texts: list[str] | None, rows: list[torch.Tensor] | None, num_images_per_prompt: int,
                     max_sequence_length: int) -> list[torch.Tensor]:
        """One branch's per-image text embeddings: the stock encoding of ``texts`` (or ``rows``),
        each prompt's repeated for its images."""
        per_prompt = self.encode_prompt(  # a copy of the list: the stock helper writes templated prompts into it
            prompt=None if texts is None else list(texts), device=self._execution_device,
            do_classifier_free_guidance=False, prompt_embeds=rows, max_sequence_length=max_sequence_length)[0]
        return [e for e in per_prompt for _ in range(num_images_per_prompt)]

    @staticmethod
    def prompt_batch_size(prompt, prompt_embeds) -> int:
        """The number of prompts: as :meth:`GuidedPipelineMixin.prompt_batch_size`, with
        ``prompt_embeds`` a list (one entry per prompt; they replace the prompt's encoding)."""
        if prompt_embeds is None:
            return GuidedPipelineMixin.prompt_batch_size(prompt, None)
        rows = len(text_rows(prompt_embeds, "prompt_embeds"))
        prompts = None if prompt is None else GuidedPipelineMixin.prompt_batch_size(prompt, None)
        if prompts is not None and prompts != rows:
            raise ValueError(f"prompt_embeds: {rows} entries for {prompts} prompts; give one per prompt")
        return rows

    def _guidance(self, guidance: GuidanceSpec, guidance_scale: float | None, cfg_normalization: bool | float,
                  cfg_truncation: float | None) -> Guidance:
        """The call's method: the stock recipe (``guidance=None``) or the named one at
        ``guidance_scale + 1`` (checked before any model call)."""
        if guidance_scale is not None and (isinstance(guidance_scale, bool) or
                                           not isinstance(guidance_scale, (int, float)) or math.isnan(guidance_scale)):
            raise ValueError(f"guidance_scale: must be a number (s of pos + s (pos - neg)), got {guidance_scale!r}")
        renorm = self._check_normalization(cfg_normalization)
        truncation = self._check_truncation(cfg_truncation)
        if guidance is not None:
            if renorm != 0 or truncation != 1.0:
                raise ValueError("cfg_normalization / cfg_truncation: they set the stock recipe (guidance=None); "
                                 f"a guidance method takes its own parameters, got guidance={guidance!r} with "
                                 f"cfg_normalization={cfg_normalization!r}, cfg_truncation={cfg_truncation!r}")
            if isinstance(guidance, Guidance):  # it carries its own scale (a given one is refused)
                return self.resolve_guidance(guidance, guidance_scale)
            return self.resolve_guidance(guidance, None if guidance_scale is None else guidance_scale + 1.0)
        scale = STOCK_GUIDANCE_SCALE if guidance_scale is None else float(guidance_scale)
        if not scale > 0:  # the stock do_classifier_free_guidance: no CFG, the conditional alone
            return self.resolve_guidance(None, 1.0)
        return conditions.stock_renorm_guidance(scale + 1.0, renorm, truncation)

    @staticmethod
    def _check_normalization(value: bool | float) -> float:
        """The stock ``cfg_normalization`` as the cap k: False -> 0 (off), True -> 1, a number >= 0."""
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise ValueError(f"cfg_normalization: must be a bool or a number >= 0 (0 = off), got {value!r}")
        return float(value)

    @staticmethod
    def _check_truncation(value: float | None) -> float:
        """The stock ``cfg_truncation`` in [0, 1]: None or above 1 never truncates (1)."""
        if value is None:
            return 1.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise ValueError(f"cfg_truncation: must be a number >= 0 (1 or more = never truncated), got {value!r}")
        return min(float(value), 1.0)

    def _check_size(self, name: str, value: int | None) -> int:
        """``height`` / ``width``: the stock default 1024, a multiple of the VAE's scale x 2."""
        value = 1024 if value is None else value
        multiple = self.vae_scale_factor * 2
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
            raise ValueError(f"{name}: must be a positive multiple of {multiple} (pixels), got {value!r}")
        return value

    def _check_callback_inputs(self, callback, names: Sequence[str]) -> None:
        if callback is None or isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            return
        unknown = [name for name in names if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs: must be among {self._callback_tensor_inputs}, "
                             f"got {list(names)!r}")

    def _cut_prompts(self, max_sequence_length: int, **texts: str | list[str] | None) -> list[str]:
        """One sentence per prompt whose chat-templated tokens exceed ``max_sequence_length`` (the
        stock pipeline cuts them silently), each also issued as a :class:`PromptTruncatedWarning`."""
        messages = []
        for name, value in texts.items():
            for text in [value] if isinstance(value, str) else value or []:
                with TEXT_LOCK:
                    templated = self.tokenizer.apply_chat_template(  # as the stock _encode_prompt
                        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True,
                        enable_thinking=True)
                    ids = self.tokenizer(templated, truncation=False)["input_ids"]
                if len(ids) > max_sequence_length:
                    cut = self.tokenizer.decode(ids[max_sequence_length:], skip_special_tokens=True)
                    messages.append(f"{name}: {text!r} is {len(ids)} tokens in the chat template, the text encoder "
                                    f"reads {max_sequence_length} (max_sequence_length); cut: {cut!r}")
        for message in messages:  # at the caller of pipe(...) (through _branch_texts and torch's no_grad)
            warnings.warn(message, PromptTruncatedWarning, stacklevel=5)
        return messages
