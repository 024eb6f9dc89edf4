"""``GuidedLTXPipeline``: the stock LTX-Video text-to-video pipeline (flow matching; a video DiT,
``LTXVideoTransformer3DModel``, on the latent video packed into tokens (frames x rows x columns of
``patch_size_t`` x ``patch_size`` x ``patch_size`` patches), T5 embeddings of the prompt with their
padding mask, LTX's causal video VAE) with the engine's sampler core.

The stock recipe (diffusers 0.42.1 ``LTXPipeline.__call__``), reproduced bit for bit by
``guidance=None``: the unconditional (negative or empty prompt) and conditional rows in ONE
batched forward, in that order, combined as ``u + s (c - u)`` when ``guidance_scale`` s > 1 (else
the conditional forward alone), then Lin et al.'s rescale at ``guidance_rescale`` (per video, over
all its elements; the core takes the std over the unpacked latents, the stock loop over the packed
tokens: the same elements, equal bit for bit in the tests); latents drawn in float32 as (videos,
channels, frames, height, width) and cast
to the embeddings' dtype for each forward, the timestep per row, rotary positions scaled by
``rope_interpolation_scale = (temporal compression / frame_rate, spatial, spatial)``; the
schedule ``sigmas = linspace(1, 1/n, n)`` with the dynamic shift ``mu`` of the video's token
count; the scheduler stepped with ``scheduler.step``; decoding de-normalises (``z * std /
scaling_factor + mean`` per channel) and, with a timestep-conditioned VAE (LTX-Video 0.9.1+),
noises the latents to ``decode_noise_scale`` with noise drawn from ``generator`` after the loop
and decodes at ``decode_timestep``. The core keeps the latents unpacked; the branch model packs
them for each forward and unpacks the output (a permutation, so the stock arithmetic is kept).

Spatio-temporal skip guidance (STG, Hyung et al., arXiv 2411.18664; their LTX pipelines in
junhahyung/stguidance, ``diffusers/ltxvideo/pipeline_stg_ltx.py``): ``u + s (c - u) + w (c - p)``
with p the conditional prediction of the network altered in chosen blocks, the three branches in
one forward, which is the engine's perturbation guidance. Their STG-A (identity self-attention,
``to_out(to_v(x))``) is ``guidance={"name": "pag", "scale": s, "pag_scale": w, "layers": [19]}``;
their STG-R (the self-attention's output replaced by its input) is ``{"name": "slg", "scale": s,
"slg_scale": w, "layers": ["transformer_blocks.19.attn1"], "start": 0.0, "stop": 1.0}``, where
``layers=[19]`` would skip the whole block (the engine's SLG, SD 3.5's). Their recipe: s = 3 (the
stock CFG), w = 1, block 19, every step. Their ``do_rescaling`` (``g *= 0.7 std(c) / std(g) +
0.3`` after the STG term) is ``"rescale": 0.7`` on either (or the call's ``guidance_rescale=0.7``):
Lin et al.'s form after the perturbation term, per video where theirs takes one std over the
whole batch (:mod:`guidance_engine.methods.perturbed`).

Layer methods alter LTX's blocks through :mod:`.ltx_attention`: SLG's skipped blocks (or
self-attentions), PAG's identity and SEG's per-frame blurred queries on the self-attention, NAG on
the cross-attention (each context with its own text mask), TSG's noise on the time-step MLP
(``time_embed.emb.timestep_embedder``); SAG is refused.

Deviations from the stock pipeline, each where the stock call fails or mixes prompts up: with
several prompts of different token lengths and ``num_videos_per_prompt > 1``, the stock encoder
repeats the embeddings per prompt (p0, p0, p1, p1) but their padding masks per batch (p0, p1,
p0, p1) (``_get_t5_prompt_embeds``; Qwen-Image's diffusers issue #13581), here every video gets
its own prompt's mask; given ``prompt_embeds`` / ``negative_prompt_embeds`` are repeated per video
(the stock call fails there); a number ``decode_timestep`` / ``decode_noise_scale`` is repeated
per video (the stock call repeats it per prompt and fails with several videos per prompt);
custom ``timesteps`` are refused (the stock call always sets its sigmas too and fails);
``callback_on_step_end``'s ``prompt_embeds`` are the conditional branch's (the stock loop passes
the unconditional and conditional embeddings concatenated). The stock per-call attributes
(``pipe.guidance_scale``, ``pipe.num_timesteps``, ``interrupt``) are each call's own
(:class:`~.common.CallAttribute`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from diffusers import LTXPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift
from diffusers.utils.torch_utils import randn_tensor

from guidance_engine.guidance import Branch, Guidance

from . import conditions
from .common import TEXT_LOCK, GuidanceSpec, GuidedPipelineMixin
from .context_attention import BoundContext
from .flow_transformer import negative_prompt_texts, packed_callback
from .ltx_attention import install_dispatcher, ltx_video_tokens, resolve_ltx_layers, text_mask_bias
from .messages import PromptTruncatedWarning
from .video_branches import GuidedVideoPipelineOutput, VideoTransformerBranches
from .wan_attention import VideoTokens

__all__ = ["GuidedLTXPipeline", "GuidedLTXPipelineOutput", "LTXBranches"]

#: The stock ``guidance_scale`` (what ``guidance=None`` uses when it is not given).
STOCK_GUIDANCE_SCALE = 3.0
#: The callback names of the branch embeddings (the stock loop's ``prompt_embeds`` holds both branches).
CALLBACK_TENSORS = {"prompt_embeds": ("cond", "encoder_hidden_states"),
                    "negative_prompt_embeds": ("uncond", "encoder_hidden_states")}


@dataclass(frozen=True)
class LatentVideo:
    """One video's latent grid (``frames`` x ``height`` x ``width``) and the transformer's patch
    sizes: how the stock pipeline packs it into tokens and unpacks the output."""

    frames: int
    height: int
    width: int
    patch: int = 1
    patch_t: int = 1

    @property
    def tokens(self) -> VideoTokens:
        return VideoTokens(self.frames // self.patch_t, self.height // self.patch, self.width // self.patch)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> (B, tokens, C * p_t * p * p): the stock ``_pack_latents``."""
        return LTXPipeline._pack_latents(latents, self.patch, self.patch_t)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`pack`: the stock ``_unpack_latents``."""
        return LTXPipeline._unpack_latents(tokens, self.tokens.frames, self.tokens.rows, self.tokens.columns,
                                           self.patch, self.patch_t)


def check_embeddings(prompts: int, **pairs: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
    """ValueError (before any model call) unless each given embedding is a (prompts, tokens,
    width) tensor and its mask a (prompts, tokens) tensor (``pairs``: name -> (embeds, mask))."""
    for name, (embeds, mask) in pairs.items():
        if embeds is None:
            continue
        if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[0] != prompts:
            got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(f"{name}: expected a (prompts, tokens, width) tensor with {prompts} rows (one per "
                             f"prompt), got {got}")
        mask_name = name.replace("_embeds", "_attention_mask")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(embeds.shape[:2]):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{mask_name}: expected a tensor of shape {tuple(embeds.shape[:2])} (one entry per "
                             f"token of {name}), got {got}")


class LTXBranches(VideoTransformerBranches):
    """The branch model over LTX-Video's transformer. ``conditions[b]`` holds branch ``b``'s T5
    embeddings (``encoder_hidden_states``) and their padding mask (``encoder_attention_mask``).
    The branches' rows run in ONE forward, in the requested order (``uncond`` then ``cond`` for
    CFG), as the stock loop batches them; latents (float32 in the core) are packed into tokens and
    cast to the embeddings' dtype, the output unpacked and cast to float32, as the stock loop."""

    family = "GuidedLTXPipeline"
    separate_forwards = False  # the stock CFG is one batched forward of (uncond, cond)
    # SLG's skipped blocks or self-attentions, PAG's identity and SEG's blur on attn1, NAG on attn2
    # (.ltx_attention); TSG's noise on the time-step MLP; SAG's attention map is refused.
    evaluates_crops = False  # its token layout (packing, positions) is the whole latent's
    perturbations = frozenset({"identity", "blur", "skip", "extrapolate"})
    time_noise = True
    resolve_layers = staticmethod(resolve_ltx_layers)
    install_dispatcher = staticmethod(install_dispatcher)

    def __init__(self, model, conditions: dict[str, dict[str, torch.Tensor]], *, video: LatentVideo,
                 rope_interpolation_scale: tuple[float, float, float], attention_kwargs: dict[str, Any] | None = None,
                 providers: Any = None, networks: Any = None) -> None:
        super().__init__(model, conditions, attention_kwargs, providers=providers, networks=networks)
        self.video = video
        self.rope_interpolation_scale = rope_interpolation_scale

    def time_embeddings(self, model) -> list[Any]:
        """TSG's noise goes on the time-step MLP's output (the embedding before LTX projects it into
        the blocks' six modulation vectors; the output norm's shift and scale read it too)."""
        return [model.time_embed.emb.timestep_embedder]

    def projected_context(self, model, branch, dtype: torch.dtype):
        """``branch`` with a bound second context (NAG's negative prompt) as the layers it alters see
        their own: projected by ``model``'s caption projection, its mask made the additive bias."""
        bound = branch.perturb
        if not isinstance(bound, BoundContext):
            return branch
        context = {"encoder_hidden_states": model.caption_projection(bound.context["encoder_hidden_states"]),
                   "encoder_attention_mask": text_mask_bias(bound.context["encoder_attention_mask"], dtype)}
        return Branch(branch, base=branch.base, time_noise=branch.time_noise, generator=branch.generator,
                      perturb=BoundContext(bound.spec, context), network=branch.network, probe=branch.probe)

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        model = self.model if model is None else model
        for _, _, branch in spans:
            self.check_alterations(branch)
        embeds = stacked("encoder_hidden_states")
        spans = [(start, end, self.projected_context(model, branch, embeds.dtype)) for start, end, branch in spans]
        tokens = self.video.tokens
        with self.altered(model, x_in, spans), ltx_video_tokens(tokens):
            out = model(hidden_states=self.video.pack(x_in).to(embeds.dtype), encoder_hidden_states=embeds,
                        timestep=timestep.expand(x_in.shape[0]),
                        encoder_attention_mask=stacked("encoder_attention_mask"), num_frames=tokens.frames,
                        height=tokens.rows, width=tokens.columns,
                        rope_interpolation_scale=self.rope_interpolation_scale,
                        attention_kwargs=self.cross_attention_kwargs, return_dict=False)[0]
        return self.video.unpack(out.float())


