"""The cache under pressure (issue 14): reservations, admission, prune and the fill's last
leaks, against the real store (real sparse files and xattrs in a tmp dir), the real fill and
filler, and an in-memory upstream (tests/test_fill.py)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from conftest import auth, manage, start_daemon, stop_daemon, wait_complete, wait_idle
from fakeglance import FakeGlance
from faultfs import FaultFS
from test_correctness import until
from test_filebackend import _mount
from test_fill import MemoryUpstream, finished

from cached.app import CONFIG, DIRECTORIES, MANAGER
from cached.cachedir.reverify import Integrity
from cached.errors import FillAborted, StoreUnavailable
from cached.fill.machine import FillSettings, FillState
from cached.fill.registry import CachedMeanwhile, Filler
from cached.jobs.schedule import CleanResult, clean
from cached.store import Entry, Store, integrity, xattrs
from cached.store import entry as entries
from cached.upstream import Credentials

MiB = 1 << 20


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount a small tmpfs as a cache directory (root); unmounted at teardown."""
    mounted: list[Path] = []

    def mount(*options: str) -> Path:
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        _mount("-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path))
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


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
        await until(lambda: filler.opening(record.id), "the opener waits for the I/O thread")
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


# ------------------------------------------------------------ items 1-3: admission, prune
async def test_joining_a_running_fill_for_more_is_an_admission(
    glance: FakeGlance, cache_dir: Path
) -> None:
    """Issue 14 item 1: a whole download joining a running range fill (``collapsed``) widened
    its reservation from one chunk to the image without admission: with another fill
    running, the cache went past its max size (seen: 315 MiB under 256M)."""
    d = await start_daemon(cache_dir, glance.url, image_cache_max_size=20 * MiB)
    try:
        a = glance.add_image(os.urandom(16 * MiB))
        c = glance.add_image(os.urandom(12 * MiB))
        a.pause()
        c.pause()
        ranged = asyncio.create_task(d.get(a.id, Range="bytes=0-0"))  # reserves a chunk
        whole_c = asyncio.create_task(d.get(c.id))  # reserves 12 MiB
        await until(lambda: a.id in d.filler.fills and c.id in d.filler.fills, "both fills running")
        await until(lambda: d.store.total_size() == 16 * MiB, "4 + 12 MiB reserved")
        # A whole download of a would widen a's fill to 16 MiB: 28 MiB in a 20 MiB cache.
        async with d.session.get(d.file_url(a.id), headers=auth()) as resp:
            assert resp.headers["Cache-Status"] == "cached; fwd=bypass; detail=cache-full"
            assert d.store.total_size() <= 20 * MiB, d.store.total_size()
            a.resume()
            c.resume()
            assert (resp.status, await resp.read()) == (200, a.data)
        assert (await ranged)[0] == 206 and (await whole_c)[0] == 200
    finally:
        await stop_daemon(d)


async def test_the_cache_is_pruned_again_when_a_fill_lets_go(
    glance: FakeGlance, cache_dir: Path
) -> None:
    """Issue 14 item 1: prune skips what fills use, and nothing pruned again once they let
    go, until the next miss or scheduled run: the cache stayed over its limit while idle
    (seen: 73 MiB idle under a 60M limit). Here the limit is lowered (a reload) while a fill
    runs; when it ends, the cache goes back under the limit by itself."""
    d = await start_daemon(cache_dir, glance.url, image_cache_max_size=32 * MiB)
    try:
        old = glance.add_image(os.urandom(4 * MiB))
        assert (await d.get(old.id))[0] == 200
        await wait_idle(d, old.id)
        image = glance.add_image(os.urandom(8 * MiB))
        image.pause()
        download = asyncio.create_task(d.get(image.id))
        await until(lambda: image.id in d.filler.fills, "the fill runs")
        maintenance = d.app[MANAGER].maintenance
        maintenance.configure(replace(d.app[CONFIG], image_cache_max_size=8 * MiB))
        await maintenance.prune()  # the reload's effect: old goes, the fill cannot
        assert d.store.get(old.id) is None and d.store.total_size() == 8 * MiB
        maintenance.configure(replace(d.app[CONFIG], image_cache_max_size=6 * MiB))
        await maintenance.prune()
        assert d.store.total_size() == 8 * MiB  # all of it held by the running fill
        image.resume()
        status, _, body = await download
        assert (status, body) == (200, image.data)
        await until(lambda: d.store.total_size() <= 6 * MiB, "pruned after the fill ended")
    finally:
        await stop_daemon(d)


async def test_an_entry_being_read_is_evicted_for_a_new_fill_and_its_reader_finishes(
    glance: FakeGlance, cache_dir: Path
) -> None:
    """Issue 14 item 3: entries in use were never evicted, so a miss in a cache full of
    entries being read passed through (56-61 % of bytes in a soak). Now the entry being read
    leaves the index, its reader finishes from its open file, and the new image is cached."""
    d = await start_daemon(cache_dir, glance.url, image_cache_max_size=40 * MiB)
    try:
        held = glance.add_image(os.urandom(24 * MiB))
        assert (await d.get(held.id))[0] == 200
        await wait_idle(d, held.id)
        entry = d.store.get(held.id)
        assert entry is not None and entry.complete
        got = bytearray()
        go_on = asyncio.Event()

        async def slow_reader() -> int:
            async with d.session.get(d.file_url(held.id), headers=auth()) as resp:
                assert resp.headers["Cache-Status"] == "cached; hit"
                async for piece in resp.content.iter_chunked(1 << 16):
                    got.extend(piece)
                    if len(got) >= MiB:
                        await go_on.wait()
                return resp.status

        reader = asyncio.create_task(slow_reader())
        await until(lambda: len(got) >= MiB and entry.readers == 1, "the reader is reading")
        new = glance.add_image(os.urandom(24 * MiB))
        status, headers, body = await d.get(new.id)
        assert (status, body) == (200, new.data)
        assert headers["Cache-Status"] == "cached; fwd=uri-miss; stored"
        assert entry.removed and d.store.get(held.id) is None
        assert not (cache_dir / held.id).exists()
        go_on.set()
        assert await reader == 200 and bytes(got) == held.data  # from the unlinked file
        await wait_complete(d, new.id)
        assert d.store.total_size() == 24 * MiB
    finally:
        await stop_daemon(d)


async def test_prune_restores_the_free_space_floor_evicting_an_unused_partial_entry(
    glance: FakeGlance, small_fs: Callable[..., Path]
) -> None:
    """Issue 14 item 2: prune evicted only to get under the max size, never to restore the
    free-space floor; a partial entry left by a fill that stopped kept the disk below it
    and every later miss was ``detail=no-space`` until ``clean`` (a day)."""
    cache = small_fs("size=40m")
    d = await start_daemon(cache, glance.url, min_free_space="8M")
    try:
        partial = glance.add_image(os.urandom(24 * MiB))
        # The upstream holds after 20 MiB until 16 MiB of chunks are written, then breaks off
        # (cut at once, bytes still in the client's buffer would be lost with the connection,
        # more of them on a loaded machine): 16 MiB of chunks stay.
        partial.hold_after = 20 * MiB
        partial.pause()

        async def cut_short() -> None:
            with contextlib.suppress(aiohttp.ClientPayloadError):  # its client is cut short
                await d.get(partial.id)

        download = asyncio.create_task(cut_short())

        def written() -> int:
            entry = d.store.get(partial.id)
            fill = d.filler.fill_of(entry) if entry is not None else None
            return len(fill.written) if fill is not None else 0

        await until(lambda: written() >= 4, "16 MiB (4 chunks) of the partial image written")
        partial.cut_after = 20 * MiB
        partial.resume()
        await download
        await wait_idle(d, partial.id)
        entry = d.store.get(partial.id)
        assert entry is not None and not entry.complete and entry.present_bytes() >= 16 * MiB
        # Another writer takes space: the disk is now below the cache's floor.
        await asyncio.to_thread(_fill_file, cache / "other-writer", 14 * MiB)
        assert await asyncio.to_thread(_free, cache) < 8 * MiB
        image = glance.add_image(os.urandom(4 * MiB))
        status, headers, body = await d.get(image.id)
        assert (status, body) == (200, image.data)
        assert headers["Cache-Status"] == "cached; fwd=uri-miss; stored"
        assert d.store.get(partial.id) is None  # evicted for the floor, not the max size
        await wait_idle(d, image.id)
        assert await asyncio.to_thread(_free, cache) >= 8 * MiB
    finally:
        await stop_daemon(d)


async def test_the_scheduled_prune_restores_the_free_space_floor(
    glance: FakeGlance, small_fs: Callable[..., Path]
) -> None:
    """Issue 14 item 2, the scheduled (or API) prune on its own: it evicts least recently used
    entries until the floor is back, though the cache is far below its max size."""
    cache = small_fs("size=40m")
    d = await start_daemon(cache, glance.url, min_free_space="8M")
    try:
        ids = []
        for _ in range(3):
            image = glance.add_image(os.urandom(8 * MiB))
            assert (await d.get(image.id))[0] == 200
            await wait_idle(d, image.id)
            ids.append(image.id)
        await asyncio.to_thread(_fill_file, cache / "other-writer", 10 * MiB)
        assert await asyncio.to_thread(_free, cache) < 8 * MiB
        result = await d.app[MANAGER].maintenance.prune()
        assert result.files == 1 and d.store.get(ids[0]) is None  # the oldest only
        assert await asyncio.to_thread(_free, cache) >= 8 * MiB
    finally:
        await stop_daemon(d)


def _fill_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# ------------------------------------------------------------------ item 6: generations
async def test_an_entry_created_while_the_index_is_rebuilt_is_never_indexed_or_committed(
    tmp_path: Path,
) -> None:
    """Issue 14 item 6: ``Store.open`` replaced the index while ``Store.create`` ran on the
    I/O thread; the created entry went into the new index (dead: its file belonged to the
    index before), or the new index held the scan's own entry of the file while the fill
    committed the old object, leaving the committed file unindexed. Whatever the order, the
    entry created under the older index is not indexed and cannot be committed."""
    for create_first in (True, False):
        root = tmp_path / f"cache-{create_first}"
        root.mkdir()
        io = ThreadPoolExecutor(1)
        store = Store(root, io=io)
        await store.open()
        image_id = str(uuid.uuid4())
        hold = threading.Event()
        held = asyncio.get_running_loop().run_in_executor(io, hold.wait)
        try:
            digests: dict[str, str | None] = {
                "checksum": None,
                "os_hash_algo": None,
                "os_hash_value": None,
            }
            steps = [store.create(image_id, 5 * MiB, **digests), store.open()]
            if not create_first:
                steps.reverse()
            tasks = []
            for step in steps:  # queued on the one I/O thread in this order
                tasks.append(asyncio.ensure_future(step))
                for _ in range(5):
                    await asyncio.sleep(0)
            hold.set()
            results = await asyncio.gather(*tasks)
            created = results[0] if create_first else results[1]
            assert created.removed and store.get(image_id) is not created
            assert not await store.commit(created)
            indexed = store.get(image_id)
            if indexed is not None:  # the scan found the file: that entry is the one served
                assert indexed.path == root / "incomplete" / image_id and indexed.path.exists()
        finally:
            hold.set()
            await held
            io.shutdown()


# ------------------------------------------------------------------ item 9: remove, detach
@pytest.fixture
def fault_fs(tmp_path: Path) -> Iterator[FaultFS]:
    """A FUSE pass-through (tests/faultfs.py) at ``tmp_path/fuse``, switchable to EIO."""
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as exc:  # fusepy, or libfuse2 under it, missing
        if os.environ.get("CACHED_MOUNT_REQUIRED"):
            raise
        pytest.skip(f"FUSE tests need fusepy and libfuse2 (see .ci/run): {exc}")
    backing, point = tmp_path / "backing", tmp_path / "fuse"
    backing.mkdir()
    point.mkdir()
    fs = FaultFS(backing, point, tmp_path / "faultfs.mode")
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()


async def test_a_removed_entry_whose_unlink_fails_is_not_forgotten(fault_fs: FaultFS) -> None:
    """Issue 14 item 9: ``Store.remove`` dropped the entry from the index though its unlink
    failed with EIO: the file stayed, counted nowhere, and came back as a cached image at the
    next start. Now the caller hears of it, the bytes still count, and clean removes it."""
    store = Store(fault_fs.mountpoint)
    await store.open()
    try:
        upstream = MemoryUpstream()
        record = upstream.add(os.urandom(5 * MiB))
        filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
        fill, _ = await filler.open(record, Credentials())
        fill.ensure_full()
        assert await finished(fill) is FillState.VERIFIED
        on_backing = fault_fs.backing / record.id
        assert await asyncio.to_thread(on_backing.exists)
        await asyncio.to_thread(fault_fs.set, "eio")
        with pytest.raises(StoreUnavailable) as raised:
            await filler.remove(record.id)
        assert raised.value.errno == errno.EIO
        assert store.get(record.id) is None  # never served again
        assert store.total_size() == 5 * MiB  # but its bytes still count
        await asyncio.to_thread(fault_fs.set, "ok")
        result = await clean(store, filler, stall_time=86400)
        assert result == CleanResult(0, 0)
        assert not await asyncio.to_thread(on_backing.exists)
        assert store.total_size() == 0
    finally:
        await asyncio.to_thread(fault_fs.set, "ok")
        store.close()


async def test_running_fills_stop_when_the_guard_forgets_the_index(
    glance: FakeGlance, small_fs: Callable[..., Path]
) -> None:
    """Issue 14 item 9: when the cache directory vanished the index was forgotten, but fills
    kept fetching into files no index would hold (nor commit). Now they are orphaned like a
    deleted entry's fills: one nobody reads stops at once."""
    cache = small_fs("size=64m")
    d = await start_daemon(
        cache, glance.url, image_cache_mount={"probe_interval": 0.2, "probe_timeout": 1.0}
    )
    try:
        image = glance.add_image(os.urandom(16 * MiB))
        image.pause()
        queue = f"{d.admin_base}/v2/cache/{image.id}"
        async with manage(d).put(queue, headers=auth("token-admin")) as resp:
            assert resp.status == 202
        await until(lambda: image.id in d.filler.fills, "the prefetch's fill runs")
        fill = d.filler.fills[image.id]
        assert fill.entry.readers == 0
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(cache)], check=True)
        await until(lambda: d.app[DIRECTORIES].cache.state.value == "vanished", "vanished")
        await until(lambda: fill.closed.is_set(), "the fill stopped", within=10)
        assert fill.state is FillState.CANCELLED
        assert image.id not in d.filler.fills and fill not in d.filler.orphans
    finally:
        image.resume()
        await stop_daemon(d)


