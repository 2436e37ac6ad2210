"""Single flight: one fill per image, shared by every request and by prefetch.

A fill owns the image's sparse file while chunks arrive. Its transfers stream from the
upstream into the file; readers stream out of the same file as it grows, woken by progress
events (never by polling). A full fill (the *driver*) walks the image from the first missing
chunk to the end; a range request only fetches the chunks it needs, and may take them ahead
of the driver, which then skips them. The fill belongs to the daemon, not to a client: when
a client goes away, the transfer it started carries on.

Durability: written chunks are flushed (fdatasync) in batches and only then recorded in the
entry's presence bitmap, so a crash loses at most unflushed chunks and never invents data.
A complete entry becomes servable only after its digest matched (``Store.commit``).
"""

from __future__ import annotations

import asyncio
import enum
import errno
import functools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cached.digest import Digest, StreamConsumer
from cached.errors import CachedError, FillAborted, StoreUnavailable, UpstreamUnavailable
from cached.store import Bitmap, Entry, Store
from cached.store import entry as entries
from cached.upstream import Backend, Buffer, Credentials, ImageRecord

log = logging.getLogger(__name__)

STORE_RETRY_AFTER = 30  # seconds of pass-through after the disk refused a write
_STORE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.ENOENT}
PIECE = 1 << 20  # bytes per upstream read and per write: large buffers keep Python cheap
MAX_PENDING = 8  # pieces in flight to the writer/hasher threads (bounds memory per fill)


class FillState(enum.Enum):
    RUNNING = "running"
    VERIFIED = "verified"  # complete, digest matched, committed (unless deleted meanwhile)
    INVALID = "invalid"  # complete but the digest did not match: never served
    FAILED = "failed"  # a transfer broke off; what was flushed stays for a resume
    CANCELLED = "cancelled"  # the entry was deleted, or the daemon stops
    IDLE = "idle"  # no transfer left, image incomplete: the next reader opens a new fill


@dataclass
class _Transfer:
    """One upstream request writing bytes ``[start, end)``; ``pos`` is written up to."""

    start: int
    pos: int
    end: int
    chunks: set[int] = field(default_factory=set)
    inflight: int = 0  # writes submitted and not yet done
    error: BaseException | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def settle(self, most: int) -> None:
        """Wait until at most ``most`` pieces are in flight; raise the first write error."""
        while self.inflight > most and self.error is None:
            self.wake.clear()
            await self.wake.wait()
        if self.error is not None:
            raise self.error


@dataclass(frozen=True)
class FillSettings:
    sync_bytes: int = 64 << 20
    sync_seconds: float = 1.0


