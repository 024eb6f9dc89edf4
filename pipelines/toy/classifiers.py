"""The shipped attribute classifiers: ``eval`` scores images (the evaluation kit), ``guide`` is
GFCG's guide classifier on the shapes classes. Small CNNs on 32 x 32 RGB, one head per attribute."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..shipped import default_model_path
from . import shapes

__all__ = ["ARCHITECTURES", "ATTRIBUTE_HEADS", "AttributeClassifier", "classifier_path", "forget_classifier",
           "load_classifier"]


#: Output classes of each attribute head.
ATTRIBUTE_HEADS = {name: len(values) for name, values in shapes.ATTRIBUTES.items()}

#: Classifier architectures: ``eval`` (VGG-like, max-pooling, ReLU) and ``guide`` (strided, SiLU).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "eval": {"style": "vgg", "channels": [32, 64, 96], "feature_dim": 128, "seed": 101, "data_seed": 1001},
    "guide": {"style": "strided", "channels": [24, 48, 96], "feature_dim": 96, "seed": 202, "data_seed": 2002},
}


def classifier_path(kind: str = "eval") -> Path:
    """Path of a shipped classifier's safetensors file."""
    return default_model_path() / "classifiers" / f"{kind}.safetensors"


class AttributeClassifier(nn.Module):
    """Small CNN: 32 x 32 RGB -> ``feature_dim`` features -> one linear head per attribute."""

    def __init__(self, style: str = "vgg", channels: Sequence[int] = (32, 64, 96), feature_dim: int = 128,
                 **_: Any) -> None:
        super().__init__()
        self.config = {"style": style, "channels": list(channels), "feature_dim": feature_dim}
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            if style == "vgg":
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                           nn.MaxPool2d(2)]
            elif style == "strided":
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(4, c), nn.SiLU(),
                           nn.Conv2d(c, c, 4, stride=2, padding=1), nn.SiLU()]
            else:
                raise ValueError(f"unknown classifier style {style!r}")
            c_in = c
        self.body = nn.Sequential(*layers)
        side = shapes.IMAGE_SIZE // 2 ** len(channels)
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in ATTRIBUTE_HEADS.items()})

    @staticmethod
    def prepare(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (array or tensor) -> float NCHW in [-1, 1]; float tensors pass through."""
        if isinstance(images, np.ndarray):
            images = np.ascontiguousarray(images)
            if not images.flags.writeable:  # e.g. np.asarray(a PIL image): torch warns on read-only memory
                images = images.copy()
            images = torch.from_numpy(images)
        if images.dtype == torch.uint8:
            images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return images

    def features(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Penultimate features (used for the Frechet distance and diversity)."""
        return self.neck(self.body(self.prepare(images)))

    def forward(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute."""
        f = self.features(images)
        return {name: head(f) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Predicted class index per attribute (``int64 [n]``)."""
        outs: dict[str, list[np.ndarray]] = {name: [] for name in ATTRIBUTE_HEADS}
        for i in range(0, len(images), batch_size):
            for name, logits in self(images[i:i + batch_size]).items():
                outs[name].append(logits.argmax(-1).cpu().numpy())
        return {name: np.concatenate(v) for name, v in outs.items()}

    @torch.no_grad()
    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> np.ndarray:
        return np.concatenate([self.features(images[i:i + batch_size]).cpu().numpy()
                               for i in range(0, len(images), batch_size)]).astype(np.float64)


_CLASSIFIER_CACHE: dict[tuple[str, str], AttributeClassifier] = {}


def load_classifier(kind: str = "eval", path: str | os.PathLike[str] | None = None) -> AttributeClassifier:
    """Load a shipped classifier (``"eval"`` or ``"guide"``) or one from ``path``; in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else classifier_path(kind)
    key = (kind, str(path))
    if key not in _CLASSIFIER_CACHE:
        with safe_open(str(path), "pt") as f:
            config = json.loads(f.metadata()["config"])
        model = AttributeClassifier(**config)
        model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        _CLASSIFIER_CACHE[key] = model.eval().requires_grad_(False)
    return _CLASSIFIER_CACHE[key]


def forget_classifier(kind: str, path: str | os.PathLike[str]) -> None:
    """Drop a cached classifier (after it was retrained into ``path``)."""
    _CLASSIFIER_CACHE.pop((kind, str(path)), None)
