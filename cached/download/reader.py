"""Send bytes of a cache entry to a client: sendfile from the sparse file, waiting on its fill.

The same loop serves a hit (everything present: one sendfile) and a reader that follows a
fill (send what is there, wait for the next progress event, repeat). A reader only ever
follows a fill of *its own* entry: if the entry is deleted and the image cached anew, the
new entry's fill is not this reader's business. The last byte of a whole-image response is
held back until the entry is verified, so a client never sees a complete response for an
image whose digest does not match.

Where the file is read (issue 10): ``os.sendfile`` reads the cache file in the kernel, so
on a share whose server stopped answering (a hard NFS mount) the call blocks the thread that
made it. Hits from a network or FUSE filesystem (:attr:`Guard.sends_in_threads`)
are therefore sent by the cache guard's bounded I/O threads: the loop waits until the socket
takes bytes, a thread sends what fits (the socket is non-blocking) and returns, and the loop
stops waiting for a thread that hangs once the guard says the directory is ``hung`` (the
response is then cut). Hits from a local disk stay on the loop (``loop.sendfile``): a local
disk answers or fails with ``EIO``, and the loop path is the fastest. Only the task serving
a response touches its socket and file; a thread stuck in the kernel holds its own
duplicates of both descriptors, closed when it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from aiohttp import web

from cached import metrics
from cached.cachedir.guard import Guard
from cached.errors import FillAborted, StoreUnavailable
from cached.fill.machine import Fill, FillState
from cached.store import Entry, State

# The cache directory's guard, if the app has one: it says where hits are read (see above).
CACHE_GUARD = web.AppKey("cache_guard", Guard)

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
            await _send(request, response, file, pos, ready - pos, progress)
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
    request: web.Request,
    response: web.StreamResponse,
    file: BinaryIO,
    offset: int,
    count: int,
    progress: Progress,
) -> None:
    """Send ``count`` bytes of ``file`` from ``offset``; ``progress.pos`` follows every piece
    that went out, so a caller that finishes the response from elsewhere after an error
    resumes at the right byte."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    loop = asyncio.get_running_loop()
    guard = request.config_dict.get(CACHE_GUARD)
    threaded = guard is not None and guard.sends_in_threads
    if transport.get_extra_info("sslcontext") is None:  # TLS: asyncio refuses (RuntimeError)
        if threaded:
            assert guard is not None
            await _sendfile_in_threads(guard, transport, file, offset, count, progress)
            return
        try:
            await loop.sendfile(transport, file, offset, count, fallback=False)
            metrics.sent(count)
            return
        except (NotImplementedError, asyncio.SendfileNotAvailableError):
            pass
    # TLS or a platform without sendfile: read in a thread, write through the response.
    while count > 0:
        piece = min(count, _FALLBACK_PIECE)
        if threaded:
            assert guard is not None
            data = await _read_in_threads(guard, file, piece, offset)
        else:
            # The cache guard's threads when there is a guard (never the default executor).
            executor = guard.executor if guard is not None else None
            data = await loop.run_in_executor(executor, os.pread, file.fileno(), piece, offset)
        if not data:
            raise FillAborted("file shorter than its entry")
        await response.write(data)  # counted by the response writer (not sent by sendfile)
        offset += len(data)
        count -= len(data)
        progress.pos = offset


