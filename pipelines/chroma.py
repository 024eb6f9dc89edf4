"""``GuidedChromaPipeline``: the stock Chroma pipeline (flow matching, an un-distilled Flux-like
transformer on 2 x 2-packed latent tokens with rotary positions, T5 embeddings only, and an
attention mask over text and image tokens that hides all but the first padding token) with the
engine's sampler core.

Prompt encoding, the attention masks, the schedule (``sigmas = linspace(1, 1/n, n)`` with the
dynamic shift ``mu``), input checks and decoding are the stock pipeline's; the loop is the core's.
The core keeps the latents unpacked, (B, C, H, W); the branch model packs them into tokens for
each forward and unpacks the output (a permutation of elements, so the stock pipeline's
arithmetic is unchanged)."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch
from diffusers import ChromaPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

from . import conditions
from .common import TEXT_LOCK, GuidanceSpec, GuidedPipelineMixin, GuidedPipelineOutput
from .flow_transformer import (TransformerBranches, negative_prompt_texts, pack_latents, packed_callback,
                               unpack_latents)
from .joint_context_attention import JointContextBranches
from .messages import PromptTruncatedWarning

__all__ = ["ChromaBranches", "GuidedChromaPipeline"]

#: The stock limit of ``max_sequence_length`` (T5's positions as Chroma was trained).
MAX_SEQUENCE_LENGTH = 512


class ChromaBranches(JointContextBranches, TransformerBranches):
    """The branch model over a Chroma transformer. ``conditions[b]`` holds branch ``b``'s T5
    embeddings (``encoder_hidden_states``), its attention mask over text then image tokens
    (``attention_mask``, one row per image) and its text positions (``txt_ids``, zeros, one
    (tokens, 3) block per image, so that row subsets and particle repeats treat them as the rest
    of the conditioning); the image positions ``img_ids`` are shared. Branches run in separate
    forwards, the conditional first, as the stock pipeline runs its CFG
    (:class:`TransformerBranches`)."""

    family = "GuidedChromaPipeline"
    # PAG's identity attention (on top of the model's text padding mask) and SEG's blurred queries
    # on double- and single-stream attention, skipped blocks (SLG), NAG's second text stream (in
    # partner rows, each with its own padding mask: :mod:`.joint_context_attention`), TSG's noise on
    # the time embedding; SAG's map is not available.
    evaluates_crops = False  # its token layout (packing, positions) is the whole latent's
    perturbations = frozenset({"identity", "blur", "skip", "extrapolate"})
    time_noise = True

    def __init__(self, model, conditions: dict[str, dict[str, torch.Tensor]], *, img_ids: torch.Tensor,
                 joint_attention_kwargs: dict[str, Any] | None = None, providers: Any = None,
                 networks: Any = None) -> None:
        super().__init__(model, conditions, joint_attention_kwargs, providers=providers, networks=networks)
        self.img_ids = img_ids

    def time_embeddings(self, model) -> list[Any]:
        """TSG's noise goes on the output of Chroma's approximator (``distilled_guidance_layer``):
        the MLP that maps the time step (and nothing else: Chroma has no pooled text or guidance
        embedding) to every block's modulation, in place of Flux's time-step MLP."""
        return [model.distilled_guidance_layer]

    def time_noise_shape(self, model) -> tuple[int, ...] | None:
        """The approximator embeds one row per modulation index: ``(indices, width)`` a sample."""
        return (model.time_text_embed.mod_proj.shape[0], model.distilled_guidance_layer.out_proj.out_features)

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        model = self.model if model is None else model
        for _, _, branch in spans:
            self.check_alterations(branch)
        kept = x_in.shape[0]
        x_in, stacked, spans, negative_text = self.carry_negative_text(
            model, x_in, stacked, spans, image=slice(stacked("encoder_hidden_states").shape[1], None))
        rows, _, height, width = x_in.shape
        timestep = timestep.expand(rows).to(x_in.dtype)  # as the stock pipeline broadcasts it
        with negative_text, self.altered(model, x_in, spans) as plan:  # image tokens: the default 2 x 2 patches after the text
            out = model(hidden_states=pack_latents(x_in), timestep=timestep / 1000,
                        encoder_hidden_states=stacked("encoder_hidden_states"), txt_ids=stacked("txt_ids")[0],
                        img_ids=self.img_ids, attention_mask=stacked("attention_mask"),
                        joint_attention_kwargs=self._attention_kwargs(model, plan) or {}, return_dict=False)[0]
        return unpack_latents(out[:kept], height, width)


class GuidedChromaPipeline(GuidedPipelineMixin, ChromaPipeline):
    """Chroma text-to-image with any guidance method of the engine.

    ``guidance=None`` is the stock recipe: CFG ``neg + s (cond - neg)`` at ``s = guidance_scale``
    when ``guidance_scale > 1`` (cond and neg in separate forwards, cond first), else the
    conditional forward alone. With a method (``guidance="apg"``, a dict or an object),
    ``guidance_scale`` (when given) is its ``scale``. The unconditional branch is the negative
    prompt (or ``negative_prompt_embeds`` with their mask), else the empty prompt (the stock
    default)."""

    default_guidance_scale = 5.0  # the stock default

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 35,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: Any = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_ip_adapter_image: Any = None,
        negative_ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
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
        """Generate images. Arguments are the stock Chroma pipeline's (IP-Adapter's are refused)
        plus ``guidance``, ``sampler``, ``eta`` and ``particle_output`` as in
        :meth:`GuidedStableDiffusionPipeline.__call__`.

        Args:
            guidance_scale: the CFG scale of ``guidance=None`` (default 5.0, the stock one; CFG
                runs when it is > 1, else the conditional alone); with a method name or dict,
                that method's ``scale``. Must not be set with a guidance object.
            prompt_embeds, negative_prompt_embeds: T5 embeddings, (prompts, tokens, width), each
                with its attention mask ``prompt_attention_mask`` / ``negative_prompt_attention_mask``
                (prompts, tokens) as the stock pipeline requires; repeated per image, as computed
                embeddings are (the stock pipeline leaves given ones as they are).
            latents: packed, as the stock pipeline takes and returns them: (B, H/2 * W/2, C * 4) at
                latent size H x W. ``callback_on_step_end`` sees and returns them packed too.
            max_sequence_length: T5 tokens per prompt, in [1, 512]; a longer prompt is cut, with a
                :class:`PromptTruncatedWarning`.
            reference_unet: (keyword) autoguidance's reference network, a weaker Chroma
                transformer taking the same conditioning.
        """
        reference = kwargs.pop("reference_unet", None)
        ip_adapter = {"ip_adapter_image": ip_adapter_image, "ip_adapter_image_embeds": ip_adapter_image_embeds,
                      "negative_ip_adapter_image": negative_ip_adapter_image,
                      "negative_ip_adapter_image_embeds": negative_ip_adapter_image_embeds}
        unsupported = sorted(k for k, v in {**kwargs, **ip_adapter}.items() if v is not None)
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {unsupported} "
                             "(IP-Adapter is not supported here)")
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                          prompt_attention_mask=prompt_attention_mask, negative_prompt_embeds=negative_prompt_embeds,
                          negative_prompt_attention_mask=negative_prompt_attention_mask,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        self.check_max_sequence_length(max_sequence_length)
        particle_output = self.check_particle_output(particle_output)
        if guidance is None:  # the stock recipe: CFG only when the scale asks for it
            scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
            guide = self.resolve_guidance(None, scale if scale > 1 else 1.0)
        else:
            guide = self.resolve_guidance(guidance, guidance_scale)
        guide = self.for_prompts(guide, negative_prompt, negative_prompt_embeds)
        ChromaBranches.check_method(guide)
        latent_h = 2 * (int(height) // (self.vae_scale_factor * 2))
        latent_w = 2 * (int(width) // (self.vae_scale_factor * 2))
        channels = self.transformer.config.in_channels // 4
        batch_size, packed = self.check_prompted_call(  # latents are checked packed, as the stock call takes them
            guide, prompt, prompt_embeds, ((latent_h // 2) * (latent_w // 2), channels * 4),
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps, sigmas=sigmas,
            sampler=sampler, eta=eta, generator=generator, latents=latents, output_type=output_type)
        rows, image_tokens = packed[0], packed[1]
        self.check_embeddings("prompt", prompt_embeds, prompt_attention_mask, batch_size)
        self.check_embeddings("negative_prompt", negative_prompt_embeds, negative_prompt_attention_mask, batch_size)
        own_negative = conditions.negative_branch_inputs(guide, negative_prompt, negative_prompt_embeds, batch_size)
        if own_negative is not None:  # the negative prompt gets a branch of its own; "uncond" stays empty
            own_negative = (*own_negative, negative_prompt_attention_mask)
            negative_prompt = negative_prompt_embeds = negative_prompt_attention_mask = None
        negative = negative_prompt_texts(negative_prompt, negative_prompt_embeds, batch_size)
        cut = self.truncated_t5_prompts(max_sequence_length, prompt=prompt, negative_prompt=negative_prompt)

        device = self._execution_device
        text = {"rows": rows, "image_tokens": image_tokens, "device": device,
                "num_images_per_prompt": num_images_per_prompt, "max_sequence_length": max_sequence_length,
                "lora_scale": joint_attention_kwargs.get("scale") if joint_attention_kwargs else None}
        cond = self.prompt_condition(prompt, prompt_embeds, prompt_attention_mask, **text)
        uncond = self.prompt_condition(negative, negative_prompt_embeds, negative_prompt_attention_mask, **text)
        dtype = cond["encoder_hidden_states"].dtype
        img_ids = self._prepare_latent_image_ids(rows, latent_h // 2, latent_w // 2, device, dtype)
        branches = ChromaBranches(self.transformer, {"cond": cond, "uncond": uncond}, img_ids=img_ids,
                                  joint_attention_kwargs=joint_attention_kwargs,
                                  networks={"reference": self.reference_network(guide, reference)})

        def encode_texts(texts, embeds=None, mask=None) -> dict[str, torch.Tensor]:
            return self.prompt_condition(texts, embeds, mask, **text)

        if own_negative is not None:
            conditions.add_negative_branch(branches, encode_texts(*own_negative))
        conditions.add_text_branches(self, branches, guide, encode_texts, batch_size=batch_size, generator=generator)

        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        config = self.scheduler.config
        mu = calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        if latents is not None:
            latents = unpack_latents(latents, latent_h, latent_w)
        if callback_on_step_end is not None:
            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
            callback_on_step_end = packed_callback(callback_on_step_end, latent_h, latent_w)
        latents, nfe_per_image, state = self.denoise(
            branches, guide, (rows, channels, latent_h, latent_w), dtype=dtype, device=device, generator=generator,
            latents=latents, particle_output=particle_output, sampler=sampler,
            num_inference_steps=num_inference_steps, timesteps=None, sigmas=sigmas, eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={"prompt_embeds": ("cond", "encoder_hidden_states")}, set_timesteps_kwargs={"mu": mu},
            call_attributes={"_joint_attention_kwargs": joint_attention_kwargs or {}})  # stock: {} for None
        if output_type == "latent":
            image = pack_latents(latents)
        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return self.guided_output(image, nfe_per_image, state, guide, sampler, warnings=cut)

    def prompt_condition(self, prompt: str | list[str] | None, prompt_embeds: torch.Tensor | None,
                         prompt_attention_mask: torch.Tensor | None, *, rows: int, image_tokens: int,
                         device: torch.device, num_images_per_prompt: int, max_sequence_length: int,
                         lora_scale: float | None) -> dict[str, torch.Tensor]:
        """A branch's conditioning (``rows`` images): the stock ``encode_prompt``'s T5 embeddings
        of ``prompt`` (or ``prompt_embeds`` with their mask, repeated per image), its text
        positions, and the stock ``_prepare_attention_mask`` over the text and the
        ``image_tokens`` image tokens."""
        embeds, text_ids, mask, *_ = self.encode_prompt(
            prompt=prompt, prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_attention_mask,
            do_classifier_free_guidance=False, device=device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, lora_scale=lora_scale)
        if prompt_embeds is not None:  # given per prompt: one row per image, as computed embeddings
            embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
            mask = mask.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        mask = self._prepare_attention_mask(batch_size=rows, sequence_length=image_tokens, dtype=embeds.dtype,
                                            attention_mask=mask)
        return {"encoder_hidden_states": embeds, "attention_mask": mask,
                "txt_ids": text_ids.expand(rows, *text_ids.shape)}

    def check_embeddings(self, name: str, embeds: torch.Tensor | None, mask: torch.Tensor | None,
                         batch_size: int) -> None:
        """ValueError, before any model call, unless given ``{name}_embeds`` are a (prompts,
        tokens, width) tensor of the transformer's text width with a (prompts, tokens) mask."""
        if embeds is None:
            return
        width = self.transformer.config.joint_attention_dim
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] != batch_size \
                or embeds.shape[2] != width:
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{name}_embeds: expected a ({batch_size}, tokens, {width}) tensor (one row per "
                             f"prompt), got {got}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{name}_attention_mask: expected a tensor of shape {tuple(embeds.shape[:2])} "
                             f"(one row per row of {name}_embeds), got {got}")

    @staticmethod
    def check_max_sequence_length(max_sequence_length: int) -> None:
        """ValueError unless ``max_sequence_length`` is an integer in [1, 512] (the stock check
        refuses only values above 512)."""
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length: must be an integer in [1, {MAX_SEQUENCE_LENGTH}], "
                             f"got {max_sequence_length!r}")

    def truncated_t5_prompts(self, max_sequence_length: int, **texts: str | list[str] | None) -> list[str]:
        """One sentence per prompt longer than the ``max_sequence_length`` tokens the stock
        pipeline keeps (``texts``: parameter name -> prompt(s)), each also issued as a
        :class:`PromptTruncatedWarning`: the stock pipeline cuts them silently."""
        if self.tokenizer is None:
            return []
        messages = []
        for name, value in texts.items():
            listed = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []
            for text in (item for item in listed if isinstance(item, str)):  # types are checked elsewhere
                with TEXT_LOCK:
                    ids = self.tokenizer(text, truncation=False)["input_ids"]
                if len(ids) > max_sequence_length:  # the kept ids end with the end token: ids[L - 1:] go
                    cut = self.tokenizer.decode(ids[max_sequence_length - 1:], skip_special_tokens=True)
                    messages.append(f"{name}: {text!r} is {len(ids)} tokens, the text encoder reads "
                                    f"max_sequence_length={max_sequence_length}; cut: {cut!r}")
        for message in messages:  # at the caller of pipe(...) (through torch's no_grad wrapper)
            warnings.warn(message, PromptTruncatedWarning, stacklevel=4)
        return messages
