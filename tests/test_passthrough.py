"""The pass-through to a Glance upstream (``cached/passthrough.py`` over
``GlanceBackend.send``) as a real ``cached serve`` process applies it: settings that a
reload changes reach the requests relayed after it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import auth
from daemonproc import CachedProcess
from fakeglance import FakeGlance

MiB = 1 << 20


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
