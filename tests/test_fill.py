"""The fill on its own: its state machine and its durability order, against an in-memory
upstream (image bytes in a dict) and a real sparse file with real xattrs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cached.errors import FillAborted, UpstreamUnavailable
from cached.fill.machine import Fill, FillSettings, FillState
from cached.fill.pipeline import FEED_THREADS, SYNC_THREADS, WRITE_THREADS
from cached.fill.registry import Filler
from cached.jobs.schedule import prune
from cached.store import Bitmap, State, Store, xattrs
from cached.upstream import Authorization, Credentials, Decision, ImageRecord

MiB = 1 << 20


class _Stream:
    def __init__(
        self, data: bytes, start: int, end: int, fail_at: int | None, gate: asyncio.Event | None
    ) -> None:
        self.start = start
        self._data, self._pos, self._end, self._fail_at = data, start, end, fail_at
        self._gate = gate

    async def read(self, n: int) -> bytes:
        if self._fail_at is not None and self._pos >= self._fail_at:
            raise UpstreamUnavailable("the upstream broke off")
        if self._gate is not None and self._pos > self.start:
            await self._gate.wait()  # held after the first piece until the test opens it
        piece = self._data[self._pos : min(self._end, self._pos + n)]
        self._pos += len(piece)
        await asyncio.sleep(0)  # let the loop run between pieces, as a socket would
        return piece

    async def read_blocks(self, n: int) -> list[bytes]:
        piece = await self.read(n)
        return [piece] if piece else []


@dataclass
class MemoryUpstream:
    """Images in memory; ``fail_at[id]`` breaks transfers that reach that offset."""

    images: dict[str, bytes] = field(default_factory=dict)
    fail_at: dict[str, int] = field(default_factory=dict)
    transfers: list[tuple[str, int, int | None]] = field(default_factory=list)
    gate: asyncio.Event | None = None  # set: transfers pause after their first piece

    def add(self, data: bytes) -> ImageRecord:
        image_id = str(uuid.uuid4())
        self.images[image_id] = data
        return ImageRecord(
            image_id, "active", len(data), None, "sha512", hashlib.sha512(data).hexdigest()
        )

    async def authorize(
        self, image_id: str, creds: Credentials, accept: str | None = None
    ) -> Authorization:
        return Authorization(Decision.ALLOW)

    @asynccontextmanager
    async def open_data(
        self, image_id: str, creds: Credentials, start: int, end: int | None
    ) -> AsyncIterator[_Stream]:
        self.transfers.append((image_id, start, end))
        data = self.images[image_id]
        yield _Stream(
            data, start, len(data) if end is None else end, self.fail_at.get(image_id), self.gate
        )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path)
    await s.open()
    yield s
    s.close()


async def finished(fill: Fill) -> FillState:
    await asyncio.wait_for(fill.closed.wait(), 20)
    return fill.state


async def test_a_full_fill_runs_verifies_and_commits(store: Store) -> None:
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(10 * MiB + 3))
    seen: list[FillState] = []
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, created = await filler.open(record, Credentials())
    assert created and fill.state is FillState.RUNNING
    fill.ensure_full()
    while fill.state.active:
        seen.append(fill.state)
        await fill.wait()
    assert await finished(fill) is FillState.VERIFIED
    assert FillState.VERIFYING in seen or fill.written.full()
    entry = store.get(record.id)
    assert entry is not None and entry.complete and entry.path == store.root / record.id
    assert entry.reserved == 0 and entry.footprint() == entry.size
    assert (store.root / record.id).read_bytes() == upstream.images[record.id]
    assert upstream.transfers == [(record.id, 0, None)]
    assert record.id not in filler.fills


async def test_a_digest_mismatch_ends_invalid_and_moves_the_file(store: Store) -> None:
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(5 * MiB))
    upstream.images[record.id] = os.urandom(5 * MiB)  # not what the record promises
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    fill.ensure_full()
    assert await finished(fill) is FillState.INVALID
    with pytest.raises(FillAborted):
        fill.raise_if_failed()
    assert store.get(record.id) is None and record.id in store.invalid
    attrs = await asyncio.to_thread(xattrs.read_all, store.root / "invalid" / record.id)
    assert attrs[xattrs.STATE] == b"invalid" and b"sha512 mismatch" in attrs[xattrs.ERROR]


async def test_a_broken_driver_fails_the_fill_and_keeps_flushed_chunks(store: Store) -> None:
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(16 * MiB))
    upstream.fail_at[record.id] = 9 * MiB
    filler = Filler(store, upstream, FillSettings(sync_bytes=4 * MiB))  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    fill.ensure_full()
    assert await finished(fill) is FillState.FAILED
    assert isinstance(fill.error, UpstreamUnavailable)
    entry = store.get(record.id)
    assert entry is not None and entry.state is State.FILLING
    assert sorted(entry.present) == [0, 1]  # the two whole chunks before the break
    assert not filler.passing_through()  # the upstream's fault, not the disk's
    # The next fill resumes: only the missing chunks are asked for.
    del upstream.fail_at[record.id]
    again, created = await filler.open(record, Credentials())
    assert created and again.entry is entry
    again.ensure_full()
    assert await finished(again) is FillState.VERIFIED
    assert upstream.transfers[-1] == (record.id, 8 * MiB, 16 * MiB)


async def test_a_reader_woken_by_the_broken_driver_finds_the_fill_failed(store: Store) -> None:
    """A whole-image reader asks again whenever it comes back from sending (as the proxy's
    reader does). Back right after the driver broke, it must find the fill FAILED; before, the
    fill was failed only in the driver task's done callback, so the reader saw RUNNING with a
    finished driver, started a second one, and the failure was forgotten (the fill resumed
    and the first client got a whole image: a flaky CI run)."""
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(16 * MiB))
    upstream.fail_at[record.id] = 9 * MiB
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    mark = fill.demand(0, record.size, whole=True)
    with pytest.raises(FillAborted):
        # A reader back from a send at any moment, the driver's end included (a second
        # transfer ends the loop: the failure was forgotten).
        while len(upstream.transfers) <= 1:
            fill.check(0, mark)
            await asyncio.sleep(0)
            fill.demand(0, record.size, whole=True)
    assert await finished(fill) is FillState.FAILED
    assert upstream.transfers == [(record.id, 0, None)]


async def test_a_range_fill_parks_idle_and_a_lost_range_cuts_only_its_readers(
    store: Store,
) -> None:
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(16 * MiB))
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    mark = fill.demand(0, 100, whole=False)
    while fill.state.active:
        await fill.wait()
    assert await finished(fill) is FillState.IDLE
    fill.check(0, mark)  # nothing lost
    entry = store.get(record.id)
    assert entry is not None and sorted(entry.present) == [0] and entry.reserved == 0

    upstream.fail_at[record.id] = 8 * MiB  # chunk 2 cannot be had
    fill, _ = await filler.open(record, Credentials())
    lost_mark = fill.demand(8 * MiB, 8 * MiB + 10, whole=False)
    other_mark = fill.demand(4 * MiB, 4 * MiB + 10, whole=False)
    await finished(fill)
    assert fill.state is FillState.IDLE  # a lost range does not fail the fill
    with pytest.raises(FillAborted, match="range of"):
        fill.check(8 * MiB, lost_mark)
    fill.check(4 * MiB, other_mark)  # its own chunk arrived
    assert sorted(entry.present) == [0, 1]


async def test_prune_never_evicts_an_entry_whose_fill_is_being_opened(store: Store) -> None:
    """While a fill of a partial entry is being opened (its file opened on a thread), the entry
    is in use: prune skips it. Before, another miss's admission prune evicted it and the
    opener's client was passed through ("deleted while opening it"; seen in an audit with
    four concurrent misses in a full cache)."""
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(16 * MiB))
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    fill.demand(0, 100, whole=False)
    assert await finished(fill) is FillState.IDLE  # a partial entry, chunk 0 present
    entry = store.get(record.id)
    assert entry is not None and not entry.complete

    opening = asyncio.create_task(filler.open(record, Credentials()))
    for _ in range(1000):  # the task starts, then waits in the file's open on a thread
        if filler.opening(record.id):
            break
        await asyncio.sleep(0)
    assert filler.opening(record.id)
    result = await prune(store, filler, 0)
    assert result.files == 0 and store.get(record.id) is entry and not entry.removed
    again, created = await opening
    assert created and again.entry is entry
    again.cancel()
    await finished(again)


async def test_cancel_and_illegal_moves(store: Store) -> None:
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(32 * MiB))
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    fill.ensure_full()
    await fill.wait()
    fill.cancel()
    assert await finished(fill) is FillState.CANCELLED
    with pytest.raises(AssertionError, match="CANCELLED -> FillState.RUNNING"):
        fill._move(FillState.RUNNING, None)  # final states are final


async def test_flush_comes_before_the_bitmap_that_claims_it(store: Store) -> None:
    """A chunk enters the bitmap on disk only after a flush that began after its bytes were
    written: at every flush, every chunk the on-disk bitmap already claims was in the file's
    content as captured at an earlier flush. (A ``kill -9`` test cannot prove this: the page
    cache survives a killed process.)"""
    upstream = MemoryUpstream()
    data = os.urandom(24 * MiB)
    record = upstream.add(data)
    entry = await store.create(
        record.id,
        len(data),
        checksum=None,
        os_hash_algo="sha512",
        os_hash_value=record.os_hash_value,
    )
    durable: list[bytes] = []  # the file's content as of each flush
    violations: list[str] = []

    def flush(fd: int) -> None:
        claimed = Bitmap(entry.chunk_count, os.getxattr(fd, xattrs.BITMAP))
        for c in claimed:
            start, end = entry.chunk_bounds(c)
            if not durable or durable[-1][start:end] != data[start:end]:
                violations.append(f"chunk {c} claimed before a flush covered it")
        os.fdatasync(fd)
        durable.append(os.pread(fd, len(data), 0))

    settings = FillSettings(sync_bytes=4 * MiB, sync_seconds=0.0, flush=flush)
    filler = Filler(store, upstream, settings)  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    fill.ensure_full()
    assert await finished(fill) is FillState.VERIFIED
    assert len(durable) >= 2 and not violations
    assert entry.complete and sorted(entry.present) == list(range(entry.chunk_count))


async def test_thirty_concurrent_fills_share_a_few_threads(store: Store) -> None:
    """Issue 9 item 8: 30 concurrent cold fills used ~94 threads (three per fill). Now every
    fill's writer, feeder and syncer lanes share three small pools."""
    upstream = MemoryUpstream(gate=asyncio.Event())
    records = [upstream.add(os.urandom(6 * MiB)) for _ in range(30)]
    filler = Filler(store, upstream, FillSettings(sync_seconds=0.0))  # type: ignore[arg-type]
    fills = []
    for record in records:
        fill, _ = await filler.open(record, Credentials())
        fill.ensure_full()
        fills.append(fill)
    # Every fill has written (and hashed) its first piece and waits for the upstream.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while not all(f.available(0) > 0 for f in fills):
        assert loop.time() < deadline, "the fills never started"
        await asyncio.sleep(0.01)
    fill_threads = [t for t in threading.enumerate() if t.name.startswith("fill-")]
    assert 0 < len(fill_threads) <= WRITE_THREADS + FEED_THREADS + SYNC_THREADS
    assert upstream.gate is not None
    upstream.gate.set()
    for fill in fills:
        assert await finished(fill) is FillState.VERIFIED