# ------------------------------------------------------------------ item 4: smaller
async def test_a_tokenless_delete_of_an_image_not_held_answers_204(
    glance: FakeGlance, cache_dir: Path
) -> None:
    """Issue 14 item 4: ``DELETE /v2/cache/{id}`` without a token on the management listener
    (admin there) for an image this node does not hold asked the upstream about the image
    with no credentials and relayed its 401; Glance answers 204 for an image it does not
    cache. A held image is still deleted, and with a token the upstream's answer stands."""
    d = await start_daemon(cache_dir, glance.url)
    try:
        image = glance.add_image(os.urandom(MiB))
        async with manage(d).delete(f"{d.admin_base}/v2/cache/{image.id}") as resp:
            assert resp.status == 204, await resp.text()
        assert (await d.get(image.id))[0] == 200
        await wait_complete(d, image.id)
        async with manage(d).delete(f"{d.admin_base}/v2/cache/{image.id}") as resp:
            assert resp.status == 204
        assert d.store.get(image.id) is None
        gone = str(uuid.uuid4())
        url = f"{d.admin_base}/v2/cache/{gone}"
        async with manage(d).delete(url, headers=auth("token-admin")) as resp:
            assert resp.status == 404  # asked with a token: unknown everywhere
    finally:
        await stop_daemon(d)


