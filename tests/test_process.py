"""The daemon as a real process: crash and restart, signals, bad configuration, a busy port,
a large index. The fake Glance runs in the test's loop; ``cached serve`` is a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import pytest
from conftest import auth, tree
from daemonproc import CachedProcess, run_cached
from fakeglance import FakeGlance

from cached.store import Bitmap, xattrs

MiB = 1 << 20
CHUNK = 4 * MiB  # chunk_size_for() of every image here

Spawn = Callable[..., CachedProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Make ``cached serve`` processes; every one still running is killed at teardown."""
    made: list[CachedProcess] = []

    def make(upstream: str, cache_dir: Path, *extra: str) -> CachedProcess:
        proc = CachedProcess(upstream, cache_dir, tmp_path / f"cached-{len(made)}.log", *extra)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()


async def download(
    url: str, image_id: str, token: str = "token-p1"
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v2/images/{image_id}/file", headers=auth(token)) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def wait_for(check: Callable[[], object]) -> object:
    """Poll ``check`` (run in a thread: it touches files) until it returns something truthy."""
    for _ in range(500):  # about 10 s
        result = await asyncio.to_thread(check)
        if result:
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {check.__qualname__}")


def complete_on_disk(path: Path) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return xattrs.read_all(path).get(xattrs.STATE) == b"complete"
        except FileNotFoundError:
            return False

    return check


def published_chunks(path: Path) -> Callable[[], list[int]]:
    """The chunks the entry's persisted bitmap records as present (empty until there is one)."""

    def check() -> list[int]:
        try:
            attrs = xattrs.read_all(path)
        except FileNotFoundError:
            return []
        meta = json.loads(attrs[xattrs.META])
        count = -(-meta["size"] // meta["chunk_size"])
        return sorted(Bitmap(count, attrs[xattrs.BITMAP]))

    return check


def data_ranges(glance: FakeGlance, image_id: str, since: int = 0) -> list[str | None]:
    """Range headers of the upstream data requests (without the 1-byte authorisation probes)."""
    path = f"/v2/images/{image_id}/file"
    return [
        r.range
        for r in glance.requests[since:]
        if r.method == "GET" and r.path == path and r.range != "bytes=0-0"
    ]


async def test_kill_9_mid_fill_keeps_only_flushed_chunks_and_resumes(
    glance: FakeGlance, tmp_path: Path, spawn: Spawn
) -> None:
    data = os.urandom(48 * MiB)
    image = glance.add_image(data, rate=24 * MiB)  # ~2 s to fill
    cache = tmp_path / "cache"
    daemon = spawn(glance.url, cache)
    url = await asyncio.to_thread(daemon.start)
    partial = cache / "incomplete" / image.id

    client = asyncio.ensure_future(download(url, image.id))
    await wait_for(published_chunks(partial))  # the first flush recorded some chunks
    await asyncio.to_thread(daemon.kill)
    with pytest.raises(aiohttp.ClientError):
        await client

    assert tree(cache) == ["incomplete/", f"incomplete/{image.id}", "invalid/", "queue/"]
    attrs = await asyncio.to_thread(xattrs.read_all, partial)
    assert attrs[xattrs.STATE] == b"filling"
    meta = json.loads(attrs[xattrs.META])
    assert (meta["size"], meta["chunk_size"]) == (len(data), CHUNK)
    present = await asyncio.to_thread(published_chunks(partial))
    assert 0 < len(present) < 12, present
    assert present == list(range(len(present)))  # one sequential transfer
    on_disk = await asyncio.to_thread(partial.read_bytes)
    assert len(on_disk) == len(data)
    for i in present:  # every chunk the bitmap vouches for holds the image's bytes
        assert on_disk[i * CHUNK : (i + 1) * CHUNK] == data[i * CHUNK : (i + 1) * CHUNK], i

    image.rate = None
    before = len(glance.requests)
    url = await asyncio.to_thread(daemon.start)
    status, headers, body = await download(url, image.id)
    assert status == 200 and body == data
    assert headers["Cache-Status"] == "cached; fwd=partial; stored"
    await wait_for(complete_on_disk(cache / image.id))
    # resumed at the first chunk not recorded: only the missing chunks were fetched
    assert data_ranges(glance, image.id, before) == [
        f"bytes={len(present) * CHUNK}-{len(data) - 1}"
    ]
    assert tree(cache) == sorted(["incomplete/", "invalid/", "queue/", image.id])

    status, headers, body = await download(url, image.id)
    assert status == 200 and body == data
    assert headers["Cache-Status"] == "cached; hit"
    assert await asyncio.to_thread(daemon.stop) == 0


async def test_sigterm_when_idle_exits_0_and_restart_hits(
    glance: FakeGlance, tmp_path: Path, spawn: Spawn
) -> None:
    data = os.urandom(3 * MiB)
    image = glance.add_image(data)
    cache = tmp_path / "cache"
    daemon = spawn(glance.url, cache)
    url = await asyncio.to_thread(daemon.start)
    assert (await download(url, image.id))[2] == data
    await wait_for(complete_on_disk(cache / image.id))

    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait, 5) == 0
    print(f"idle SIGTERM -> exit in {time.monotonic() - started:.2f}s")
    assert "stopping" in daemon.output()
    assert "Traceback" not in daemon.output()

    url = await asyncio.to_thread(daemon.start)
    status, headers, body = await download(url, image.id)
    assert status == 200 and body == data
    assert headers["Cache-Status"] == "cached; hit"
    assert await asyncio.to_thread(daemon.stop) == 0


async def test_second_sigterm_during_a_fill_exits_0_at_once(
    glance: FakeGlance, tmp_path: Path, spawn: Spawn
) -> None:
    """The first SIGTERM drains (tests/test_ops.py); a second one stops at once, keeping
    what was flushed for a resume."""
    done = glance.add_image(os.urandom(MiB))
    data = os.urandom(40 * MiB)
    slow = glance.add_image(data, rate=4 * MiB)  # ~10 s: far longer than we wait
    cache = tmp_path / "cache"
    daemon = spawn(glance.url, cache)
    url = await asyncio.to_thread(daemon.start)
    assert (await download(url, done.id))[0] == 200
    await wait_for(complete_on_disk(cache / done.id))

    client = asyncio.ensure_future(download(url, slow.id))
    await wait_for(lambda: glance.bytes_sent.get(slow.id, 0) > 2 * MiB)
    daemon.signal(signal.SIGTERM)
    await wait_for(lambda: "stopping: no new connections" in daemon.output())
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(daemon.wait, 5)
    except subprocess.TimeoutExpired:
        client.cancel()
        pytest.fail("cached still runs 5 s after a second SIGTERM:\n" + daemon.output())
    print(f"second SIGTERM during a fill -> exit in {time.monotonic() - started:.2f}s")
    assert "second signal: stopping at once" in daemon.output()
    assert code == 0
    with pytest.raises(aiohttp.ClientError):  # cut short, never a complete-looking body
        await client
    # what was flushed is all that the bitmap records, and it is right
    partial = cache / "incomplete" / slow.id
    on_disk = await asyncio.to_thread(partial.read_bytes)
    for i in await asyncio.to_thread(published_chunks(partial)):
        assert on_disk[i * CHUNK : (i + 1) * CHUNK] == data[i * CHUNK : (i + 1) * CHUNK], i

    slow.rate = None
    url = await asyncio.to_thread(daemon.start)
    status, headers, body = await download(url, done.id)
    assert status == 200 and headers["Cache-Status"] == "cached; hit"
    status, _, body = await download(url, slow.id)
    assert status == 200 and body == data
    assert await asyncio.to_thread(daemon.stop) == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen: 127.0.0.1:0\nbogus_option: 1\n", ["unknown option 'bogus_option'"]),
        ("image_cache_max_size: lots\n", ["option 'image_cache_max_size'", "not a size"]),
        ("upstream_read_timeout: soon\n", ["option 'upstream_read_timeout'"]),
        ("listen: [127.0.0.1\n", ["not valid YAML"]),
        ("- listen\n- upstream\n", ["must be a mapping"]),
        (None, ["cannot read"]),
    ],
    ids=["unknown-key", "bad-size", "bad-number", "not-yaml", "not-a-mapping", "missing-file"],
)
def test_bad_config_file_exits_non_zero_naming_key_and_file(
    tmp_path: Path, text: str | None, expected: list[str]
) -> None:
    conf = tmp_path / "cached.yaml"
    if text is not None:
        conf.write_text(text)
    cache = tmp_path / "cache"
    images = tmp_path / "images"
    images.mkdir()
    res = run_cached(
        "serve", "-c", str(conf), "--upstream", f"file://{images}", "--cache-dir", str(cache)
    )
    assert res.returncode == 2, res.stderr
    assert str(conf) in res.stderr
    for needle in expected:
        assert needle in res.stderr
    assert "Traceback" not in res.stderr
    assert not cache.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["images"] + (["cached.yaml"] if text is not None else [])
    )


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = run_cached(
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"file://{images}",
            "--cache-dir",
            str(tmp_path / "cache"),
        )
    assert res.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}" in res.stderr
    assert "in use" in res.stderr.lower()
    assert "Traceback" not in res.stderr


