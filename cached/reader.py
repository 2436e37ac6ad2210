"""Send bytes of a cache entry to a client: sendfile from the sparse file, waiting on its fill.

The same loop serves a hit (everything present: one sendfile) and a reader that follows a
fill (send what is there, wait for the next progress event, repeat). The last byte of a
whole-image response is held back until the entry is verified, so a client never sees a
complete response for an image whose digest does not match.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import BinaryIO

from aiohttp import web

from cached.errors import FillAborted
from cached.fill import Fill, FillState
from cached.store import Entry

_FALLBACK_PIECE = 1 << 20

# Returns the image's current fill, started and asked to cover [pos, end), or None when the
# entry needs no fill (it is complete).
EnsureFill = Callable[[int, int, Fill | None], Awaitable[Fill | None]]


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


async def send_entry(
    request: web.Request,
    response: web.StreamResponse,
    entry: Entry,
    file: BinaryIO,
    start: int,
    end: int,
    current_fill: Callable[[], Fill | None],
    ensure_fill: EnsureFill,
) -> None:
    """Send bytes ``[start, end)`` of ``entry`` on the prepared response of ``request``.

    Raises FillAborted (the fill failed or the entry went invalid/was deleted) or
    ConnectionError (the client went away); the caller then cuts the connection.
    """
    pos = start
    followed: Fill | None = None
    while pos < end:
        if entry.state.value == "invalid":
            raise FillAborted(f"entry {entry.image_id} failed verification")
        if followed is not None:
            followed.raise_if_failed()  # an upstream failure ends this response too
        fill = None
        if not entry.complete:
            # Keep following our fill while it runs, even if the entry was deleted and the
            # fill left the registry; otherwise pick up whichever fill runs now.
            running = followed is not None and followed.state is FillState.RUNNING
            fill = followed if running else current_fill()
        followed = fill or followed
        # A fill knows what it wrote, also after it ended (a deleted entry publishes nothing).
        ready = followed.available(pos) if followed is not None else _present_end(entry, pos)
        limit = end
        verified = entry.complete or (followed is not None and followed.state is FillState.VERIFIED)
        if start == 0 and end == entry.size and not verified:
            limit = end - 1  # hold back the last byte until the digest matched
        ready = min(ready, limit)
        if ready > pos:
            await _send(request, response, file, pos, ready - pos)
            pos = ready
            continue
        if entry.complete:
            continue
        fill = await ensure_fill(pos, end, fill)
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
    try:
        await loop.sendfile(transport, file, offset, count, fallback=False)
        return
    except (NotImplementedError, asyncio.SendfileNotAvailableError):
        pass
    # TLS or a platform without sendfile: read in a thread, write through the response.
    while count > 0:
        data = await asyncio.to_thread(os.pread, file.fileno(), min(count, _FALLBACK_PIECE), offset)
        if not data:
            raise FillAborted("file shorter than its entry")
        await response.write(data)
        offset += len(data)
        count -= len(data)
