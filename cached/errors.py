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
    """The cache directory failed an operation (read-only, vanished, full, I/O error).

    Raised only for I/O on the cache directory; ``errno`` is the system error, if any.
    """

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class NotAdmitted(CachedError):
    """The cache does not take this image now; ``detail`` is the Cache-Status detail
    (``too-large``: never, by the admission rule; ``cache-full``: not while running fills
    hold the cache's max size; ``no-space``: not while the filesystem is short of its
    free-space floor)."""

    def __init__(self, detail: str, message: str):
        super().__init__(message)
        self.detail = detail


class FillAborted(CachedError):
    """A fill stopped before the bytes a reader waits for arrived."""