@pytest.mark.parametrize("status", [500, 503])
async def test_a_failing_upstream_is_asked_once_per_download(
    glance: FakeGlance, cache_dir: Path, status: int
) -> None:
    """Issue 14 item 4: when the upstream answered the authorisation probe with a 5xx, the
    probe asked again without the Range (meant for stores that refuse ranges): every failed
    download cost the failing upstream two requests. Now its answer is relayed at once."""
    d = await start_daemon(cache_dir, glance.url)
    try:
        image = glance.add_image(os.urandom(MiB))
        glance.fail_downloads = status
        got, _, _ = await d.get(image.id)
        assert got == status
        assert len(glance.data_requests(image.id)) == 1
    finally:
        glance.fail_downloads = None
        await stop_daemon(d)


async def test_a_hit_that_opened_its_file_before_the_eviction_is_not_a_changed_file(
    store: Store,
) -> None:
    """Found by the soak (issue 14 item 3): a hit opened its entry's file, prune evicted the
    entry (unlinking the file, which moves its ctime), then the hit's fstat saw a ctime it
    had not recorded: "changed since it was verified", re-verified, and an image without a
    digest moved to invalid/, cutting every reader of it. The unlinked file is reopened here
    through /proc (the same inode, opened after the unlink) to take that path every time."""
    upstream = MemoryUpstream()
    data = os.urandom(3 * MiB)
    record = upstream.add(data)
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    fill.ensure_full()
    assert await finished(fill) is FillState.VERIFIED
    entry = store.get(record.id)
    assert entry is not None and entry.complete
    await until(lambda: entry.identity is not None, "the commit record is written")
    fd = await asyncio.to_thread(os.open, entry.path, os.O_RDONLY)
    try:
        assert await store.evict(entry)  # the unlink: the inode lives on through fd
        entry.path = Path(f"/proc/self/fd/{fd}")
        file, changed = await asyncio.to_thread(integrity.open_for_hit, entry)
        assert not changed and not entry.suspect
        assert not isinstance(file, bytes)
        try:
            assert await asyncio.to_thread(file.read) == data
        finally:
            await asyncio.to_thread(file.close)
    finally:
        await asyncio.to_thread(os.close, fd)


