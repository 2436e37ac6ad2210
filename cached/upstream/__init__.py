"""Backends: where image records and data come from, behind one small interface.

``glance`` is an HTTP upstream (the real image API); ``file`` is a directory laid out like
Glance's filesystem store. Only this package knows upstream HTTP. A backend only fetches:
records, authorisation answers and image bytes (plus, for Glance, one raw request sent as
given); answering a client's request is the proxy side's job (``cached/edge/passthrough.py`` for
Glance, ``cached/edge/fileapi.py`` for a file store). Nothing here imports ``aiohttp.web``.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

# Image bytes as they arrive: aiohttp's buffers, or views into them (never joined).
Buffer = bytes | memoryview

# Request headers that carry the caller's identity; a download authorisation is reused only
# for the exact same set of values.
_IDENTITY_EXACT = {"authorization", "cookie"}
_IDENTITY_SKIP_PREFIXES = ("x-forwarded-", "x-openstack-request-id", "x-real-ip")


@dataclass(frozen=True)
class Credentials:
    """The caller's identity-bearing headers, forwarded as they are to the upstream."""

    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Credentials:
        picked = []
        for name, value in headers.items():
            low = name.lower()
            if low in _IDENTITY_EXACT or (
                low.startswith("x-") and not low.startswith(_IDENTITY_SKIP_PREFIXES)
            ):
                picked.append((low, value))
        return cls(tuple(sorted(picked)))

    @classmethod
    def token(cls, token: str) -> Credentials:
        return cls((("x-auth-token", token),))

    def key(self) -> str:
        """A digest identifying these credentials (never log the token itself)."""
        h = hashlib.sha256()
        for name, value in self.headers:
            h.update(name.encode() + b"\0" + value.encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()

    def get(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


@dataclass(frozen=True)
class ImageRecord:
    """The fields of an image record (``GET /v2/images/{id}``) the cache relies on."""

    id: str
    status: str
    size: int | None
    checksum: str | None = None
    os_hash_algo: str | None = None
    os_hash_value: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    # raw holds only what a cache entry kept (its declared formats), not the upstream's
    # record: the other properties (e.g. the signature's) are not known.
    rebuilt: bool = field(default=False, compare=False)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ImageRecord:
        size = doc.get("size")
        return cls(
            id=str(doc.get("id")),
            status=str(doc.get("status")),
            size=size if isinstance(size, int) and size >= 0 else None,
            checksum=doc.get("checksum") or None,
            os_hash_algo=doc.get("os_hash_algo") or None,
            os_hash_value=doc.get("os_hash_value") or None,
            raw=doc,
        )


class Decision(enum.Enum):
    ALLOW = "allow"  # the caller may download the image
    DENY = "deny"  # the upstream refused: relay its answer
    NO_DATA = "no-data"  # the image has no data (Glance answers 204): relay, never cache


@dataclass(frozen=True)
class Authorization:
    """What the upstream said about one caller downloading one image."""

    decision: Decision
    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    request_id: str | None = None
    # ALLOW given by cached itself while the upstream failed (auth_stale_if_error): the
    # caller's credentials were allowed this image within that window
    # (cached/identity/authorizer.py).
    stale: bool = False


class DataStream(Protocol):
    """Image bytes from ``start`` on, in order."""

    start: int

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream, ``b""`` after it."""

    async def read_blocks(self, n: int) -> list[Buffer]:
        """Up to ``n`` bytes as the buffers they arrived in (no copy to join them); fewer
        only at the end of the stream."""


class Backend(Protocol):
    """The interface the proxy, the fills and the jobs use to reach the upstream."""

    async def authorize(
        self, image_id: str, creds: Credentials, accept: str | None = None
    ) -> Authorization:
        """Ask the upstream, with the caller's credentials, whether they may download it.

        ``accept``: the caller's ``Accept`` header (None: it sent none), sent with the
        question so that a refusal comes in the shape the upstream gives that caller."""

    async def record(self, image_id: str, creds: Credentials) -> ImageRecord:
        """The image record; raises UpstreamError with the upstream's answer otherwise."""

    def open_data(
        self, image_id: str, creds: Credentials, start: int, end: int | None
    ) -> AbstractAsyncContextManager[DataStream]:
        """Stream bytes ``[start, end)`` of the image (``end=None``: to its end, and the
        request asks for the whole image); raises UpstreamError/UpstreamUnavailable."""

    async def close(self) -> None:
        """Release connections."""
