"""A fill's byte sources: where each of its transfers takes its bytes from.

The seam for a second source of bytes (a sibling cache holding or fetching the image).
The state machine (cached/fill/machine.py) asks :meth:`Sources.pick` for a source per
transfer and opens it for a byte range; when a source that :attr:`ByteSource.hands_over`
fails, it asks again (the failed sources excluded) and resumes at the first byte the failed
one did not deliver, without knowing who the sources are. A source that does not hand over
(the upstream) fails the transfer as it always did: a driver's failure fails the fill, a
range transfer's loses its chunks.

Today there is one source, :class:`UpstreamSource`: the upstream backend, opened with the
fill's credentials (its service credentials, else the opener's).

Threads: everything here runs on the event loop; a source's stream is read there too. A
source keeps no state the fill shares: ``pick`` may be called for several transfers at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from cached.errors import UpstreamError
from cached.upstream import Backend, Credentials, DataStream

log = logging.getLogger("cached.fill")


class ByteSource(Protocol):
    """One place a transfer's bytes can come from."""

    @property
    def name(self) -> str:
        """For logs and metrics: ``upstream``, later a sibling's id."""

    @property
    def hands_over(self) -> bool:
        """Whether a failure of this source is handed to the next one (True for a sibling,
        whose failure says nothing of the image) or is the transfer's (the upstream)."""

    def open(
        self, image_id: str, start: int, end: int | None
    ) -> AbstractAsyncContextManager[DataStream]:
        """Stream bytes ``[start, end)`` (``end=None``: to the image's end); raises
        UpstreamError or UpstreamUnavailable (classified where they arise) when it cannot."""


class Sources(Protocol):
    """Chooses the source of each transfer."""

    async def pick(self, start: int, end: int, failed: Sequence[ByteSource]) -> ByteSource | None:
        """The source for bytes ``[start, end)``, none of ``failed``; None: no source is
        left (the transfer fails with the last source's error)."""


class UpstreamSource:
    """The upstream backend, opened with the credentials the fill gives it.

    ``renew(creds)`` is asked when the upstream answers 401 to ``creds`` before any byte: True
    means fresher credentials are to be had (the daemon's own token was revoked or expired
    early), and the open is tried once more with them; a caller's token is never renewed.
    """

    name = "upstream"
    hands_over = False

    def __init__(
        self,
        backend: Backend,
        credentials: Callable[[], Awaitable[Credentials]],
        renew: Callable[[Credentials], Awaitable[bool]] | None = None,
    ):
        self._backend = backend
        self._credentials = credentials
        self._renew = renew

    @asynccontextmanager
    async def open(self, image_id: str, start: int, end: int | None) -> AsyncIterator[DataStream]:
        creds = await self._credentials()
        async with contextlib.AsyncExitStack() as stack:
            try:
                stream = await stack.enter_async_context(
                    self._backend.open_data(image_id, creds, start, end)
                )
            except UpstreamError as exc:
                if exc.status != 401 or self._renew is None or not await self._renew(creds):
                    raise
                log.warning("the upstream refused the service token for %s: renewed", image_id)
                creds = await self._credentials()
                stream = await stack.enter_async_context(
                    self._backend.open_data(image_id, creds, start, end)
                )
            yield stream


class OneSource:
    """Every transfer from the one source given (today: the upstream)."""

    def __init__(self, source: ByteSource):
        self.source = source

    async def pick(self, start: int, end: int, failed: Sequence[ByteSource]) -> ByteSource | None:
        return None if self.source in failed else self.source
