"""The cache under pressure (issue 14): reservations, admission, prune and the fill's last
leaks, against the real store (real sparse files and xattrs in a tmp dir), the real fill and
filler, and an in-memory upstream (tests/test_fill.py)."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_fill import MemoryUpstream, finished

from cached.errors import FillAborted, StoreUnavailable
from cached.fill import FillSettings, FillState
from cached.filler import Filler
from cached.store import Store
from cached.upstream import Credentials

MiB = 1 << 20


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(tmp_path)
    await s.open()
    yield s
    s.close()


# ------------------------------------------------------------------ item 5: reservations
async def test_a_fill_whose_final_flush_fails_releases_its_reservation(store: Store) -> None:
    """Issue 14 item 5: the final flush failed (``_finish``, StoreUnavailable) and the fill
    ended FAILED keeping its reservation: the phantom bytes counted against admission and
    prune for good, and a later range fill added to them."""
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(12 * MiB))

    def flush(fd: int) -> None:  # the disk fails every flush (no flush before the last)
        raise OSError(errno.EIO, "Input/output error")

    settings = FillSettings(sync_bytes=1 << 40, sync_seconds=1e9, flush=flush)
    filler = Filler(store, upstream, settings)  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    fill.ensure_full()
    assert await finished(fill) is FillState.FAILED
    assert isinstance(fill.error, StoreUnavailable)
    entry = store.get(record.id)
    assert entry is not None and not entry.complete
    assert entry.reserved == 0
    assert store.total_size() == entry.present_bytes() == 0


# ------------------------------------------------------------------ item 8: opening
async def test_cancelling_the_opener_of_a_fill_does_not_cancel_its_waiters(
    tmp_path: Path,
) -> None:
    """Issue 14 item 8: ``Filler.open`` stored the opener's CancelledError in the future
    every other opener of the same image waited on, so one client going away cancelled the
    downloads of all the others. Now they get FillAborted; only the opener is cancelled."""
    io = ThreadPoolExecutor(1)  # the store's one I/O thread, held busy below
    store = Store(tmp_path, io=io)
    await store.open()
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(MiB))
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    hold = threading.Event()
    held = asyncio.get_running_loop().run_in_executor(io, hold.wait)
    try:
        opener = asyncio.create_task(filler.open(record, Credentials()))
        await _until(lambda: filler.opening(record.id))  # waiting for the I/O thread
        waiter = asyncio.create_task(filler.open(record, Credentials()))
        await asyncio.sleep(0)  # the waiter awaits the opening
        await asyncio.sleep(0)
        assert not waiter.done()
        opener.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opener
        with pytest.raises(FillAborted, match="cancelled"):
            await waiter
        assert not waiter.cancelled()
    finally:
        hold.set()
        await held
        io.shutdown()


async def _until(condition: Callable[[], bool], timeout: float = 20) -> None:
    """Wait until ``condition()`` holds (a deadline, not a sleep that decides)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)
