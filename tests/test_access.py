"""Access history written in batches (cached/store/access.py): the index is the authority at
once, the xattrs catch up within ``access_record_interval`` and at a clean shutdown, a crash
loses only that much history and never a guarantee (a changed file is still re-verified).

Real ``cached serve`` processes where the point is the process's life (SIGTERM, kill -9), the
daemon in-process otherwise; the fake Glance on loopback, real files with real xattrs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Daemon, auth, start_daemon, stop_daemon, wait_complete, wait_idle
from daemonproc import CachedProcess
from fakeglance import FakeGlance
from test_integrity import flip_byte

from cached.jobs import schedule as jobs
from cached.store import xattrs

MiB = 1 << 20
ADMIN = "token-admin"
ADMIN_DIGEST = "sha256:" + hashlib.sha256(ADMIN.encode()).hexdigest()


def on_disk(path: Path) -> tuple[int, float]:
    """``user.hits`` and ``user.cached.last_accessed`` of the file (blocking)."""
    attrs = xattrs.read_all(path)
    return int(attrs[xattrs.HITS]), float(attrs[xattrs.LAST_ACCESSED])


async def eventually(check: Callable[[], object], within: float = 10.0) -> None:
    """Wait for ``check()`` (run in a thread: it reads files) to hold."""
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- a real cached serve
@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., CachedProcess]]:
    made: list[CachedProcess] = []

    def make(upstream: str, cache_dir: Path, **options: object) -> CachedProcess:
        conf = tmp_path / f"cached-{len(made)}.yaml"
        conf.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()))
        proc = CachedProcess(
            upstream, cache_dir, tmp_path / f"cached-{len(made)}.log", "-c", str(conf)
        )
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()


async def download(url: str, image_id: str) -> tuple[str, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v2/images/{image_id}/file", headers=auth("token-p1")) as resp,
    ):
        assert resp.status == 200
        return resp.headers["Cache-Status"], await resp.read()


async def cache_list(url: str) -> dict[str, dict[str, Any]]:
    """``GET /v2/cache``'s cached images by id."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v2/cache", headers=auth(ADMIN)) as resp,
    ):
        assert resp.status == 200
        return {row["image_id"]: row for row in (await resp.json())["cached_images"]}