async def test_an_evicted_entrys_access_record_never_lands_on_its_successor(store: Store) -> None:
    """Found by the soak (issue 14 item 3): access records are written in batches on the
    I/O threads; one for an entry evicted meanwhile, whose image was cached anew at the same
    path, was written into the new entry's file. That moved the new file's ctime, so its next
    hit took it for changed, and an image without a digest went to invalid/ (cutting its
    readers). Now a record is written only to the file the entry last recorded."""
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(2 * MiB))
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]

    async def cache_it() -> Entry:
        fill, _ = await filler.open(record, Credentials())
        fill.ensure_full()
        assert await finished(fill) is FillState.VERIFIED
        entry = store.get(record.id)
        assert entry is not None and entry.complete
        await until(lambda: entry.identity is not None, "the commit record is written")
        return entry

    old = await cache_it()
    assert await store.evict(old)
    new = await cache_it()
    assert new is not old and new.path == old.path
    values = entries.access_values(old, hit=True, now=1.0)
    await asyncio.to_thread(integrity.write_access, old, old.path, values)
    file, changed = await asyncio.to_thread(integrity.open_for_hit, new, (0, 10))
    assert not changed and not new.suspect and isinstance(file, bytes)
    attrs = await asyncio.to_thread(xattrs.read_all, new.path)
    assert attrs.get(xattrs.LAST_ACCESSED) != b"1.0"


