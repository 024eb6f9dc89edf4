"""``GuidedStableDiffusion3Pipeline``: the stock SD3 pipeline (flow matching, MMDiT transformer,
two CLIP encoders and T5) with the engine's sampler core. Prompt encoding, the dynamic shift of
the flow schedule, input checks and decoding are the stock pipeline's; the loop is the core's."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from . import conditions
from .branches import NetworkBranches
from .common import GuidanceSpec, GuidedPipelineMixin, GuidedPipelineOutput
from .joint_context_attention import JointContextBranches


class TransformerBranches(JointContextBranches, NetworkBranches):
    """The branch model over an SD3 transformer: one forward, rows of each branch with that
    branch's text embeddings and pooled projections (stock order: unconditional first). Skipped
    blocks (SLG) act on their branch's rows inside that forward; the stock pipeline instead runs
    its skip-layer branch as a separate forward. NAG's negative text stream rides in partner rows
    of the same forward (:mod:`.joint_context_attention`), modulated by the prompt's pooled
    projections as in the authors' SD3 pipeline."""

    context_attention = "joint"  # NAG: their SD3 processor's L1 rule, alpha 0.125

    def check_alterations(self, branch, owner: str = "guidance") -> None:
        if branch.time_noise > 0:
            raise ValueError(f"guidance: method {owner!r} perturbs the time-step embedding, which is not available "
                             "for SD3 transformers")
        if branch.probe is not None:
            raise ValueError(f"guidance: method {owner!r} reads a plain self-attention map, which SD3 transformers "
                             "do not have (their joint attention mixes text and image tokens)")

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        model = self.model if model is None else model
        for _, _, branch in spans:
            self.check_alterations(branch)
        rows = x_in.shape[0]
        x_in, stacked, spans, negative_text = self.carry_negative_text(model, x_in, stacked, spans,
                                                                       own=("pooled_projections",))
        with negative_text, self.altered(model, x_in, spans) as plan:
            return model(hidden_states=x_in, timestep=timestep.expand(x_in.shape[0]),
                         encoder_hidden_states=stacked("encoder_hidden_states"),
                         pooled_projections=stacked("pooled_projections"),
                         joint_attention_kwargs=self._attention_kwargs(model, plan), return_dict=False)[0][:rows]


