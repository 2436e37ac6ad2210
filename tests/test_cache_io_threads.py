"""Issue 14 item 7: every module does its cache-directory I/O on the cache guard's bounded
threads, never through ``asyncio.to_thread`` (the default executor). The prefetcher read and
wrote ``queue/`` there: 40 ``GET /v2/cache/progress`` on a hanging share used up the default
pool and a SIGHUP reload never finished.

How it is seen: a Python audit hook (PEP 578) notes every file system call Python audits
(``open``, ``os.listdir``, ``os.scandir``, ``os.remove``, ``os.rename``, ``os.mkdir``, ...)
whose path is in the cache directory and that runs on a thread of the default executor
(named ``asyncio_N``), while a daemon goes through the paths that touch the cache directory:
misses, hits, ranges, the prefetch queue and its progress, deletes, prune and clean.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import auth, manage, start_daemon, stop_daemon, wait_complete, wait_idle
from fakeglance import FakeGlance
from test_correctness import until

from cached.app import MANAGER

MiB = 1 << 20

_watched: list[str] = []  # the cache directory being watched, if any
_seen: list[tuple[str, str, str]] = []  # (event, path, thread) of each violation


def _hook(event: str, args: tuple[object, ...]) -> None:
    if not _watched or not (event == "open" or event.startswith(("os.", "shutil."))):
        return
    thread = threading.current_thread().name
    if not thread.startswith("asyncio_"):
        return
    for arg in args:
        if isinstance(arg, str | bytes | os.PathLike):
            path = os.fsdecode(arg)
            if path.startswith(_watched[0]):
                _seen.append((event, path, thread))


sys.addaudithook(_hook)  # cannot be removed: it does nothing unless a test watches


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Path]:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    _watched.append(str(cache_dir))
    _seen.clear()
    try:
        yield cache_dir
    finally:
        _watched.clear()


async def test_no_module_touches_the_cache_directory_through_to_thread(
    glance: FakeGlance, watch: Path
) -> None:
    d = await start_daemon(
        watch, glance.url, image_cache_max_size=64 * MiB, service_token="token-admin"
    )
    try:
        admin = manage(d)
        images = [glance.add_image(os.urandom(3 * MiB)) for _ in range(4)]
        # A miss, a hit, a range miss and hit.
        assert (await d.get(images[0].id))[0] == 200
        await wait_complete(d, images[0].id)
        assert (await d.get(images[0].id))[1]["Cache-Status"] == "cached; hit"
        assert (await d.get(images[1].id, Range="bytes=10-20"))[0] == 206
        await wait_idle(d, images[1].id)
        # The queue: legacy queueing (waits for the schedule), its progress, a run, a
        # dequeue; then a failed prefetch, whose record is written on the marker.
        for image in images[2:]:
            url = f"{d.admin_base}/v1/queued_images/{image.id}"
            async with admin.put(url, headers=auth("token-admin")) as resp:
                assert resp.status == 200, await resp.text()
        for _ in range(3):
            async with admin.get(f"{d.admin_base}/v2/cache/progress") as resp:
                assert resp.status == 200
        images[3].cut_after = MiB
        prefetcher = d.app[MANAGER].prefetcher
        await prefetcher.run()
        await until(lambda: d.store.get(images[2].id) is not None, "prefetched")
        async with admin.get(f"{d.admin_base}/v2/cache/progress") as resp:
            assert resp.status == 200
        async with admin.delete(f"{d.admin_base}/v2/cache/{images[3].id}") as resp:
            assert resp.status == 204
        async with admin.delete(f"{d.admin_base}/v2/cache/{images[0].id}") as resp:
            assert resp.status == 204
        await d.app[MANAGER].maintenance.prune()
        await d.app[MANAGER].maintenance.clean()
    finally:
        await stop_daemon(d)
    assert _seen == [], "cache-directory I/O on the default executor (asyncio.to_thread)"
