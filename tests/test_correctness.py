"""Issue 7's regressions: a fill's lifecycle on delete, one owner for the index, errors
classified where they arise, the authorisation-cache race, images larger than the cache.

Each test failed on the code before the fix (the docstring says how).
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from conftest import (
    Daemon,
    auth,
    data_gets,
    manage,
    start_daemon,
    stop_daemon,
    tree,
    wait_complete,
)
from fakeglance import FakeGlance

from cached.errors import UpstreamUnavailable
from cached.fill.machine import FillSettings, FillState
from cached.fill.registry import Filler
from cached.identity.authorizer import Authorizer
from cached.store import Entry, Store
from cached.upstream import Authorization, Credentials, Decision, ImageRecord

MiB = 1 << 20
EMPTY = ["incomplete/", "invalid/", "queue/"]


async def until(check: Any, what: str, within: float = 10.0) -> None:
    """Wait for ``check()`` to hold (polling the loop), or fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------- 1. delete during a fill
async def test_delete_during_a_fill_keeps_single_flight_and_the_first_reader_whole(
    daemon: Daemon, glance: FakeGlance
) -> None:
    """Before: the deleted fill kept downloading for nobody, a new request started a second
    fill, and the first reader switched to it and was cut one byte short (16,777,215 of
    16,777,216 bytes)."""
    image = glance.add_image(os.urandom(16 * MiB), rate=16 * MiB)
    got = bytearray()

    async def first_reader() -> int:
        async with daemon.session.get(daemon.file_url(image.id), headers=auth()) as resp:
            async for piece in resp.content.iter_chunked(1 << 16):
                got.extend(piece)
            return resp.status

    first = asyncio.create_task(first_reader())
    await until(lambda: len(got) >= 2 * MiB, "the first reader got 2 MiB")
    deleted_fill = daemon.filler.fills[image.id]
    async with manage(daemon).delete(f"{daemon.admin_base}/v2/cache/{image.id}") as resp:
        assert resp.status == 204
    image.rate = None  # the second fill runs at full speed
    status, headers, body = await daemon.get(image.id)
    assert status == 200 and body == image.data
    assert headers["Cache-Status"] == "cached; fwd=uri-miss; stored"  # a new fill, not the old
    assert await first == 200
    assert bytes(got) == image.data  # whole, from the deleted entry's own fill
    await asyncio.wait_for(deleted_fill.closed.wait(), 10)
    # One transfer per delete: the first fill (for its reader), then the new entry's fill.
    assert data_gets(glance, image.id) == [None, None]
    await wait_complete(daemon, image.id)
    assert tree(daemon.cache_dir) == sorted([*EMPTY, image.id])


async def test_a_deleted_fill_nobody_reads_stops_and_close_sees_orphans(
    daemon: Daemon, glance: FakeGlance
) -> None:
    """Before: ``Filler.remove`` dropped the fill from the registry but let it download the
    whole image into an unlinked file; ``Filler.close`` never saw it."""
    image = glance.add_image(os.urandom(16 * MiB), rate=4 * MiB)
    reader = asyncio.create_task(daemon.get(image.id))
    await until(lambda: image.id in daemon.filler.fills, "a fill runs")
    fill = daemon.filler.fills[image.id]
    await until(lambda: glance.bytes_sent.get(image.id, 0) > 0, "bytes flow")
    reader.cancel()  # the only client leaves: the fill goes on for the daemon...
    await until(lambda: fill.entry.readers == 0, "the reader left")
    assert fill.state is FillState.RUNNING
    async with manage(daemon).delete(f"{daemon.admin_base}/v2/cache/{image.id}") as resp:
        assert resp.status == 204
    # ...but not for a deleted entry nobody reads.
    await asyncio.wait_for(fill.closed.wait(), 10)
    assert fill.state is FillState.CANCELLED
    assert glance.bytes_sent[image.id] < len(image.data)
    assert daemon.filler.orphans == set()
    assert tree(daemon.cache_dir) == EMPTY


