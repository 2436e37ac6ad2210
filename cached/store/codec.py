"""Bounded decoding of the small JSON documents kept in xattrs.

Every xattr is input we did not necessarily write: an operator, a restore tool or an
attacker with access to the cache directory may have set it. :func:`loads_object` checks the
length and the nesting depth *before* ``json.loads`` runs (whose recursion a deeply nested
document would exhaust), refuses ``NaN``/``Infinity`` and numbers that do not fit a double,
and raises nothing but :class:`ValueError`.

Pure functions, no shared state: any thread may call them.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_JSON = 4096  # bytes; our documents are a few hundred
MAX_DEPTH = 4  # an object of scalars is depth 1; nothing we write goes deeper than 2


def _depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in ``text``, ignoring brackets inside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:32]}")
    return value


def loads_object(
    raw: bytes, *, max_len: int = MAX_JSON, max_depth: int = MAX_DEPTH
) -> dict[str, Any]:
    """Decode ``raw`` as a JSON object within ``max_len`` bytes and ``max_depth`` levels.

    Raises:
        ValueError: anything else (not UTF-8, not JSON, too long, too deep, not an object,
            a non-finite number, an integer of more digits than Python converts).
    """
    if len(raw) > max_len:
        raise ValueError(f"{len(raw)} bytes of JSON (at most {max_len})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc.reason}") from None
    if _depth(text) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth}")
    try:
        doc = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:  # cannot happen after the depth check; never let it escape
        raise ValueError("JSON nested too deep") from None
    if not isinstance(doc, dict):
        raise ValueError(f"JSON {type(doc).__name__}, expected an object")
    return doc


def dumps(doc: dict[str, Any]) -> bytes:
    """The compact encoding :func:`loads_object` reads back."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def int_field(doc: dict[str, Any], name: str, *, low: int, high: int) -> int:
    """``doc[name]`` as an integer within ``[low, high]`` (a JSON integer, not a float/bool)."""
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: {_show(value)} is not an integer")
    if not low <= value <= high:
        raise ValueError(f"{name}: {value} not within [{low}, {high}]")
    return value


def str_field(doc: dict[str, Any], name: str, *, max_len: int = 256) -> str | None:
    """``doc[name]`` as a string of at most ``max_len`` characters, or None if absent/null."""
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise ValueError(f"{name}: {_show(value)} is not a string of <= {max_len} characters")
    return value


def float_field(doc: dict[str, Any], name: str, *, default: float | None) -> float | None:
    """``doc[name]`` as a finite number (JSON integer or float), ``default`` if absent/null."""
    value = doc.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: {_show(value)} is not a number")
    try:
        result = float(value)
    except OverflowError:
        raise ValueError(f"{name}: out of range") from None
    if not math.isfinite(result):
        raise ValueError(f"{name}: out of range")
    return result


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