#: The output of :class:`GuidedLTXPipeline` (the video families' one class, under its earlier name).
GuidedLTXPipelineOutput = GuidedVideoPipelineOutput


class GuidedLTXPipeline(GuidedPipelineMixin, LTXPipeline):
    """LTX-Video text-to-video with any guidance method of the engine.

    ``guidance=None`` is the stock recipe: CFG at ``guidance_scale`` (default 3.0; the conditional
    forward alone when <= 1) with ``guidance_rescale``. With a method (``guidance="apg"``, a dict
    or an object), ``guidance_scale`` (when given) is its ``scale`` and ``guidance_rescale`` (when
    > 0) its ``rescale``; its unconditional branch is the negative prompt, else the empty prompt."""

    default_guidance_scale = STOCK_GUIDANCE_SCALE  # the stock default

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 512,
        width: int = 704,
        num_frames: int = 161,
        frame_rate: int = 25,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        decode_timestep: float | list[float] = 0.0,
        decode_noise_scale: float | list[float] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        max_sequence_length: int = 128,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        eta: float | None = None,
        particle_output: str = "draw",
        **kwargs: Any,
    ) -> GuidedLTXPipelineOutput | tuple:
        """Generate videos. Arguments are the stock LTX pipeline's plus ``guidance``, ``sampler``,
        ``eta`` and ``particle_output`` as in :meth:`GuidedStableDiffusionPipeline.__call__`.

        Args:
            height, width: pixels, multiples of 32 (the stock check).
            num_frames: frames of each video, an integer >= 1 (``8 k + 1`` recommended by LTX; the
                latent video has ``(num_frames - 1) // temporal compression + 1`` frames).
            frame_rate: frames per second, a number > 0; it scales the rotary positions in time.
            timesteps: not supported (the stock call sets its own sigmas and fails with them); None.
            guidance_scale: with ``guidance=None``, the stock CFG scale in [0, 100] (None: the stock
                3.0; it guides only when > 1); with a method name or dict, that method's ``scale``
                (None: the method's default). Must not be set with a guidance object.
            guidance_rescale: Lin et al.'s rescale phi in [0, 1] on the CFG output (0: off).
            num_videos_per_prompt: videos per prompt, an integer >= 1.
            latents: packed float32 noise, (videos, tokens, channels) as the stock pipeline takes
                it; ``callback_on_step_end`` sees and returns this shape; ``output_type="latent"``
                returns it.
            prompt_attention_mask, negative_prompt_attention_mask: the (prompts, tokens) masks of
                given embeddings (required with them, as stock).
            decode_timestep, decode_noise_scale: with a timestep-conditioned VAE, the timestep it
                decodes at and the fraction of fresh noise mixed in first (None: the timestep),
                each a number or a list of one per video.
            max_sequence_length: T5 tokens per prompt (padded to it, as stock), an integer >= 1; a
                longer prompt is cut, with a :class:`PromptTruncatedWarning`.
            reference_unet: (keyword) autoguidance's reference network, a weaker LTX transformer
                taking the same embeddings.

        Returns:
            :class:`GuidedLTXPipelineOutput` (its ``frames`` as the stock output's), or ``(video,)``.
        """
        reference = kwargs.pop("reference_unet", None)
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"{type(self).__name__}: unsupported argument(s) {unsupported}")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt=prompt, height=height, width=width,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          prompt_attention_mask=prompt_attention_mask,
                          negative_prompt_attention_mask=negative_prompt_attention_mask)
        self.check_video_call(timesteps, frame_rate, num_videos_per_prompt=num_videos_per_prompt,
                              num_frames=num_frames, max_sequence_length=max_sequence_length)
        particle_output = self.check_particle_output(particle_output)
        guide = self.for_prompts(self.call_guidance(guidance, guidance_scale, guidance_rescale),
                                 negative_prompt, negative_prompt_embeds)
        LTXBranches.check_method(guide)
        spatial, temporal = self.vae_spatial_compression_ratio, self.vae_temporal_compression_ratio
        video = LatentVideo((num_frames - 1) // temporal + 1, height // spatial, width // spatial,
                            self.transformer_spatial_patch_size, self.transformer_temporal_patch_size)
        channels = self.transformer.config.in_channels
        batch_size, packed = self.check_prompted_call(  # latents are checked packed, as the stock call takes them
            guide, prompt, prompt_embeds, (video.tokens.count, channels * video.patch_t * video.patch ** 2),
            num_images_per_prompt=num_videos_per_prompt, num_inference_steps=num_inference_steps, sampler=sampler,
            eta=eta, generator=generator, latents=latents, output_type=output_type)
        rows = packed[0]
        check_embeddings(batch_size, prompt_embeds=(prompt_embeds, prompt_attention_mask),
                         negative_prompt_embeds=(negative_prompt_embeds, negative_prompt_attention_mask))
        decode_at = self.decode_schedule(decode_timestep, decode_noise_scale, rows) \
            if self.vae.config.timestep_conditioning and output_type != "latent" else None
        own_negative = conditions.negative_branch_inputs(guide, negative_prompt, negative_prompt_embeds, batch_size)
        if own_negative is not None:  # the negative prompt gets a branch of its own; "uncond" stays empty
            own_negative = (own_negative[0], own_negative[1], negative_prompt_attention_mask)
            negative_prompt = negative_prompt_embeds = negative_prompt_attention_mask = None
        negative = negative_prompt_texts(negative_prompt, negative_prompt_embeds, batch_size)
        cut = self.truncated_t5_prompts(max_sequence_length, prompt=prompt, negative_prompt=negative)

        def encode(texts, embeds=None, mask=None) -> dict[str, torch.Tensor]:
            return self.prompt_condition(texts, embeds, mask, num_videos_per_prompt, max_sequence_length)

        by_branch = {"cond": encode(prompt, prompt_embeds, prompt_attention_mask),
                     "uncond": encode(negative, negative_prompt_embeds, negative_prompt_attention_mask)}
        branches = LTXBranches(
            self.transformer, by_branch, video=video,
            rope_interpolation_scale=(temporal / frame_rate, spatial, spatial), attention_kwargs=attention_kwargs,
            networks={"reference": self.reference_network(guide, reference)})
        if own_negative is not None:
            conditions.add_negative_branch(branches, encode(*own_negative))
        conditions.add_text_branches(self, branches, guide, encode, batch_size=batch_size,
                                     generator=generator)  # a method's own prompts; ICG's random ones
        latents, nfe_per_image, state = self.run_core(
            branches, guide, video, rows, channels, generator=generator, latents=latents,
            particle_output=particle_output, sampler=sampler, eta=eta, num_inference_steps=num_inference_steps,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        if output_type == "latent":
            frames = video.pack(latents)
        else:
            frames = self.decode_video(latents, by_branch["cond"]["encoder_hidden_states"].dtype, generator,
                                       decode_at, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return GuidedVideoPipelineOutput.of(self.guided_output(frames, nfe_per_image, state, guide, sampler,
                                                               warnings=cut))

    def run_core(self, branches: LTXBranches, guide: Guidance, video: LatentVideo, rows: int, channels: int, *,
                 latents: torch.Tensor | None, callback_on_step_end, callback_on_step_end_tensor_inputs: list[str],
                 **run: Any) -> tuple[torch.Tensor, list[int], Any]:
        """The stock schedule (``linspace(1, 1/n, n)`` with ``mu`` of the video's token count) on the
        core; packed ``latents`` and callbacks seen packed, as the stock loop holds them. Returns
        (unpacked latents, NFEs per video, the method's final state)."""
        steps = run["num_inference_steps"]
        config = self.scheduler.config
        mu = calculate_shift(video.frames * video.height * video.width, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        if latents is not None:
            latents = video.unpack(latents)
        if callback_on_step_end is not None:
            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
            callback_on_step_end = packed_callback(callback_on_step_end, video.height, video.width,
                                                   pack=video.pack, unpack=lambda tokens, h, w: video.unpack(tokens))
        return self.denoise(
            branches, guide, (rows, channels, video.frames, video.height, video.width), dtype=torch.float32,
            device=self._execution_device, latents=latents, timesteps=None,
            sigmas=np.linspace(1.0, 1 / steps, steps), callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, callback_tensors=CALLBACK_TENSORS,
            set_timesteps_kwargs={"mu": mu}, **run)

    def check_video_call(self, timesteps, frame_rate: float, **counts: Any) -> None:
        """The checks the stock call lacks (before any model call): each of ``counts`` an integer
        >= 1, ``frame_rate`` a number > 0, no custom ``timesteps``."""
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        if isinstance(frame_rate, bool) or not isinstance(frame_rate, (int, float)) or not frame_rate > 0:
            raise ValueError(f"frame_rate: must be a number > 0 (frames per second), got {frame_rate!r}")
        if timesteps is not None:
            raise ValueError("timesteps: not supported; the stock LTXPipeline sets its own sigmas (linspace(1, 1/n, "
                             f"n) with the shift mu) and fails given timesteps too, got {timesteps!r}")

    def call_guidance(self, guidance: GuidanceSpec, guidance_scale: float | None, guidance_rescale: float) -> Guidance:
        """The call's method: the stock recipe for ``guidance=None`` (CFG with rescale when the
        scale is > 1, else the conditional alone), or the named one at ``guidance_scale``."""
        if guidance is not None:
            return self.resolve_guidance(guidance, guidance_scale, guidance_rescale)
        scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale <= 1:
            return self.resolve_guidance(None, 1.0)  # the stock loop's do_classifier_free_guidance is off
        return self.resolve_guidance(None, scale, guidance_rescale)

    @staticmethod
    def decode_schedule(decode_timestep, decode_noise_scale, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timestep per video, noise fraction per video) of a timestep-conditioned decode: numbers
        repeated per video, lists of one per video; the noise fraction defaults to the timestep."""
        def per_video(name: str, value) -> list[float]:
            values = value if isinstance(value, (list, tuple)) else [value] * rows
            if len(values) != rows or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in values):
                raise ValueError(f"{name}: expected a number or a list of {rows} numbers (one per video), "
                                 f"got {value!r}")
            return [float(v) for v in values]

        timestep = per_video("decode_timestep", decode_timestep)
        noise = timestep if decode_noise_scale is None else per_video("decode_noise_scale", decode_noise_scale)
        return torch.tensor(timestep), torch.tensor(noise)

    def prompt_condition(self, texts: list[str] | str | None, embeds: torch.Tensor | None, mask: torch.Tensor | None,
                         num_videos_per_prompt: int, max_sequence_length: int) -> dict[str, torch.Tensor]:
        """One branch's conditioning, one row per video: the stock T5 encoding of ``texts`` (or the
        given ``embeds`` with their ``mask``), each prompt's embeddings and mask repeated for its
        videos together (the stock encoder repeats the masks per batch instead)."""
        device = self._execution_device
        if embeds is None:
            embeds, mask, _, _ = self.encode_prompt(prompt=texts, do_classifier_free_guidance=False,
                                                    num_videos_per_prompt=1, max_sequence_length=max_sequence_length,
                                                    device=device)
        return {"encoder_hidden_states": embeds.to(device).repeat_interleave(num_videos_per_prompt, dim=0),
                "encoder_attention_mask": mask.to(device).repeat_interleave(num_videos_per_prompt, dim=0)}

    def truncated_t5_prompts(self, max_sequence_length: int, **texts: str | list[str] | None) -> list[str]:
        """One sentence per prompt whose T5 tokens (with the end token) exceed ``max_sequence_length``
        (the stock pipeline cuts them with a log line), each also issued as a
        :class:`PromptTruncatedWarning`."""
        messages = []
        for name, value in texts.items():
            for text in [value] if isinstance(value, str) else value or []:
                with TEXT_LOCK:
                    ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
                    if len(ids) > max_sequence_length:
                        cut = self.tokenizer.decode(ids[max_sequence_length - 1:], skip_special_tokens=True)
                        messages.append(f"{name}: {text!r} is {len(ids)} tokens with the end token, the text encoder "
                                        f"reads {max_sequence_length} (max_sequence_length); cut: {cut!r}")
        for message in messages:  # at the caller of pipe(...) (through torch's no_grad wrapper)
            warnings.warn(message, PromptTruncatedWarning, stacklevel=4)
        return messages

    def decode_video(self, latents: torch.Tensor, dtype: torch.dtype, generator,
                     decode_at: tuple[torch.Tensor, torch.Tensor] | None, output_type: str) -> Any:
        """The stock decoding: de-normalised latents in the embeddings' ``dtype``; with a
        timestep-conditioned VAE, noised by ``decode_at``'s fraction of noise drawn from
        ``generator`` (after the loop, as stock) and decoded at its timestep; the video processor."""
        device = self._execution_device
        vae = self.vae
        latents = self._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        latents = latents.to(dtype)
        timestep = None
        if decode_at is not None:
            noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
            timestep = decode_at[0].to(device, latents.dtype)
            scale = decode_at[1].to(device, latents.dtype)[:, None, None, None, None]
            latents = (1 - scale) * latents + scale * noise
        video = vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)