async def test_an_eviction_whose_unlink_runs_late_never_removes_the_next_entrys_file(
    tmp_path: Path,
) -> None:
    """Found by the soak (issue 14 item 3): an evicted entry's unlink waited for an I/O
    thread while the image was fetched again and its new entry committed (renamed to the
    same path); the late unlink then removed the new entry's file: indexed, complete, and
    every hit of it passed through. Now an unlink removes only its own entry's file."""
    io = ThreadPoolExecutor(1)
    store = Store(tmp_path, io=io)
    await store.open()
    try:
        upstream = MemoryUpstream()
        record = upstream.add(os.urandom(MiB))
        filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
        fill, _ = await filler.open(record, Credentials())
        fill.ensure_full()
        assert await finished(fill) is FillState.VERIFIED
        old = store.get(record.id)
        assert old is not None and old.complete
        hold = threading.Event()
        held = asyncio.get_running_loop().run_in_executor(io, hold.wait)
        evicting = asyncio.ensure_future(store.evict(old))
        await until(lambda: old.removed, "out of the index, its unlink waits for the thread")
        # Meanwhile the next entry of the image is committed at the same path (as a commit's
        # rename does: the new file replaces the old one there).
        successor = tmp_path / "successor"
        await asyncio.to_thread(successor.write_bytes, b"the next entry")
        await asyncio.to_thread(os.rename, successor, old.path)
        hold.set()
        await held
        assert await evicting
        assert await asyncio.to_thread(old.path.read_bytes) == b"the next entry"
    finally:
        io.shutdown()


