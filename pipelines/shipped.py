"""Where the shipped default models live inside the package. A leaf module (no imports of the
package), so that the library, the toy world and the apps can all reach them."""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_dit_model_path", "default_distilled_model_path", "default_model_path"]

_SHIPPED = Path(__file__).resolve().parent / "default_model"


def default_model_path() -> Path:
    """The shipped default model's directory (diffusers format, trained by ``train_default``)."""
    if not (_SHIPPED / "model_index.json").is_file():
        raise FileNotFoundError(f"the default model is missing from the installation ({_SHIPPED}); "
                                "reinstall guidance-engine or pass --model")
    return _SHIPPED


_SHIPPED_DIT = Path(__file__).resolve().parent / "default_model_dit"


def default_dit_model_path() -> Path:
    """The shipped class-conditional default model (a tiny DiT, trained by ``train_dit``)."""
    if not (_SHIPPED_DIT / "model_index.json").is_file():
        raise FileNotFoundError(f"the class-conditional default model is missing from the installation "
                                f"({_SHIPPED_DIT}); reinstall guidance-engine or pass --model")
    return _SHIPPED_DIT


_SHIPPED_DISTILLED = Path(__file__).resolve().parent / "default_model_distilled"


def default_distilled_model_path() -> Path:
    """The shipped guidance-distilled default model: the default model's student with an embedded
    guidance scale (``time_cond_proj_dim``), trained by ``train_distilled``; a negative prompt does
    nothing on it unless a method such as NAG makes it act."""
    if not (_SHIPPED_DISTILLED / "model_index.json").is_file():
        raise FileNotFoundError(f"the guidance-distilled default model is missing from the installation "
                                f"({_SHIPPED_DISTILLED}); reinstall guidance-engine or pass --model")
    return _SHIPPED_DISTILLED