def _clone(original: Path, data: bytes, ids: list[str], with_data: set[str]) -> None:
    """Copies of a complete entry under new ids: its xattrs, and its data where asked
    (the others are sparse files of the same size: start-up reads no data)."""
    attrs = xattrs.read_all(original)

    def clone(image_id: str) -> None:
        fd = os.open(original.with_name(image_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        try:
            if image_id in with_data:
                os.write(fd, data)
            else:
                os.ftruncate(fd, len(data))
            xattrs.write_many(fd, attrs)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(4) as pool:  # ext4 xattr blocks are slow to write one by one
        list(pool.map(clone, ids))


async def test_ten_thousand_entries_start_and_hit(
    glance: FakeGlance, tmp_path: Path, spawn: Spawn
) -> None:
    data = os.urandom(4096)
    image = glance.add_image(data)
    cache = tmp_path / "cache"
    daemon = spawn(glance.url, cache)
    url = await asyncio.to_thread(daemon.start)
    assert (await download(url, image.id))[2] == data
    await wait_for(complete_on_disk(cache / image.id))
    assert await asyncio.to_thread(daemon.stop) == 0

    clones = [str(uuid.uuid4()) for _ in range(10_000)]
    probes = [clones[0], clones[4321], clones[-1]]
    await asyncio.to_thread(_clone, cache / image.id, data, clones, set(probes))
    for probe in probes:  # the same data under the clone's id: it authorises upstream
        glance.add_image(data, image_id=probe)

    started = time.monotonic()
    url = await asyncio.to_thread(daemon.start)
    took = time.monotonic() - started
    index_line = next(line for line in daemon.output().splitlines() if "cache index:" in line)
    print(f"start-up with 10,001 entries: {took:.2f}s ({index_line.split('cache index: ')[1]})")
    assert "cache index: 10001 complete, 0 partial, 0 invalid" in index_line

    before = len(glance.requests)
    for probe in probes:
        status, headers, body = await download(url, probe)
        assert status == 200 and body == data
        assert headers["Cache-Status"] == "cached; hit"
    assert data_ranges(glance, probes[0], before) == []  # hits: no data transfer upstream
    assert await asyncio.to_thread(daemon.stop) == 0


async def test_a_second_daemon_on_the_same_cache_directory_refuses_to_start(
    glance: FakeGlance, tmp_path: Path, spawn: Spawn
) -> None:
    """Two daemons on one cache directory undo each other's work: the second one's start-up
    scan moved the first one's half-filled entry to invalid/. The second now refuses to start
    (exit 2, one line saying why) before it reads anything; the claim goes with the first
    process, kill -9 included."""
    cache = tmp_path / "cache"
    cache.mkdir()
    first = spawn(glance.url, cache)
    url = await asyncio.to_thread(first.start)
    done = glance.add_image(os.urandom(MiB))
    assert (await download(url, done.id))[0] == 200
    await wait_for(complete_on_disk(cache / done.id))
    filling = glance.add_image(os.urandom(3 * CHUNK))
    filling.pause()  # a fill the first daemon is in the middle of
    getting = asyncio.create_task(download(url, filling.id))
    await wait_for(lambda: (cache / "incomplete" / filling.id).exists())
    before = await asyncio.to_thread(tree, cache)

    args = ["serve", "--listen", "127.0.0.1:0", "--upstream", glance.url]
    second = await asyncio.to_thread(run_cached, *args, "--cache-dir", str(cache))
    assert second.returncode == 2, second.stdout + second.stderr
    assert "in use by another cached" in second.stderr, second.stderr
    assert await asyncio.to_thread(tree, cache) == before  # nothing moved to invalid/

    filling.resume()
    assert (await getting)[0] == 200
    assert (await download(url, done.id))[1]["Cache-Status"] == "cached; hit"
    await asyncio.to_thread(first.kill)  # kill -9: the claim goes with the process
    third = spawn(glance.url, cache)
    url = await asyncio.to_thread(third.start)
    assert (await download(url, done.id))[1]["Cache-Status"] == "cached; hit"
    assert await asyncio.to_thread(third.stop) == 0