async def _read_in_threads(guard: Guard, file: BinaryIO, size: int, offset: int) -> bytes:
    """``pread`` on the guard's I/O threads; a read still hanging when the guard says hung
    ends the response as a failed cache read (the caller relays the rest from the upstream:
    nothing of that read ever reaches the socket)."""
    loop = asyncio.get_running_loop()
    fd = os.dup(file.fileno())  # the thread's own (the caller may close the file meanwhile)
    job = loop.run_in_executor(guard.executor, _pread_and_close, fd, size, offset)
    job.add_done_callback(_retrieved)  # an abandoned read's late error is no news
    hung = guard.when_hung()
    try:
        await asyncio.wait((job, hung), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hung.cancel()
    if not job.done():
        cause = StoreUnavailable(f"{guard.directory} is hung: a cache read did not return")
        raise FillAborted("cache directory hung") from cause
    try:
        return job.result()
    except OSError as exc:
        guard.report(exc)
        raise


def _pread_and_close(fd: int, size: int, offset: int) -> bytes:
    """An I/O thread: read, then close the duplicate (closing a file on FUSE can block)."""
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


class _Sendfile:
    """One :func:`_send` by sendfile on I/O threads: the duplicated socket and file
    descriptors it owns. ``in_fd`` is closed by the thread that ends the transfer (closing a
    file on a share can block too), or by one more I/O job if the loop stopped first."""

    def __init__(self, out_fd: int, in_fd: int):
        self.out_fd, self.in_fd = out_fd, in_fd
        self.stop = threading.Event()  # the loop gave up: send nothing more
        self.in_closed = False

    def some(self, offset: int, count: int) -> int:
        """An I/O thread: send up to ``count`` bytes from ``offset`` on the non-blocking
        socket. Returns the bytes sent: fewer than ``count`` means the socket is full; -1 -
        sent that the transfer is over (done, the file ended, or the loop gave up)."""
        sent = 0
        try:
            while sent < count and not self.stop.is_set():
                try:
                    n = os.sendfile(self.out_fd, self.in_fd, offset + sent, count - sent)
                except BlockingIOError:
                    return sent
                if n == 0:
                    break  # the file ended early
                sent += n
        except BaseException:
            self.close_file()
            raise
        self.close_file()
        return -1 - sent

    def close_file(self) -> None:
        if not self.in_closed:
            self.in_closed = True
            os.close(self.in_fd)


async def _sendfile_in_threads(
    guard: Guard,
    transport: asyncio.BaseTransport,
    file: BinaryIO,
    offset: int,
    count: int,
    progress: Progress,
) -> None:
    """``os.sendfile`` on the guard's I/O threads; the loop only waits for the socket."""
    loop = asyncio.get_running_loop()
    executor = guard.executor
    assert executor is not None
    sock = transport.get_extra_info("socket")
    # Duplicates: the loop may wait on the socket while the transport owns its descriptor,
    # and a thread stuck on the share keeps valid descriptors after the response is gone.
    sending = _Sendfile(os.dup(sock.fileno()), os.dup(file.fileno()))
    hung = guard.when_hung()
    job: asyncio.Future[int] | None = None
    try:
        # What the transport still holds (the headers, if the socket was full) goes first.
        while isinstance(transport, asyncio.WriteTransport) and transport.get_write_buffer_size():
            await _writable(loop, sending.out_fd)
        while True:
            job = loop.run_in_executor(executor, sending.some, offset, count)
            await asyncio.wait((job, hung), return_when=asyncio.FIRST_COMPLETED)
            if not job.done():
                # Its thread waits on the share. It must never write into this socket again,
                # and the client must learn its download is short: shut the socket down.
                sending.stop.set()
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise FillAborted(f"{guard.directory} is hung: a cache read did not return")
            try:
                sent = job.result()
            except OSError as exc:
                if not isinstance(exc, ConnectionError):  # the client's side, not the share's
                    guard.report(exc)
                raise
            over = sent < 0
            sent = -1 - sent if over else sent
            if sent:
                metrics.sent(sent)
                offset += sent
                count -= sent
                progress.pos = offset
            if over:
                if count:
                    raise FillAborted("file shorter than its entry")
                return
            await _writable(loop, sending.out_fd)
    finally:
        hung.cancel()
        sending.stop.set()
        if job is not None and not job.done():
            job.add_done_callback(_retrieved)  # the abandoned send's late error is no news
            job.add_done_callback(lambda _job: _finish(executor, sending))
        else:
            _finish(executor, sending)


def _retrieved(job: asyncio.Future[Any]) -> None:
    if not job.cancelled():
        job.exception()


def _finish(executor: concurrent.futures.Executor, sending: _Sendfile) -> None:
    """On the loop, once no thread sends for ``sending`` any more: release its descriptors."""
    os.close(sending.out_fd)  # a socket: closing it does not wait
    if not sending.in_closed:
        sending.in_closed = True
        try:
            executor.submit(os.close, sending.in_fd)
        except RuntimeError:  # the executor is shut down: the daemon is stopping
            os.close(sending.in_fd)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Until the socket ``fd`` (not the transport's own descriptor) takes bytes again."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)