class GuidedStableDiffusion3Pipeline(GuidedPipelineMixin, StableDiffusion3Pipeline):
    """Stable Diffusion 3 text-to-image with any guidance method of the engine (flow models: CFG++,
    APG, CFG-Zero* and the rest work on the same x0/eps predictions)."""

    default_guidance_scale = 7.0

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        max_sequence_length: int = 256,
        mu: float | None = None,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        eta: float | None = None,
        particle_output: str = "draw",
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01,
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple:
        """Generate images. Arguments are the stock SD3 pipeline's (IP-Adapter excepted) plus
        ``guidance``, ``sampler``, ``eta`` and ``particle_output`` as in
        :meth:`GuidedStableDiffusionPipeline.__call__`; the default CFG scale is 7.0.
        ``reference_unet`` (keyword): autoguidance's reference network, a weaker SD3 transformer
        taking the same embeddings (default: from ``from_pretrained``/``from_pipe`` or the model
        directory's ``reference_unet/`` subfolder).

        ``skip_guidance_layers`` (with ``guidance=None``) is the stock skip-layer guidance: the
        engine's :class:`~guidance_engine.methods.slg.SLG` with the stock scale and window (stock
        ``n start < i < n stop``), its skip branch rows of the one batched forward."""
        reference = kwargs.pop("reference_unet", None)  # autoguidance's reference transformer
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"GuidedStableDiffusion3Pipeline: unsupported argument(s) {unsupported} "
                             "(IP-Adapter is not supported here)")
        if skip_guidance_layers is not None:
            guidance = conditions.stock_skip_layer_guidance(
                guidance, guidance_scale, self.default_guidance_scale, skip_guidance_layers, skip_layer_guidance_scale, skip_layer_guidance_start,
                skip_layer_guidance_stop, len(sigmas) if sigmas is not None else num_inference_steps)
            guidance_scale = None
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        particle_output = self.check_particle_output(particle_output)
        guide = self.for_prompts(self.resolve_guidance(guidance, guidance_scale), negative_prompt, negative_prompt_embeds)
        batch_size, shape = self.check_prompted_call(
            guide, prompt, prompt_embeds, (self.transformer.config.in_channels, height // self.vae_scale_factor,
                                           width // self.vae_scale_factor),
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps, sigmas=sigmas,
            sampler=sampler, eta=eta, generator=generator, latents=latents, output_type=output_type)
        cut = self.truncated_prompts(prompt=prompt, negative_prompt=negative_prompt)
        device = self._execution_device
        own_negative = conditions.negative_branch_inputs(guide, negative_prompt, negative_prompt_embeds, batch_size)
        if own_negative is not None:  # the negative prompt gets a branch of its own; "uncond" stays empty
            own_negative = (*own_negative, negative_prompt_2, negative_prompt_3, negative_pooled_prompt_embeds)
            negative_prompt = negative_prompt_2 = negative_prompt_3 = None
            negative_prompt_embeds = negative_pooled_prompt_embeds = None
        lora_scale = joint_attention_kwargs.get("scale") if joint_attention_kwargs else None
        (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
         negative_pooled_prompt_embeds) = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=True, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device, clip_skip=clip_skip,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=lora_scale)
        branches = TransformerBranches(self.transformer, {
            "cond": {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds},
            "uncond": {"encoder_hidden_states": negative_prompt_embeds,
                       "pooled_projections": negative_pooled_prompt_embeds},
        }, joint_attention_kwargs, networks={"reference": self.reference_network(guide, reference)})

        def encode_texts(texts, embeds=None, texts_2=None, texts_3=None, pooled=None) -> dict[str, torch.Tensor]:
            """A branch of other prompts (the negative's own, a method's), encoded as the prompt."""
            hidden, _, pooled, _ = self.encode_prompt(
                prompt=texts, prompt_2=texts_2, prompt_3=texts_3, do_classifier_free_guidance=False,
                prompt_embeds=embeds, pooled_prompt_embeds=pooled, device=device, clip_skip=clip_skip,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
                lora_scale=lora_scale)
            return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

        if own_negative is not None:
            conditions.add_negative_branch(branches, encode_texts(*own_negative))
        conditions.add_text_branches(self, branches, guide, encode_texts, batch_size=batch_size, generator=generator)

        shift: dict[str, Any] = {}
        if mu is not None:
            shift["mu"] = mu
        elif self.scheduler.config.get("use_dynamic_shifting", None):
            patch = self.transformer.config.patch_size
            config = self.scheduler.config
            shift["mu"] = calculate_shift((shape[2] // patch) * (shape[3] // patch),
                                          config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                          config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        latents, nfe_per_image, state = self.denoise(
            branches, guide, shape, dtype=prompt_embeds.dtype, device=device, generator=generator, latents=latents,
            particle_output=particle_output, sampler=sampler, num_inference_steps=num_inference_steps,
            timesteps=None, sigmas=sigmas, eta=eta, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={"prompt_embeds": ("cond", "encoder_hidden_states"),
                              "negative_prompt_embeds": ("uncond", "encoder_hidden_states"),
                              "pooled_prompt_embeds": ("cond", "pooled_projections"),
                              "negative_pooled_prompt_embeds": ("uncond", "pooled_projections")},
            set_timesteps_kwargs=shift,
            call_attributes={"_clip_skip": clip_skip, "_skip_layer_guidance_scale": skip_layer_guidance_scale})
        if output_type == "latent":
            image = latents
        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return self.guided_output(image, nfe_per_image, state, guide, sampler, warnings=cut)