async def test_close_stops_orphaned_fills(daemon: Daemon, glance: FakeGlance) -> None:
    image = glance.add_image(os.urandom(16 * MiB), rate=2 * MiB)
    got = bytearray()

    async def read() -> None:
        try:
            async with daemon.session.get(daemon.file_url(image.id), headers=auth()) as resp:
                async for piece in resp.content.iter_chunked(1 << 16):
                    got.extend(piece)
        except aiohttp.ClientError:
            pass

    reading = asyncio.create_task(read())
    await until(lambda: len(got) > 0, "the reader gets bytes")
    fill = daemon.filler.fills[image.id]
    await daemon.filler.remove(image.id)
    assert daemon.filler.orphans == {fill} and fill.state is FillState.RUNNING
    await asyncio.wait_for(daemon.filler.close(), 10)
    assert fill.state is FillState.CANCELLED and fill.closed.is_set()
    await reading


# ----------------------------------------------- 2. errors that are not the cache disk's
class _FailingStream:
    start = 0

    async def read(self, n: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    async def read_blocks(self, n: int) -> list[bytes]:
        raise OSError(errno.EIO, "Input/output error")


class _BrokenSource:
    """An upstream whose image store answers EIO (an NFS image share going bad)."""

    async def authorize(
        self, image_id: str, creds: Credentials, accept: str | None = None
    ) -> Authorization:
        return Authorization(Decision.ALLOW)

    @asynccontextmanager
    async def open_data(
        self, image_id: str, creds: Credentials, start: int, end: int | None
    ) -> AsyncIterator[_FailingStream]:
        yield _FailingStream()


async def test_an_upstream_io_error_does_not_switch_caching_off(tmp_path: Path) -> None:
    """Before: the file upstream's ``EIO`` ended the fill with an OSError, which tripped the
    30 s pass-through switch: a healthy image B then came back as ``fwd=bypass``."""
    store = Store(tmp_path)
    await store.open()
    filler = Filler(store, _BrokenSource(), FillSettings())  # type: ignore[arg-type]
    a = ImageRecord(str(uuid.uuid4()), "active", 8 * MiB)
    fill, created = await filler.open(a, Credentials())
    assert created
    fill.ensure_full()
    await asyncio.wait_for(fill.closed.wait(), 10)
    assert fill.state is FillState.FAILED and isinstance(fill.error, UpstreamUnavailable)
    assert not filler.passing_through()
    b = ImageRecord(str(uuid.uuid4()), "active", MiB)
    other, created = await filler.open(b, Credentials())  # before: StoreUnavailable
    assert created
    await filler.close()
    store.close()


async def test_a_delete_racing_the_open_of_a_fill_is_not_a_disk_failure(tmp_path: Path) -> None:
    """Before: the ENOENT of a delete that raced ``os.open(entry.path)`` tripped the switch."""
    store = Store(tmp_path)
    await store.open()
    filler = Filler(store, _BrokenSource(), FillSettings())  # type: ignore[arg-type]
    record = ImageRecord(str(uuid.uuid4()), "active", MiB)
    entry = await store.create(record.id, MiB, checksum=None, os_hash_algo=None, os_hash_value=None)
    await store.run(os.unlink, entry.path)  # gone under us (a clean, an operator)
    try:
        await filler.open(record, Credentials())
    except Exception as exc:  # noqa: BLE001 - any clear error will do, but not a disk failure
        assert "deleted" in str(exc)
    assert not filler.passing_through()
    await filler.close()
    store.close()


# ------------------------------------------------------------- 3. one owner for the index
class _LoopOnly(dict[str, Entry]):
    """The index, refusing changes from any thread but the event loop's."""

    def __init__(self, owner: threading.Thread, *args: Any) -> None:
        super().__init__(*args)
        self.owner = owner

    def _check(self) -> None:
        assert threading.current_thread() is self.owner, "index changed off the event loop"

    def __setitem__(self, key: str, value: Entry) -> None:
        self._check()
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._check()
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self._check()
        return super().pop(*args)


async def test_index_changes_only_on_the_loop_while_it_is_iterated(tmp_path: Path) -> None:
    """Before: ``Store.create/remove/invalidate`` changed ``Store.entries`` inside
    ``asyncio.to_thread`` while the loop iterated it (73 RuntimeErrors in 3 s)."""
    store = Store(tmp_path)
    await store.open()
    store.entries = _LoopOnly(threading.current_thread())
    ids = [str(uuid.uuid4()) for _ in range(40)]
    done = False

    async def churn() -> None:
        for image_id in ids:
            entry = await store.create(
                image_id, MiB, checksum=None, os_hash_algo=None, os_hash_value=None
            )
            if image_id[0] in "0123":
                await store.invalidate(entry, "test")
            elif image_id[0] in "4567":
                await store.remove(image_id)
            else:
                await store.commit(entry)

    async def iterate() -> int:
        rounds = 0
        while not done:
            store.total_size()
            store.complete_entries()
            rounds += 1
            await asyncio.sleep(0)
        return rounds

    iterating = asyncio.create_task(iterate())
    await asyncio.gather(*(churn() for _ in range(1)))
    done = True
    assert await iterating > 0
    kept = {i for i in ids if i[0] not in "01234567"}
    assert set(store.entries) == kept
    store.close()


async def test_commit_racing_a_delete_leaves_nothing_and_raises_nothing(tmp_path: Path) -> None:
    """Before: a ``Store.remove`` between the commit's ``removed`` check and its rename made
    the commit fail (and trip the pass-through switch), or left the committed file behind."""
    store = Store(tmp_path)
    await store.open()
    for _ in range(30):
        image_id = str(uuid.uuid4())
        entry = await store.create(
            image_id, 10, checksum=None, os_hash_algo=None, os_hash_value=None
        )
        committed, removed = await asyncio.gather(store.commit(entry), store.remove(image_id))
        assert removed is entry and entry.removed
        assert tree(tmp_path) == EMPTY
        assert store.get(image_id) is None
    store.close()


# ------------------------------------------------------ 4. the authorisation-cache race
class _SlowAuthority:
    """An upstream whose authorisation answers wait for the test to release them."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.asked = 0

    async def authorize(
        self, image_id: str, creds: Credentials, accept: str | None = None
    ) -> Authorization:
        self.asked += 1
        await self.release.wait()
        return Authorization(Decision.ALLOW)


async def test_a_forget_during_a_probe_is_not_overwritten() -> None:
    """Before: ``check`` stored ALLOW after its await, over a ``forget()`` made meanwhile:
    a member removed through the proxy while their probe was in flight still downloaded."""
    upstream = _SlowAuthority()
    authorizer = Authorizer(upstream, ttl=30)  # type: ignore[arg-type]
    image_id, creds = str(uuid.uuid4()), Credentials.token("member")
    probe = asyncio.create_task(authorizer.check(image_id, creds))
    await until(lambda: upstream.asked == 1, "the probe is in flight")
    authorizer.forget(image_id)  # e.g. DELETE /v2/images/{id}/members/{member} succeeded
    upstream.release.set()
    assert (await probe).decision is Decision.ALLOW  # the answer to the question asked
    await authorizer.check(image_id, creds)
    assert upstream.asked == 2  # asked again: the stale answer was not kept
    await authorizer.check(image_id, creds)
    assert upstream.asked == 2  # an answer given after the change is reused


# ----------------------------------------------------- 5. an image larger than the cache
async def test_an_image_larger_than_admitted_streams_through_and_evicts_nothing(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Before: with an 8 MiB cache a 12 MiB image evicted every entry, the cache ended over
    its limit, and the next prune evicted the big one too."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    d = await start_daemon(
        cache_dir, glance.url, image_cache_max_size=8 * MiB, max_image_fraction=0.5
    )
    try:
        small = glance.add_image(os.urandom(3 * MiB))
        assert (await d.get(small.id))[0] == 200
        await wait_complete(d, small.id)
        big = glance.add_image(os.urandom(12 * MiB))
        status, headers, body = await d.get(big.id)
        assert status == 200 and body == big.data
        assert headers["Cache-Status"] == "cached; fwd=bypass; detail=too-large"
        status, headers, body = await d.get(big.id, Range="bytes=0-99")
        assert status == 206 and body == big.data[:100]
        assert headers["Cache-Status"] == "cached; fwd=bypass; detail=too-large"
        assert tree(cache_dir) == sorted([*EMPTY, small.id])
        assert d.store.total_size() == 3 * MiB
        assert (await d.get(small.id))[1]["Cache-Status"] == "cached; hit"
    finally:
        await stop_daemon(d)


async def test_reservations_count_and_the_prune_keeps_the_cache_within_its_limit(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Running fills reserve what they will write: the prune makes room before the bytes
    arrive, so complete + partial + running stays within the max size."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    d = await start_daemon(cache_dir, glance.url, image_cache_max_size=10 * MiB)
    try:
        olds = [glance.add_image(os.urandom(3 * MiB)) for _ in range(3)]
        for image in olds:
            assert (await d.get(image.id))[0] == 200
            await wait_complete(d, image.id)
        new = glance.add_image(os.urandom(4 * MiB), rate=8 * MiB)
        reading = asyncio.create_task(d.get(new.id))
        await until(lambda: new.id in d.filler.fills, "the new entry fills")
        # 9 MiB cached + 4 MiB reserved > 10 MiB: the least recently used goes at once.
        await until(lambda: d.store.total_size() <= 10 * MiB, "room was made")
        assert d.store.get(olds[0].id) is None
        status, _, body = await reading
        assert status == 200 and body == new.data
        await wait_complete(d, new.id)
        assert d.store.total_size() == 10 * MiB
    finally:
        await stop_daemon(d)


async def test_concurrent_misses_are_admitted_within_the_max_size(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Issue 10 (space): admission and the fill's reservation are one step. Before, two
    misses admitted at the same time each saw the other's bytes unreserved, and both fills
    ran: 2 x 12 MiB in a 20 MiB cache (seen with real daemons: 90 MB in an 80 MiB cache)."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    d = await start_daemon(
        cache_dir, glance.url, image_cache_max_size=20 * MiB, max_image_fraction=0.6
    )
    try:
        for _ in range(5):
            images = [glance.add_image(os.urandom(12 * MiB)) for _ in range(2)]
            for image in images:
                image.pause()
            gets = [asyncio.create_task(d.get(i.id)) for i in images]
            await until(
                lambda images=images: all(len(glance.data_requests(i.id)) == 2 for i in images),
                "both transfers asked (after each one's probe)",
            )
            assert d.store.total_size() <= 20 * MiB, d.store.total_size()
            for image in images:
                image.resume()
            answers = await asyncio.gather(*gets)
            assert [(a[0], a[2]) for a in answers] == [(200, i.data) for i in images]
            statuses = sorted(a[1]["Cache-Status"] for a in answers)
            assert statuses == [
                "cached; fwd=bypass; detail=cache-full",
                "cached; fwd=uri-miss; stored",
            ], statuses
            for image in images:  # an empty cache for the next round
                await until(lambda i=image.id: i not in d.filler.fills, "the fill ended")
                if d.store.get(image.id) is not None:
                    await d.filler.remove(image.id)
    finally:
        await stop_daemon(d)


async def test_a_cold_range_reserves_what_it_fetches_not_the_image(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Issue 9 item 6: ``Range: bytes=0-0`` on a large image must not flush the cache."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    d = await start_daemon(
        cache_dir, glance.url, image_cache_max_size=20 * MiB, max_image_fraction=1.0
    )
    try:
        olds = [glance.add_image(os.urandom(3 * MiB)) for _ in range(3)]
        for image in olds:
            assert (await d.get(image.id))[0] == 200
            await wait_complete(d, image.id)
        big = glance.add_image(os.urandom(20 * MiB))
        status, _, body = await d.get(big.id, Range="bytes=0-0")
        assert status == 206 and body == big.data[:1]
        assert all(d.store.get(i.id) is not None for i in olds)  # nothing evicted
        assert d.store.total_size() == 9 * MiB + 4 * MiB  # one 4 MiB chunk
    finally:
        await stop_daemon(d)


# ----------------------------------------- issue 9 item 8: one path for a refused caller
async def test_a_refused_caller_takes_the_same_path_cached_or_not(
    daemon: Daemon, glance: FakeGlance
) -> None:
    """Before: a miss asked for the image record beside the authorisation probe, a hit did
    not, so a refused caller could time whether this node holds an image. Now the record is
    only asked for once the probe allowed the download."""
    cached_image = glance.add_image(os.urandom(MiB))  # private to p1
    assert (await daemon.get(cached_image.id))[0] == 200
    await wait_complete(daemon, cached_image.id)
    cold_image = glance.add_image(os.urandom(MiB))

    def upstream_calls(image_id: str) -> list[tuple[str, str | None]]:
        return [(r.path, r.range) for r in glance.requests if f"/v2/images/{image_id}" in r.path]

    seen = {i.id: len(upstream_calls(i.id)) for i in (cached_image, cold_image)}
    for image in (cached_image, cold_image):
        status, _, _ = await daemon.get(image.id, token="token-p2")  # another project
        assert status == 404
    made = {i.id: upstream_calls(i.id)[seen[i.id] :] for i in (cached_image, cold_image)}
    probe = "bytes=0-0"
    assert made[cached_image.id] == [(f"/v2/images/{cached_image.id}/file", probe)]
    assert made[cold_image.id] == [(f"/v2/images/{cold_image.id}/file", probe)]
