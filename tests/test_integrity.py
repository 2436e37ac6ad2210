"""Stored-state integrity (issue 9, items 4 and 5): tampered or corrupt metadata never crashes
the daemon nor is trusted; a changed or corrupt file is never served as a hit.

Real files with real xattrs written by the test, the fake Glance on loopback, the daemon
in-process (restarted on the same cache directory) and as a real ``cached serve`` process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import (
    Daemon,
    auth,
    data_gets,
    start_daemon,
    stop_daemon,
    tree,
    wait_complete,
    wait_idle,
)
from daemonproc import CachedProcess
from fakeglance import FakeGlance

from cached.app import CONFIG, INTEGRITY, SCHEDULER
from cached.ops.lifecycle import LIVE, RELOADABLES
from cached.store import State, Store, xattrs
from cached.store import entry as entries
from cached.store.written import CTIME_SLACK_NS, WRITTEN

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 4 * MiB
EMPTY = ["incomplete/", "invalid/", "queue/"]


def new_id() -> str:
    return str(uuid.uuid4())


def plant(
    path: Path,
    size: int,
    meta: bytes,
    *,
    state: bytes = b"complete",
    bitmap: bytes | None = None,
) -> None:
    """A sparse file of ``size`` bytes with the given raw xattrs (as a tamperer would)."""
    with path.open("wb") as f:
        f.truncate(size)
    xattrs.write(path, xattrs.META, meta)
    xattrs.write(path, xattrs.STATE, state)
    if bitmap is not None:
        xattrs.write(path, xattrs.BITMAP, bitmap)


def meta(size: int | str, chunk: int | str = CHUNK, **more: object) -> bytes:
    extra = "".join(f',"{k}":{v}' for k, v in more.items())
    return f'{{"size":{size},"chunk_size":{chunk}{extra}}}'.encode()


# Each case: (name, file size, user.cached.meta, user.cached.bitmap or None, state).
BAD: list[tuple[str, int, bytes, bytes | None, bytes]] = [
    ("chunk_size 0", 10 * MiB, meta(10 * MiB, 0), b"\x07", b"complete"),
    ("size 1e400", 10 * MiB, meta("1e400", CHUNK), b"\x07", b"complete"),
    ("1,500-deep JSON", 100, b"[" * 1500 + b"]" * 1500, None, b"complete"),
    (
        "1,500-deep inside",
        100,
        b'{"size":100,"x":' + b"[" * 1500 + b"]" * 1500 + b"}",
        None,
        b"complete",
    ),
    ("tiny chunk, large sparse file", 64 * GiB, meta(64 * GiB, 1), None, b"filling"),
    ("over-long bitmap", 8 * MiB, meta(8 * MiB), b"\x03" + bytes(2000), b"filling"),
    ("bitmap claims past the end", 9 * MiB, meta(9 * MiB), b"\x0f", b"filling"),
    ("size larger than the file", MiB, meta(2 * MiB), b"\x00", b"filling"),
    ("size smaller than the file", 2 * MiB, meta(MiB), b"\x00", b"complete"),
    ("negative size", 0, meta(-1), b"\x00", b"complete"),
    ("size true", 1, b'{"size":true,"chunk_size":4194304}', b"\x00", b"complete"),
    ("size a string", 5, b'{"size":"5","chunk_size":4194304}', b"\x00", b"complete"),
    ("size NaN", 5, b'{"size":NaN,"chunk_size":4194304}', b"\x00", b"complete"),
    ("chunk_size not the store's", 8 * MiB, meta(8 * MiB, 8 * MiB), b"\x01", b"filling"),
    ("chunk_size a float", 8 * MiB, meta(8 * MiB, "4194304.0"), b"\x03", b"filling"),
    ("meta a list", 5, b"[5, 4194304]", b"\x00", b"complete"),
    ("meta not UTF-8", 5, b'{"size":5,"chunk_size":4194304,"checksum":"\xff"}', None, b"complete"),
    ("checksum not hex", 5, meta(5, CHUNK, checksum='"../../etc"'), b"\x01", b"complete"),
    ("state unknown", 5, meta(5, CHUNK, checksum='"ab"'), b"\x01", b"COMPLETE "),
]


@pytest.mark.parametrize(("name", "size", "raw", "bitmap", "state"), BAD, ids=[c[0] for c in BAD])
def test_load_refuses_metadata_out_of_bounds(
    tmp_path: Path, name: str, size: int, raw: bytes, bitmap: bytes | None, state: bytes
) -> None:
    path = tmp_path / new_id()
    plant(path, size, raw, state=state, bitmap=bitmap)
    with pytest.raises(ValueError, match="bad cache metadata"):
        entries.load(path)


def test_every_bad_case_goes_to_invalid_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    asyncio.run(Store(root).open())  # the layout
    planted = []
    for i, (_, size, raw, bitmap, state) in enumerate(BAD):
        area = root if i % 2 else root / "incomplete"
        image_id = new_id()
        plant(area / image_id, size, raw, state=state, bitmap=bitmap)
        planted.append(image_id)
    good = new_id()
    plant(root / "incomplete" / good, 5, meta(5), state=b"filling", bitmap=b"\x00")

    store = Store(root)
    with caplog.at_level(logging.WARNING, logger="cached.store"):
        asyncio.run(store.open())
    store.close()
    assert list(store.entries) == [good]
    assert store.invalid == set(planted)
    assert tree(root) == sorted([*EMPTY, f"incomplete/{good}", *(f"invalid/{i}" for i in planted)])
    moved = [r.getMessage() for r in caplog.records if "to invalid/" in r.getMessage()]
    assert len(moved) == len(BAD)
    for image_id in planted:  # one line each, naming the file
        assert sum(image_id in line for line in moved) == 1
    assert xattrs.read_all(root / "invalid" / planted[0])["user.cached.state"] == b"invalid"


def test_bookkeeping_garbage_falls_back_to_zero(tmp_path: Path) -> None:
    path = tmp_path / new_id()
    plant(path, 5, meta(5), state=b"filling", bitmap=b"\x00")
    for name, value in [
        (xattrs.HITS, b"1e400"),
        (xattrs.LAST_ACCESSED, b"nan"),
        (xattrs.LAST_MODIFIED, b"inf"),
    ]:
        xattrs.write(path, name, value)
    entry = entries.load(path)
    assert (entry.hits, entry.last_accessed, entry.last_modified) == (0, 0.0, 0.0)


# ------------------------------------------------------------------------- the daemon
@pytest.fixture
async def cache_dir(tmp_path: Path) -> Path:
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


@pytest.fixture
async def running(glance: FakeGlance, cache_dir: Path) -> AsyncIterator[list[Daemon]]:
    """Daemons started by the test (``restart``); every one is stopped at teardown."""
    made: list[Daemon] = []
    yield made
    for d in made:
        await stop_daemon(d)


async def restart(made: list[Daemon], cache_dir: Path, upstream: str, **options: object) -> Daemon:
    while made:
        await stop_daemon(made.pop())
    d = await start_daemon(cache_dir, upstream, **options)
    made.append(d)
    return d


async def cached_image(d: Daemon, glance: FakeGlance, size: int = 3 * CHUNK) -> tuple[str, bytes]:
    data = os.urandom(size)
    image = glance.add_image(data)
    status, headers, body = await d.get(image.id)
    assert (status, body == data) == (200, True)
    await wait_complete(d, image.id)
    await wait_idle(d, image.id)
    return image.id, data


def flip_byte(path: Path, offset: int, *, keep_mtime: bool) -> None:
    """Corrupt one byte in place; optionally set mtime back as a careful tamperer would.

    Waits (on the clock, a condition) until the file's ctime is older than the slack the
    check at start allows after our own last write (cached/store/written.py).
    """
    st = os.stat(path)
    while time.time_ns() <= st.st_ctime_ns + CTIME_SLACK_NS:
        time.sleep(0.01)
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(path).st_mtime_ns == st.st_mtime_ns


async def eventually(check: object, within: float = 10.0) -> None:
    """Wait for ``check()`` (run in a thread: it may read files) to hold."""
    for _ in range(int(within / 0.02)):
        if await asyncio.to_thread(check):  # type: ignore[arg-type]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["mtime-changed", "mtime-restored"])
async def test_a_changed_file_is_reverified_before_a_hit_and_never_served_corrupt(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon], keep_mtime: bool
) -> None:
    d = await restart(running, cache_dir, glance.url)
    image_id, data = await cached_image(d, glance)
    status, headers, body = await d.get(image_id)
    assert headers["Cache-Status"] == "cached; hit" and body == data
    flip_byte(cache_dir / image_id, 5 * MiB, keep_mtime=keep_mtime)

    status, headers, body = await d.get(image_id)
    # Not a hit: the digest over the file failed, the entry went to invalid/, and this
    # download passed through to the upstream.
    assert (status, headers["Cache-Status"], body == data) == (200, "cached; fwd=bypass", True)
    assert d.store.get(image_id) is None
    assert tree(cache_dir) == sorted([*EMPTY, f"invalid/{image_id}"])
    error = (await asyncio.to_thread(xattrs.read_all, cache_dir / "invalid" / image_id))[
        "user.error"
    ]
    assert error.startswith(b"re-verification failed: sha512 mismatch")

    status, headers, body = await d.get(image_id)  # fetched again, then hits again
    assert (headers["Cache-Status"], body == data) == ("cached; fwd=uri-miss; stored", True)
    await wait_complete(d, image_id)
    status, headers, body = await d.get(image_id)
    assert (headers["Cache-Status"], body == data) == ("cached; hit", True)


@pytest.mark.parametrize("interval", [0, 0.2], ids=["every-hit", "batched"])
async def test_hits_keep_the_commit_record_current(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon], interval: float
) -> None:
    """Our own metadata writes (hit counter, access time) move ctime: the record follows them,
    so neither the next hit nor the next start re-verifies an unchanged file. (Batched: the
    hit counter on disk catches up within access_record_interval, cached/store/access.py.)"""
    d = await restart(running, cache_dir, glance.url, access_record_interval=interval)
    image_id, data = await cached_image(d, glance)
    for _ in range(3):
        assert (await d.get(image_id))[1]["Cache-Status"] == "cached; hit"
    entry = d.store.get(image_id)
    assert entry is not None and not entry.suspect
    await eventually(lambda: xattrs.read_all(cache_dir / image_id)["user.hits"] == b"3")
    assert (await asyncio.to_thread(xattrs.read_all, cache_dir / image_id))["user.hits"] == b"3"
    assert not entry.suspect
    d = await restart(running, cache_dir, glance.url)
    entry = d.store.get(image_id)
    assert entry is not None and entry.complete and not entry.suspect
    assert (await d.get(image_id))[1]["Cache-Status"] == "cached; hit"


async def test_a_file_changed_while_the_daemon_was_down_is_reverified_at_start(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await restart(running, cache_dir, glance.url)
    image_id, data = await cached_image(d, glance)
    good_id, good = await cached_image(d, glance)
    await stop_daemon(running.pop())
    flip_byte(cache_dir / image_id, 0, keep_mtime=True)  # ctime moves; nobody can set it back

    d = await restart(running, cache_dir, glance.url)
    # Verified in the background at start: the corrupt one goes, the good one stays.
    await eventually(lambda: (cache_dir / "invalid" / image_id).exists())
    status, headers, body = await d.get(image_id)
    assert headers["Cache-Status"] != "cached; hit" and body == data
    status, headers, body = await d.get(good_id)
    assert (headers["Cache-Status"], body == good) == ("cached; hit", True)


async def test_an_entry_without_commit_record_is_verified_then_served(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    """A cache written before commit records existed: verified once, then a plain hit."""
    d = await restart(running, cache_dir, glance.url)
    image_id, data = await cached_image(d, glance)
    await stop_daemon(running.pop())
    os.removexattr(cache_dir / image_id, WRITTEN)

    d = await restart(running, cache_dir, glance.url)
    entry = d.store.get(image_id)
    assert entry is not None and entry.complete
    before = len(data_gets(glance, image_id))
    status, headers, body = await d.get(image_id)
    assert (headers["Cache-Status"], body == data) == ("cached; hit", True)
    assert len(data_gets(glance, image_id)) == before  # served from the verified file
    assert not entry.suspect and WRITTEN in (
        await asyncio.to_thread(xattrs.read_all, cache_dir / image_id)
    )


async def test_no_digest_and_no_record_is_not_trusted(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await restart(running, cache_dir, glance.url)
    image = glance.add_image(os.urandom(MiB))
    image.checksum = image.os_hash_algo = image.os_hash_value = None
    assert (await d.get(image.id))[0] == 200
    await wait_complete(d, image.id)
    await stop_daemon(running.pop())
    os.removexattr(cache_dir / image.id, WRITTEN)
    d = await restart(running, cache_dir, glance.url)
    assert d.store.get(image.id) is None and image.id in d.store.invalid


async def partial_entry(d: Daemon, glance: FakeGlance) -> tuple[str, bytes]:
    """A 3-chunk image of which only chunk 0 is cached (a range request)."""
    data = os.urandom(3 * CHUNK)
    image = glance.add_image(data)
    status, _, body = await d.get(image.id, Range=f"bytes=0-{CHUNK - 1}")
    assert (status, body == data[:CHUNK]) == (206, True)
    await wait_idle(d, image.id)
    entry = d.store.get(image.id)
    assert entry is not None and list(entry.present) == [0]
    return image.id, data


async def test_state_complete_on_a_partial_is_not_served_with_zeros(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await restart(running, cache_dir, glance.url)
    image_id, data = await partial_entry(d, glance)
    await stop_daemon(running.pop())
    await asyncio.to_thread(
        xattrs.write, cache_dir / "incomplete" / image_id, xattrs.STATE, b"complete"
    )

    d = await restart(running, cache_dir, glance.url)
    entry = d.store.get(image_id)
    assert entry is not None and entry.state is State.FILLING  # a partial entry again
    status, headers, body = await d.get(image_id)
    assert (status, headers["Cache-Status"], body == data) == (
        200,
        "cached; fwd=partial; stored",
        True,
    )
    assert data_gets(glance, image_id)[-1] == f"bytes={CHUNK}-{3 * CHUNK - 1}"


async def test_state_complete_with_a_full_bitmap_on_a_partial_is_verified_first(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await restart(running, cache_dir, glance.url)
    image_id, data = await partial_entry(d, glance)
    await stop_daemon(running.pop())
    path = cache_dir / "incomplete" / image_id
    with path.open("r+b") as f:  # make the holes data (zeros): the bitmap's claim holds up
        f.seek(CHUNK)
        f.write(bytes(2 * CHUNK))
    await asyncio.to_thread(xattrs.write, path, xattrs.BITMAP, b"\x07")
    await asyncio.to_thread(xattrs.write, path, xattrs.STATE, b"complete")

    d = await restart(running, cache_dir, glance.url)
    status, headers, body = await d.get(image_id)
    assert headers["Cache-Status"] != "cached; hit" and body == data  # never the zeros
    assert image_id in d.store.invalid or (cache_dir / "invalid" / image_id).exists()


async def test_an_over_claiming_bitmap_on_a_partial_is_not_served(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await restart(running, cache_dir, glance.url)
    image_id, data = await partial_entry(d, glance)
    await stop_daemon(running.pop())
    await asyncio.to_thread(
        xattrs.write, cache_dir / "incomplete" / image_id, xattrs.BITMAP, b"\x07"
    )  # claims all 3

    d = await restart(running, cache_dir, glance.url)
    entry = d.store.get(image_id)
    assert entry is not None and list(entry.present) == [0]  # the holes were never written
    assert (await asyncio.to_thread(xattrs.read_all, entry.path))[xattrs.BITMAP] == b"\x01"
    status, _, body = await d.get(image_id, Range=f"bytes={2 * CHUNK}-{2 * CHUNK + 99}")
    assert (status, body) == (206, data[2 * CHUNK : 2 * CHUNK + 100])  # not 100 zeros
    assert data_gets(glance, image_id)[-1] == f"bytes={2 * CHUNK}-{3 * CHUNK - 1}"


# ----------------------------------------------------------------------------- scrub
async def test_scrub_finds_a_flipped_byte_and_notes_unverifiable_entries(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await restart(running, cache_dir, glance.url)
    bad_id, bad = await cached_image(d, glance)
    good_id, good = await cached_image(d, glance, MiB)
    plain = glance.add_image(os.urandom(MiB))
    plain.checksum = plain.os_hash_algo = plain.os_hash_value = None
    assert (await d.get(plain.id))[0] == 200
    await wait_complete(d, plain.id)
    # Silent corruption: the byte changes, mtime stays (the per-hit stat check is not asked:
    # no request comes before the scrub).
    flip_byte(cache_dir / bad_id, 3 * CHUNK - 1, keep_mtime=True)

    result = await d.app[INTEGRITY].scrub()
    assert (result.checked, result.corrupt, result.unverifiable) == (1, 1, 1)
    assert result.bytes == MiB
    assert d.store.get(bad_id) is None and (cache_dir / "invalid" / bad_id).exists()
    status, headers, body = await d.get(bad_id)
    assert headers["Cache-Status"] != "cached; hit" and body == bad
    assert (await d.get(good_id))[1]["Cache-Status"] == "cached; hit"
    assert (await d.get(plain.id))[1]["Cache-Status"] == "cached; hit"


async def test_scrub_runs_on_its_schedule(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await restart(running, cache_dir, glance.url, scrub_interval=1, scrub_rate=64)
    image_id, data = await cached_image(d, glance)
    flip_byte(cache_dir / image_id, 1, keep_mtime=True)
    await eventually(lambda: (cache_dir / "invalid" / image_id).exists())
    assert d.store.get(image_id) is None


async def test_scrub_waits_while_a_fill_runs(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await restart(running, cache_dir, glance.url)
    image_id, _ = await cached_image(d, glance)
    slow = glance.add_image(os.urandom(2 * MiB), rate=256 * 1024)  # ~8 s to fill
    download = asyncio.ensure_future(d.get(slow.id))
    await eventually(lambda: slow.id in d.filler.fills)
    scrub = asyncio.ensure_future(d.app[INTEGRITY].scrub())
    fill_running_when_scrub_ended: list[bool] = []
    scrub.add_done_callback(lambda _: fill_running_when_scrub_ended.append(bool(d.filler.fills)))
    assert (await download)[0] == 200
    result = await scrub
    # The pass (12 MiB, well under a second) waited for the ~8 s fill to end.
    assert fill_running_when_scrub_ended == [False]
    assert (result.checked, result.corrupt) == (1, 0)


async def test_a_hit_on_a_changed_file_does_not_wait_for_a_throttled_scrub(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    # 12 MiB at 1 MiB/s: the pass over the big entry lasts about 12 s whatever the machine.
    d = await restart(running, cache_dir, glance.url, scrub_rate=1)
    big_id, _ = await cached_image(d, glance)
    small_id, small = await cached_image(d, glance, MiB)
    scrub = asyncio.ensure_future(d.app[INTEGRITY].scrub())
    flip_byte(cache_dir / small_id, 7, keep_mtime=False)
    status, headers, body = await d.get(small_id)
    assert (headers["Cache-Status"], body == small) == ("cached; fwd=bypass", True)
    assert not scrub.done()  # the request's verification did not queue behind it
    await d.app[INTEGRITY].close()  # stops the pass within a piece
    await scrub


async def test_a_reload_applies_scrub_interval_and_rate(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await restart(running, cache_dir, glance.url)
    old = d.app[CONFIG]
    new = dataclasses.replace(old, scrub_interval=5, scrub_rate=2.5)
    assert {"scrub_interval", "scrub_rate"} <= LIVE
    assert d.app[RELOADABLES].apply(old, new) == []
    job = d.app[SCHEDULER].get_job("scrub")
    assert job.trigger.interval.total_seconds() == 5
    assert d.app[INTEGRITY].settings == (2.5 * MiB, 5)


# ----------------------------------------------------------------------- a real process
@pytest.fixture
def proc(tmp_path: Path) -> Iterator[list[CachedProcess]]:
    made: list[CachedProcess] = []
    yield made
    for p in made:
        p.kill()


async def test_the_daemon_starts_and_serves_on_a_cache_of_tampered_metadata(
    glance: FakeGlance, tmp_path: Path, proc: list[CachedProcess]
) -> None:
    """Before: ZeroDivisionError/OverflowError/RecursionError at start, the process exited
    (under systemd, a restart loop), or a multi-GiB bitmap was built."""
    cache = tmp_path / "cache"
    daemon = CachedProcess(glance.url, cache, tmp_path / "cached.log")
    proc.append(daemon)
    url = await asyncio.to_thread(daemon.start)
    data = os.urandom(CHUNK + 5)
    good = glance.add_image(data)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v2/images/{good.id}/file", headers=auth()) as r:
            assert r.status == 200 and await r.read() == data
    await eventually(lambda: xattrs.read_all(cache / good.id).get(xattrs.STATE) == b"complete")
    assert await asyncio.to_thread(daemon.stop) == 0

    planted = {}
    for i, (_, size, raw, bitmap, state) in enumerate(BAD):
        image = glance.add_image(os.urandom(1000 + i))
        area = cache if i % 2 else cache / "incomplete"
        await asyncio.to_thread(plant, area / image.id, size, raw, state=state, bitmap=bitmap)
        planted[image.id] = image

    url = await asyncio.to_thread(daemon.start)
    out = daemon.output()
    assert "Traceback" not in out
    assert f"cache index: 1 complete, 0 partial, {len(BAD)} invalid" in out
    assert sum("to invalid/" in line for line in out.splitlines()) == len(BAD)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/v2/images/{good.id}/file", headers=auth()) as r:
            assert r.headers["Cache-Status"] == "cached; hit" and await r.read() == data
        for image_id, image in list(planted.items())[:4]:
            async with session.get(f"{url}/v2/images/{image_id}/file", headers=auth()) as r:
                assert r.status == 200 and await r.read() == image.data
                assert r.headers["Cache-Status"] == "cached; fwd=uri-miss; stored"
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert await asyncio.to_thread(daemon.stop) == 0


async def test_a_hit_being_sent_is_cut_when_the_scrub_finds_its_entry_corrupt(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await restart(running, cache_dir, glance.url, scrub_rate=4096)
    size = 48 * MiB  # three 16 MiB sendfile slices, more than the socket buffers hold
    image_id, data = await cached_image(d, glance, size)
    host, port = d.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    request = f"GET /v2/images/{image_id}/file HTTP/1.1\r\nHost: x\r\nX-Auth-Token: token-p1\r\n"
    writer.write(request.encode() + b"\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Cache-Status: cached; hit" in head
    got = len(await reader.readexactly(MiB))  # then stop reading: the server blocks mid-slice
    await asyncio.to_thread(flip_byte, cache_dir / image_id, size - 1, keep_mtime=True)
    result = await d.app[INTEGRITY].scrub()
    assert result.corrupt == 1
    while got < size and (chunk := await reader.read(1 << 20)):  # the slice in flight, then cut
        got += len(chunk)
    writer.close()
    assert got < size
