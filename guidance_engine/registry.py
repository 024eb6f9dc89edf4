"""Methods by name: the CLI, dict configs and ``guidance="apg"`` in the pipelines resolve here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, TypeVar

if TYPE_CHECKING:
    from .guidance import Guidance

_METHODS: dict[str, type] = {}
G = TypeVar("G", bound=type)


def register(cls: G) -> G:
    """Class decorator: make a guidance method available under ``cls.name``."""
    if not cls.name or cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"cannot register {cls.__name__} under the name {cls.name!r}")
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Every registered method name, sorted (the built-in ones register when ``guidance_engine``
    imports its ``methods`` package, before anything can ask)."""
    return sorted(_METHODS)


def method_class(name: str) -> type[Guidance]:
    """The class registered under ``name``; ValueError listing the known names otherwise."""
    known = method_names()
    if name not in _METHODS:
        raise ValueError(f"guidance: unknown method {name!r}; known methods: {', '.join(known)}")
    return _METHODS[name]


def resolve_guidance(spec: Guidance | str | Mapping[str, Any], **overrides: Any) -> Guidance:
    """A guidance object from an object, a method name, or a dict ``{"name": ..., **params}``.

    ``overrides`` (e.g. ``scale`` from the CLI) are applied on top; unknown parameter names raise
    ValueError listing the method's parameters.
    """
    from .guidance import Guidance

    if isinstance(spec, Guidance):
        return spec.new(**overrides) if overrides else spec
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError("guidance: a dict config needs a 'name' key naming the method")
        params = dict(spec)
        name = params.pop("name")
    else:
        raise ValueError(f"guidance: expected a Guidance object, a method name or a dict, got {type(spec).__name__}")
    cls = method_class(name)
    params.update(overrides)
    allowed = {f.name for f in cls.parameters()}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"guidance: method {name!r} has no parameter(s) {', '.join(unknown)}; "
                         f"its parameters are {', '.join(sorted(allowed))}")
    from .strict_json import NON_FINITE

    numeric = {f.name for f in cls.parameters() if "low" in f.metadata and f.metadata.get("choices") is None}
    for key, value in params.items():  # strict JSON writes inf as "inf" (manifests, PNG metadata)
        if key in numeric and isinstance(value, str) and value in NON_FINITE:
            params[key] = NON_FINITE[value]
    return cls(**params)
