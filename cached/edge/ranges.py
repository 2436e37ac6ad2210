"""HTTP Range requests (RFC 9110 §14): parse one ``bytes=`` range against a known size.

Pure functions, no shared state: safe from any thread or task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 9110 §14.1.1: ``first-pos "-" [ last-pos ]`` or ``"-" suffix-length``; positions are
# 1*DIGIT, and DIGIT is ASCII 0-9 only (RFC 5234 B.1): re.ASCII keeps Unicode digits ("١")
# out. Optional whitespace (OWS, SP/HTAB) is tolerated around the numbers.
_SPEC = re.compile(r"[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*", re.ASCII)
# Positions longer than this cannot address any image (2**64 has 20 digits); they are
# clamped instead of converted, so thousands of digits cost nothing and never overflow.
_MAX_DIGITS = 20
_HUGE = 10**_MAX_DIGITS


class RangeNotSatisfiable(Exception):
    """RFC 9110 §15.5.17: answer 416 with ``Content-Range: bytes */size``.

    ``detail``: Glance 33's second line for it (its 416 page)."""

    def __init__(self, detail: str = "Invalid Range header.") -> None:
        super().__init__(detail)
        self.detail = detail


class MalformedRange(ValueError):
    """The Range header is not valid syntax; answered 416 as Glance 33 does ("Invalid
    Range header."), never guessed at."""


class MultipleRanges(Exception):
    """More than one range: not served from the cache (passed to the upstream)."""


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, end)`` of a representation of ``size`` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end - 1}/{self.size}"


def _position(digits: str) -> int:
    """A position's value; anything beyond any image's size is clamped to a huge number."""
    digits = digits.lstrip("0") or "0"
    return _HUGE if len(digits) > _MAX_DIGITS else int(digits)


def parse(header: str | None, size: int) -> ByteRange | None:
    """The range asked for, or None for the whole representation.

    None also when the range unit is not ``bytes`` (ignored, §14.2), and for a suffix range
    on an empty image: §14.1.1 makes ``bytes=-N`` (N > 0) the one satisfiable range of a
    zero-length representation, and the whole of it (no bytes) is what it selects; since a
    ``206`` cannot describe an empty range, the answer is the whole, empty representation
    (``200``). Every other range of an empty image is not satisfiable.

    Raises:
        MalformedRange: not ``bytes=first-last``, ``bytes=first-`` or ``bytes=-suffix``.
        MultipleRanges: a comma-separated list.
        RangeNotSatisfiable: a first position at or past the end, a last position before
            the first, or a zero-length suffix.
    """
    if header is None:
        return None
    unit, sep, specs = header.partition("=")
    if not sep:
        raise MalformedRange(f"Range header is not 'bytes=first-last': {header[:80]!r}")
    if unit.strip(" \t").lower() != "bytes":
        return None
    parts = specs.split(",")
    if len(parts) > 1:
        raise MultipleRanges()
    match = _SPEC.fullmatch(parts[0])
    if not match or not (match.group(1) or match.group(2)):
        raise MalformedRange(f"Range header is not 'bytes=first-last': {header[:80]!r}")
    first, last = match.group(1), match.group(2)
    if not first:  # suffix: the last N bytes (§14.1.1)
        n = _position(last)
        if n == 0:
            raise RangeNotSatisfiable()
        if size == 0:
            return None
        return ByteRange(max(0, size - n), size, size)
    start = _position(first)
    if start >= size:
        raise RangeNotSatisfiable(
            "Invalid start position in Range header. Start position MUST be in the "
            f"inclusive range [0, {size - 1}]."
        )
    if not last:
        return ByteRange(start, size, size)
    stop = _position(last)
    if stop < start:
        raise RangeNotSatisfiable()
    return ByteRange(start, min(stop + 1, size), size)
