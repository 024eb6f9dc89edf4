"""``GuidedFlux2KleinPipeline``: the stock Flux.2 Klein pipeline (flow matching, a Flux.2 transformer
on patchified latent tokens with 4-D rotary positions, prompt embeddings stacked from several
hidden layers of a Qwen3 model, optional reference images as extra tokens) with the engine's
sampler core.

Prompt encoding, reference-image encoding, the schedule (``sigmas = linspace(1, 1/n, n)`` with the
empirical shift ``mu``), input checks and the batch-norm de-normalisation before decoding are the
stock pipeline's; the loop is the core's. The core keeps the latents patchified, (B, 4C, H/2, W/2)
(the layout the stock pipeline draws its noise in and takes ``latents=`` in); the branch model
flattens them into (B, H/2 * W/2, 4C) tokens for each forward and back (a permutation of
elements, so the stock pipeline's arithmetic is unchanged)."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from diffusers.utils.torch_utils import get_module_execution_device

from . import conditions
from .common import TEXT_LOCK, GuidanceSpec, GuidedPipelineMixin, GuidedPipelineOutput
from .flow_transformer import TransformerBranches, negative_prompt_texts, packed_callback
from .joint_context_attention import JointContextBranches
from .messages import PromptTruncatedWarning
from .perturbation import ImageTokens

__all__ = ["Flux2Branches", "GuidedFlux2KleinPipeline", "pack_latents", "unpack_latents"]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Patchified (B, C, H, W) latents as (B, H * W, C) tokens in raster order: the stock
    ``Flux2KleinPipeline._pack_latents`` (a view, as the stock one)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height * width, C) tokens in raster order back to (B, C, height, width) patchified
    latents: the stock ``_unpack_latents_with_ids`` for the positions ``prepare_latents`` makes."""
    b, _, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


class Flux2Branches(JointContextBranches, TransformerBranches):
    """The branch model over a Flux.2 transformer. ``conditions[b]`` holds branch ``b``'s stacked
    Qwen3 embeddings (``encoder_hidden_states``) and their 4-D positions (``txt_ids``, one row per
    image); the image positions ``img_ids`` (the latents', then the reference images') and the
    reference-image tokens ``reference_tokens`` (one row, the same for every image; None without
    reference images) are shared. The transformer's output is cut to the latents' tokens, as in
    the stock pipeline. Branches run in separate forwards, the conditional first, as the stock
    pipeline runs its CFG (:class:`TransformerBranches`)."""

    family = "GuidedFlux2KleinPipeline"
    # PAG's identity attention and SEG's blurred queries on double- and single-stream attention
    # (the latents' tokens; reference-image tokens are conditioning, as the text), skipped blocks
    # (SLG), NAG's second text stream (its rule on the whole image stream, reference tokens too, as
    # the authors' Flux processor on everything after the text), TSG's noise on the time-step
    # embedding; SAG's map is not available.
    evaluates_crops = False  # its token layout (packing, positions) is the whole latent's
    perturbations = frozenset({"identity", "blur", "skip", "extrapolate"})
    time_noise = True

    def __init__(self, model, conditions: dict[str, dict[str, torch.Tensor]], *, img_ids: torch.Tensor,
                 reference_tokens: torch.Tensor | None = None, attention_kwargs: dict[str, Any] | None = None,
                 providers: Any = None, networks: Any = None) -> None:
        super().__init__(model, conditions, attention_kwargs, providers=providers, networks=networks)
        self.img_ids = img_ids
        self.reference_tokens = reference_tokens

    def time_embeddings(self, model) -> list[Any]:
        """TSG's noise goes on the time-step MLP's output, before a guidance embedding is added and
        the modulations are computed from it."""
        return [model.time_guidance_embed.timestep_embedder]

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        model = self.model if model is None else model
        for _, _, branch in spans:
            self.check_alterations(branch)
        kept = x_in.shape[0]
        x_in, stacked, spans, negative_text = self.carry_negative_text(
            model, x_in, stacked, spans, image=slice(stacked("encoder_hidden_states").shape[1], None))
        rows, _, height, width = x_in.shape
        tokens = pack_latents(x_in)
        if self.reference_tokens is not None:  # after the latents' tokens, as the stock input
            tokens = torch.cat([tokens, self.reference_tokens.expand(rows, -1, -1)], dim=1)
        timestep = timestep.expand(rows).to(x_in.dtype)  # as the stock pipeline broadcasts it
        # The latents are patchified already: one token per latent position, then the references'.
        layout = ImageTokens(height, width, context=tokens.shape[1] - height * width)
        with negative_text, self.altered(model, x_in, spans, tokens=layout) as plan:
            # the embedded guidance of a guidance-distilled model (Flux.2 [dev]); Klein has none (None)
            out = model(hidden_states=tokens.to(model.dtype), timestep=timestep / 1000, guidance=stacked("guidance"),
                        encoder_hidden_states=stacked("encoder_hidden_states"), txt_ids=stacked("txt_ids"),
                        img_ids=self.img_ids, joint_attention_kwargs=self._attention_kwargs(model, plan),
                        return_dict=False)[0]
        return unpack_latents(out[:kept, :height * width], height, width)


