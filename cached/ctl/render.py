"""Text output of ``cached-manage``: tables drawn like PrettyTable's default style (the
tables ``glance-cache-manage`` prints), ISO times and human sizes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

Align = Literal["l", "c", "r"]

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def _justify(text: str, width: int, align: Align) -> str:
    if align == "l":
        return text.ljust(width)
    if align == "r":
        return text.rjust(width)
    excess = width - len(text)
    half = excess // 2
    if excess % 2 == 0:
        return " " * half + text + " " * half
    # PrettyTable puts the odd space after text of odd length, before text of even length.
    if len(text) % 2:
        return " " * half + text + " " * (half + 1)
    return " " * (half + 1) + text + " " * half


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    align: dict[str, Align] | None = None,
) -> str:
    """Render ``rows`` under ``header`` as PrettyTable 3 does by default (columns centred
    unless ``align`` says otherwise; headers aligned like their column)."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(header)]
    aligns: list[Align] = [(align or {}).get(h, "c") for h in header]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(values: Sequence[str]) -> str:
        parts = (_justify(v, w, a) for v, w, a in zip(values, widths, aligns, strict=True))
        return "| " + " | ".join(parts) + " |"

    return "\n".join([rule, line(header), rule, *(line(row) for row in cells), rule])


def iso_time(epoch: float | int | None) -> str:
    """Epoch seconds as Glance prints them (naive UTC ISO 8601); ``N/A`` for 0 or missing."""
    if not epoch:
        return "N/A"
    return datetime.fromtimestamp(epoch, tz=UTC).replace(tzinfo=None).isoformat()


def human_size(size: int | None) -> str:
    """``1.0 GiB``, ``512 B`` (binary units); ``-`` when unknown."""
    if size is None:
        return "-"
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def percent(done: int | None, total: int | None) -> str:
    """``42.0%`` of ``total``; ``-`` when either is unknown."""
    if done is None or not total:
        return "-"
    return f"{100.0 * done / total:.1f}%"


def rate(bytes_per_second: float | None) -> str:
    """A transfer rate in MB/s (10**6 bytes, as download tools print it); ``-`` if unknown."""
    if bytes_per_second is None:
        return "-"
    return f"{bytes_per_second / 1e6:.1f} MB/s"
