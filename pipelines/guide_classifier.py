"""What GFCG needs from a pipeline: the guide classifier on decoded denoised estimates, the asked
class of every row, and a conditioning per class (branches ``gfcg_class_<k>``).

The shapes classes (the class-conditional default model, and GFCG on the text-to-image default
model) are shape x colour, 12 of them, class ``k = shape_index * 4 + colour_index`` over
:data:`~guidance_engine.pipelines.toy.shapes.SHAPES` and :data:`~guidance_engine.pipelines.toy.shapes.COLORS`
(0 "red circle", 1 "green circle", ..., 11 "yellow triangle"). Their probabilities are the
product of the guide classifier's shape and colour heads (softmax each): the heads are trained
as independent attributes. Only the "guide" classifier is ever used here; the "eval" one
measures the results.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from guidance_engine.guidance import Guidance
from guidance_engine.methods.gfcg import GFCG, class_branch

from .toy import shapes

#: class id -> (shape, colour) of the shapes classes; names "red circle", "green circle", ...
SHAPE_CLASSES: tuple[tuple[str, str], ...] = tuple((s, c) for s in shapes.SHAPES for c in shapes.COLORS)
ID2LABEL: dict[int, str] = {k: f"{c} {s}" for k, (s, c) in enumerate(SHAPE_CLASSES)}


def shape_class(shape: int | str, color: int | str) -> int:
    """The class id of a (shape, colour) pair, given as indices or names."""
    s = shapes.SHAPES.index(shape) if isinstance(shape, str) else int(shape)
    c = shapes.COLORS.index(color) if isinstance(color, str) else int(color)
    return s * len(shapes.COLORS) + c


def shapes_class_probabilities(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, 12] class probabilities from an attribute classifier's shape and colour logits."""
    p_shape = logits["shape"].float().softmax(-1)
    p_color = logits["color"].float().softmax(-1)
    return (p_shape[:, :, None] * p_color[:, None, :]).flatten(1)


class DecodedClassifier:
    """GFCG's :class:`~guidance_engine.methods.gfcg.GuideClassifier`: decode the denoised latents
    (``decode``: latents -> images in [-1, 1]), classify them in inference mode."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor],
                 probabilities: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, num_classes: int):
        self.decode, self.probabilities = decode, probabilities
        self.targets = targets.reshape(-1).long().cpu()
        self.num_classes = int(num_classes)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            images = self.decode(x0).float().clamp(-1, 1)
            return self.probabilities(images)


#: Load the guide classifier from this file instead of the shipped one (benchmarks of retrained ones).
GUIDE_CLASSIFIER_PATH: str | None = None


def shapes_guide_probabilities() -> Callable[[torch.Tensor], torch.Tensor]:
    """Images -> shapes-class probabilities with the shipped "guide" classifier."""
    from .toy.classifiers import load_classifier

    classifier = load_classifier("guide", GUIDE_CLASSIFIER_PATH)

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        return shapes_class_probabilities(classifier(images.to("cpu")))

    return probabilities


def is_shapes_model(id2label: dict[int, str]) -> bool:
    return {int(k): v for k, v in id2label.items()} == ID2LABEL


# ----------------------------------------------------------------------------- DiT
def attach_dit_gfcg(pipe, guide: Guidance, branches, labels: torch.Tensor, classifier=None) -> Guidance:
    """For GFCG on a :class:`GuidedDiTPipeline`: a branch per class (its label), the decoded
    classifier (``classifier``: images -> logits over the model's classes; default the shipped
    guide classifier for the shapes classes), bound to ``guide``. Other methods: unchanged."""
    if not isinstance(guide, GFCG):
        return guide
    n = pipe.num_classes
    for k in range(n):
        branches.conditions[class_branch(k)] = {"class_labels": torch.full_like(labels, k)}
    if classifier is not None:
        def probabilities(images: torch.Tensor) -> torch.Tensor:
            return classifier(images).float().softmax(-1)
    elif is_shapes_model(pipe.id2label):
        probabilities = shapes_guide_probabilities()
    else:
        raise ValueError("gfcg_classifier: GFCG needs a classifier of this model's classes (a callable mapping "
                         "images in [-1, 1] to logits over them); the shipped one knows only the shapes classes")

    def decode(x0: torch.Tensor) -> torch.Tensor:
        return pipe.vae.decode((1 / pipe.vae.config.scaling_factor * x0).to(pipe.vae.dtype)).sample

    return guide.with_classifier(DecodedClassifier(decode, probabilities, labels, n))


# ----------------------------------------------------------------------------- text-to-image
_SHAPE_WORD = re.compile(r"\b(circle|square|triangle)(s?)\b")


def swap_prompt(prompt: str, shape: str, color: str) -> str:
    """``prompt`` with its shape word (plural kept) and shape colour (the first colour word not
    naming the background) replaced: "two red circles on a blue background" -> "two green
    squares on a blue background"."""
    prompt = _SHAPE_WORD.sub(lambda m: shape + m.group(2), prompt, count=1)
    words = list(re.finditer(r"[A-Za-z]+", prompt))
    for i, m in enumerate(words):
        nxt = words[i + 1].group(0).lower() if i + 1 < len(words) else ""
        if m.group(0).lower() in shapes.COLORS and nxt != "background":
            return prompt[:m.start()] + color + prompt[m.end():]
    return prompt


def prompt_class(prompt: str) -> int:
    """The shapes class a prompt asks for; ValueError when it names no shape or no colour."""
    want = shapes.parse_prompt(prompt)
    if want["shape"] < 0 or want["color"] < 0:
        raise ValueError(f"prompt: GFCG on text-to-image needs prompts naming a shape ({', '.join(shapes.SHAPES)}) "
                         f"and its colour ({', '.join(shapes.COLORS)}) to define the classes, got {prompt!r}")
    return shape_class(want["shape"], want["color"])


def attach_text_gfcg(pipe, guide: Guidance, branches, prompt: str | Sequence[str] | None, num_images_per_prompt: int,
                     encode: Callable[[list[str]], torch.Tensor]) -> Guidance:
    """For GFCG on the text-to-image pipeline: the classes are the shapes classes, each row's
    reference branch ``gfcg_class_<k>`` sees its own prompt with shape and colour swapped to
    class k (encoded once per call, on first use), the classifier sees the VAE-decoded estimate."""
    if not isinstance(guide, GFCG):
        return guide
    if prompt is None:
        raise ValueError("prompt: GFCG on text-to-image needs prompt text (not prompt_embeds) to build the "
                         "reference prompts")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    targets = torch.tensor([prompt_class(p) for p in prompts]).repeat_interleave(num_images_per_prompt)
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def provider(k: int) -> Callable[[], dict[str, torch.Tensor]]:
        def condition() -> dict[str, torch.Tensor]:
            if k not in cache:
                shape, color = SHAPE_CLASSES[k]
                cache[k] = {"encoder_hidden_states": encode([swap_prompt(p, shape, color) for p in prompts])}
            return cache[k]
        return condition

    for k in range(len(SHAPE_CLASSES)):
        branches.providers[class_branch(k)] = provider(k)

    def decode(x0: torch.Tensor) -> torch.Tensor:
        return pipe.vae.decode((x0 / pipe.vae.config.scaling_factor).to(pipe.vae.dtype)).sample

    return guide.with_classifier(DecodedClassifier(decode, shapes_guide_probabilities(), targets, len(SHAPE_CLASSES)))
