"""``GuidedDiTPipeline``: diffusers' class-conditional ``DiTPipeline`` with the engine's sampler core.

Every branch is rows of ONE forward of the transformer (``Transformer2DModel`` or
``DiTTransformer2DModel``) with that branch's class labels: the asked classes, the null class,
GFCG's reference classes, ICG's random classes.

What is matched and what is not (tests/test_dit.py):

* The null class is read from the model: ``num_embeds_ada_norm`` classes, and the label
  embedding's extra row (index ``num_embeds_ada_norm``, present when it was trained with class
  dropout) is the null class. The stock pipeline hard-codes 1000, right for ImageNet DiT only.
* Stock CFG is reproduced bit for bit for ``guidance_scale >= 1``: same noise, rows in the stock
  order (conditional first, then null), the same lerp on the first ``latent_channels`` output
  channels, the same scheduler steps and decoding. Learned-sigma models (``out_channels = 2 x
  latent channels``): the stock pipeline guides the eps half only and steps with it, dropping the
  variance half; so do we. Stock ignores ``guidance_scale <= 1`` (no guidance); here a scale
  below 1 extrapolates towards the null class, as the engine's CFG does everywhere.
* Class labels are checked (``[0, num_classes)``) before any model call; names from the model's
  ``id2label`` are accepted too.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel, Transformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from diffusers.schedulers import KarrasDiffusionSchedulers

from . import conditions
from .branches import NetworkBranches
from .common import GuidanceSpec, GuidedPipelineMixin, GuidedPipelineOutput


def null_class_label(transformer) -> int | None:
    """The null class of a class-conditional DiT: ``num_embeds_ada_norm`` when its label
    embedding has the extra (class-dropout) row; None when it has none (no CFG possible)."""
    classes = transformer.config.get("num_embeds_ada_norm")
    if classes is None:
        return None
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            return int(classes) if module.embedding_table.num_embeddings > module.num_classes else None
    return None


class DiTBranches(NetworkBranches):
    """The branch model over a DiT transformer: one forward, each branch's rows with its class
    labels; the output's first ``latent_channels`` channels (the eps half of learned-sigma
    models). Rows go in the stock order (conditional before null)."""

    def __init__(self, transformer, conditions, latent_channels: int, providers=None, networks=None) -> None:
        super().__init__(transformer, conditions, providers=providers, networks=networks)
        self.latent_channels = latent_channels

    def check_alterations(self, branch, owner: str = "guidance") -> None:
        """Altered layers (PAG, SEG, SLG) and SAG's attention probe act on the DiT blocks'
        self-attention, TSG's noise on the blocks' time-step embeddings."""
        if branch.time_noise > 0 and not self.time_embeddings(self.model):
            raise ValueError(f"guidance: method {owner!r} perturbs the DiT blocks' time-step embeddings "
                             f"(norm1.emb.timestep_embedder); {type(self.model).__name__} has none")

    def time_embeddings(self, model) -> list:
        """Every block's time-step MLP (``norm1.emb.timestep_embedder``; the final layer reuses block
        0's): TSG adds one noise draw per forward to each, before the class embedding is added."""
        return [module for name, module in model.named_modules() if name.endswith("norm1.emb.timestep_embedder")]

    def __call__(self, x, timestep, requests):
        order = {"cond": 0, "uncond": 1}  # the stock DiT batch is [class labels, null labels]
        return super().__call__(x, timestep, sorted(requests, key=lambda r: order.get(str(r[0]), 2)))

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, stacked: Callable[[str], torch.Tensor | None],
                spans: list[tuple[int, int, Any]], model=None) -> torch.Tensor:
        model = self.model if model is None else model
        for _, _, branch in spans:
            self.check_alterations(branch)
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        t = t.reshape(-1)[:1].to(x_in.device).expand(x_in.shape[0])
        with self.altered(model, x_in, spans):
            out = model(x_in, timestep=t, class_labels=stacked("class_labels")).sample
        return out[:, :self.latent_channels] if out.shape[1] != self.latent_channels else out


