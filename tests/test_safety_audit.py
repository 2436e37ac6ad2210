"""Audit mode against a running daemon (issue 18; in-process on loopback, and one ``cached
serve`` subprocess): images made by qemu-img, served by the fake
Glance (declared right and wrong) or by the ``file`` backend; the verdict lands in the entry's
``user.cached.verdict`` before the commit record (the hit that follows is a plain hit, not a
re-verification), hits carry ``Cached-Image-Verdict``, the bytes are served unchanged, and a
restarted daemon reads the verdict back from the file. ``image_safety_mode: off`` does none
of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import uuid
from pathlib import Path

import aiohttp
import pytest
from conftest import (
    Daemon,
    auth,
    start_daemon,
    stop_daemon,
    wait_complete,
    wait_idle,
    wait_until,
)
from daemonproc import CachedProcess
from fakeglance import FakeGlance
from scrapes import Delta, scrape
from test_safety_inspect import qemu_img

from cached.safety import record
from cached.safety.verdict import Outcome
from cached.store import codec, written, xattrs

MiB = 1 << 20
HIT = "cached; hit"
MISS = "cached; fwd=uri-miss; stored"


def make(tmp_path: Path, kind: str) -> bytes:
    """A qemu-img image: ``clean`` qcow2, ``backing`` (a qcow2 with a backing file) or
    ``backing-big`` (the same, 12 MiB of data: three 4 MiB chunks)."""
    out = tmp_path / f"{kind}-{uuid.uuid4().hex[:8]}.qcow2"
    if kind == "clean":
        qemu_img("create", "-q", "-f", "qcow2", out, "64M")
    elif kind == "backing":
        qemu_img("create", "-q", "-f", "raw", tmp_path / "base.raw", "1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", tmp_path / "base.raw", "-F", "raw", out)
    elif kind == "backing-big":
        noise = tmp_path / "noise.raw"
        noise.write_bytes(random.Random(3).randbytes(12 * MiB))
        qemu_img("convert", "-f", "raw", "-O", "qcow2", noise, out)
        qemu_img("rebase", "-u", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", out)
    else:
        raise AssertionError(kind)
    return out.read_bytes()


def stored_verdict(daemon: Daemon, image_id: str) -> record.Verdict | None:
    path = daemon.cache_dir / image_id
    if record.NAME not in os.listxattr(path):
        return None
    return record.loads(os.getxattr(path, record.NAME))


async def as_older_entry(path: Path) -> None:
    """Make the complete entry at ``path`` one filled before its metadata kept the declared
    formats (no ``disk_format``/``container_format`` in ``user.cached.meta``), its commit
    record written again (a daemon that is stopped: as that older daemon left it)."""
    await asyncio.to_thread(_strip_formats, path)


def _strip_formats(path: Path) -> None:
    meta = json.loads(os.getxattr(path, xattrs.META))
    meta.pop("disk_format", None)
    meta.pop("container_format", None)
    os.setxattr(path, xattrs.META, codec.dumps(meta))
    written.record(path)


async def miss_then_hit(daemon: Daemon, image_id: str, data: bytes) -> dict[str, str]:
    """GET twice: a miss that serves ``data``, then a hit that does; the hit's headers."""
    status, headers, body = await daemon.get(image_id)
    assert (status, headers["Cache-Status"], body == data) == (200, MISS, True)
    assert "Cached-Image-Verdict" not in headers  # decided at the end of the fill
    await wait_complete(daemon, image_id)
    status, headers, body = await daemon.get(image_id)
    assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
    entry = daemon.store.get(image_id)
    assert entry is not None and not entry.suspect  # the commit record covers the xattr
    return headers


@pytest.mark.parametrize(
    ("kind", "disk_format", "container_format", "outcome", "header"),
    [
        ("clean", "qcow2", "bare", Outcome.SAFE, 'safe; detected="qcow2"; declared="qcow2"'),
        ("clean", "vmdk", "bare", Outcome.MISMATCH,
         'mismatch; detected="qcow2"; declared="vmdk"'),
        ("clean", "raw", "bare", Outcome.MISMATCH, 'mismatch; detected="qcow2"; declared="raw"'),
        # CVE-2024-40767: a "raw" image that is a qcow2 with a backing file
        ("backing", "raw", "bare", Outcome.UNSAFE,
         'unsafe; detected="qcow2"; declared="raw"; checks="backing_file"'),
        # a declaration that is no format name never reaches the header as written
        ("clean", 'qcow2"\r\nX-Injected: 1', "bare", Outcome.MISMATCH,
         'mismatch; detected="qcow2"; declared="?"'),
        # Glance does not inspect non-bare containers; the cache does
        ("backing", "qcow2", "ovf", Outcome.UNSAFE,
         'unsafe; detected="qcow2"; declared="qcow2"; checks="backing_file"'),
    ],
)  # fmt: skip
async def test_audit_verdict_stored_and_sent_on_hits(
    daemon: Daemon,
    glance: FakeGlance,
    tmp_path: Path,
    kind: str,
    disk_format: str,
    container_format: str,
    outcome: Outcome,
    header: str,
) -> None:
    data = make(tmp_path, kind)
    image = glance.add_image(data, disk_format=disk_format, container_format=container_format)
    before = await scrape(daemon)
    headers = await miss_then_hit(daemon, image.id, data)
    assert headers["Cached-Image-Verdict"] == header
    judged = Delta(before, await scrape(daemon))
    assert judged("cached_image_verdicts_total", verdict=outcome.value) == 1
    assert sum(judged("cached_image_verdicts_total", verdict=o.value) for o in Outcome) == 1
    verdict = stored_verdict(daemon, image.id)
    assert verdict is not None
    declared = disk_format if disk_format.isalnum() else "?"
    assert (verdict.outcome, verdict.detected, verdict.declared) == (outcome, "qcow2", declared)
    assert "X-Injected" not in headers
    assert verdict.virtual_size == (MiB if kind == "backing" else 64 * MiB)


