"""What the video families' branch models and outputs share (Wan, LTX-Video, HunyuanVideo 1.5).

:class:`VideoTransformerBranches` is a flow transformer's branch model whose layer alterations
are resolved by the family's ``resolve_layers`` (once per call and network) and driven by the
family's row-plan dispatcher (``install_dispatcher``, put in front of each altered module before
the forward); attention probes (SAG) are refused: a video transformer's self-attention runs over
every token of the clip, and the map it would record is tokens x tokens. Each family sets the two
functions from its ``*_attention`` module.

:class:`GuidedVideoPipelineOutput` is the output of every video pipeline: the engine's
:class:`~.common.GuidedPipelineOutput` whose ``images`` are videos, with ``frames`` (the stock
video outputs' name) the same object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .common import GuidedPipelineOutput
from .flow_transformer import TransformerBranches

__all__ = ["GuidedVideoPipelineOutput", "VideoTransformerBranches"]


class VideoTransformerBranches(TransformerBranches):
    """The branch model over a video transformer: layers by ``resolve_layers``, dispatchers by
    ``install_dispatcher``, no attention probes."""

    #: ``(model, perturbation, owner) -> [(name, module), ...]``: the modules a perturbation alters,
    #: ValueError naming ``layers`` otherwise.
    resolve_layers: ClassVar[Callable[..., list]]
    #: ``(module, kind)``: puts the family's row-plan dispatcher in front of an altered module, once.
    install_dispatcher: ClassVar[Callable[[Any, str], None]]

    @classmethod
    def refusal(cls, branch, owner: str = "guidance") -> str | None:
        if branch.probe is not None:
            return (f"guidance: method {owner!r} reads a self-attention map, which {cls.family} does not record "
                    "(its self-attention runs over every token of the video: the map is tokens x tokens)")
        return super().refusal(branch, owner)

    def layers(self, model, perturbation, owner: str = "guidance") -> list:
        """The family's blocks or attention layers that ``perturbation`` alters (resolved once per
        call and network)."""
        key = (id(model), perturbation.kind, perturbation.layers)
        if key not in self._layers:
            self._layers[key] = self.resolve_layers(model, perturbation, owner)
        return self._layers[key]

    def altered(self, model, x_in: torch.Tensor, spans: list[tuple[int, int, Any]], tokens: Any = None):
        for _, _, branch in spans:  # the family's dispatchers, which the shared row plan then drives
            if branch.perturb is not None:
                for _, module in self.layers(model, branch.perturb):
                    self.install_dispatcher(module, branch.perturb.kind)
        return super().altered(model, x_in, spans, tokens)


@dataclass
class GuidedVideoPipelineOutput(GuidedPipelineOutput):
    """:class:`~.common.GuidedPipelineOutput` whose ``images`` are videos; ``frames`` is the same
    object under the stock video outputs' name (``WanPipelineOutput.frames``, ...)."""

    @property
    def frames(self) -> Any:
        return self.images

    @classmethod
    def of(cls, output: GuidedPipelineOutput) -> GuidedVideoPipelineOutput:
        """``output``'s fields as a video output."""
        return cls(**{f.name: getattr(output, f.name) for f in dataclasses.fields(output)})
