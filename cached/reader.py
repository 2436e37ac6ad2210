"""Send bytes of a cache entry to a client: sendfile from the sparse file, waiting on its fill.

The same loop serves a hit (everything present: one sendfile) and a reader that follows a
fill (send what is there, wait for the next progress event, repeat). A reader only ever
follows a fill of *its own* entry: if the entry is deleted and the image cached anew, the
new entry's fill is not this reader's business. The last byte of a whole-image response is
held back until the entry is verified, so a client never sees a complete response for an
image whose digest does not match.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import BinaryIO

from aiohttp import web

from cached import metrics
from cached.errors import FillAborted
from cached.fill import Fill, FillState
from cached.store import Entry, State

_FALLBACK_PIECE = 1 << 20
# At most this much per sendfile: a hit, too, sees its entry go invalid (scrub) between slices.
_SLICE = 16 << 20

# Returns the active fill of the reader's entry, asked to cover [pos, end), and a mark for
# Fill.check; (None, 0) when the entry needs no fill (it is complete).
EnsureFill = Callable[[int, int], Awaitable[tuple[Fill | None, int]]]


def _present_end(entry: Entry, pos: int) -> int:
    """End of the durable bytes from ``pos`` (for an entry no fill is working on)."""
    if entry.complete:
        return entry.size
    c = pos // entry.chunk_size
    if c not in entry.present:
        return pos
    while c + 1 < entry.chunk_count and c + 1 in entry.present:
        c += 1
    return entry.chunk_bounds(c)[1]


@dataclass
class Progress:
    """How far a response got: bytes before ``pos`` went to the client."""

    pos: int


async def send_entry(
    request: web.Request,
    response: web.StreamResponse,
    entry: Entry,
    file: BinaryIO,
    start: int,
    end: int,
    fill_of_entry: Callable[[], Fill | None],
    ensure_fill: EnsureFill,
    progress: Progress | None = None,
    following: tuple[Fill, int] | None = None,
) -> None:
    """Send bytes ``[start, end)`` of ``entry`` on the prepared response of ``request``.

    Raises FillAborted (the fill failed, the range it needed was lost, the entry went
    invalid or was deleted; its ``__cause__`` says why) or ConnectionError (the client went
    away). ``progress.pos`` tells the caller how far the response got, so it can finish it
    from elsewhere or cut the connection. ``following`` is the fill the caller attached the
    reader to and the mark its demand returned: the reader follows it from the first byte, so
    a fill that fails before the reader first looks still ends this response (it is not
    silently replaced by a new fill).
    """
    progress = progress if progress is not None else Progress(start)
    pos = progress.pos = start
    followed, mark = following if following is not None else (None, 0)
    while pos < end:
        if entry.state is State.INVALID:
            raise FillAborted(f"entry {entry.image_id} failed verification")
        if followed is not None:
            followed.check(pos, mark)  # an upstream failure ends this response too
        if not entry.complete and (followed is None or not followed.state.active):
            followed = fill_of_entry() or followed
        # A fill knows what it wrote, also after it ended (a deleted entry publishes nothing).
        ready = followed.available(pos) if followed is not None else _present_end(entry, pos)
        limit = end
        verified = entry.complete or (followed is not None and followed.state is FillState.VERIFIED)
        if start == 0 and end == entry.size and not verified:
            limit = end - 1  # hold back the last byte until the digest matched
        ready = min(ready, limit, pos + _SLICE)
        if ready > pos:
            await _send(request, response, file, pos, ready - pos)
            pos = progress.pos = ready
            continue
        if entry.complete:
            continue
        fill, mark = await ensure_fill(pos, end)
        if fill is None:
            continue
        followed = fill
        if fill.available(pos) <= pos or pos >= limit:
            await fill.wait()


async def _send(
    request: web.Request, response: web.StreamResponse, file: BinaryIO, offset: int, count: int
) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    loop = asyncio.get_running_loop()
    if transport.get_extra_info("sslcontext") is None:  # TLS: asyncio refuses (RuntimeError)
        try:
            await loop.sendfile(transport, file, offset, count, fallback=False)
            metrics.sent(count)
            return
        except (NotImplementedError, asyncio.SendfileNotAvailableError):
            pass
    # TLS or a platform without sendfile: read in a thread, write through the response.
    while count > 0:
        data = await asyncio.to_thread(os.pread, file.fileno(), min(count, _FALLBACK_PIECE), offset)
        if not data:
            raise FillAborted("file shorter than its entry")
        await response.write(data)
        metrics.sent(len(data))
        offset += len(data)
        count -= len(data)