async def test_a_hit_of_an_entry_evicted_before_its_file_opened_neither_serves_nor_judges(
    store: Store,
) -> None:
    """Found by the soak (issue 14 item 3): a hit looked its entry up, the entry was evicted
    and the image cached anew before the hit opened the file by its path: it opened the new
    entry's file, found it unlike what the evicted entry recorded, and had the evicted entry
    re-verified (an image without a digest: judged corrupt). Now such a hit passes through
    (FileNotFoundError, as for an entry evicted before the open) and judges nothing."""
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(MiB))
    record = replace(record, os_hash_algo=None, os_hash_value=None)  # nothing to verify with
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]

    async def cache_it() -> Entry:
        fill, _ = await filler.open(record, Credentials())
        fill.ensure_full()
        assert await finished(fill) is FillState.VERIFIED
        entry = store.get(record.id)
        assert entry is not None and entry.complete
        await until(lambda: entry.identity is not None, "the commit record is written")
        return entry

    old = await cache_it()
    assert await store.evict(old)
    new = await cache_it()
    invalidated: list[str] = []

    async def invalidate(entry: Entry, reason: str) -> None:
        invalidated.append(entry.image_id)

    checker = Integrity(
        store, filling=lambda: (), invalidate=invalidate, rate=1 << 30, interval=86400
    )
    with pytest.raises(FileNotFoundError):
        await checker.open_hit(old)
    assert not old.suspect and invalidated == []
    assert not new.suspect and not new.removed and store.get(record.id) is new


async def test_no_fill_is_opened_on_an_entry_that_is_complete(store: Store) -> None:
    """Found by the soak (issue 14 item 3): a miss that came while the image's fill verified
    waited for that fill to end, then opened a second fill on the now complete entry, which
    committed it again (its state written, its file renamed onto itself): the file changed
    under its commit record, and an image without a digest went to invalid/ at its next
    access, cutting its readers. Now the opener hears that it is cached."""
    upstream = MemoryUpstream()
    record = upstream.add(os.urandom(MiB))
    filler = Filler(store, upstream, FillSettings())  # type: ignore[arg-type]
    fill, _ = await filler.open(record, Credentials())
    fill.ensure_full()
    assert await finished(fill) is FillState.VERIFIED
    entry = store.get(record.id)
    assert entry is not None and entry.complete
    await until(lambda: entry.identity is not None, "the commit record is written")
    recorded = entry.identity
    with pytest.raises(CachedMeanwhile):
        await filler.open(record, Credentials())
    assert record.id not in filler.fills and entry.identity == recorded and not entry.suspect


async def test_prune_orders_by_when_an_entry_was_last_requested(
    glance: FakeGlance, cache_dir: Path
) -> None:
    """Issue 14 item 3 (the hit ratio beside LRU): an entry's last access was stamped when a
    hit had been sent, so an image whose long download had just begun looked older than one
    fetched once a while ago, and was evicted first. An LRU cache orders by requests: the
    stamp is now also taken when a download begins."""
    d = await start_daemon(cache_dir, glance.url, image_cache_max_size=64 * MiB)
    try:
        read = glance.add_image(os.urandom(24 * MiB))
        other = glance.add_image(os.urandom(4 * MiB))
        for image in (read, other):  # read is the older: cached first
            assert (await d.get(image.id))[0] == 200
            await wait_idle(d, image.id)
        got = bytearray()
        go_on = asyncio.Event()

        async def slow_reader() -> int:
            async with d.session.get(d.file_url(read.id), headers=auth()) as resp:
                async for piece in resp.content.iter_chunked(1 << 16):
                    got.extend(piece)
                    if len(got) >= MiB:
                        await go_on.wait()
                return resp.status

        reader = asyncio.create_task(slow_reader())
        entry = d.store.get(read.id)
        assert entry is not None
        await until(lambda: len(got) >= MiB and entry.readers == 1, "the download has begun")
        maintenance = d.app[MANAGER].maintenance
        maintenance.configure(replace(d.app[CONFIG], image_cache_max_size=24 * MiB))
        result = await maintenance.prune()
        assert result.files == 1
        assert d.store.get(other.id) is None and d.store.get(read.id) is entry
        go_on.set()
        assert await reader == 200 and bytes(got) == read.data
    finally:
        await stop_daemon(d)
