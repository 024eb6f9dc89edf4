"""Strict JSON for everything the project writes (manifests, PNG metadata): no ``Infinity`` or
``NaN`` tokens, which JSON.parse and most JSON readers reject.

A non-finite float is written as the string "inf", "-inf" or "nan"; :func:`resolve_guidance`
reads those strings back as floats for numeric method parameters (``sigma_max: "inf"``).
"""

from __future__ import annotations

import json
import math
from typing import Any

NON_FINITE: dict[str, float] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan,
                                "Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def to_strict(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts, lists, tuples) replaced by its name."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: to_strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`to_strict` (``value``), refusing any non-finite number left."""
    return json.dumps(to_strict(value), allow_nan=False, default=lambda o: to_strict(str(o)), **kwargs)
