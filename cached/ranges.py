"""HTTP Range requests (RFC 9110 §14): parse one ``bytes=`` range against a known size."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


class RangeNotSatisfiable(Exception):
    """RFC 9110 §15.5.17: answer 416 with ``Content-Range: bytes */size``."""


class MalformedRange(ValueError):
    """The Range header is not valid syntax; we answer 400 rather than guess."""


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


def parse(header: str | None, size: int) -> ByteRange | None:
    """The range asked for, or None for the whole representation.

    A range unit other than ``bytes`` is ignored (§14.2), as is a Range on an empty image.
    """
    if header is None:
        return None
    unit, sep, specs = header.partition("=")
    if not sep:
        raise MalformedRange(f"Range header is not 'bytes=first-last': {header[:80]!r}")
    if unit.strip().lower() != "bytes":
        return None
    parts = specs.split(",")
    if len(parts) > 1:
        raise MultipleRanges()
    match = _SPEC.match(parts[0])
    if not match or not (match.group(1) or match.group(2)):
        raise MalformedRange(f"Range header is not 'bytes=first-last': {header[:80]!r}")
    first, last = match.group(1), match.group(2)
    if size == 0:
        raise RangeNotSatisfiable()
    if not first:  # suffix: the last N bytes (§14.1.2)
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable()
        return ByteRange(max(0, size - n), size, size)
    start = int(first)
    if start >= size:
        raise RangeNotSatisfiable()
    end = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        raise RangeNotSatisfiable()
    return ByteRange(start, end, size)
