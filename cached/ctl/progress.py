"""Fetch progress of queued images: cached's ``GET /v2/cache/progress`` (see cached/manage/api.py).

It answers ``{"progress": {"<image id>": {"state", "bytes_done", "size", "rate", ...}}}`` for
every queued image and every image being filled. Glance has no such resource (404): then
nothing is known and ``list-queued`` shows ``-``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cached.ctl.client import Client, HostError


@dataclass(frozen=True)
class Progress:
    """How far the fetch of one image is; None where the daemon did not say."""

    state: str | None = None  # fetching, waiting, queued, failed
    bytes_done: int | None = None
    size: int | None = None
    rate: float | None = None  # bytes per second from the upstream
    failures: int | None = None
    last_error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "bytes_done": self.bytes_done,
            "size": self.size,
            "rate": self.rate,
            "failures": self.failures,
            "last_error": self.last_error,
        }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def parse(document: Any) -> dict[str, Progress]:
    """The entries of a ``GET /v2/cache/progress`` answer; malformed ones are left out."""
    entries = document.get("progress") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        return {}
    return {
        str(image_id): Progress(
            _str(e.get("state")),
            _int(e.get("bytes_done")),
            _int(e.get("size")),
            _number(e.get("rate")),
            _int(e.get("failures")),
            _str(e.get("last_error")),
        )
        for image_id, e in entries.items()
        if isinstance(e, dict)
    }


def directory_problems(document: Any) -> list[str]:
    """One line per directory of a ``GET /v2/cache/progress`` answer that is not ``ok``:
    the daemon passes through (cache) or answers 503 (store), and says why."""
    directories = document.get("directories") if isinstance(document, dict) else None
    lines = []
    for d in directories if isinstance(directories, list) else []:
        if isinstance(d, dict) and d.get("state") not in (None, "ok"):
            lines.append(
                f"{d.get('name', '?')} directory {d.get('directory', '?')} is "
                f"{d.get('state')} since {d.get('since', '?')}: {d.get('reason', '')}"
            )
    return lines


async def fetch_status(client: Client) -> tuple[dict[str, Progress], list[str]]:
    """Progress per image ID and the directory problems of one host (empty if the host
    reports neither)."""
    try:
        status, document = await client.get_json("/v2/cache/progress")
    except HostError:
        return {}, []
    if status != 200:
        return {}, []
    return parse(document), directory_problems(document)