class GuidedFlux2KleinPipeline(GuidedPipelineMixin, Flux2KleinPipeline):
    """Flux.2 Klein text-to-image (with optional reference images) with any guidance method of
    the engine.

    ``guidance=None`` is the stock recipe: CFG ``neg + s (cond - neg)`` at ``s = guidance_scale``
    when ``guidance_scale > 1`` and the model is not step-distilled (the pipeline's config
    ``is_distilled``), cond and neg in separate forwards, cond first; else the conditional forward
    alone. With a method (``guidance="apg"``, a dict or an object), ``guidance_scale`` (when given)
    is its ``scale``, on distilled models too (the method was asked for). The unconditional branch
    is ``negative_prompt`` (an argument the stock pipeline lacks), else ``negative_prompt_embeds``,
    else the empty prompt (the stock default)."""

    default_guidance_scale = 4.0  # the stock default

    @torch.no_grad()
    def __call__(
        self,
        image: Any = None,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = (9, 18, 27),
        negative_prompt: str | list[str] | None = None,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        eta: float | None = None,
        particle_output: str = "draw",
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Generate images. Arguments are the stock Klein pipeline's, plus ``negative_prompt``,
        ``guidance``, ``sampler``, ``eta`` and ``particle_output`` as in
        :meth:`GuidedStableDiffusionPipeline.__call__`.

        Args:
            image: reference images (a PIL image or a list of them, each at least 64 px a side, as
                the stock pipeline checks), encoded once and seen by every branch as extra tokens;
                the output takes the first one's size unless ``height`` / ``width`` are given.
            guidance_scale: the CFG scale of ``guidance=None`` (default 4.0, the stock one; CFG
                runs when it is > 1 and the model is not distilled); with a method name or dict,
                that method's ``scale``. Must not be set with a guidance object.
            latents: the start noise, patchified as the stock pipeline takes it: (B, 4C, H/2, W/2)
                at latent size H x W. ``callback_on_step_end`` sees and returns them as tokens,
                (B, H/2 * W/2, 4C), as with the stock pipeline; ``output_type="latent"`` returns
                de-normalised, unpatchified (B, C, H, W) latents, as the stock pipeline.
            max_sequence_length: tokens the text encoder reads per prompt, chat template included
                (>= 1); a longer prompt is cut, with a :class:`PromptTruncatedWarning`.
            text_encoder_out_layers: the Qwen3 hidden states stacked into the prompt embeddings
                (each in [-L - 1, L] for an L-layer encoder; hidden state 0 is the token embedding).
            negative_prompt: the unconditional branch's prompt (a string, or one per prompt);
                default: ``negative_prompt_embeds``, else the empty prompt.
            reference_unet: (keyword) autoguidance's reference network, a weaker Flux.2
                transformer taking the same conditioning.
        """
        reference_network = kwargs.pop("reference_unet", None)
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {unsupported}")
        references = self.reference_images(image)
        if references:  # the stock rule: the output takes the first reference image's size
            height = height or references[0].shape[-2]
            width = width or references[0].shape[-1]
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        # stock's warning that a distilled model ignores the scale is only true of guidance=None
        self.check_inputs(prompt=prompt, height=height, width=width, prompt_embeds=prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          guidance_scale=scale if guidance is None else 1.0)
        self.check_text_settings(max_sequence_length, text_encoder_out_layers, prompt_embeds, negative_prompt_embeds)
        particle_output = self.check_particle_output(particle_output)
        guide = self.for_prompts(self.klein_guidance(guidance, guidance_scale), negative_prompt,
                                 negative_prompt_embeds)
        Flux2Branches.check_method(guide)
        latent_h = int(height) // (self.vae_scale_factor * 2)  # patchified: half the VAE latent size
        latent_w = int(width) // (self.vae_scale_factor * 2)
        channels = (self.transformer.config.in_channels // 4) * 4
        batch_size, shape = self.check_prompted_call(
            guide, prompt, prompt_embeds, (channels, latent_h, latent_w), num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps, sigmas=sigmas, sampler=sampler, eta=eta, generator=generator,
            latents=latents, output_type=output_type)
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != batch_size:
            raise ValueError(f"negative_prompt_embeds: expected {batch_size} rows (one per prompt), "
                             f"got {negative_prompt_embeds.shape[0]}")
        cut = self.truncated_chat_prompts(max_sequence_length, prompt=prompt, negative_prompt=negative_prompt)
        own_negative = conditions.negative_branch_inputs(guide, negative_prompt, negative_prompt_embeds, batch_size)
        if own_negative is not None:  # the negative prompt gets a branch of its own; "uncond" stays empty
            negative_prompt = negative_prompt_embeds = None
        negative = negative_prompt_texts(negative_prompt, negative_prompt_embeds, batch_size)

        device = self._execution_device
        text = {"device": device, "num_images_per_prompt": num_images_per_prompt,
                "max_sequence_length": max_sequence_length, "text_encoder_out_layers": text_encoder_out_layers}
        branches = Flux2Branches(
            self.transformer, {"cond": self.prompt_condition(prompt, prompt_embeds, **text),
                               "uncond": self.prompt_condition(negative, negative_prompt_embeds, **text)},
            **self.image_inputs(references, latent_h, latent_w, generator, device),
            attention_kwargs=attention_kwargs, networks={"reference": self.reference_network(guide, reference_network)})

        def encode_texts(texts, embeds=None) -> dict[str, torch.Tensor]:
            return self.prompt_condition(texts, embeds, **text)

        if own_negative is not None:
            conditions.add_negative_branch(branches, encode_texts(*own_negative))
        conditions.add_text_branches(self, branches, guide, encode_texts, batch_size=batch_size, generator=generator)

        return self.sample_and_decode(
            branches, guide, shape, device=device, generator=generator, latents=latents,
            num_inference_steps=num_inference_steps, sigmas=sigmas, sampler=sampler, eta=eta,
            particle_output=particle_output, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, output_type=output_type,
            return_dict=return_dict, warnings=cut,
            call_attributes={"_guidance_scale": scale} if guidance is None else None)  # stock: the call's scale

    def sample_and_decode(self, branches: Flux2Branches, guide, shape: tuple[int, ...], *, device, generator,
                          latents: torch.Tensor | None, num_inference_steps: int, sigmas, sampler: str | None,
                          eta: float | None, particle_output: str, callback_on_step_end,
                          callback_on_step_end_tensor_inputs: list[str], output_type: str, return_dict: bool,
                          warnings: list[str], call_attributes: dict[str, Any] | None = None
                          ) -> GuidedPipelineOutput | tuple:
        """The rest of a Flux.2 call once its branches are built (Klein and [dev] alike): the stock
        schedule (``linspace(1, 1/n, n)`` with the empirical ``mu``), the core run (callbacks see
        the latents as tokens), the family's decoding. ``call_attributes``: the family's stock
        per-call attribute values (:meth:`GuidedPipelineMixin.call_attributes`)."""
        latent_h, latent_w = shape[-2:]
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=latent_h * latent_w, num_steps=num_inference_steps)
        if callback_on_step_end is not None:
            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
            callback_on_step_end = packed_callback(callback_on_step_end, latent_h, latent_w,
                                                   pack=pack_latents, unpack=unpack_latents)
        dtype = branches.conditions["cond"]["encoder_hidden_states"].dtype
        latents, nfe_per_image, state = self.denoise(
            branches, guide, shape, dtype=dtype, device=device, generator=generator, latents=latents,
            particle_output=particle_output, sampler=sampler, num_inference_steps=num_inference_steps,
            timesteps=None, sigmas=sigmas, eta=eta, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={"prompt_embeds": ("cond", "encoder_hidden_states")}, set_timesteps_kwargs={"mu": mu},
            call_attributes=call_attributes)
        image = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return self.guided_output(image, nfe_per_image, state, guide, sampler, warnings=warnings)

    def klein_guidance(self, guidance: GuidanceSpec, guidance_scale: float | None):
        """The method of a call. ``guidance=None`` is the stock recipe: CFG at ``guidance_scale``
        (default 4.0) when it is > 1 and the model is not step-distilled, else the conditional
        alone; a method takes ``guidance_scale`` (when given) as its scale, distilled or not."""
        if guidance is not None:
            return self.resolve_guidance(guidance, guidance_scale)
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        stock_cfg = scale > 1 and not self.config.is_distilled  # the stock do_classifier_free_guidance
        return self.resolve_guidance(None, scale if stock_cfg else 1.0)

    def image_inputs(self, references: list[torch.Tensor], latent_h: int, latent_w: int, generator,
                     device: torch.device) -> dict[str, torch.Tensor | None]:
        """The branch model's image inputs: the positions of the (latent_h x latent_w) latent
        tokens, then the reference images' (time offsets 10, 20, ...), and the reference images'
        tokens, one row (None without references), encoded as the stock pipeline encodes them (by
        the VAE's mode: no draw from ``generator``)."""
        img_ids = self._prepare_latent_ids(torch.empty(1, 0, latent_h, latent_w)).to(device)
        if not references:
            return {"img_ids": img_ids, "reference_tokens": None}
        tokens, reference_ids = self.prepare_image_latents(images=references, batch_size=1, generator=generator,
                                                           device=device, dtype=self.vae.dtype)
        return {"img_ids": torch.cat([img_ids, reference_ids], dim=1), "reference_tokens": tokens}

    def reference_images(self, image: Any) -> list[torch.Tensor]:
        """The reference images as the stock pipeline prepares them (checked: PIL images, at least
        64 px a side; shrunk to at most 1024 x 1024 px of area, cropped to a multiple of twice the
        VAE factor), as [-1, 1] tensors; [] for None. No model runs here."""
        if image is None:
            return []
        images = image if isinstance(image, list) else [image]
        if not images:
            raise ValueError("image: expected a PIL image or a non-empty list of them (reference images), got []")
        for item in images:
            self.image_processor.check_image_input(item)
        prepared = []
        multiple = self.vae_scale_factor * 2
        for item in images:
            if item.size[0] * item.size[1] > 1024 * 1024:
                item = self.image_processor._resize_to_target_area(item, 1024 * 1024)
            width, height = (side // multiple * multiple for side in item.size)
            prepared.append(self.image_processor.preprocess(item, height=height, width=width, resize_mode="crop"))
        return prepared

    def check_text_settings(self, max_sequence_length: int, text_encoder_out_layers: Sequence[int],
                            prompt_embeds: torch.Tensor | None, negative_prompt_embeds: torch.Tensor | None) -> None:
        """ValueError, before any model call, for a ``max_sequence_length`` below 1 or a hidden
        layer the text encoder does not have (it has L + 1 hidden states, 0 the token embedding),
        or given embeddings that are not (B, tokens, width) tensors."""
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: must be an integer >= 1, got {max_sequence_length!r}")
        layers = self.text_encoder.config.num_hidden_layers if self.text_encoder is not None else None
        if not isinstance(text_encoder_out_layers, (tuple, list)) or not text_encoder_out_layers or not all(
                isinstance(k, int) and not isinstance(k, bool) and (layers is None or -layers - 1 <= k <= layers)
                for k in text_encoder_out_layers):
            accepted = "integers" if layers is None else f"integers in [{-layers - 1}, {layers}]"
            raise ValueError(f"text_encoder_out_layers: expected a non-empty tuple of {accepted} (hidden states "
                             f"of the text encoder), got {text_encoder_out_layers!r}")
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (not isinstance(embeds, torch.Tensor) or embeds.ndim != 3):
                got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
                raise ValueError(f"{name}: expected a (batch, tokens, width) tensor, got {got}")

    def prompt_condition(self, prompt: list[str] | str | None, prompt_embeds: torch.Tensor | None,
                         **text: Any) -> dict[str, torch.Tensor]:
        """A branch's conditioning: the stock ``encode_prompt``'s embeddings of ``prompt`` (or
        ``prompt_embeds``, repeated per image) and their text positions."""
        embeds, text_ids = self.encode_prompt(prompt=prompt, prompt_embeds=prompt_embeds, **text)
        return {"encoder_hidden_states": embeds, "txt_ids": text_ids}

    def chat_text(self, prompt: str) -> str:
        """``prompt`` in the chat template, as the stock pipeline gives it to the text encoder."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)

    def truncated_chat_prompts(self, max_sequence_length: int, **texts: str | list[str] | None) -> list[str]:
        """One sentence per prompt longer, in the chat template, than ``max_sequence_length``
        tokens (``texts``: parameter name -> prompt(s)), each also issued as a
        :class:`PromptTruncatedWarning`: the stock pipeline cuts them silently."""
        if self.tokenizer is None:
            return []
        messages = []
        for name, value in texts.items():
            listed = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []
            for prompt in (item for item in listed if isinstance(item, str)):
                with TEXT_LOCK:
                    ids = self.tokenizer(self.chat_text(prompt), truncation=False)["input_ids"]
                if len(ids) > max_sequence_length:
                    cut = self.tokenizer.decode(ids[max_sequence_length:], skip_special_tokens=True)
                    messages.append(f"{name}: {prompt!r} is {len(ids)} tokens in the chat template, the text "
                                    f"encoder reads max_sequence_length={max_sequence_length}; cut: {cut!r}")
        for message in messages:  # at the caller of pipe(...) (through torch's no_grad wrapper)
            warnings.warn(message, PromptTruncatedWarning, stacklevel=4)
        return messages

    def decode_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """Patchified latents de-normalised with the VAE's batch-norm statistics and unpatchified,
        as the stock pipeline; decoded and post-processed unless ``output_type`` is "latent"."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
            latents.device, latents.dtype)
        latents = self._unpatchify_latents(latents * std + mean)
        if output_type == "latent":
            return latents
        image = self.vae.decode(latents.to(get_module_execution_device(self.vae)), return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)
