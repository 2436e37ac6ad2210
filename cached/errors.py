"""Domain exceptions, raised by the store and the backends and mapped to HTTP in one place."""

from __future__ import annotations


class CachedError(Exception):
    """Base class of every error cached raises on purpose."""


class ConfigError(CachedError):
    """A configuration file or flag is invalid; the message names the key and the file."""


class UpstreamError(CachedError):
    """The upstream answered with a status we pass on to the caller unchanged.

    Attributes:
        status: the upstream HTTP status.
        body: the upstream body (bounded), relayed verbatim.
        headers: the upstream headers worth relaying (content type, request id).
    """

    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.headers = headers or {}


class UpstreamUnavailable(CachedError):
    """The upstream could not be reached, or a transfer from it broke off."""


class ChecksumMismatch(CachedError):
    """A filled entry's digest differs from the one the image record promises."""


class StoreUnavailable(CachedError):
    """The cache directory cannot be written (read-only, vanished, full)."""


class FillAborted(CachedError):
    """A fill stopped before the bytes a reader waits for arrived."""
