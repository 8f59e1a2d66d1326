"""The one way the project writes JSON: strict JSON, never the bare ``NaN`` / ``Infinity``
that ``json.dumps`` writes by default and that other readers (jq, browsers, DuckDB, Spark)
refuse. A non-finite float is written as null: it can only be a measurement (a metric over
nothing, a diverged loss), since every setting refuses inf and nan when it is validated."""
from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float in it (in dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def to_json(value: Any, **kwargs) -> str:
    """``json.dumps(value, **kwargs)`` as strict JSON: the same text for finite values, so
    ids hashed from it do not change; null where a float is not finite."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
