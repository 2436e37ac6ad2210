"""The write side of a fill: pieces written into the entry's file and fed to the stream's
consumers (cached/fill/consumers.py: the digest, later format inspectors), each on a thread
of its own, and batched flushes that make written chunks durable.

Threads: each fill has three lanes, each running its jobs one at a time and in order: the
writer (``pwritev``), the feeder (the consumers, in stream order) and the syncer
(``fdatasync`` then the presence bitmap). The lanes of all fills share three small thread
pools (a lane takes a thread per job, so busy fills take turns): 30 concurrent fills use 16
threads, not 90. The threads only do I/O on values handed to them; the callbacks that
report results run on the event loop, which owns the fill's state.

Durability order (tested): a chunk enters the bitmap on disk only after an ``fdatasync``
that began after its bytes were written, so the bitmap never claims a byte the disk lacks.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any

from cached.errors import StoreUnavailable
from cached.fill.consumers import StreamConsumer
from cached.store import entry as entries
from cached.upstream import Buffer

# fdatasync by default; tests pass an observer that checks the order of flush and bitmap.
Flush = Callable[[int], None]


WRITE_THREADS, FEED_THREADS, SYNC_THREADS = 8, 4, 4
_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(kind: str, threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if kind not in _pools:
            _pools[kind] = ThreadPoolExecutor(threads, thread_name_prefix=f"fill-{kind}")
        return _pools[kind]


class Lane(Executor):
    """Runs its jobs one at a time, in the order submitted, on a shared pool."""

    def __init__(self, pool: ThreadPoolExecutor):
        self._pool = pool
        self._lock = threading.Lock()
        self._jobs: deque[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]] = deque()
        self._busy = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            self._jobs.append((future, functools.partial(fn, **kwargs), args))
            if self._busy:
                return future  # the running job hands the lane on
            self._busy = True
        self._pool.submit(self._run_next)
        return future

    def _run_next(self) -> None:
        with self._lock:
            future, fn, args = self._jobs.popleft()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever awaits the job
                future.set_exception(exc)
        with self._lock:
            if not self._jobs:
                self._busy = False
                return
        self._pool.submit(self._run_next)  # one job per turn: other lanes get the thread

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to release: queued jobs still run (the file is closed by the last)."""


class Pipeline:
    """Writer, feeder and syncer lanes of one fill's open file descriptor."""

    def __init__(self, fd: int, label: str, consumers: list[StreamConsumer], flush: Flush):
        self.fd = fd
        self.consumers = consumers
        self._flush = flush
        self._loop = asyncio.get_running_loop()
        self.label = label
        self._writer = Lane(_pool("write", WRITE_THREADS))
        self._feeder = Lane(_pool("feed", FEED_THREADS))
        self._syncer = Lane(_pool("sync", SYNC_THREADS))

    def submit(
        self,
        pos: int,
        blocks: list[Buffer],
        written: Callable[[asyncio.Future[int]], None],
        settled: Callable[[], None],
    ) -> None:
        """Write ``blocks`` at ``pos`` and feed them to the consumers.

        ``written`` gets the write's future (its result is the byte count; its exception a
        :class:`StoreUnavailable`); ``settled`` is called once both threads are done with
        the piece, so the caller can bound how much is in flight (and in memory).
        """
        parts = [1 + len(self.consumers)]

        def part_done(_: asyncio.Future[Any]) -> None:
            parts[0] -= 1
            if parts[0] == 0:
                settled()

        for consumer in self.consumers:
            fed = self._loop.run_in_executor(self._feeder, _feed, consumer, pos, blocks)
            fed.add_done_callback(part_done)
            fed.add_done_callback(functools.partial(_reported, consumer))
        fut = self._loop.run_in_executor(self._writer, _pwrite_all, self.fd, blocks, pos)
        fut.add_done_callback(written)
        fut.add_done_callback(part_done)

    async def writes_done(self) -> None:
        """Wait until every write handed to the writer so far has run."""
        await self._loop.run_in_executor(self._writer, _nothing)

    async def make_durable(self, bitmap: bytes, stamp: float) -> None:
        """Flush the file, then persist ``bitmap`` (on the syncer thread; writes go on)."""
        await self._loop.run_in_executor(self._syncer, self._durable, bitmap, stamp)

    def _durable(self, bitmap: bytes, stamp: float) -> None:
        try:
            self._flush(self.fd)
            entries.record_present(self.fd, bitmap, stamp)
        except OSError as exc:
            raise StoreUnavailable(f"cannot flush the cache file: {exc}", exc.errno) from exc

    async def catch_up(self, size: int) -> None:
        """Every consumer reads back what the stream skipped, on the feeder lane, in order,
        after the pieces already fed; each then reports on the loop."""
        for consumer in self.consumers:
            try:
                await self._loop.run_in_executor(self._feeder, consumer.catch_up, self.fd, size)
            except OSError as exc:
                raise StoreUnavailable(f"cannot read the cache file: {exc}", exc.errno) from exc
            consumer.report()

    async def on_feeder(self, job: Callable[[int, int], object], size: int) -> None:
        """Run ``job(fd, size)`` on the feeder lane, after every consumer's pieces (a
        consumer's final judgement before the commit, e.g. the format inspector's)."""
        try:
            await self._loop.run_in_executor(self._feeder, job, self.fd, size)
        except OSError as exc:
            raise StoreUnavailable(f"cannot read the cache file: {exc}", exc.errno) from exc

    def close(self) -> None:
        """Close the file after the queued writes."""
        self._writer.submit(os.close, self.fd)


def _nothing() -> None:
    return None


def _pwrite_all(fd: int, blocks: list[Buffer], pos: int) -> int:
    """Write every block at ``pos`` on (one pwritev; loops on short writes)."""
    views = [memoryview(b) for b in blocks]
    total = sum(len(v) for v in views)
    try:
        while views:
            n = os.pwritev(fd, views, pos)
            pos += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
    except OSError as exc:  # the cache disk's error, classified here where it arises
        raise StoreUnavailable(f"cannot write the cache file: {exc}", exc.errno) from exc
    return total


def _reported(consumer: StreamConsumer, fed: asyncio.Future[Any]) -> None:
    """A feed job ended (on the loop): the consumer may tell what it found."""
    if not fed.cancelled() and fed.exception() is None:
        consumer.report()


def _feed(consumer: StreamConsumer, pos: int, blocks: list[Buffer]) -> None:
    for block in blocks:
        consumer.feed(pos, block)
        pos += len(memoryview(block))
