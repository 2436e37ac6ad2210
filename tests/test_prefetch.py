"""Prefetch and permanent answers: a queued image the upstream refuses for good (403, 404)
or that was deleted leaves the queue instead of being retried forever."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from conftest import Daemon, auth, manage, start_daemon, stop_daemon
from fakeglance import FakeGlance

from cached.app import MANAGER
from cached.jobs.prefetch import Outcome, Prefetcher

MiB = 1 << 20


def prefetcher(d: Daemon) -> Prefetcher:
    return d.app[MANAGER].prefetcher


async def legacy_queue(d: Daemon, image_id: str) -> None:
    """Queue without fetching now (``PUT /v2/queued_images``: the schedule fetches it)."""
    async with manage(d).put(f"{d.admin_base}/v2/queued_images/{image_id}") as resp:
        assert resp.status == 200


async def queued(d: Daemon) -> list[str]:
    async with manage(d).get(f"{d.admin_base}/v2/queued_images") as resp:
        return list((await resp.json())["queued_images"])


def prefetch_warnings(caplog: pytest.LogCaptureFixture, image_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "cached.prefetch"
        and r.levelno >= logging.WARNING
        and image_id in r.getMessage()
    ]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


@pytest.mark.parametrize(
    ("token", "status"),
    [
        ("token-admin", 404),  # the image was deleted upstream after it was queued
        ("token-reader", 403),  # may see the record, may not download (download_image policy)
    ],
)
async def test_permanent_upstream_answers_dequeue_with_one_log_line(
    glance: FakeGlance,
    cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
    token: str,
    status: int,
) -> None:
    d = await start_daemon(cache_dir, glance.url, service_token=token)
    try:
        image = glance.add_image(os.urandom(MiB))
        await legacy_queue(d, image.id)
        if status == 404:
            del glance.images[image.id]
        caplog.clear()
        caplog.set_level(logging.INFO, logger="cached.prefetch")

        counts = await prefetcher(d).run()
        assert counts[Outcome.REFUSED] == 1 and counts[Outcome.FAILED] == 0
        assert await queued(d) == []
        assert not (cache_dir / "queue" / image.id).exists()
        lines = prefetch_warnings(caplog, image.id)
        assert lines == [
            f"prefetch of {image.id}: the upstream answered {status}: dequeued, not retried"
        ]
        # Statuses the upstream answered for this image: one try, never retried.
        asked = len(glance.requests)
        assert (await prefetcher(d).run()) == dict.fromkeys(Outcome, 0)
        assert len(glance.requests) == asked
    finally:
        await stop_daemon(d)


async def test_transient_failures_stay_queued(glance: FakeGlance, cache_dir: Path) -> None:
    """The counterpart: a transfer that breaks off is retried later (not a permanent answer)."""
    d = await start_daemon(cache_dir, glance.url, service_token="token-admin")
    try:
        image = glance.add_image(os.urandom(2 * MiB), cut_after=MiB)
        await legacy_queue(d, image.id)
        counts = await prefetcher(d).run()
        assert counts[Outcome.FAILED] == 1 and counts[Outcome.REFUSED] == 0
        assert await queued(d) == [image.id]
    finally:
        await stop_daemon(d)


async def test_forget_stops_a_running_prefetch_and_dequeues(
    glance: FakeGlance, cache_dir: Path
) -> None:
    """What the proxy calls when an image is deleted through it."""
    d = await start_daemon(cache_dir, glance.url, service_token="token-admin")
    try:
        image = glance.add_image(os.urandom(4 * MiB), rate=MiB)  # about 4 s: still running
        await legacy_queue(d, image.id)
        run = asyncio.create_task(prefetcher(d).run())
        for _ in range(500):  # until its transfer has begun
            if glance.bytes_sent.get(image.id):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the prefetch never started")
        assert await prefetcher(d).forget(image.id) is True
        counts = await asyncio.wait_for(run, 10)  # the run ends: its fetch was cancelled
        assert counts == {**dict.fromkeys(Outcome, 0), Outcome.DROPPED: 1}
        assert await queued(d) == []
        assert await prefetcher(d).forget(image.id) is False  # nothing left to forget
    finally:
        await stop_daemon(d)


async def test_image_deleted_through_the_proxy_leaves_the_queue(
    glance: FakeGlance, cache_dir: Path
) -> None:
    d = await start_daemon(cache_dir, glance.url, service_token="token-admin")
    try:
        image = glance.add_image(os.urandom(MiB))
        await legacy_queue(d, image.id)
        async with d.session.delete(
            f"{d.url}/v2/images/{image.id}", headers=auth("token-admin")
        ) as resp:
            assert resp.status == 204
        assert await queued(d) == []
    finally:
        await stop_daemon(d)


async def _fetching(
    d: Daemon, glance: FakeGlance, image_id: str
) -> asyncio.Task[dict[Outcome, int]]:
    """A prefetch run whose fetch of ``image_id`` has its fill open (the upstream is held)."""
    run = asyncio.create_task(prefetcher(d).run())
    deadline = asyncio.get_running_loop().time() + 10
    while d.filler.get(image_id) is None or not glance.data_requests(image_id):
        assert asyncio.get_running_loop().time() < deadline, "the prefetch never started"
        await asyncio.sleep(0.01)
    return run


@pytest.mark.parametrize(
    "how", ["DELETE /v2/cached_images/{id}", "DELETE /v2/cache (target cache)"]
)
async def test_a_cache_copy_deleted_mid_prefetch_is_not_a_failure(
    glance: FakeGlance, cache_dir: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """The image stays queued (these deletes leave the queue alone, as in Glance) and the
    next run fetches it: no failure recorded, no backoff waited out."""
    d = await start_daemon(cache_dir, glance.url, service_token="token-admin")
    image = glance.add_image(os.urandom(2 * MiB))
    try:
        await legacy_queue(d, image.id)
        image.pause()
        run = await _fetching(d, glance, image.id)
        caplog.set_level(logging.INFO, logger="cached.prefetch")
        if how.startswith("DELETE /v2/cached_images"):
            url, headers = f"{d.admin_base}/v2/cached_images/{image.id}", {}
        else:
            url, headers = f"{d.admin_base}/v2/cache", {"x-image-cache-clear-target": "cache"}
        async with manage(d).delete(url, headers=headers) as resp:
            assert resp.status in (200, 204)
        counts = await asyncio.wait_for(run, 10)
        assert counts == {**dict.fromkeys(Outcome, 0), Outcome.DELETED: 1}
        assert await queued(d) == [image.id]
        assert prefetch_warnings(caplog, image.id) == []
        progress = (await prefetcher(d).progress())[image.id]
        assert (progress["state"], progress["failures"]) == ("queued", 0)

        image.resume()
        assert (await prefetcher(d).run())[Outcome.CACHED] == 1  # at once: nothing to wait
        assert await queued(d) == []
    finally:
        image.resume()
        await stop_daemon(d)


async def test_an_image_deleted_through_the_proxy_mid_prefetch_is_not_a_failure(
    glance: FakeGlance, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = await start_daemon(cache_dir, glance.url, service_token="token-admin")
    image = glance.add_image(os.urandom(2 * MiB))
    try:
        await legacy_queue(d, image.id)
        image.pause()
        run = await _fetching(d, glance, image.id)
        caplog.set_level(logging.INFO, logger="cached.prefetch")
        async with d.session.delete(
            f"{d.url}/v2/images/{image.id}", headers=auth("token-admin")
        ) as resp:
            assert resp.status == 204
        counts = await asyncio.wait_for(run, 10)
        assert counts[Outcome.FAILED] == 0 and sum(counts.values()) == 1, counts
        assert prefetch_warnings(caplog, image.id) == []
        assert await queued(d) == []
    finally:
        image.resume()
        await stop_daemon(d)


@pytest.mark.parametrize("status", [403, 404])
async def test_a_permanent_answer_to_the_transfer_itself_dequeues(
    glance: FakeGlance, cache_dir: Path, status: int
) -> None:
    """The record is there, but the download is refused (403) or its data gone (404): as
    permanent as when the record says so."""
    d = await start_daemon(cache_dir, glance.url, service_token="token-admin")
    try:
        image = glance.add_image(os.urandom(MiB))
        await legacy_queue(d, image.id)
        glance.fail_downloads = status
        counts = await prefetcher(d).run()
        assert counts == {**dict.fromkeys(Outcome, 0), Outcome.REFUSED: 1}
        assert await queued(d) == []
    finally:
        await stop_daemon(d)
