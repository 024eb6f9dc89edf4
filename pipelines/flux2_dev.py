"""``GuidedFlux2Pipeline``: the stock Flux.2 [dev] pipeline (a guidance-distilled Flux.2 transformer
on patchified latent tokens with 4-D rotary positions and an embedded guidance value, prompt
embeddings stacked from several hidden layers of a Mistral 3 model, optional reference images as
extra tokens) with the engine's sampler core.

Prompt encoding (system message and chat template), reference-image encoding, the schedule
(``sigmas = linspace(1, 1/n, n)`` with the empirical shift ``mu``), input checks and the
batch-norm de-normalisation before decoding are the stock pipeline's; the loop is the core's. The
latents' layout is the Klein adapter's (:mod:`.flux2`): the core keeps them patchified,
(B, 4C, H/2, W/2), and the branch model flattens them into tokens for each forward.

What differs from the Klein adapter: the stock [dev] pipeline never runs CFG (one conditional
forward a step, with ``guidance_scale`` embedded into the transformer), returns the sampled
tokens as they are for ``output_type="latent"``, counts the Mistral text encoder's layers in its
text config, and renders prompts with a system message."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, Sequence

import torch
from diffusers import Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import format_input

from guidance_engine.guidance import Guidance

from . import conditions
from .common import TEXT_LOCK, GuidanceSpec, GuidedPipelineMixin, GuidedPipelineOutput
from .flow_transformer import negative_prompt_texts
from .flux2 import Flux2Branches, GuidedFlux2KleinPipeline, pack_latents
from .messages import PromptTruncatedWarning

__all__ = ["Flux2DevBranches", "GuidedFlux2Pipeline"]


class Flux2DevBranches(Flux2Branches):
    """The branch model over a guidance-distilled Flux.2 transformer: :class:`Flux2Branches` whose
    conditions also hold the embedded guidance value per row (``guidance``, float32), which its
    forward passes on as the stock [dev] pipeline passes it."""

    family = "GuidedFlux2Pipeline"


class GuidedFlux2Pipeline(GuidedPipelineMixin, Flux2Pipeline):
    """Flux.2 [dev] text-to-image (with optional reference images) with any guidance method of
    the engine.

    Two scales, as in :class:`GuidedFluxPipeline`: ``guidance_scale`` is the value embedded into
    the guidance-distilled transformer (default 4.0, the stock one, in every branch's
    conditioning), and a method's own ``scale`` guides between branches. ``guidance=None`` is the
    stock recipe: the conditional forward alone (no CFG). A method (``guidance="apg"``, a dict or
    an object) runs at its own default scale unless the spec sets one (``{"name": "apg",
    "scale": 3}``); its unconditional branch is ``negative_prompt`` (an argument the stock
    pipeline lacks), else ``negative_prompt_embeds``, else the empty prompt.

    ``caption_upsample_temperature`` (the stock prompt rewriting by the text encoder) is refused:
    the stock rewriting samples from torch's global RNG, not from ``generator``, and needs the
    PixtralProcessor; call the inherited ``upsample_prompt`` first and pass its prompts instead."""

    default_guidance_scale = 1.0  # guidance=None: the conditional alone (the embedded value is guidance_scale)

    # The stock Flux.2 pipelines prepare reference images and their positions and encode a
    # prompt's condition alike: the Klein adapter's functions, shared.
    reference_images = GuidedFlux2KleinPipeline.reference_images
    image_inputs = GuidedFlux2KleinPipeline.image_inputs
    prompt_condition = GuidedFlux2KleinPipeline.prompt_condition
    sample_and_decode = GuidedFlux2KleinPipeline.sample_and_decode

    @torch.no_grad()
    def __call__(
        self,
        image: Any = None,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        max_sequence_length: int = 512,
        text_encoder_out_layers: tuple[int, ...] = (10, 20, 30),
        caption_upsample_temperature: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        eta: float | None = None,
        particle_output: str = "draw",
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Generate images. Arguments are the stock Flux.2 [dev] pipeline's, plus
        ``negative_prompt``, ``negative_prompt_embeds``, ``guidance``, ``sampler``, ``eta`` and
        ``particle_output`` as in :meth:`GuidedStableDiffusionPipeline.__call__`.

        Args:
            image: reference images (a PIL image or a list of them, each at least 64 px a side, as
                the stock pipeline checks), encoded once and seen by every branch as extra tokens;
                the output takes the first one's size unless ``height`` / ``width`` are given.
            guidance_scale: the guidance value embedded into the transformer (a finite number;
                default 4.0, the stock one), the same in every branch. Never a method's scale.
            latents: the start noise, patchified as the stock pipeline takes it: (B, 4C, H/2, W/2)
                at latent size H x W. ``callback_on_step_end`` sees and returns them as tokens,
                (B, H/2 * W/2, 4C), and ``output_type="latent"`` returns those tokens, as the
                stock pipeline.
            max_sequence_length: tokens the text encoder reads per prompt, system message and chat
                template included (>= 1); a longer prompt is cut, with a
                :class:`PromptTruncatedWarning`.
            text_encoder_out_layers: the Mistral hidden states stacked into the prompt embeddings
                (each in [-L - 1, L] for an L-layer encoder; hidden state 0 is the token embedding).
            caption_upsample_temperature: refused unless None or 0 (see the class docstring).
            negative_prompt: the unconditional branch's prompt of a method (a string, or one per
                prompt); default: ``negative_prompt_embeds``, else the empty prompt. Refused with
                ``guidance=None``, which runs no unconditional branch.
            negative_prompt_embeds: the unconditional branch's embeddings, (prompts, tokens, width)
                as ``encode_prompt`` returns them for one image per prompt.
            reference_unet: (keyword) autoguidance's reference network, a weaker Flux.2
                transformer taking the same conditioning.
        """
        reference_network = kwargs.pop("reference_unet", None)
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {unsupported}")
        if caption_upsample_temperature:  # the stock test: 0 and None leave the prompt as it is
            raise ValueError("caption_upsample_temperature: caption upsampling is not supported here (it samples "
                             "from the global RNG, not from generator); rewrite the prompt first with "
                             f"pipe.upsample_prompt(prompt, temperature=...), got {caption_upsample_temperature!r}")
        self.check_embedded_scale(guidance_scale)
        references = self.reference_images(image)
        if references:  # the stock rule: the output takes the first reference image's size
            height = height or references[0].shape[-2]
            width = width or references[0].shape[-1]
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt=prompt, height=height, width=width, prompt_embeds=prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        self.check_text_settings(max_sequence_length, text_encoder_out_layers, prompt_embeds, negative_prompt_embeds)
        particle_output = self.check_particle_output(particle_output)
        guide = self.dev_guidance(guidance, negative_prompt, negative_prompt_embeds)
        Flux2DevBranches.check_method(guide)
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
        embedded = torch.full((shape[0],), guidance_scale, device=device, dtype=torch.float32)  # as stock: per row
        branches = Flux2DevBranches(
            self.transformer, {"cond": {**self.prompt_condition(prompt, prompt_embeds, **text), "guidance": embedded},
                               "uncond": {**self.prompt_condition(negative, negative_prompt_embeds, **text),
                                          "guidance": embedded}},
            **self.image_inputs(references, latent_h, latent_w, generator, device),
            attention_kwargs=attention_kwargs, networks={"reference": self.reference_network(guide, reference_network)})

        def encode_texts(texts, embeds=None) -> dict[str, torch.Tensor]:
            return {**self.prompt_condition(texts, embeds, **text), "guidance": embedded}

        if own_negative is not None:
            conditions.add_negative_branch(branches, encode_texts(*own_negative))
        conditions.add_text_branches(self, branches, guide, encode_texts, batch_size=batch_size, generator=generator)

        return self.sample_and_decode(
            branches, guide, shape, device=device, generator=generator, latents=latents,
            num_inference_steps=num_inference_steps, sigmas=sigmas, sampler=sampler, eta=eta,
            particle_output=particle_output, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, output_type=output_type,
            return_dict=return_dict, warnings=cut,
            call_attributes={"_guidance_scale": guidance_scale})  # stock: the embedded value

    @staticmethod
    def check_embedded_scale(guidance_scale: Any) -> None:
        """ValueError, before any model call, unless ``guidance_scale`` is a finite real number
        (the stock pipeline builds a tensor of it; None fails there)."""
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) \
                or not math.isfinite(guidance_scale):
            raise ValueError("guidance_scale: the guidance value embedded into the transformer, a finite number "
                             f"(stock default 4.0), got {guidance_scale!r}")

    def dev_guidance(self, guidance: GuidanceSpec, negative_prompt, negative_prompt_embeds) -> Guidance:
        """The method of a call. ``guidance=None`` is the stock recipe, the conditional alone
        (CFG at scale 1), so a negative prompt, which it would ignore, is refused; a method keeps
        its own scale (``guidance_scale`` is the embedded value, not a method's scale)."""
        if guidance is None:
            given = {"negative_prompt": negative_prompt, "negative_prompt_embeds": negative_prompt_embeds}
            for name, value in given.items():
                if value is not None:
                    raise ValueError(f"{name}: guidance=None runs the stock Flux.2 [dev] recipe, the conditional "
                                     "forward alone, which reads no negative prompt; name a method (guidance='cfg', "
                                     "'apg', ...) to guide away from it")
            return self.resolve_guidance(None, None)
        return self.for_prompts(self.resolve_guidance(guidance, None), negative_prompt, negative_prompt_embeds)

    def check_text_settings(self, max_sequence_length: int, text_encoder_out_layers: Sequence[int],
                            prompt_embeds: torch.Tensor | None, negative_prompt_embeds: torch.Tensor | None) -> None:
        """ValueError, before any model call, for a ``max_sequence_length`` below 1, a hidden
        layer the text encoder does not have (its language model has L + 1 hidden states, 0 the
        token embedding), or given embeddings that are not (B, tokens, width) tensors."""
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length: must be an integer >= 1, got {max_sequence_length!r}")
        layers = None if self.text_encoder is None else self.text_encoder.config.get_text_config().num_hidden_layers
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

    def chat_ids(self, prompt: str) -> list[int]:
        """The token ids of ``prompt`` as the stock pipeline gives it to the text encoder (after
        the system message, in the chat template), uncut. Works with the stock PixtralProcessor
        and with a plain tokenizer in its place."""
        messages = format_input(prompts=[prompt], system_message=self.system_message)
        with TEXT_LOCK:
            return list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"][0])

    def truncated_chat_prompts(self, max_sequence_length: int, **texts: str | list[str] | None) -> list[str]:
        """One sentence per prompt longer, with the system message in the chat template, than
        ``max_sequence_length`` tokens (``texts``: parameter name -> prompt(s)), each also issued
        as a :class:`PromptTruncatedWarning`: the stock pipeline cuts them silently."""
        if self.tokenizer is None:
            return []
        decoder = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a processor's own tokenizer
        messages = []
        for name, value in texts.items():
            listed = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []
            for prompt in (item for item in listed if isinstance(item, str)):
                ids = self.chat_ids(prompt)
                if len(ids) > max_sequence_length:
                    cut = decoder.decode(ids[max_sequence_length:], skip_special_tokens=True)
                    messages.append(f"{name}: {prompt!r} is {len(ids)} tokens with the system message in the chat "
                                    f"template, the text encoder reads max_sequence_length={max_sequence_length}; "
                                    f"cut: {cut!r}")
        for message in messages:  # at the caller of pipe(...) (through torch's no_grad wrapper)
            warnings.warn(message, PromptTruncatedWarning, stacklevel=4)
        return messages

    def decode_latents(self, latents: torch.Tensor, output_type: str) -> Any:
        """The sampled patchified latents as the stock pipeline returns them: for
        ``output_type="latent"`` its tokens, (B, H/2 * W/2, 4C), as sampled (not de-normalised);
        else de-normalised, unpatchified, decoded and post-processed as the Klein adapter does."""
        if output_type == "latent":
            return pack_latents(latents)
        return GuidedFlux2KleinPipeline.decode_latents(self, latents, output_type)
