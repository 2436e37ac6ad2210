"""The hit path checks the very file it serves (cached/store/integrity.py ``open_for_hit``):
a file changed behind cached's back -- its content, its mtime set back with ``touch -d``, an
inode replaced under the same name -- is re-verified before it is served again; and the
``file`` upstream's authorisation opens a plain image file in one step while a symlink is
still followed only inside the store.

The daemon in-process, the fake Glance on loopback, real files with real xattrs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import Daemon, start_daemon, stop_daemon, wait_complete, wait_idle
from fakeglance import FakeGlance
from test_integrity import flip_byte

from cached.store import xattrs
from cached.store.integrity import SMALL_HIT

MiB = 1 << 20


@pytest.fixture
async def daemon_on(glance: FakeGlance, tmp_path: Path) -> AsyncIterator[Daemon]:
    (tmp_path / "cache").mkdir()
    d = await start_daemon(tmp_path / "cache", glance.url)
    yield d
    await stop_daemon(d)


async def cached_image(d: Daemon, glance: FakeGlance) -> tuple[str, bytes]:
    data = os.urandom(3 * MiB + 5)
    image = glance.add_image(data)
    assert (await d.get(image.id))[0] == 200
    await wait_complete(d, image.id)
    await wait_idle(d, image.id)
    status, headers, body = await d.get(image.id)
    assert (headers["Cache-Status"], body == data) == ("cached; hit", True)
    return image.id, data


def replace_inode(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file with the old one's xattrs and times, and rename it over
    the old name (as a restore from a backup, or an attacker, would)."""
    st = os.stat(path)
    attrs = xattrs.read_all(path)
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    for name, value in attrs.items():
        xattrs.write(new, name, value)
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(new, path)
    assert os.stat(path).st_ino != st.st_ino


@pytest.mark.parametrize("same_content", [True, False], ids=["restored", "different"])
async def test_a_replaced_inode_is_reverified_before_its_next_hit(
    glance: FakeGlance,
    daemon_on: Daemon,
    same_content: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = daemon_on
    image_id, data = await cached_image(d, glance)
    path = d.cache_dir / image_id
    replaced = data if same_content else data[:-1] + bytes([data[-1] ^ 1])
    await asyncio.to_thread(replace_inode, path, replaced)

    caplog.set_level(logging.WARNING, "cached")
    status, headers, body = await d.get(image_id)
    assert status == 200 and body == data  # never the changed bytes
    assert any("changed since it was verified" in r.getMessage() for r in caplog.records)
    if same_content:  # verified by digest, then served (and recorded) as a hit
        assert headers["Cache-Status"] == "cached; hit"
        entry = d.store.get(image_id)
        assert entry is not None and not entry.suspect
        assert entry.identity is not None and entry.identity.ino == os.stat(path).st_ino
        assert (await d.get(image_id))[1]["Cache-Status"] == "cached; hit"
    else:
        assert headers["Cache-Status"] == "cached; fwd=bypass"
        assert d.store.get(image_id) is None and image_id in d.store.invalid


async def test_touch_d_is_reverified_and_then_served(
    glance: FakeGlance, daemon_on: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    d = daemon_on
    image_id, data = await cached_image(d, glance)
    path = d.cache_dir / image_id
    await asyncio.to_thread(
        subprocess.run, ["touch", "-d", "2020-01-01 00:00:00", str(path)], check=True
    )
    caplog.set_level(logging.WARNING, "cached")
    status, headers, body = await d.get(image_id)
    assert (status, headers["Cache-Status"], body == data) == (200, "cached; hit", True)
    assert any("re-verified" in r.getMessage() for r in caplog.records)


async def test_content_changed_between_two_hits_is_never_served(
    glance: FakeGlance, daemon_on: Daemon
) -> None:
    d = daemon_on
    image_id, data = await cached_image(d, glance)
    await asyncio.to_thread(flip_byte, d.cache_dir / image_id, 2 * MiB, keep_mtime=True)
    status, headers, body = await d.get(image_id, Range="bytes=0-99")
    assert (status, headers["Cache-Status"], body) == (206, "cached; fwd=bypass", data[:100])
    assert d.store.get(image_id) is None


# ---------------------------------------------------------------- the file upstream
async def test_file_upstream_authorises_files_links_inside_and_refuses_the_rest(
    tmp_path: Path,
) -> None:
    """One open for a plain image file; a symlink is resolved, and followed only when it
    stays in the store (tests/test_hardening.py has the pass-through and record cases)."""
    images, cache, outside = tmp_path / "images", tmp_path / "cache", tmp_path / "outside"
    for p in (images, cache, outside):
        p.mkdir()
    plain, inside, out, to_dir, dangling = (str(uuid.uuid4()) for _ in range(5))
    (images / plain).write_bytes(b"plain image")
    (images / inside).symlink_to(plain)  # relative, within the store
    (outside / "secret").write_bytes(b"secret")
    (images / out).symlink_to(outside / "secret")
    (images / to_dir).mkdir()  # a directory named like an image is no image
    (images / dangling).symlink_to(images / "nothing-here")
    d = await start_daemon(cache, f"file://{images}")
    try:
        for image_id, expected in (
            (plain, (200, b"plain image")),
            (inside, (200, b"plain image")),
            (out, (404, None)),
            (to_dir, (404, None)),
            (dangling, (404, None)),
        ):
            for _ in range(2):  # the miss, then the hit (each authorised by the store)
                status, _, body = await d.get(image_id)
                assert (status, body if status == 200 else None) == expected, image_id
                if status == 200:
                    await wait_complete(d, image_id)
        # A file swapped for a link out of the store after it was cached: refused, though
        # the cached copy is still there.
        (images / plain).unlink()
        (images / plain).symlink_to(outside / "secret")
        assert (await d.get(plain))[0] == 404
        shutil.rmtree(outside)
    finally:
        await stop_daemon(d)


# ---------------------------------------------------------------- small hits
async def test_small_hits_and_small_ranges_are_byte_exact(
    glance: FakeGlance, daemon_on: Daemon
) -> None:
    """Hits of at most SMALL_HIT bytes are read with the open that checks the file and
    written from memory; larger ones sendfile. Both byte-exact, whole or ranged."""
    d = daemon_on
    small = glance.add_image(os.urandom(SMALL_HIT))
    large = glance.add_image(os.urandom(SMALL_HIT + 1))
    empty = glance.add_image(b"")
    for image in (small, large, empty):
        assert (await d.get(image.id))[0] == 200
        await wait_complete(d, image.id)
        await wait_idle(d, image.id)
    for image, headers, status, expected in (
        (small, {}, 200, small.data),
        (large, {}, 200, large.data),
        (empty, {}, 200, b""),
        (small, {"Range": "bytes=-10"}, 206, small.data[-10:]),
        (large, {"Range": f"bytes=1-{SMALL_HIT}"}, 206, large.data[1:]),  # SMALL_HIT bytes
        (large, {"Range": "bytes=0-"}, 206, large.data),
    ):
        status_got, got, body = await d.get(image.id, **headers)
        assert (status_got, got["Cache-Status"], body == expected) == (status, "cached; hit", True)
        assert got["Content-Length"] == str(len(expected))
    entry = d.store.get(small.id)
    assert entry is not None and entry.hits == 2 and entry.readers == 0