async def test_restarted_daemon_reads_the_verdict_from_the_entry(
    glance: FakeGlance, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    first = await start_daemon(cache, glance.url)
    try:
        await miss_then_hit(first, image.id, data)
    finally:
        await stop_daemon(first)
    second = await start_daemon(cache, glance.url)
    try:
        status, headers, body = await second.get(image.id)
        assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
        assert headers["Cached-Image-Verdict"] == (
            'unsafe; detected="qcow2"; declared="raw"; checks="backing_file"'
        )
    finally:
        await stop_daemon(second)


async def test_an_unparseable_verdict_is_no_verdict_and_the_first_hit_inspects_again(
    glance: FakeGlance, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    first = await start_daemon(cache, glance.url)
    try:
        await miss_then_hit(first, image.id, data)
    finally:
        await stop_daemon(first)
    os.setxattr(cache / image.id, record.NAME, b'{"v":1,"verdict":"safe"}')  # a tamper
    second = await start_daemon(cache, glance.url)
    try:
        status, headers, body = await second.get(image.id)
        assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
        # No verdict kept: the hit inspected the file again, its declaration looked up with
        # the caller's token (the tamper kept none), and stored the new verdict.
        assert headers["Cached-Image-Verdict"] == (
            'unsafe; detected="qcow2"; declared="raw"; checks="backing_file"'
        )
        verdict = stored_verdict(second, image.id)
        assert verdict is not None and verdict.checks == ("backing_file",)
        assert verdict.container == "bare"
        entry = second.store.get(image.id)
        assert entry is not None and not entry.suspect  # the commit record was written again
    finally:
        await stop_daemon(second)


async def test_a_range_fill_then_the_rest_catches_the_inspector_up(
    daemon: Daemon, glance: FakeGlance, tmp_path: Path
) -> None:
    """The first 4 MiB chunk comes in by a range fill; the full download after it streams from
    the second chunk on, so the inspector reads the header back from the file at the end."""
    data = make(tmp_path, "backing-big")
    assert len(data) > 8 * MiB
    image = glance.add_image(data, disk_format="qcow2")
    status, _, body = await daemon.get(image.id, Range="bytes=0-99")
    assert (status, body) == (206, data[:100])
    await wait_idle(daemon, image.id)
    headers = await miss_then_hit_after_partial(daemon, image.id, data)
    assert headers["Cached-Image-Verdict"] == (
        'unsafe; detected="qcow2"; declared="qcow2"; checks="backing_file"'
    )


async def miss_then_hit_after_partial(daemon: Daemon, image_id: str, data: bytes) -> dict[str, str]:
    status, headers, body = await daemon.get(image_id)
    assert (status, body == data) == (200, True)
    await wait_complete(daemon, image_id)
    status, headers, body = await daemon.get(image_id)
    assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
    return headers


async def test_file_backend_raw_bare_is_no_declaration(tmp_path: Path) -> None:
    images, cache = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    cache.mkdir()
    data = make(tmp_path, "clean")
    image_id = str(uuid.uuid4())
    (images / image_id).write_bytes(data)
    daemon = await start_daemon(cache, f"file://{images}")
    try:
        headers = await miss_then_hit(daemon, image_id, data)
        assert headers["Cached-Image-Verdict"] == 'safe; detected="qcow2"'  # not a mismatch
    finally:
        await stop_daemon(daemon)


async def test_mode_off_inspects_nothing(glance: FakeGlance, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    daemon = await start_daemon(cache, glance.url, image_safety_mode="off")
    try:
        headers = await miss_then_hit(daemon, image.id, data)
        assert "Cached-Image-Verdict" not in headers
        assert stored_verdict(daemon, image.id) is None
        assert record.NAME not in os.listxattr(cache / image.id)
    finally:
        await stop_daemon(daemon)


async def test_a_daemon_process_logs_stores_and_sends_the_verdict(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """``cached serve`` as a real subprocess (the default configuration: audit)."""
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    cache = tmp_path / "cache"
    proc = CachedProcess(glance.url, cache, tmp_path / "cached.log")
    url = await asyncio.to_thread(proc.start)
    try:
        async with aiohttp.ClientSession() as session:
            file_url = f"{url}/v2/images/{image.id}/file"
            async with session.get(file_url, headers=auth()) as resp:
                assert (resp.status, resp.headers["Cache-Status"]) == (200, MISS)
                assert await resp.read() == data
            await wait_until(lambda: (cache / image.id).exists(), "the entry is committed")
            async with session.get(file_url, headers=auth()) as resp:
                assert (resp.status, resp.headers["Cache-Status"]) == (200, HIT)
                assert resp.headers["Cached-Image-Verdict"] == (
                    'unsafe; detected="qcow2"; declared="raw"; checks="backing_file"'
                )
                assert await resp.read() == data
        verdict = record.loads(os.getxattr(cache / image.id, record.NAME))
        assert (verdict.outcome, verdict.checks) == (Outcome.UNSAFE, ("backing_file",))
        assert (
            f"image {image.id} content unsafe: detected qcow2, declared raw, failed backing_file"
            in proc.output()
        )
    finally:
        assert await asyncio.to_thread(proc.stop) == 0
