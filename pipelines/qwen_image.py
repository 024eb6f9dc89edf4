"""``GuidedQwenImagePipeline``: the stock Qwen-Image pipeline (flow matching; a dual-stream
transformer on 2 x 2-packed latent tokens with Qwen-Image's rotary positions, Qwen2.5-VL
embeddings of the prompt in a chat template, with their padding mask) with the engine's sampler
core.

Prompt encoding, the schedule (``sigmas = linspace(1, 1/n, n)`` with the dynamic shift ``mu``),
input checks and decoding are the stock pipeline's; the loop is the core's. The core keeps the
latents unpacked, (B, C, H, W); the branch model packs them into tokens for each forward and
unpacks the output (a permutation of elements, so the stock arithmetic is unchanged).

One deviation from the stock pipeline (diffusers 0.42.1): with several prompts of different
lengths and ``num_images_per_prompt > 1``, its ``encode_prompt`` repeats the embeddings per prompt
(p0, p0, p1, p1) but their padding masks per batch (p0, p1, p0, p1), so images see another
prompt's mask (diffusers issue #13581). Here every image gets its own prompt's mask; everywhere
else (one image per prompt, prompts of one length) the result equals the stock pipeline's."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from guidance_engine.guidance import Guidance

from . import conditions
from .common import TEXT_LOCK, GuidanceSpec, GuidedPipelineMixin, GuidedPipelineOutput
from .flow_transformer import (TransformerBranches, negative_prompt_texts, pack_latents, packed_callback,
                               unpack_latents)
from .joint_context_attention import JointContextBranches
from .messages import PromptTruncatedWarning

__all__ = ["GuidedQwenImagePipeline", "QwenImageBranches"]

#: The stock ``true_cfg_scale`` (what ``guidance=None`` uses when it is not given).
STOCK_TRUE_CFG_SCALE = 4.0
#: A branch condition's text padding mask (absent when every token is valid, as the stock pipeline passes None).
MASK_KEY = "encoder_hidden_states_mask"


def check_embeddings(name: str, embeds: torch.Tensor | None, mask: torch.Tensor | None, prompts: int) -> None:
    """ValueError (before any model call) unless given embeddings ``name`` are (prompts, tokens,
    width) and their mask (``name`` + "_mask") is None or (prompts, tokens)."""
    if embeds is None:
        return
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] != prompts:
        got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"{name}: expected a (prompts, tokens, width) tensor with {prompts} rows (one per prompt), "
                         f"got {got}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2])):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}_mask: expected a tensor of shape {tuple(embeds.shape[:2])} (one entry per token "
                         f"of {name}), got {got}")


class QwenImageBranches(JointContextBranches, TransformerBranches):
    """The branch model over a Qwen-Image transformer. ``conditions[b]`` holds branch ``b``'s
    Qwen2.5-VL embeddings (``encoder_hidden_states``), their padding mask
    (``encoder_hidden_states_mask``, absent when no token is padding) and, for a
    guidance-distilled model, the embedded guidance value per row (``guidance``); ``img_shape``
    is one image's (frames, token rows, token columns), the rotary positions' grid. Branches run
    in separate forwards, the conditional first, as the stock pipeline runs its true CFG
    (:class:`TransformerBranches`)."""

    family = "GuidedQwenImagePipeline"
    # PAG's identity attention (with the text padding mask) and SEG's blurred queries on the joint
    # attention, skipped blocks (SLG), NAG's second text stream (in partner rows; the prompt's and
    # the negative's embeddings padded to one length, the padding masked), TSG's noise on the
    # time-step embedding; SAG's map is not available.
    evaluates_crops = False  # its token layout (packing, positions) is the whole latent's
    perturbations = frozenset({"identity", "blur", "skip", "extrapolate"})
    time_noise = True

    def __init__(self, model, conditions: dict[str, dict[str, torch.Tensor]], *, img_shape: tuple[int, int, int],
                 attention_kwargs: dict[str, Any] | None = None, providers: Any = None, networks: Any = None) -> None:
        super().__init__(model, conditions, attention_kwargs, providers=providers, networks=networks)
        self.img_shape = img_shape

    def time_embeddings(self, model) -> list[Any]:
        """TSG's noise goes on the time-step MLP's output, before the additional time condition
        (``use_additional_t_cond``) is added to it."""
        return [model.time_text_embed.timestep_embedder]

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        model = self.model if model is None else model
        for _, _, branch in spans:
            self.check_alterations(branch)
        kept = x_in.shape[0]
        x_in, stacked, spans, negative_text = self.carry_negative_text(
            model, x_in, stacked, spans, text_mask=("encoder_hidden_states", MASK_KEY))
        rows, _, height, width = x_in.shape
        timestep = timestep.expand(rows).to(x_in.dtype)  # as the stock pipeline broadcasts it
        with negative_text, self.altered(model, x_in, spans) as plan:  # image tokens: the default 2 x 2 patches
            out = model(hidden_states=pack_latents(x_in), timestep=timestep / 1000, guidance=stacked("guidance"),
                        encoder_hidden_states_mask=stacked(MASK_KEY),
                        encoder_hidden_states=stacked("encoder_hidden_states"),
                        img_shapes=[[self.img_shape]] * rows,
                        attention_kwargs=self._attention_kwargs(model, plan) or {},
                        return_dict=False)[0]
        return unpack_latents(out[:kept], height, width)


class GuidedQwenImagePipeline(GuidedPipelineMixin, QwenImagePipeline):
    """Qwen-Image text-to-image with any guidance method of the engine.

    Two scales, as in the stock pipeline: ``true_cfg_scale`` is the scale of guidance between
    branches, ``guidance_scale`` the value embedded into a guidance-distilled transformer (None by
    default; ignored by other transformers). ``guidance=None`` is the stock recipe: the
    conditional forward alone, or, with a negative prompt and ``true_cfg_scale > 1`` (default 4),
    the stock true CFG ``neg + s (cond - neg)`` with each 2 x 2 token rescaled to the conditional
    token's norm (the engine's ``CFGRenorm``; cond and neg in separate forwards, as the stock
    pipeline). With a method (``guidance="apg"``, a dict or an object), ``true_cfg_scale`` (when
    given) is its ``scale``; its unconditional branch is the negative prompt, else the empty
    prompt."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        max_sequence_length: int = 512,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        eta: float | None = None,
        particle_output: str = "draw",
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Generate images. Arguments are the stock Qwen-Image pipeline's plus ``guidance``,
        ``sampler``, ``eta`` and ``particle_output`` as in :meth:`GuidedStableDiffusionPipeline.__call__`.

        Args:
            true_cfg_scale: with ``guidance=None``, the stock true-CFG scale (None: the stock 4.0;
                it guides only when > 1 and a negative prompt is given); with a method name or
                dict, that method's ``scale`` (None: the method's default). Must not be set with a
                guidance object.
            guidance_scale: the value embedded into a guidance-distilled transformer (required
                there, as in the stock pipeline; ignored by other transformers).
            prompt_embeds, negative_prompt_embeds: Qwen2.5-VL embeddings, (prompts, tokens, width),
                with their padding masks ``prompt_embeds_mask`` / ``negative_prompt_embeds_mask``
                (prompts, tokens; None: every token valid), repeated per image with their masks.
            latents: packed, as the stock pipeline takes and returns them: (B, H/2 * W/2, C * 4) at
                latent size H x W. ``callback_on_step_end`` sees and returns them packed too.
            max_sequence_length: embedding tokens kept per prompt (its tokens after the chat
                template's opening), in [1, 1024]; a longer prompt is cut, with a
                :class:`PromptTruncatedWarning`.
            reference_unet: (keyword) autoguidance's reference network, a weaker Qwen-Image
                transformer taking the same conditioning.
        """
        reference = kwargs.pop("reference_unet", None)
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {unsupported}")
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                          negative_prompt_embeds_mask=negative_prompt_embeds_mask,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: must be an integer in [1, {self.tokenizer_max_length}], "
                             f"got {max_sequence_length!r}")
        if self.transformer.config.guidance_embeds and guidance_scale is None:
            raise ValueError("guidance_scale: required for a guidance-distilled transformer (its config has "
                             "guidance_embeds=True); got None")
        particle_output = self.check_particle_output(particle_output)
        guide = self.for_prompts(self.call_guidance(guidance, true_cfg_scale, negative_prompt, negative_prompt_embeds),
                                 negative_prompt, negative_prompt_embeds)
        QwenImageBranches.check_method(guide)
        latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        channels = self.transformer.config.in_channels // 4
        batch_size, packed = self.check_prompted_call(  # latents are checked packed, as the stock call takes them
            guide, prompt, prompt_embeds, ((latent_h // 2) * (latent_w // 2), channels * 4),
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps, sigmas=sigmas,
            sampler=sampler, eta=eta, generator=generator, latents=latents, output_type=output_type)
        rows = packed[0]
        check_embeddings("prompt_embeds", prompt_embeds, prompt_embeds_mask, batch_size)
        check_embeddings("negative_prompt_embeds", negative_prompt_embeds, negative_prompt_embeds_mask, batch_size)
        own_negative = conditions.negative_branch_inputs(guide, negative_prompt, negative_prompt_embeds, batch_size)
        if own_negative is not None:  # the negative prompt gets a branch of its own; "uncond" stays empty
            own_negative = (*own_negative, negative_prompt_embeds_mask)
            negative_prompt = negative_prompt_embeds = negative_prompt_embeds_mask = None
        negative = negative_prompt_texts(negative_prompt, negative_prompt_embeds, batch_size)
        cut = self.truncated_template_prompts(max_sequence_length, prompt=prompt, negative_prompt=negative_prompt)

        def encode(texts, embeds=None, mask=None) -> dict[str, torch.Tensor]:
            condition = self.prompt_condition(texts, embeds, mask, num_images_per_prompt=num_images_per_prompt,
                                              max_sequence_length=max_sequence_length)
            if self.transformer.config.guidance_embeds:  # the stock value, the same in every branch
                condition["guidance"] = torch.full((rows,), guidance_scale, device=self._execution_device,
                                                   dtype=torch.float32)
            return condition

        cond = encode(prompt, prompt_embeds, prompt_embeds_mask)
        uncond = encode(negative, negative_prompt_embeds, negative_prompt_embeds_mask)
        branches = QwenImageBranches(self.transformer, {"cond": cond, "uncond": uncond},
                                     img_shape=(1, latent_h // 2, latent_w // 2), attention_kwargs=attention_kwargs,
                                     networks={"reference": self.reference_network(guide, reference)})
        if own_negative is not None:
            conditions.add_negative_branch(branches, encode(*own_negative))
        conditions.add_text_branches(self, branches, guide, encode, batch_size=batch_size, generator=generator)

        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        config = self.scheduler.config
        mu = calculate_shift(packed[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        if latents is not None:
            latents = unpack_latents(latents, latent_h, latent_w)
        if callback_on_step_end is not None:
            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
            callback_on_step_end = packed_callback(callback_on_step_end, latent_h, latent_w)
        latents, nfe_per_image, state = self.denoise(
            branches, guide, (rows, channels, latent_h, latent_w), dtype=cond["encoder_hidden_states"].dtype,
            device=self._execution_device, generator=generator, latents=latents, particle_output=particle_output,
            sampler=sampler, num_inference_steps=num_inference_steps, timesteps=None, sigmas=sigmas, eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={"prompt_embeds": ("cond", "encoder_hidden_states")}, set_timesteps_kwargs={"mu": mu},
            call_attributes={"_guidance_scale": guidance_scale,  # stock: the embedded value
                             "_attention_kwargs": attention_kwargs or {}})  # stock: {} for None
        image = self.decode_latents(latents, height, width, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return self.guided_output(image, nfe_per_image, state, guide, sampler, warnings=cut)

    def call_guidance(self, guidance: GuidanceSpec, true_cfg_scale: float | None, negative_prompt,
                      negative_prompt_embeds) -> Guidance:
        """The call's method: the stock recipe for ``guidance=None`` (true CFG with the token
        renorm only with a negative prompt and a scale > 1, else the conditional alone), or the
        named one at ``true_cfg_scale``."""
        if isinstance(guidance, Guidance) and true_cfg_scale is not None:
            raise ValueError(f"true_cfg_scale: set the scale on the guidance object itself, got guidance={guidance!r} "
                             f"and true_cfg_scale={true_cfg_scale!r}")
        if guidance is not None:
            return self.resolve_guidance(guidance, true_cfg_scale)
        scale = STOCK_TRUE_CFG_SCALE if true_cfg_scale is None else true_cfg_scale
        if scale > 1 and (negative_prompt is not None or negative_prompt_embeds is not None):
            return conditions.stock_true_cfg_renorm(scale)
        return self.resolve_guidance(None, 1.0)

    def prompt_condition(self, texts: list[str] | str | None, embeds: torch.Tensor | None, mask: torch.Tensor | None,
                         *, num_images_per_prompt: int, max_sequence_length: int) -> dict[str, torch.Tensor]:
        """One branch's conditioning, one row per image: the stock encoding of ``texts`` (or the
        given ``embeds`` with their ``mask``), each prompt's embeddings and mask repeated for its
        images together (the stock ``encode_prompt`` interleaves the masks instead)."""
        embeds, mask = self.encode_prompt(prompt=texts, prompt_embeds=embeds, prompt_embeds_mask=mask,
                                          device=self._execution_device, num_images_per_prompt=1,
                                          max_sequence_length=max_sequence_length)
        condition = {"encoder_hidden_states": embeds.repeat_interleave(num_images_per_prompt, dim=0)}
        if mask is not None:
            condition[MASK_KEY] = mask.repeat_interleave(num_images_per_prompt, dim=0)
        return condition

    def truncated_template_prompts(self, max_sequence_length: int, **texts: str | list[str] | None) -> list[str]:
        """One sentence per prompt whose embedding tokens (its tokens after the chat template's
        opening, with the template's closing tokens) exceed ``max_sequence_length`` (the stock
        pipeline cuts them silently), each also issued as a :class:`PromptTruncatedWarning`."""
        drop = self.prompt_template_encode_start_idx
        limit = min(max_sequence_length, self.tokenizer_max_length)
        messages = []
        for name, value in texts.items():
            for text in [value] if isinstance(value, str) else value or []:
                with TEXT_LOCK:
                    ids = self.tokenizer(self.prompt_template_encode.format(text), truncation=False)["input_ids"]
                    kept = ids[drop:]
                    if len(kept) > limit:
                        cut = self.tokenizer.decode(kept[limit:], skip_special_tokens=True)
                        messages.append(f"{name}: {text!r} is {len(kept)} tokens with the chat template's closing "
                                        f"tokens, the text encoder reads {limit} (max_sequence_length); cut: {cut!r}")
        for message in messages:  # at the caller of pipe(...) (through torch's no_grad wrapper)
            warnings.warn(message, PromptTruncatedWarning, stacklevel=4)
        return messages

    def decode_latents(self, latents: torch.Tensor, height: int, width: int, output_type: str) -> Any:
        """The output as the stock pipeline makes it: packed latents for "latent", else the VAE's
        decoding of the de-normalised latents (``z * std + mean`` per channel, one frame)."""
        packed = pack_latents(latents)
        if output_type == "latent":
            return packed
        latents = self._unpack_latents(packed, height, width, self.vae_scale_factor).to(self.vae.dtype)
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        image = self.vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return self.image_processor.postprocess(image, output_type=output_type)