class Fill:
    """The in-flight state of one image's entry."""

    def __init__(
        self,
        entry: Entry,
        store: Store,
        backend: Backend,
        creds: Credentials,
        settings: FillSettings,
        on_close: Callable[[Fill], None],
        fd: int,
    ):
        self.entry = entry
        self._store = store
        self._backend = backend
        self.creds = creds
        self._settings = settings
        self._on_close = on_close
        self.state = FillState.RUNNING
        self.error: BaseException | None = None
        self.written: Bitmap = entry.present.copy()
        if entry.size == 0:
            self.written.add(0)  # an empty image has nothing to fetch, only to verify
        self._claimed: set[int] = set()
        self._transfers: list[_Transfer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._driver: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._progress: asyncio.Future[None] = self._loop.create_future()
        self._fd = fd  # the entry's file, opened read-write (by the caller, off the loop)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"fill-w-{entry.image_id[:8]}")
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix=f"fill-h-{entry.image_id[:8]}")
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix=f"fill-s-{entry.image_id[:8]}")
        self._sync_lock = asyncio.Lock()
        self.digest = Digest.for_record(entry.checksum, entry.os_hash_algo, entry.os_hash_value)
        self.consumers: list[StreamConsumer] = [self.digest] if self.digest else []
        self._unsynced_bytes = 0
        self._last_sync = time.monotonic()
        self._sync_future: asyncio.Future[None] | None = None
        self._finishing = False
        self._closing: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.upstream_bytes = 0
        self.upstream_requests = 0

    # ----------------------------------------------------------------- readers
    def available(self, pos: int) -> int:
        """End of the bytes readable from ``pos`` on (``pos`` itself if none are yet)."""
        entry = self.entry
        c = pos // entry.chunk_size
        if c in self.written:
            last = c
            while last + 1 < entry.chunk_count and last + 1 in self.written and last - c < 64:
                last += 1
            return entry.chunk_bounds(last)[1]
        for t in self._transfers:
            if t.start <= pos < t.pos:
                return t.pos
        return pos

    def will_produce(self, pos: int) -> bool:
        """Whether a running transfer (or the driver) will write byte ``pos``."""
        c = pos // self.entry.chunk_size
        return (
            c in self.written
            or c in self._claimed
            or (self._driver is not None and not self._driver.done())
        )

    async def wait(self) -> None:
        """Wait for the next progress event; raise FillAborted if the fill ended badly."""
        self.raise_if_failed()
        if self.state is FillState.RUNNING:
            await asyncio.shield(self._progress)
            self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.state in (FillState.FAILED, FillState.INVALID, FillState.CANCELLED):
            raise FillAborted(f"fill of {self.entry.image_id} {self.state.value}: {self.error}")

    def _notify(self) -> None:
        fired, self._progress = self._progress, self._loop.create_future()
        fired.set_result(None)

    # ----------------------------------------------------------------- transfers
    def ensure_full(self) -> None:
        """Make sure the whole image is being fetched (start the driver if it is not)."""
        if self.state is FillState.RUNNING and (self._driver is None or self._driver.done()):
            self._driver = self._spawn(self._drive())

    def ensure_range(self, start: int, end: int) -> None:
        """Fetch the chunks covering ``[start, end)`` that nobody has or is fetching."""
        if self.state is not FillState.RUNNING:
            return
        run: list[int] = []
        for c in self.entry.chunks_of(start, end):
            if c in self.written or c in self._claimed:
                if run:
                    self._spawn_run(run)
                    run = []
            else:
                run.append(c)
        if run:
            self._spawn_run(run)
        if not self._tasks:
            # Everything asked for is here already: nothing will finish a task, so let go now.
            self._spawn(self._finish() if self.written.full() else self._park())

    def _spawn_run(self, chunks: list[int]) -> None:
        self._claimed.update(chunks)
        first, last = chunks[0], chunks[-1]
        start = self.entry.chunk_bounds(first)[0]
        end = self.entry.chunk_bounds(last)[1]
        self._spawn(self._transfer(start, end, claimed=set(chunks)))

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.state is FillState.RUNNING:
            self._fail(exc)
        elif not self._tasks and self.state is FillState.RUNNING:
            if self.written.full():
                self._spawn(self._finish())
            else:
                # Nothing left to do for now (a range fill): flush and let go of the file.
                self._spawn(self._park())

    async def _drive(self) -> None:
        """Fetch every chunk nobody has or is fetching, then wait for the others."""
        entry = self.entry
        while self.state is FillState.RUNNING:
            first = next(
                (
                    c
                    for c in range(entry.chunk_count)
                    if c not in self.written and c not in self._claimed
                ),
                None,
            )
            if first is None:
                return
            # Ask for the run of missing chunks; claim them lazily, as the stream reaches
            # them, so a range request can still take chunks ahead of us (we stop there).
            stop = next(
                (
                    c
                    for c in range(first, entry.chunk_count)
                    if c in self.written or c in self._claimed
                ),
                entry.chunk_count,
            )
            start = entry.chunk_bounds(first)[0]
            end = entry.chunk_bounds(stop - 1)[1]
            await self._transfer(start, end, claimed=None)

    async def _transfer(self, start: int, end: int, claimed: set[int] | None) -> None:
        """Stream ``[start, end)`` from the upstream into the file.

        With ``claimed=None`` chunks are claimed one by one as the stream reaches them, and
        the transfer stops at the first chunk someone else has.
        """
        entry = self.entry
        t = _Transfer(start, start, end, set(claimed or ()))
        self._transfers.append(t)
        whole = start == 0 and end == entry.size
        try:
            self.upstream_requests += 1
            log.debug("transfer %s [%d, %d)", entry.image_id, start, end)
            async with self._backend.open_data(
                entry.image_id, self.creds, start, None if whole else end
            ) as stream:
                pos = start
                while pos < end and self.state is FillState.RUNNING:
                    c = pos // entry.chunk_size
                    chunk_start, chunk_end = entry.chunk_bounds(c)
                    if pos == chunk_start and claimed is None:
                        if c in self.written or c in self._claimed:
                            break  # taken by a range transfer: let the driver skip it
                        self._claimed.add(c)
                        t.chunks.add(c)
                    n = min(PIECE, chunk_end - pos)
                    blocks = await stream.read_blocks(n)
                    got = sum(len(memoryview(b)) for b in blocks)
                    if got != n:
                        raise UpstreamUnavailable(
                            f"upstream sent {pos - start + got} of {end - start} bytes"
                        )
                    self.upstream_bytes += n
                    self._submit(t, pos, blocks, c if pos + n == chunk_end else -1)
                    pos += n
                    await t.settle(MAX_PENDING - 1)
            await t.settle(0)
        finally:
            self._transfers.remove(t)
            self._claimed.difference_update(t.chunks - set(self.written))
            self._notify()

    def _submit(self, t: _Transfer, pos: int, blocks: list[Buffer], finished_chunk: int) -> None:
        """Write ``blocks`` at ``pos`` (writer thread) and feed the consumers (hasher thread).

        The piece stays in flight (and in memory) until both threads are done with it, so a
        digest that falls behind slows the transfer instead of queueing up the image.
        """
        parts = [1 + len(self.consumers)]

        def part_done(_: asyncio.Future[Any]) -> None:
            parts[0] -= 1
            if parts[0] == 0:
                t.inflight -= 1
                t.wake.set()

        t.inflight += 1
        for consumer in self.consumers:
            fed = self._loop.run_in_executor(self._hasher, _feed, consumer, pos, blocks)
            fed.add_done_callback(part_done)
        fut = self._loop.run_in_executor(self._writer, _pwrite_all, self._fd, blocks, pos)
        size = sum(len(memoryview(b)) for b in blocks)
        fut.add_done_callback(functools.partial(self._written, t, pos + size, finished_chunk))
        fut.add_done_callback(part_done)

    def _written(
        self, t: _Transfer, upto: int, finished_chunk: int, fut: asyncio.Future[int]
    ) -> None:
        if fut.cancelled() or fut.exception() is not None:
            t.error = t.error or fut.exception() or FillAborted("write cancelled")
            return
        if t.error is not None:
            return  # an earlier piece of this transfer failed: its chunk has a hole
        t.pos = upto
        self._unsynced_bytes += fut.result()
        if finished_chunk >= 0:
            self.written.add(finished_chunk)
            self._claimed.discard(finished_chunk)
            t.chunks.discard(finished_chunk)
            self._maybe_sync()
        self._notify()

    # ----------------------------------------------------------------- durability
    def _maybe_sync(self) -> None:
        due = (
            self._unsynced_bytes >= self._settings.sync_bytes
            or time.monotonic() - self._last_sync >= self._settings.sync_seconds
        )
        if due and not self._sync_lock.locked():
            self._sync_future = asyncio.ensure_future(self._sync())

    async def _sync(self, force: bool = False) -> None:
        """Flush, then record as present what was written before the flush began.

        Runs on its own thread so writes go on while the disk catches up; one at a time.
        """
        async with self._sync_lock:
            if self._fd < 0 or self.entry.removed:
                return
            chunks = set(self.written) - set(self.entry.present)
            self._unsynced_bytes = 0
            self._last_sync = time.monotonic()
            if not chunks:
                return
            try:
                await self._loop.run_in_executor(self._syncer, self._sync_publish, self._fd, chunks)
            except (OSError, RuntimeError) as exc:
                log.error("cannot flush %s: %s", self.entry.path, exc)
                if self.state is FillState.RUNNING and not force:
                    self._fail(exc)

    def _sync_publish(self, fd: int, chunks: set[int]) -> None:
        os.fdatasync(fd)
        if not self.entry.removed:
            entries.publish(self.entry, fd, chunks)

    # ----------------------------------------------------------------- endings
    async def _finish(self) -> None:
        """All chunks are written: flush, verify, commit (or invalidate)."""
        if self._finishing:
            return
        self._finishing = True
        await self._sync()  # waits for one in flight, then flushes the rest
        entry = self.entry
        ok = True
        if self.digest is not None:
            ok = await self._loop.run_in_executor(
                self._hasher, self.digest.finish, self._fd, entry.size
            )
        if ok:
            # Deleted meanwhile: still verified for the readers that follow us, never kept.
            committed = not entry.removed and await asyncio.to_thread(self._store.commit, entry)
            log.info(
                "%s %s: %d bytes, %s verified, %d upstream requests",
                "cached" if committed else "verified (deleted, not kept)",
                entry.image_id,
                entry.size,
                self.digest.algo if self.digest else "nothing",
                self.upstream_requests,
            )
            self._end(FillState.VERIFIED, None)
        elif entry.removed:
            self._end(FillState.INVALID, CachedError("digest mismatch"))
        else:
            assert self.digest is not None
            reason = (
                f"{self.digest.algo} mismatch: got {self.digest.hexdigest()}, "
                f"expected {self.digest.expected}"
            )
            log.error("image %s failed verification: %s", entry.image_id, reason)
            await asyncio.to_thread(self._store.invalidate, entry, reason)
            self._end(FillState.INVALID, CachedError(reason))
        self._close_files()

    async def _park(self) -> None:
        """No transfer is left and the image is not complete (a range fill): let go."""
        await self._sync()
        if self.state is FillState.RUNNING and self._tasks <= {asyncio.current_task()}:
            self._end(FillState.IDLE, None)
            self._close_files()

    def _fail(self, exc: BaseException) -> None:
        log.warning("fill of %s stopped: %s", self.entry.image_id, exc)
        self._end(FillState.FAILED, exc)
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        # Keep what was written and flushed: the next request resumes from there.
        self._closing = self._loop.create_task(self._flush_and_close())

    async def _flush_and_close(self) -> None:
        try:
            # Let the writes already handed to the writer thread land and be counted.
            await self._loop.run_in_executor(self._writer, _nothing)
            await asyncio.sleep(0)
            await self._sync(force=True)
        finally:
            self._close_files()

    def _end(self, state: FillState, error: BaseException | None) -> None:
        self.state = state
        self.error = error
        self._notify()

    def _close_files(self) -> None:
        """Let go of the file and leave the registry: the next reader opens a new fill."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            # Every caller awaited _sync() first; the writer closes after its queued writes.
            self._writer.submit(os.close, fd)
            self._writer.shutdown(wait=False)
            self._hasher.shutdown(wait=False)
            self._syncer.shutdown(wait=False)
        self._on_close(self)
        self.closed.set()

    def cancel(self) -> None:
        """Stop every transfer (the entry was deleted, or the daemon stops)."""
        if self.state is FillState.RUNNING:
            self._end(FillState.CANCELLED, FillAborted("fill cancelled"))
            for task in list(self._tasks):
                task.cancel()
            self._closing = self._loop.create_task(self._flush_and_close())


def _nothing() -> None:
    return None


def _pwrite_all(fd: int, blocks: list[Buffer], pos: int) -> int:
    """Write every block at ``pos`` on (one pwritev; loops on short writes)."""
    views = [memoryview(b) for b in blocks]
    total = sum(len(v) for v in views)
    while views:
        n = os.pwritev(fd, views, pos)
        pos += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def _feed(consumer: StreamConsumer, pos: int, blocks: list[Buffer]) -> None:
    for block in blocks:
        consumer.feed(pos, block)
        pos += len(memoryview(block))


class Filler:
    """The registry of fills: at most one per image."""

    def __init__(self, store: Store, backend: Backend, settings: FillSettings):
        self._store = store
        self._backend = backend
        self._settings = settings
        self.fills: dict[str, Fill] = {}
        # When the disk last refused a write (full, read-only, I/O error): new fills are
        # refused for a while and downloads pass through instead of failing over and over.
        self._store_failed_at = -float(STORE_RETRY_AFTER)
        # Told the size of every new entry before it fills (the prune makes room for it).
        self.on_new_entry: Callable[[int], None] | None = None
        self._opening: dict[str, asyncio.Future[Fill]] = {}

    def get(self, image_id: str) -> Fill | None:
        """The running fill of ``image_id``, if any."""
        fill = self.fills.get(image_id)
        return fill if fill is not None and fill.state is FillState.RUNNING else None

    async def open(self, record: ImageRecord, creds: Credentials) -> tuple[Fill, bool]:
        """The fill of ``record``'s image, creating its entry and fill if there are none.

        Returns the fill and whether this call created it.
        """
        image_id = record.id
        while True:
            fill = self.fills.get(image_id)
            if fill is None:
                break
            if fill.state is FillState.RUNNING:
                return fill, False
            await fill.closed.wait()  # a fill that just ended is still flushing
        opening = self._opening.get(image_id)
        if opening is not None:
            return await asyncio.shield(opening), False
        if time.monotonic() - self._store_failed_at < STORE_RETRY_AFTER:
            raise StoreUnavailable("the cache could not be written a moment ago")
        future: asyncio.Future[Fill] = asyncio.get_running_loop().create_future()
        self._opening[image_id] = future
        try:
            entry = self._store.get(image_id)
            if entry is None or entry.size != record.size:
                if entry is not None:
                    await asyncio.to_thread(self._store.remove, image_id)
                assert record.size is not None
                if self.on_new_entry is not None:
                    self.on_new_entry(record.size)
                entry = await asyncio.to_thread(
                    self._store.create,
                    image_id,
                    record.size,
                    checksum=record.checksum,
                    os_hash_algo=record.os_hash_algo,
                    os_hash_value=record.os_hash_value,
                )
            fd = await asyncio.to_thread(os.open, entry.path, os.O_RDWR)
            fill = Fill(entry, self._store, self._backend, creds, self._settings, self._closed, fd)
            self.fills[image_id] = fill
            future.set_result(fill)
            return fill, True
        except OSError as exc:
            self._store_failed(exc)
            error = StoreUnavailable(f"cannot create a cache entry: {exc}")
            future.set_exception(error)
            future.exception()
            raise error from exc
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters get it from their own await
            raise
        finally:
            del self._opening[image_id]

    def _closed(self, fill: Fill) -> None:  # called by the fill when it lets go
        if self.fills.get(fill.entry.image_id) is fill:
            del self.fills[fill.entry.image_id]
        if isinstance(fill.error, OSError):
            self._store_failed(fill.error)

    def _store_failed(self, exc: OSError) -> None:
        if exc.errno in _STORE_ERRNOS:
            log.error(
                "cache directory refused a write (%s): passing through for %ds",
                exc,
                STORE_RETRY_AFTER,
            )
            self._store_failed_at = time.monotonic()

    async def remove(self, image_id: str) -> bool:
        """Delete an image's entry, safely while it is being read or filled.

        Readers that have the file open finish from it; a running fill goes on for them but
        never commits; the space is freed when the last of them closes the file.
        """
        entry = self._store.get(image_id)
        if entry is not None:
            entry.removed = True  # before any thread runs: a fill finishing now won't commit
        fill = self.fills.pop(image_id, None)
        removed = await asyncio.to_thread(self._store.remove, image_id)
        return removed is not None or fill is not None

    async def close(self) -> None:
        """Stop every fill, keeping what was written and flushed for a resume."""
        fills = list(self.fills.values())
        for fill in fills:
            fill.cancel()
        await asyncio.gather(*(f.closed.wait() for f in fills))
