"""What cached passes through (``cached/edge/passthrough.py`` over ``GlanceBackend.send``, or
``cached/edge/fileapi.py`` over a file store): a reload's settings reach the requests relayed
after it (a real ``cached serve`` process), and the version document, like every other
pass-through answer, counts as an upstream request."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import Daemon, auth, manage, start_daemon, stop_daemon
from daemonproc import CachedProcess
from fakeglance import FakeGlance

MiB = 1 << 20
FORWARDS = 'cached_upstream_requests_total{kind="forward"}'


async def forwards(daemon: Daemon) -> float:
    async with manage(daemon).get(f"{daemon.admin_base}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    (line,) = [line for line in text.splitlines() if line.startswith(FORWARDS + " ")]
    return float(line.split()[1])


@pytest.mark.parametrize("kind", ["glance", "file"])
async def test_the_version_document_counts_as_an_upstream_request(
    glance: FakeGlance, tmp_path: Path, kind: str
) -> None:
    store = tmp_path / "images"
    store.mkdir()
    (tmp_path / "cache").mkdir()
    upstream = glance.url if kind == "glance" else f"file://{store}"
    daemon = await start_daemon(tmp_path / "cache", upstream)
    try:
        before = await forwards(daemon)
        async with daemon.session.get(f"{daemon.url}/versions") as resp:
            assert resp.status == 200
            ids = [v["id"] for v in (await resp.json())["versions"]]
            assert {"v2.14", "v2.18"} <= set(ids)
        assert await forwards(daemon) == before + 1
    finally:
        await stop_daemon(daemon)


async def wait_log(proc: CachedProcess, text: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if text in await asyncio.to_thread(proc.output):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{text!r} never logged:\n{proc.output()}")


async def test_a_reloaded_read_timeout_applies_to_the_pass_through(
    glance: FakeGlance, tmp_path: Path
) -> None:
    conf = tmp_path / "cached.yaml"
    # A 1 MiB cache admits nothing over 512 KiB: the image below passes through.
    conf.write_text("image_cache_max_size: 1M\nupstream_read_timeout: 600\n")
    (tmp_path / "cache").mkdir()
    proc = CachedProcess(glance.url, tmp_path / "cache", tmp_path / "cached.log", "-c", str(conf))
    url = await asyncio.to_thread(proc.start)
    try:
        conf.write_text("image_cache_max_size: 1M\nupstream_read_timeout: 1\n")
        proc.signal(signal.SIGHUP)
        await wait_log(proc, "reloaded: applied upstream_read_timeout")
        image = glance.add_image(os.urandom(2 * MiB))
        image.pause()  # the upstream sends the headers and a first piece, then nothing
        # The limit is a deadline for a broken daemon, far above the 1 s it waits now.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async with session.get(f"{url}/v2/images/{image.id}/file", headers=auth()) as resp:
                assert resp.status == 200
                assert resp.headers["Cache-Status"] == "cached; fwd=bypass; detail=too-large"
                # Cut off (a short body), not left waiting for the old 600 s.
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
        await wait_log(proc, "upstream broke off GET")
    finally:
        image.resume()
        await asyncio.to_thread(proc.stop)