class GuidedDiTPipeline(GuidedPipelineMixin, DiTPipeline):
    """Class-conditional DiT generation with any guidance method of the engine that needs only
    class conditionings (CFG, CFG++, APG, AG, ICG with random classes, GFCG, FKC, ...).

    Load like the stock pipeline (``GuidedDiTPipeline.from_pretrained(path)``) or convert one
    (``GuidedDiTPipeline.from_pipe(stock_pipe)``).
    """

    default_guidance_scale = 4.0

    def __init__(self, transformer: Transformer2DModel | DiTTransformer2DModel, vae: AutoencoderKL,
                 scheduler: KarrasDiffusionSchedulers, id2label: dict | None = None):
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        if id2label is not None:  # saved into model_index.json, as in the DiT checkpoints
            self.register_to_config(id2label={str(k): v for k, v in id2label.items()})
        self.id2label = {int(k): v for k, v in (id2label or {}).items()}

    # -- classes -----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def null_class(self) -> int | None:
        """The null class label of this model (None: trained without class dropout)."""
        return null_class_label(self.transformer)

    def class_ids(self, class_labels: int | str | Sequence[int | str] | torch.Tensor) -> list[int]:
        """Class ids of ``class_labels`` (ints or names from ``id2label``), checked against the
        model's class count before any model call."""
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                if label not in self.labels:
                    raise ValueError(f"class_labels: unknown class name {label!r}; known: {sorted(self.labels)}")
                label = self.labels[label]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_classes:
                raise ValueError(f"class_labels: must be integers in [0, {self.num_classes}) or class names, "
                                 f"got {label!r}")
            ids.append(int(label))
        if not ids:
            raise ValueError("class_labels: give at least one class")
        return ids

    def class_name(self, k: int) -> str:
        return self.id2label.get(int(k), str(k))

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        output_type: str | None = "pil",
        return_dict: bool = True,
        latents: torch.Tensor | None = None,
        guidance: GuidanceSpec = None,
        sampler: str | None = None,
        eta: float | None = None,
        particle_output: str = "draw",
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock style)
        gfcg_classifier=None,
        reference_unet=None,
    ) -> GuidedPipelineOutput | tuple:
        """Generate one image per class label. Arguments are the stock DiT pipeline's, plus:

        Args:
            guidance_scale: CFG's scale when ``guidance`` is None (default 4.0, the stock one);
                with a method name or dict, that method's ``scale``.
            latents: initial noise ``[batch, C, S, S]`` (default: drawn from ``generator`` as
                the stock pipeline draws it).
            guidance, sampler, eta, particle_output: as in
                :meth:`GuidedStableDiffusionPipeline.__call__`.
            gfcg_classifier: GFCG's guide classifier: a callable mapping decoded images
                (``[-1, 1]``, NCHW) to logits over this model's classes; default: the shipped
                "guide" attribute classifier when the model's classes are the shapes classes.
            callback_on_step_end: ``callback(pipe, i, t, {"latents": ..., "class_labels": ...})``.
            reference_unet: autoguidance's reference network, a weaker DiT with the same classes
                (default: from ``from_pretrained``/``from_pipe`` or the model directory's
                ``reference_unet/`` subfolder).

        Returns:
            :class:`GuidedPipelineOutput` (images, ``nfe`` per image, guidance config and state).
        """
        ids = self.class_ids(class_labels)
        particle_output = self.check_particle_output(particle_output)
        guide = self.resolve_guidance(guidance, guidance_scale)
        size, channels = self.transformer.config.sample_size, self.transformer.config.in_channels
        self.check_call(guide, shape=(len(ids), channels, size, size), num_inference_steps=num_inference_steps,
                        sampler=sampler, eta=eta, generator=generator, latents=latents, output_type=output_type)
        device = self._execution_device
        labels = torch.tensor(ids, device=device).reshape(-1)
        null = self.null_class
        labelled = {"cond": {"class_labels": labels}}
        if null is not None:
            labelled["uncond"] = {"class_labels": torch.full_like(labels, null)}
        branches = DiTBranches(self.transformer, labelled, self.transformer.config.in_channels,
                               providers=conditions.independent_class_conditions(self.num_classes, len(ids),
                                                                                 generator, device),
                               networks={"reference": self.reference_network(guide, reference_unet)})
        if null is None and "uncond" in guide.required_branches():
            raise ValueError(f"guidance: method {guide.name!r} needs the null class, which this transformer lacks "
                             "(its label embedding has no class-dropout row)")
        guide = conditions.attach_dit_gfcg(self, guide, branches, labels, gfcg_classifier)

        latents, nfe_per_image, state = self.denoise(
            branches, guide, (len(ids), channels, size, size), dtype=self.transformer.dtype, device=device,
            generator=generator, latents=latents, particle_output=particle_output, sampler=sampler,
            num_inference_steps=num_inference_steps, timesteps=None, sigmas=None, eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={"class_labels": ("cond", "class_labels")})
        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents_to_images(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return self.guided_output(images, nfe_per_image, state, guide, sampler)

    def decode_latents_to_images(self, latents: torch.Tensor, output_type: str = "pt"):
        """The stock DiT decoding: ``1 / scaling_factor * latents`` through the VAE, to [0, 1]."""
        latents = 1 / self.vae.config.scaling_factor * latents
        samples = self.vae.decode(latents.to(self.vae.dtype)).sample
        samples = (samples / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return samples
        samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(samples) if output_type == "pil" else samples
