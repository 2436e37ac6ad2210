"""Enforce mode (issue 18, "Modes"): ``image_safety_mode: enforce`` with
``image_safety_on_violation: pass-through`` or ``refuse``, against a running daemon (in-process
on loopback, and one ``cached serve`` subprocess) in front of the fake Glance or the ``file``
backend, with images made by qemu-img and declared right and wrong.

What is checked, per mode: the verdict xattr and the verdict record in ``verdicts/``, the
answers (status, ``Cache-Status``, ``Cached-Image-Verdict``, webob's 403 body per ``Accept``),
the commit record of safe images (their hit is a plain hit), that a refused image never reaches
a client as a clean 200/206 (first download and later ones, whole and range), that callers the
upstream refuses get its answer, that a restart keeps the record, and that a violating prefetch
is dequeued. With the admin side: an override bound to the image's ``os_hash_value`` makes a
violating image a hit (one for other bytes does not; withdrawn, it is a violation again), and
entries without a current verdict are inspected again before their first hit, by the audit
job or a recheck, whose violating verdicts are enforced at once.
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
from conftest import Daemon, auth, manage, start_daemon, stop_daemon, wait_complete, wait_until
from daemonproc import CachedProcess
from fakeglance import FakeGlance, FakeImage
from scrapes import Delta, scrape
from test_safety_admin import admin, safety_of
from test_safety_audit import as_older_entry, make, stored_verdict
from test_safety_inspect import qemu_img

from cached.app import MANAGER
from cached.download.proxy import _record_of
from cached.edge import replies
from cached.jobs.prefetch import Outcome as PrefetchOutcome
from cached.safety import record, violations
from cached.safety.inspect import VERSION
from cached.safety.verdict import Outcome, Verdict
from cached.store import entry as entries

MiB = 1 << 20
HIT = "cached; hit"
MISS = "cached; fwd=uri-miss; stored"
UNSAFE_BYPASS = "cached; fwd=bypass; detail=unsafe-format"
BACKING = 'unsafe; detected="qcow2"; declared="raw"; checks="backing_file"'


async def fetch(
    daemon: Daemon, image_id: str, token: str = "token-p1", **headers: str
) -> tuple[int, dict[str, str], bytes | None]:
    """GET the image's data: status, headers, and the body, or None when the connection was
    cut before the body was complete (never a clean response)."""
    async with daemon.session.get(
        daemon.file_url(image_id), headers={**auth(token), **headers}
    ) as resp:
        try:
            body: bytes | None = await resp.read()
        except aiohttp.ClientPayloadError:
            body = None
        return resp.status, dict(resp.headers), body


def data_gets(glance: FakeGlance, image_id: str) -> int:
    """Downloads the upstream served, without the authorisation probes (``bytes=0-0``)."""
    return sum(1 for r in glance.data_requests(image_id) if r.range != "bytes=0-0")


async def enforcing(tmp_path: Path, upstream: str, on_violation: str) -> Daemon:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    return await start_daemon(
        cache, upstream, image_safety_mode="enforce", image_safety_on_violation=on_violation
    )


def record_of(daemon: Daemon, image_id: str) -> violations.Violation | None:
    path = daemon.cache_dir / violations.DIRECTORY / image_id
    return violations.loads(path.read_bytes()) if path.exists() else None


async def settled(daemon: Daemon) -> None:
    safety = daemon.proxy.safety
    assert safety is not None
    await safety.settled()


async def listed(daemon: Daemon) -> list[str]:
    """The image ids ``GET /v2/cache`` lists as cached (the management API)."""
    async with manage(daemon).get(f"{daemon.admin_base}/v2/cache") as resp:
        assert resp.status == 200
        return [row["image_id"] for row in (await resp.json())["cached_images"]]


def no_entry(daemon: Daemon, image_id: str) -> bool:
    return (
        daemon.store.get(image_id) is None
        and not (daemon.cache_dir / image_id).exists()
        and not (daemon.cache_dir / "incomplete" / image_id).exists()
    )


# The images of the table in the report: (kind, disk_format, container_format) -> verdict.
VIOLATING = [
    pytest.param("clean", "vmdk", "bare", Outcome.MISMATCH, (), id="qcow2-declared-vmdk"),
    pytest.param("clean", "raw", "bare", Outcome.MISMATCH, (), id="qcow2-declared-raw"),
    pytest.param("backing", "raw", "bare", Outcome.UNSAFE, ("backing_file",), id="backing-raw"),
    pytest.param(
        "backing", "qcow2", "ovf", Outcome.UNSAFE, ("backing_file",), id="backing-qcow2-ovf"
    ),
]


@pytest.mark.parametrize("on_violation", ["pass-through", "refuse"])
async def test_a_safe_image_is_cached_and_hit(
    glance: FakeGlance, tmp_path: Path, on_violation: str
) -> None:
    data = make(tmp_path, "clean")
    image = glance.add_image(data, disk_format="qcow2", container_format="bare")
    daemon = await enforcing(tmp_path, glance.url, on_violation)
    try:
        status, headers, body = await fetch(daemon, image.id)
        assert (status, headers["Cache-Status"], body == data) == (200, MISS, True)
        await wait_complete(daemon, image.id)
        status, headers, body = await fetch(daemon, image.id)
        assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
        assert headers["Cached-Image-Verdict"] == 'safe; detected="qcow2"; declared="qcow2"'
        entry = daemon.store.get(image.id)
        assert entry is not None and not entry.suspect  # the commit record covers the xattr
        assert (entry.disk_format, entry.container_format) == ("qcow2", "bare")
        verdict = stored_verdict(daemon, image.id)
        assert verdict is not None and verdict.outcome is Outcome.SAFE
        assert record_of(daemon, image.id) is None
    finally:
        await stop_daemon(daemon)


@pytest.mark.parametrize(("kind", "disk", "container", "outcome", "checks"), VIOLATING)
async def test_pass_through_serves_the_data_and_never_caches_it(
    glance: FakeGlance,
    tmp_path: Path,
    kind: str,
    disk: str,
    container: str,
    outcome: Outcome,
    checks: tuple[str, ...],
) -> None:
    data = make(tmp_path, kind)
    image = glance.add_image(data, disk_format=disk, container_format=container)
    daemon = await enforcing(tmp_path, glance.url, "pass-through")
    try:
        before_metrics = await scrape(daemon)
        status, headers, body = await fetch(daemon, image.id)
        assert (status, headers["Cache-Status"], body == data) == (200, MISS, True)
        await wait_until(lambda: record_of(daemon, image.id) is not None, "the record")
        await settled(daemon)
        recorded = record_of(daemon, image.id)
        assert recorded is not None
        assert (recorded.image_id, recorded.os_hash_value) == (image.id, image.os_hash_value)
        assert (recorded.verdict.outcome, recorded.verdict.checks) == (outcome, checks)
        await wait_until(lambda: no_entry(daemon, image.id), "the entry is dropped")
        before = data_gets(glance, image.id)
        for _ in range(2):  # never a hit: every download goes upstream
            status, headers, body = await fetch(daemon, image.id)
            assert (status, headers["Cache-Status"], body == data) == (200, UNSAFE_BYPASS, True)
        status, headers, body = await fetch(daemon, image.id, Range="bytes=10-19")
        assert (status, headers["Cache-Status"], body) == (206, UNSAFE_BYPASS, data[10:20])
        assert data_gets(glance, image.id) == before + 3
        assert no_entry(daemon, image.id)
        assert image.id not in await listed(daemon)
        counted = Delta(before_metrics, await scrape(daemon))
        assert counted("cached_image_verdicts_total", verdict=outcome.value) == 1
        assert counted("cached_bypass_total", reason="unsafe-format") == 3
    finally:
        await stop_daemon(daemon)


def refused_message(image_id: str, verdict: Verdict) -> str:
    detected = verdict.detected or "nothing"
    failed = f"; failed checks: {', '.join(verdict.checks)}" if verdict.checks else ""
    return (
        f"Image {image_id} is refused by the image cache: its content is "
        f"{verdict.outcome.value} (detected {detected}, declared {verdict.declared}{failed})."
    )


@pytest.mark.parametrize(("kind", "disk", "container", "outcome", "checks"), VIOLATING)
async def test_refuse_cuts_the_first_download_and_answers_403_after(
    glance: FakeGlance,
    tmp_path: Path,
    kind: str,
    disk: str,
    container: str,
    outcome: Outcome,
    checks: tuple[str, ...],
) -> None:
    data = make(tmp_path, kind)
    image = glance.add_image(data, disk_format=disk, container_format=container)
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        status, _, body = await fetch(daemon, image.id)
        assert body is None, f"a refused image reached the client whole ({status})"
        await settled(daemon)
        recorded = record_of(daemon, image.id)
        assert recorded is not None and recorded.verdict.outcome is outcome
        assert recorded.verdict.checks == checks
        await wait_until(lambda: no_entry(daemon, image.id), "the entry is dropped")
        before = data_gets(glance, image.id)
        message = refused_message(image.id, recorded.verdict)
        for accept, kind_, text in [
            ("text/plain", "text/plain", f"403 Forbidden\n\n{message}\n\n   "),
            ("*/*", "text/html", None),
            ("application/json", "application/json", None),
        ]:
            headers = {"Accept": accept} if accept else {}
            status, got, body = await fetch(daemon, image.id, **headers)
            assert (status, got["Content-Type"].split(";")[0]) == (403, kind_)
            assert "Cache-Status" not in got
            assert got["Cached-Image-Verdict"].startswith(outcome.value)
            assert got["x-openstack-request-id"].startswith("req-")
            assert body is not None and data[:64] not in body
            if text is not None:
                assert body.decode() == text
            elif kind_ == "application/json":
                assert json.loads(body) == {
                    "message": f"{message}<br /><br />\n\n\n",
                    "code": "403 Forbidden",
                    "title": "Forbidden",
                }
            else:
                assert body.decode().startswith("<html>\n <head>\n  <title>403 Forbidden</title>")
        status, _, _ = await fetch(daemon, image.id, Range="bytes=0-99")
        assert status == 403
        assert data_gets(glance, image.id) == before  # no upstream data for a refusal
        assert image.id not in await listed(daemon)
    finally:
        await stop_daemon(daemon)


def raw_bytes(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@pytest.mark.parametrize("on_violation", ["pass-through", "refuse"])
@pytest.mark.parametrize(
    ("kind", "disk", "container", "outcome", "header"),
    [
        ("raw", "raw", "bare", Outcome.SAFE, 'safe; detected="raw"; declared="raw"'),
        ("raw", "ami", "ami", Outcome.NOT_INSPECTABLE,
         'not-inspectable; detected="raw"; declared="ami"'),
        ("raw", "raw", "ovf", Outcome.NOT_INSPECTABLE,
         'not-inspectable; detected="raw"; declared="raw"'),
        ("clean", "qcow2", "ovf", Outcome.SAFE, 'safe; detected="qcow2"; declared="qcow2"'),
    ],
)  # fmt: skip
async def test_allowed_verdicts_are_hits_and_ranges_go(
    glance: FakeGlance,
    tmp_path: Path,
    on_violation: str,
    kind: str,
    disk: str,
    container: str,
    outcome: Outcome,
    header: str,
) -> None:
    """safe and not-inspectable pass enforce; a first range of a one-chunk image waits for
    the final verdict (refuse) and is then served."""
    data = raw_bytes(3 * MiB) if kind == "raw" else make(tmp_path, kind)
    image = glance.add_image(data, disk_format=disk, container_format=container)
    daemon = await enforcing(tmp_path, glance.url, on_violation)
    try:
        status, headers, body = await fetch(daemon, image.id, Range="bytes=100-199")
        assert (status, body) == (206, data[100:200])
        await wait_complete(daemon, image.id)  # one chunk: the range filled the image
        status, headers, body = await fetch(daemon, image.id)
        assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
        assert headers["Cached-Image-Verdict"] == header
        verdict = stored_verdict(daemon, image.id)
        assert verdict is not None and verdict.outcome is outcome
        assert record_of(daemon, image.id) is None
        assert image.id in await listed(daemon)
    finally:
        await stop_daemon(daemon)


async def test_refuse_a_first_range_of_a_small_image(glance: FakeGlance, tmp_path: Path) -> None:
    """A range of a one-chunk image never fetched before: judged on the whole image (its last
    bytes may decide), then 403, never a 206."""
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        status, headers, body = await fetch(daemon, image.id, Range="bytes=0-99")
        assert (status, headers["Cached-Image-Verdict"]) == (403, BACKING)
        assert body is not None and data[:100] not in body
    finally:
        await stop_daemon(daemon)


async def test_refuse_cuts_the_first_download_at_the_header_verdict(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """The upstream holds the image after its first 2 MiB (the qcow2 header is judged after
    256 KiB, fed in the fill's 1 MiB pieces): the client's download is cut there, long before
    the held-back last byte."""
    data = make(tmp_path, "backing-big")
    image = glance.add_image(data, disk_format="qcow2", hold_after=2 * MiB)
    image.pause()
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        received = 0
        async with daemon.session.get(daemon.file_url(image.id), headers=auth()) as resp:
            assert (resp.status, resp.headers["Cache-Status"]) == (200, MISS)
            with pytest.raises(aiohttp.ClientPayloadError):
                async for piece in resp.content.iter_any():
                    received += len(piece)
        assert received <= 2 * MiB < len(data)
        assert image.flowing.is_set() is False  # cut while the upstream still held the rest
        await settled(daemon)
        assert record_of(daemon, image.id) is not None
    finally:
        image.resume()
        await stop_daemon(daemon)


async def test_pass_through_knows_the_verdict_while_the_first_download_runs(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """The header verdict is recorded as soon as it is reached: a download that comes while
    the first one is still running goes upstream; the first one completes, uncached."""
    data = make(tmp_path, "backing-big")
    image = glance.add_image(data, disk_format="qcow2", hold_after=2 * MiB)
    image.pause()
    daemon = await enforcing(tmp_path, glance.url, "pass-through")
    try:
        first = await daemon.session.get(daemon.file_url(image.id), headers=auth())
        assert (first.status, first.headers["Cache-Status"]) == (200, MISS)
        await wait_until(lambda: record_of(daemon, image.id) is not None, "the record")
        async with daemon.session.get(daemon.file_url(image.id), headers=auth()) as second:
            assert (second.status, second.headers["Cache-Status"]) == (200, UNSAFE_BYPASS)
            image.resume()
            assert await second.read() == data
        assert await first.read() == data  # the data goes: a clean 200, as before
        first.release()
        await settled(daemon)
        await wait_until(lambda: no_entry(daemon, image.id), "the entry is dropped")
        assert not list((daemon.cache_dir / "invalid").iterdir())
    finally:
        image.resume()
        await stop_daemon(daemon)


async def test_refuse_judges_chunk_0_before_a_range_miss(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """A range in the second chunk of an image never fetched: the first chunk is fetched too
    (beside the range's), its header is judged before anything is sent, and the answer is a
    403 with no byte of the image."""
    data = make(tmp_path, "backing-big")
    assert len(data) > 8 * MiB
    image = glance.add_image(data, disk_format="qcow2")
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        status, headers, body = await fetch(
            daemon, image.id, Range=f"bytes={5 * MiB}-{5 * MiB + 99}"
        )
        assert status == 403, (status, headers)
        assert body is not None and data[5 * MiB : 5 * MiB + 100] not in body
        assert headers["Cached-Image-Verdict"] == (
            'unsafe; detected="qcow2"; declared="qcow2"; checks="backing_file"'
        )
        transfers = [r.range for r in glance.data_requests(image.id)]
        assert "bytes=0-4194303" in transfers  # chunk 0 (the range's chunk may come too)
        await settled(daemon)
        await wait_until(lambda: no_entry(daemon, image.id), "the entry is dropped")
        status, _, _ = await fetch(daemon, image.id)  # whole, later: refused too
        assert status == 403
    finally:
        await stop_daemon(daemon)


async def test_refuse_serves_a_range_of_a_safe_image(glance: FakeGlance, tmp_path: Path) -> None:
    noise = tmp_path / "noise.raw"
    noise.write_bytes(random.Random(5).randbytes(9 * MiB))
    out = tmp_path / "big.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", noise, out)
    data = out.read_bytes()
    image = glance.add_image(data, disk_format="qcow2")
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        start = 5 * MiB
        status, headers, body = await fetch(daemon, image.id, Range=f"bytes={start}-{start + 99}")
        assert (status, body) == (206, data[start : start + 100])
        assert record_of(daemon, image.id) is None
    finally:
        await stop_daemon(daemon)


@pytest.mark.parametrize("on_violation", ["pass-through", "refuse"])
async def test_unauthorised_callers_get_the_upstreams_answer(
    glance: FakeGlance, tmp_path: Path, on_violation: str
) -> None:
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    daemon = await enforcing(tmp_path, glance.url, on_violation)
    try:
        await fetch(daemon, image.id)
        await settled(daemon)
        assert record_of(daemon, image.id) is not None
        # another project: Glance's 404; a reader: Glance's 403 for download_image
        for token, want in [("token-p2", 404), ("token-reader", 403), ("nobody", 401)]:
            status, headers, body = await fetch(daemon, image.id, token=token)
            assert status == want, token
            assert "Cached-Image-Verdict" not in headers
            assert body is not None and b"refused by the image cache" not in body
    finally:
        await stop_daemon(daemon)


async def test_downloads_bypassed_otherwise_are_not_inspected(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Several ranges, and an image too large for the cache: the upstream's answer, with the
    bypass's own reason; nothing is inspected or recorded."""
    data = make(tmp_path, "backing-big")
    image = glance.add_image(data, disk_format="qcow2")
    cache = tmp_path / "cache"
    cache.mkdir()
    daemon = await start_daemon(
        cache,
        glance.url,
        image_safety_mode="enforce",
        image_safety_on_violation="refuse",
        image_cache_max_size=8 * MiB,  # admits images up to 4 MiB (half): not this one
    )
    try:
        status, headers, body = await fetch(daemon, image.id)
        assert (status, headers["Cache-Status"], body == data) == (
            200,
            "cached; fwd=bypass; detail=too-large",
            True,
        )
        await settled(daemon)
        assert record_of(daemon, image.id) is None and no_entry(daemon, image.id)
    finally:
        await stop_daemon(daemon)
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:  # several ranges: whatever the upstream answers (the fake, as Glance: 400)
        status, headers, _ = await fetch(daemon, image.id, Range="bytes=0-9,20-29")
        assert (status, headers["Cache-Status"]) == (400, "cached; fwd=bypass")
        await settled(daemon)
        assert record_of(daemon, image.id) is None and no_entry(daemon, image.id)
    finally:
        await stop_daemon(daemon)


async def test_restart_keeps_the_record_and_clean_leaves_it(
    glance: FakeGlance, tmp_path: Path
) -> None:
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    daemon = await enforcing(tmp_path, glance.url, "pass-through")
    try:
        await fetch(daemon, image.id)
        await settled(daemon)
        async with manage(daemon).post(f"{daemon.admin_base}/v2/cache/clean") as resp:
            assert resp.status == 200
    finally:
        await stop_daemon(daemon)
    assert record_of(daemon, image.id) is not None  # clean empties invalid/ only
    second = await enforcing(tmp_path, glance.url, "pass-through")
    try:
        before = data_gets(glance, image.id)
        status, headers, body = await fetch(second, image.id)
        assert (status, headers["Cache-Status"], body == data) == (200, UNSAFE_BYPASS, True)
        assert data_gets(glance, image.id) == before + 1
        assert no_entry(second, image.id)
    finally:
        await stop_daemon(second)
    third = await enforcing(tmp_path, glance.url, "refuse")  # the same record, refused
    try:
        status, headers, _ = await fetch(third, image.id)
        assert (status, headers["Cached-Image-Verdict"]) == (403, BACKING)
    finally:
        await stop_daemon(third)


async def test_an_audited_entry_is_no_hit_once_enforced(glance: FakeGlance, tmp_path: Path) -> None:
    """An image cached in audit mode whose stored verdict violates: under enforce its entry
    is dropped at the first request and it is refused."""
    cache = tmp_path / "cache"
    cache.mkdir()
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    first = await start_daemon(cache, glance.url)
    try:
        status, _, body = await fetch(first, image.id)
        assert (status, body == data) == (200, True)
        await wait_complete(first, image.id)
    finally:
        await stop_daemon(first)
    second = await enforcing(tmp_path, glance.url, "refuse")
    try:
        status, headers, _ = await fetch(second, image.id)
        assert (status, headers["Cached-Image-Verdict"]) == (403, BACKING)
        await settled(second)
        assert no_entry(second, image.id) and record_of(second, image.id) is not None
    finally:
        await stop_daemon(second)


async def test_a_deleted_image_forgets_its_record(glance: FakeGlance, tmp_path: Path) -> None:
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        await fetch(daemon, image.id)
        await settled(daemon)
        async with daemon.session.delete(
            f"{daemon.url}/v2/images/{image.id}", headers=auth()
        ) as resp:
            assert resp.status == 204
        await wait_until(lambda: record_of(daemon, image.id) is None, "the record is removed")
    finally:
        await stop_daemon(daemon)


async def test_a_violating_prefetch_is_dequeued(glance: FakeGlance, tmp_path: Path) -> None:
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    cache = tmp_path / "cache"
    cache.mkdir()
    daemon = await start_daemon(
        cache,
        glance.url,
        image_safety_mode="enforce",
        image_safety_on_violation="refuse",
        service_token="token-admin",
    )
    try:
        prefetcher = daemon.app[MANAGER].prefetcher
        queued = f"{daemon.admin_base}/v2/queued_images"
        for again in (False, True):  # again: known, dequeued before any transfer
            async with manage(daemon).put(f"{queued}/{image.id}") as resp:
                assert resp.status == 200
            before = data_gets(glance, image.id)
            counts = await prefetcher.run()
            assert (counts[PrefetchOutcome.REFUSED], counts[PrefetchOutcome.FAILED]) == (1, 0)
            async with manage(daemon).get(queued) as resp:
                assert (await resp.json())["queued_images"] == []
            await settled(daemon)
            assert record_of(daemon, image.id) is not None
            assert (data_gets(glance, image.id) == before) is again
    finally:
        await stop_daemon(daemon)


async def test_file_backend_refuses_by_content(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    clean, backing = make(tmp_path, "clean"), make(tmp_path, "backing")
    clean_id, backing_id = str(uuid.uuid4()), str(uuid.uuid4())
    (images / clean_id).write_bytes(clean)
    (images / backing_id).write_bytes(backing)
    daemon = await enforcing(tmp_path, f"file://{images}", "refuse")
    try:
        status, _, body = await fetch(daemon, clean_id)
        assert (status, body == clean) == (200, True)  # raw/bare is no declaration
        status, _, body = await fetch(daemon, backing_id)
        assert body is None
        await settled(daemon)
        status, headers, _ = await fetch(daemon, backing_id)
        assert (status, headers["Cached-Image-Verdict"]) == (
            403,
            'unsafe; detected="qcow2"; checks="backing_file"',
        )
    finally:
        await stop_daemon(daemon)


async def test_a_daemon_process_refuses_and_remembers(glance: FakeGlance, tmp_path: Path) -> None:
    """``cached serve`` as a real subprocess, restarted: the record survives."""
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    cache = tmp_path / "cache"
    conf = tmp_path / "cached.yaml"
    conf.write_text("image_safety_mode: enforce\nimage_safety_on_violation: refuse\n")
    proc = CachedProcess(glance.url, cache, tmp_path / "cached.log", "--config", str(conf))
    try:
        for attempt in range(2):
            url = await asyncio.to_thread(proc.start)
            async with aiohttp.ClientSession() as session:
                file_url = f"{url}/v2/images/{image.id}/file"
                async with session.get(file_url, headers=auth()) as resp:
                    if attempt == 0:
                        with pytest.raises(aiohttp.ClientPayloadError):
                            await resp.read()
                    else:
                        assert resp.status == 403
                        assert resp.headers["Cached-Image-Verdict"] == BACKING
                if attempt == 0:
                    record = cache / violations.DIRECTORY / image.id
                    await wait_until(record.exists, "the record")
            assert await asyncio.to_thread(proc.stop) == 0
        log = (tmp_path / "cached.log").read_text()  # both runs
        assert (
            f"image {image.id} content unsafe: detected qcow2, declared raw, failed "
            f"backing_file (oslo.utils {VERSION}): refused"
        ) in log
        assert "1 image(s) kept out of the cache by their content" in log
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()


# -- enforce with the admin side: overrides, re-inspection (the audit job, a recheck)


async def violating_answer(
    daemon: Daemon, glance: FakeGlance, image_id: str, data: bytes, on_violation: str
) -> None:
    """A download of a violating image now: 403 (refuse) or the upstream's data
    (pass-through), never the cache's bytes."""
    before = data_gets(glance, image_id)
    status, headers, body = await fetch(daemon, image_id)
    assert headers.get("Cache-Status") != HIT
    if on_violation == "refuse":
        assert (status, headers["Cached-Image-Verdict"].split(";")[0]) == (403, "unsafe")
        assert body is not None and data[:64] not in body
        assert data_gets(glance, image_id) == before
    else:
        assert (status, headers["Cache-Status"], body == data) == (200, UNSAFE_BYPASS, True)
        assert data_gets(glance, image_id) == before + 1


async def kept_out(daemon: Daemon, image_id: str) -> violations.Violation:
    """The image's violation is recorded and its entry is gone."""
    await settled(daemon)
    await wait_until(lambda: no_entry(daemon, image_id), "the entry is dropped")
    recorded = record_of(daemon, image_id)
    assert recorded is not None
    return recorded


@pytest.mark.parametrize("on_violation", ["pass-through", "refuse"])
async def test_an_override_for_the_images_content_makes_it_a_hit(
    glance: FakeGlance, tmp_path: Path, on_violation: str
) -> None:
    """An override bound to another os_hash_value changes nothing; one bound to the image's
    forgets its record, the image is cached and hit (its verdict still in the header);
    withdrawn, the image's next download drops the entry and records the violation again."""
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    assert image.os_hash_value is not None
    daemon = await enforcing(tmp_path, glance.url, on_violation)
    try:
        path = f"/v2/cache/safety/{image.id}/override"
        status, row = await admin(daemon, "PUT", path, {"os_hash_value": "ab" * 64})
        assert (status, row["overridden"]) == (200, False)
        status, headers, body = await fetch(daemon, image.id)
        if on_violation == "refuse":
            assert body is None  # cut, never whole
        else:
            assert (status, headers["Cache-Status"], body == data) == (200, MISS, True)
        recorded = await kept_out(daemon, image.id)
        assert recorded.os_hash_value == image.os_hash_value
        await violating_answer(daemon, glance, image.id, data, on_violation)
        status, row = await admin(daemon, "GET", f"/v2/cache/safety/{image.id}")
        assert status == 200
        assert (row["cached"], row["verdict"], row["overridden"]) == (False, "unsafe", False)
        assert row["os_hash_value"] == image.os_hash_value
        status, listing = await admin(daemon, "GET", "/v2/cache/safety")
        assert [r["image_id"] for r in listing["violations"]] == [image.id]
        assert image.id not in [r["image_id"] for r in listing["verdicts"]]

        status, _ = await admin(daemon, "PUT", path, {"os_hash_value": image.os_hash_value})
        assert status == 200
        assert record_of(daemon, image.id) is None  # the record of that content is forgotten
        status, headers, body = await fetch(daemon, image.id)
        assert (status, headers["Cache-Status"], body == data) == (200, MISS, True)
        await wait_complete(daemon, image.id)
        for _ in range(2):
            status, headers, body = await fetch(daemon, image.id)
            assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
            assert headers["Cached-Image-Verdict"] == BACKING
        await settled(daemon)
        assert record_of(daemon, image.id) is None
        assert image.id in await listed(daemon)
        status, listing = await admin(daemon, "GET", "/v2/cache/safety")
        assert listing["violations"] == []
        status, row = await admin(daemon, "GET", f"/v2/cache/safety/{image.id}")
        assert (status, row["verdict"], row["overridden"]) == (200, "unsafe", True)

        status, _ = await admin(daemon, "DELETE", path)
        assert status == 204
        await violating_answer(daemon, glance, image.id, data, on_violation)
        recorded = await kept_out(daemon, image.id)
        assert (recorded.verdict.outcome, recorded.verdict.checks) == (
            Outcome.UNSAFE,
            ("backing_file",),
        )
        assert image.id not in await listed(daemon)
    finally:
        await stop_daemon(daemon)


async def test_an_override_lets_a_restarted_daemon_serve_the_image(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """The override and the entry survive a restart under enforce: still a hit, and a
    violation is neither recorded nor read back."""
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        assert image.os_hash_value is not None
        await safety_of(daemon).override(image.id, image.os_hash_value, "vendor image")
        assert (await fetch(daemon, image.id))[0] == 200
        await wait_complete(daemon, image.id)
    finally:
        await stop_daemon(daemon)
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        status, headers, body = await fetch(daemon, image.id)
        assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
        await settled(daemon)
        assert record_of(daemon, image.id) is None and not safety_of(daemon).violations
    finally:
        await stop_daemon(daemon)


async def filled_without_inspection(
    tmp_path: Path, glance: FakeGlance, images: list[tuple[FakeImage, bytes]]
) -> None:
    """Cache ``images`` with ``image_safety_mode: off`` (no verdict: as before inspection)."""
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    first = await start_daemon(cache, glance.url, image_safety_mode="off")
    try:
        for image, data in images:
            status, _, body = await fetch(first, image.id)
            assert (status, body == data) == (200, True)
            await wait_complete(first, image.id)
    finally:
        await stop_daemon(first)
    assert all(record.NAME not in os.listxattr(cache / i.id) for i, _ in images)


@pytest.mark.parametrize("on_violation", ["pass-through", "refuse"])
async def test_the_first_hit_of_an_entry_without_a_verdict_waits_for_its_reinspection(
    glance: FakeGlance, tmp_path: Path, on_violation: str
) -> None:
    """Entries cached before inspection: under enforce their first download inspects them
    again before using them. A violating one is never sent from the cache: dropped, recorded,
    and that download gets the upstream's data or 403. One whose metadata kept no declaration
    (older still) has its record looked up with the caller's token: a clean qcow2 declared
    raw (safe on its content alone) is a mismatch. A safe one is a plain hit."""
    unsafe, clean = make(tmp_path, "backing"), make(tmp_path, "clean")
    bad = glance.add_image(unsafe, disk_format="raw")
    wrong = glance.add_image(clean, disk_format="raw")
    good = glance.add_image(clean, disk_format="qcow2")
    await filled_without_inspection(
        tmp_path, glance, [(bad, unsafe), (wrong, clean), (good, clean)]
    )
    await as_older_entry(tmp_path / "cache" / wrong.id)
    daemon = await enforcing(tmp_path, glance.url, on_violation)
    try:
        await violating_answer(daemon, glance, bad.id, unsafe, on_violation)
        recorded = await kept_out(daemon, bad.id)
        assert (recorded.verdict.outcome, recorded.verdict.checks) == (
            Outcome.UNSAFE,
            ("backing_file",),
        )
        before = data_gets(glance, wrong.id)
        status, headers, body = await fetch(daemon, wrong.id)
        assert headers.get("Cache-Status") != HIT
        if on_violation == "refuse":
            assert (status, headers["Cached-Image-Verdict"]) == (
                403,
                'mismatch; detected="qcow2"; declared="raw"',
            )
            assert data_gets(glance, wrong.id) == before
        else:
            assert (status, headers["Cache-Status"], body == clean) == (200, UNSAFE_BYPASS, True)
        assert (await kept_out(daemon, wrong.id)).verdict.outcome is Outcome.MISMATCH
        status, headers, body = await fetch(daemon, good.id)
        assert (status, headers["Cache-Status"], body == clean) == (200, HIT, True)
        assert headers["Cached-Image-Verdict"] == 'safe; detected="qcow2"; declared="qcow2"'
        await settled(daemon)
        assert record_of(daemon, good.id) is None and daemon.store.get(good.id) is not None
    finally:
        await stop_daemon(daemon)


async def test_the_audit_job_and_a_recheck_drop_and_record_what_violates(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Under enforce the audit's and an admin recheck's new verdicts are acted on at once (not
    at the next download): the violating entry is dropped and recorded; the next download is
    refused; a safe entry stays."""
    unsafe, clean = make(tmp_path, "backing"), make(tmp_path, "clean")
    audited = glance.add_image(unsafe, disk_format="raw")
    rechecked = glance.add_image(unsafe, disk_format="qcow2")
    good = glance.add_image(clean, disk_format="qcow2")
    await filled_without_inspection(
        tmp_path, glance, [(audited, unsafe), (rechecked, unsafe), (good, clean)]
    )
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        safety = safety_of(daemon)
        busy = {rechecked.id}  # left to the recheck
        result = await safety.audit(
            daemon.store.complete_entries, lambda entry: entry.image_id in busy
        )
        assert (result.inspected, result.skipped) == (2, 1)
        recorded = await kept_out(daemon, audited.id)
        assert recorded.verdict.outcome is Outcome.UNSAFE
        assert daemon.store.get(good.id) is not None and record_of(daemon, good.id) is None
        status, answer = await admin(daemon, "POST", f"/v2/cache/safety/{rechecked.id}/recheck")
        assert (status, answer["verdict"], answer["checks"]) == (200, "unsafe", ["backing_file"])
        recorded = await kept_out(daemon, rechecked.id)
        assert (recorded.verdict.declared, recorded.verdict.checks) == ("qcow2", ("backing_file",))
        for image in (audited, rechecked):
            await violating_answer(daemon, glance, image.id, unsafe, "refuse")
        status, headers, _ = await fetch(daemon, good.id)
        assert (status, headers["Cache-Status"]) == (200, HIT)
    finally:
        await stop_daemon(daemon)


async def test_a_reinspection_that_cannot_read_the_file_refuses_once_and_records_nothing(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """An entry without a verdict whose file cannot be read when it is inspected again (a
    directory in its place: EISDIR): enforce fails closed for that download (403, verdict
    error) but records nothing and keeps the entry; once the file reads again, the next hit
    inspects it again and serves it."""
    data = make(tmp_path, "clean")
    image = glance.add_image(data, disk_format="qcow2")
    await filled_without_inspection(tmp_path, glance, [(image, data)])
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        path = tmp_path / "cache" / image.id
        aside = tmp_path / "aside"
        await asyncio.to_thread(os.rename, path, aside)
        await asyncio.to_thread(os.mkdir, path)
        status, headers, _ = await fetch(daemon, image.id)
        assert (status, headers["Cached-Image-Verdict"].split(";")[0]) == (403, "error")
        await settled(daemon)
        assert record_of(daemon, image.id) is None and not safety_of(daemon).violations
        assert daemon.store.get(image.id) is not None
        await asyncio.to_thread(os.rmdir, path)
        await asyncio.to_thread(os.rename, aside, path)
        status, headers, body = await fetch(daemon, image.id)
        assert (status, body == data) == (200, True)
        assert headers["Cached-Image-Verdict"] == 'safe; detected="qcow2"; declared="qcow2"'
        assert record_of(daemon, image.id) is None
    finally:
        await stop_daemon(daemon)


async def test_a_range_of_an_overridden_image_is_not_held_for_its_header(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """refuse holds a range miss until the image's header is judged (it fetches the first
    chunk too); an image an override lets be served is not judged against enforce: its range
    goes as in audit while the upstream holds every download after its first MiB (the first
    chunk could not be judged), and the image is cached after."""
    data = make(tmp_path, "backing-big")
    image = glance.add_image(data, disk_format="raw", hold_after=MiB)
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        assert image.os_hash_value is not None
        await safety_of(daemon).override(image.id, image.os_hash_value)
        image.pause()
        start = 4 * MiB + 1000  # in the second chunk, within its first MiB
        status, _, body = await asyncio.wait_for(
            fetch(daemon, image.id, Range=f"bytes={start}-{start + 99}"), 60
        )  # (a deadline: without the override's exemption it waits for the held chunk 0)
        assert (status, body) == (206, data[start : start + 100])
        image.resume()
        status, headers, body = await fetch(daemon, image.id)
        assert (status, body == data) == (200, True)
        await wait_complete(daemon, image.id)
        await settled(daemon)
        assert record_of(daemon, image.id) is None
    finally:
        await stop_daemon(daemon)


async def test_an_override_spares_an_entry_its_reinspection_finds_violating(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """An entry cached before inspection, re-inspected under enforce with an override for its
    content: its new verdict violates, and it is served as a hit, nothing recorded."""
    data = make(tmp_path, "backing")
    image = glance.add_image(data, disk_format="raw")
    await filled_without_inspection(tmp_path, glance, [(image, data)])
    daemon = await enforcing(tmp_path, glance.url, "refuse")
    try:
        assert image.os_hash_value is not None
        await safety_of(daemon).override(image.id, image.os_hash_value)
        status, headers, body = await fetch(daemon, image.id)
        assert (status, headers["Cache-Status"], body == data) == (200, HIT, True)
        assert headers["Cached-Image-Verdict"] == BACKING
        result = await safety_of(daemon).audit(
            daemon.store.complete_entries, lambda e: False, every=True
        )
        assert result.inspected == 1
        await settled(daemon)
        assert record_of(daemon, image.id) is None and daemon.store.get(image.id) is not None
    finally:
        await stop_daemon(daemon)


# -- the parts, without a daemon


def test_declared_formats_are_kept_and_older_entries_still_parse(tmp_path: Path) -> None:
    image_id = str(uuid.uuid4())
    path = tmp_path / image_id
    made = entries.create(
        path,
        image_id,
        10,
        checksum=None,
        os_hash_algo=None,
        os_hash_value=None,
        disk_format="qcow2",
        container_format="ovf",
    )
    loaded = entries.load(path)
    assert (
        (loaded.disk_format, loaded.container_format)
        == ("qcow2", "ovf")
        == (
            made.disk_format,
            made.container_format,
        )
    )
    assert _record_of(loaded).raw == {"disk_format": "qcow2", "container_format": "ovf"}
    older = tmp_path / str(uuid.uuid4())
    entries.create(older, older.name, 10, checksum=None, os_hash_algo=None, os_hash_value=None)
    meta = json.loads(os.getxattr(older, "user.cached.meta"))
    assert "disk_format" not in meta and "container_format" not in meta  # as before
    loaded = entries.load(older)
    assert (loaded.disk_format, loaded.container_format) == (None, None)
    assert _record_of(loaded).raw == {}  # undeclared: judged on content alone


def test_violation_records_round_trip_and_parse_strictly(tmp_path: Path) -> None:
    verdict = Verdict(
        Outcome.UNSAFE, "qcow2", "raw", ("backing_file",), (), 1 << 20, "10.2.0", "0123abcd"
    )
    image_id = str(uuid.uuid4())
    violation = violations.Violation(image_id, "ab" * 64, verdict)
    violations.write(tmp_path, violation)
    assert violations.load_all(tmp_path) == [violation]
    assert violation.applies_to("ab" * 64) and violation.applies_to(None)
    assert not violation.applies_to("cd" * 64)
    raw = violations.dumps(violation)
    for bad in [
        raw.replace(b'"v":1', b'"v":2'),
        raw.replace(image_id.encode(), b"not-an-id"),
        raw.replace(b'"ab', b'"zz'),
        raw.replace(b'"unsafe"', b'"fine"'),
        raw[:-1] + b',"x":1}',
    ]:
        with pytest.raises(ValueError):
            violations.loads(bad)
    (tmp_path / violations.DIRECTORY / image_id).write_bytes(raw[:20])
    assert violations.load_all(tmp_path) == []  # unreadable: removed, inspected again
    assert not (tmp_path / violations.DIRECTORY / image_id).exists()


@pytest.mark.parametrize(
    ("accept", "kind"),
    [
        (None, "text/plain"),
        ("", "text/plain"),
        ("*/*", "text/html"),
        ("application/json", "application/json"),
        ("text/html", "text/html"),
        ("text/plain", "text/plain"),
        ("application/json, text/html", "text/html"),
        ("text/*", "text/html"),
        ("application/*", "application/json"),
        ("application/json;q=0.9, text/html;q=0.5", "application/json"),
        ("text/html;q=0, */*", "application/json"),
        ("garbage;;", "text/html"),
        ("image/png", "text/plain"),
    ],
)
def test_a_refusal_takes_the_content_type_webob_gives(accept: str | None, kind: str) -> None:
    """As webob 1.8.11 (Glance 33's) renders ``HTTPForbidden(explanation=...)`` (checked
    against it by hand: the table and the bodies below)."""
    message = 'Image 1 is "x" & y\'s: unsafe.'
    response = replies.glance_error(403, message, "req-1", accept)
    assert response.content_type == kind
    assert response.text is not None
    if kind == "text/html":
        assert response.text == (
            "<html>\n <head>\n  <title>403 Forbidden</title>\n </head>\n <body>\n"
            "  <h1>403 Forbidden</h1>\n  Image 1 is &quot;x&quot; &amp; y&#x27;s: unsafe."
            "<br /><br />\n\n\n\n </body>\n</html>"
        )
    elif kind == "text/plain":
        assert response.text == f"403 Forbidden\n\n{message}\n\n   "
    else:
        assert json.loads(response.text)["message"] == f"{message}<br /><br />\n\n\n"