def cached_manage(url: str) -> dict[str, Any]:
    """``cached-manage --json list-cached`` against the daemon (a real process; blocking)."""
    host = url.removeprefix("http://")
    out = subprocess.run(
        [sys.executable, "-m", "cached.ctl", "-H", host, "--os-auth-token", ADMIN]
        + ["--json", "list-cached"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {row["image_id"]: row for row in json.loads(out.stdout)["cached_images"]}


async def hit_three_times(
    glance: FakeGlance, spawn: Callable[..., CachedProcess], cache: Path
) -> tuple[CachedProcess, str, bytes]:
    """A daemon with a long interval that cached an image and served it as 3 hits."""
    data = os.urandom(MiB)
    image = glance.add_image(data)
    daemon = spawn(glance.url, cache, access_record_interval=3600, admin_tokens=[ADMIN_DIGEST])
    url = await asyncio.to_thread(daemon.start)
    assert (await download(url, image.id))[0] == "cached; fwd=uri-miss; stored"
    await eventually(lambda: xattrs.read_all(cache / image.id).get(xattrs.STATE) == b"complete")
    for _ in range(3):
        assert await download(url, image.id) == ("cached; hit", data)
    return daemon, image.id, data


async def test_hits_show_at_once_and_a_clean_shutdown_writes_them_for_the_restart(
    glance: FakeGlance, tmp_path: Path, spawn: Callable[..., CachedProcess]
) -> None:
    cache = tmp_path / "cache"
    daemon, image_id, data = await hit_three_times(glance, spawn, cache)
    # The index is the authority: the cache list and cached-manage count the hits now...
    assert (await cache_list(daemon.url))[image_id]["hits"] == 3
    assert (await asyncio.to_thread(cached_manage, daemon.url))[image_id]["hits"] == 3
    # ... while the durable copy waits for the interval (an hour here).
    assert (await asyncio.to_thread(on_disk, cache / image_id))[0] == 0
    listed = (await cache_list(daemon.url))[image_id]["last_accessed"]

    assert await asyncio.to_thread(daemon.stop) == 0  # SIGTERM: written on the way out
    assert await asyncio.to_thread(on_disk, cache / image_id) == (3, listed)

    url = await asyncio.to_thread(daemon.start)
    row = (await cache_list(url))[image_id]
    assert (row["hits"], row["last_accessed"]) == (3, listed)
    assert await download(url, image_id) == ("cached; hit", data)
    assert (await cache_list(url))[image_id]["hits"] == 4
    assert "re-verif" not in daemon.output()  # our own writes kept the commit record good
    assert await asyncio.to_thread(daemon.stop) == 0
    assert (await asyncio.to_thread(on_disk, cache / image_id))[0] == 4


async def test_a_crash_loses_the_interval_of_access_history_and_nothing_else(
    glance: FakeGlance, tmp_path: Path, spawn: Callable[..., CachedProcess]
) -> None:
    cache = tmp_path / "cache"
    daemon, image_id, data = await hit_three_times(glance, spawn, cache)
    committed = await asyncio.to_thread(on_disk, cache / image_id)
    await asyncio.to_thread(daemon.kill)  # kill -9: the pending history is lost

    assert await asyncio.to_thread(on_disk, cache / image_id) == committed
    url = await asyncio.to_thread(daemon.start)
    row = (await cache_list(url))[image_id]
    assert (row["hits"], row["last_accessed"]) == committed  # as of the commit
    # ... and nothing else: still a verified entry, served as a hit without re-reading it.
    assert await download(url, image_id) == ("cached; hit", data)
    assert "re-verif" not in daemon.output() and "suspect" not in daemon.output()
    assert await asyncio.to_thread(daemon.stop) == 0


# ---------------------------------------------------------------- the daemon in-process
@pytest.fixture
async def cache_dir(tmp_path: Path) -> Path:
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


@pytest.fixture
async def running() -> AsyncIterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        await stop_daemon(d)


async def started(made: list[Daemon], cache_dir: Path, upstream: str, **options: object) -> Daemon:
    d = await start_daemon(cache_dir, upstream, **options)
    made.append(d)
    return d


async def cached_image(d: Daemon, glance: FakeGlance, size: int = MiB) -> tuple[str, bytes]:
    data = os.urandom(size)
    image = glance.add_image(data)
    assert (await d.get(image.id))[0] == 200
    await wait_complete(d, image.id)
    await wait_idle(d, image.id)
    return image.id, data


async def test_the_durable_copy_catches_up_within_the_interval(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await started(running, cache_dir, glance.url, access_record_interval=0.2)
    image_id, data = await cached_image(d, glance)
    for _ in range(5):
        assert (await d.get(image_id))[1]["Cache-Status"] == "cached; hit"
    entry = d.store.get(image_id)
    assert entry is not None and entry.hits == 5
    await eventually(lambda: on_disk(cache_dir / image_id) == (5, entry.last_accessed))
    assert d.store.access.pending == 0 and not entry.suspect
    # Many hits, one write: the next flush finds nothing to do until the next hit.
    assert await d.store.access.flush() == 0


async def test_prune_orders_by_the_index_not_by_the_lagging_copy(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await started(running, cache_dir, glance.url, access_record_interval=3600)
    older, _ = await cached_image(d, glance)
    newer, _ = await cached_image(d, glance)
    assert (await d.get(older))[1]["Cache-Status"] == "cached; hit"  # now the recent one
    disk = {i: await asyncio.to_thread(on_disk, cache_dir / i) for i in (older, newer)}
    assert disk[older][1] < disk[newer][1]  # on disk, "older" still looks older

    result = await jobs.prune(d.store, d.filler, MiB)
    assert result.files == 1
    assert d.store.get(older) is not None and d.store.get(newer) is None


async def test_a_file_changed_before_its_record_is_flushed_is_still_reverified(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    """The batched write of the access xattrs does not vouch for a file that changed behind
    our back meanwhile: the entry is suspect, the change is caught before the next hit."""
    d = await started(running, cache_dir, glance.url, access_record_interval=3600)
    image_id, data = await cached_image(d, glance, 3 * MiB)
    assert (await d.get(image_id))[1]["Cache-Status"] == "cached; hit"  # pending
    path = cache_dir / image_id
    await asyncio.to_thread(flip_byte, path, MiB, keep_mtime=True)

    assert await d.store.access.flush() == 1
    entry = d.store.get(image_id)
    assert entry is not None and entry.suspect  # seen by the flush, not recorded over
    # Nor written to at all: a file that is not what the entry recorded may be another
    # entry's (evicted, and cached anew at the same path: tests/test_pressure.py).
    assert (await asyncio.to_thread(on_disk, path))[0] == 0

    status, headers, body = await d.get(image_id)
    assert (status, headers["Cache-Status"], body == data) == (200, "cached; fwd=bypass", True)
    assert d.store.get(image_id) is None and image_id in d.store.invalid


async def test_an_entry_deleted_before_the_flush_is_not_written(
    glance: FakeGlance, cache_dir: Path, running: list[Daemon]
) -> None:
    d = await started(running, cache_dir, glance.url, access_record_interval=3600)
    image_id, _ = await cached_image(d, glance)
    assert (await d.get(image_id))[1]["Cache-Status"] == "cached; hit"
    assert d.store.access.pending == 1
    await d.store.remove(image_id)
    assert await d.store.access.flush() == 0
    assert not (cache_dir / image_id).exists()
