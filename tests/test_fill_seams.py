"""The fill's two seams (issue 15): byte sources chosen per transfer, one that hands over
replaced at the first byte it did not deliver; stream consumers fed in order on the feeder
lane, caught up from the file before the commit (with or without a digest), reporting on
the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from test_fill import MemoryUpstream, finished

from cached.errors import UpstreamUnavailable
from cached.fill.machine import FillSettings, FillState
from cached.fill.registry import Filler
from cached.fill.sources import ByteSource, UpstreamSource
from cached.store import Store
from cached.upstream import Credentials, DataStream

MiB = 1 << 20


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path)
    await s.open()
    yield s
    s.close()


class BreakingSource:
    """A source that hands over (as a sibling cache would) and breaks at ``fail_at``."""

    name = "sibling"
    hands_over = True

    def __init__(self, upstream: MemoryUpstream, fail_at: int) -> None:
        self._upstream = upstream
        self._fail_at = fail_at
        self.opened: list[tuple[int, int | None]] = []
        self.delivered = 0

    @asynccontextmanager
    async def open(self, image_id: str, start: int, end: int | None) -> AsyncIterator[DataStream]:
        self.opened.append((start, end))
        data = self._upstream.images[image_id]
        stop = len(data) if end is None else end
        source = self

        class Stream:
            start = 0

            def __init__(self, pos: int, fail_at: int) -> None:
                self.start, self._pos, self._fail_at = pos, pos, fail_at

            async def read(self, n: int) -> bytes:
                if self._pos >= self._fail_at:
                    raise UpstreamUnavailable("the sibling went away")
                piece = data[self._pos : min(stop, self._pos + n)]
                self._pos += len(piece)
                source.delivered = self._pos
                await asyncio.sleep(0)
                return piece

            async def read_blocks(self, n: int) -> list[bytes]:
                piece = await self.read(n)
                return [piece] if piece else []

        yield Stream(start, self._fail_at)


class InOrder:
    """Sibling first, then the upstream, as a fleet's choice would be."""

    def __init__(self, *sources: ByteSource) -> None:
        self.sources = sources
        self.asked: list[tuple[int, int, int]] = []

    async def pick(self, start: int, end: int, failed: Sequence[ByteSource]) -> ByteSource | None:
        self.asked.append((start, end, len(failed)))
        return next((s for s in self.sources if s not in failed), None)


async def test_a_source_that_hands_over_is_replaced_where_it_stopped(store: Store) -> None:
    upstream = MemoryUpstream()
    data = os.urandom(9 * MiB + 5)
    record = upstream.add(data)
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    sibling = BreakingSource(upstream, fail_at=3 * MiB + 4096)

    async def creds() -> Credentials:
        return Credentials()

    fill.sources = InOrder(sibling, UpstreamSource(upstream, creds))  # type: ignore[arg-type]
    fill.ensure_full()
    assert await finished(fill) is FillState.VERIFIED  # the upstream's digest matched
    assert (store.root / record.id).read_bytes() == data
    assert sibling.opened == [(0, None)]
    # The upstream was asked only for what the sibling did not deliver.
    [(image_id, resumed, end)] = upstream.transfers
    assert image_id == record.id and end == len(data)
    assert 3 * MiB < resumed == sibling.delivered < len(data)
    assert fill.sources.asked[0] == (0, len(data), 0)
    assert fill.sources.asked[1][2] == 1


async def test_an_upstream_failure_is_not_handed_over(store: Store) -> None:
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(4 * MiB))
    upstream.fail_at[record.id] = MiB
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    fill.ensure_full()
    assert await finished(fill) is FillState.FAILED
    assert len(upstream.transfers) == 1  # no other source was tried


class Recorder:
    """A stream consumer that records what it was given, and on which thread."""

    def __init__(self) -> None:
        self.fed: list[tuple[int, int]] = []
        self.caught_up: list[tuple[int, int]] = []  # (bytes read back, size)
        self.reports: list[tuple[str, int]] = []  # (thread, catch-ups done by then)
        self.feed_threads: set[str] = set()
        self._seen = 0

    def feed(self, offset: int, data: bytes | memoryview) -> None:
        self.feed_threads.add(threading.current_thread().name)
        self.fed.append((offset, len(memoryview(data))))

    def catch_up(self, fd: int, size: int) -> None:
        covered = sorted(self.fed)
        missing, pos = 0, 0
        for offset, n in covered:
            if offset > pos:
                missing += len(os.pread(fd, offset - pos, pos))
            pos = max(pos, offset + n)
        missing += len(os.pread(fd, size - pos, pos)) if pos < size else 0
        self.caught_up.append((missing, size))

    def report(self) -> None:
        self.reports.append((threading.current_thread().name, len(self.caught_up)))


async def test_consumers_are_fed_caught_up_and_report_on_the_loop(store: Store) -> None:
    upstream = MemoryUpstream()
    data = os.urandom(12 * MiB)
    record = upstream.add(data)
    # Half of it on disk already (a resumed entry): the stream skips it, catch-up reads it.
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    recorder = Recorder()
    fill.consumers.append(recorder)
    fill.ensure_range(8 * MiB, 12 * MiB)  # a range first: the stream starts out of order
    fill.ensure_full()
    assert await finished(fill) is FillState.VERIFIED
    assert sum(n for _, n in recorder.fed) == len(data)
    assert all(name.startswith("fill-feed") for name in recorder.feed_threads)
    assert len(recorder.caught_up) == 1 and recorder.caught_up[0][1] == len(data)
    loop_thread = threading.current_thread().name
    assert {thread for thread, _ in recorder.reports} == {loop_thread}
    # One report per feed job while it streamed, the last after the catch-up.
    assert [done for _, done in recorder.reports].count(0) >= 2
    assert recorder.reports[-1][1] == 1


async def test_a_consumer_is_caught_up_without_a_digest(store: Store) -> None:
    upstream = MemoryUpstream()
    data = os.urandom(3 * MiB)
    record = upstream.add(data)
    bare = type(record)(record.id, record.status, record.size, None, None, None)
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, _ = await filler.open(bare, Credentials())
    assert fill.digest is None and fill.consumers == []
    recorder = Recorder()
    fill.consumers.append(recorder)
    fill.ensure_full()
    assert await finished(fill) is FillState.VERIFIED
    assert recorder.caught_up == [(0, len(data))]
