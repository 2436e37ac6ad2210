"""Metrics move as they should across a hit, a miss, a collapsed join, a range, an eviction, a
verification failure and a pass-through; /healthz and /readyz; the access log's byte count.

In-process daemon (real TCP on loopback) in front of the fake Glance; values are read from a
real ``GET /metrics`` scrape, parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from conftest import (
    Daemon,
    auth,
    manage,
    start_daemon,
    stop_daemon,
    wait_complete,
    wait_guard,
    wait_idle,
)
from fakeglance import FakeGlance
from scrapes import measure, scrape, value
from test_filebackend import remount_read_only, tmpfs  # noqa: F401 (fixture)

MiB = 1 << 20


@pytest.fixture
async def small(glance: FakeGlance, tmp_path: Path) -> AsyncIterator[Daemon]:
    """A daemon whose cache holds 6 MiB: a second 4 MiB image evicts the first."""
    cache = tmp_path / "cache"
    cache.mkdir()
    d = await start_daemon(cache, glance.url, image_cache_max_size="6M")
    yield d
    await stop_daemon(d)


async def test_miss_then_hit_count_requests_bytes_and_upstream(
    glance: FakeGlance, daemon: Daemon
) -> None:
    data = os.urandom(5 * MiB + 123)
    image = glance.add_image(data)

    async def miss() -> None:
        status, headers, body = await daemon.get(image.id)
        assert (status, headers["Cache-Status"], body) == (
            200,
            "cached; fwd=uri-miss; stored",
            data,
        )
        await wait_complete(daemon, image.id)

    d = await measure(daemon, miss)
    assert d("cached_requests_total", outcome="miss") == 1
    assert d("cached_served_bytes_total", outcome="miss") == len(data)
    assert d("cached_upstream_requests_total", kind="data") == 1
    assert d("cached_upstream_bytes_total", kind="data") == len(data)
    assert d("cached_upstream_requests_total", kind="probe") == 1
    assert d("cached_auth_probes_total", result="allow") == 1
    assert d("cached_fills_started_total") == 1
    assert d("cached_fills_finished_total", result="verified") == 1
    assert d("cached_fill_duration_seconds_count", result="verified") == 1
    assert d("cached_download_duration_seconds_count", outcome="miss") == 1
    after = d.after
    assert value(after, "cached_cache_bytes") == len(data)
    assert value(after, "cached_cache_entries", state="complete") == 1
    assert value(after, "cached_cache_max_bytes") == 10 << 30

    async def hit() -> None:
        status, headers, body = await daemon.get(image.id)
        assert (status, headers["Cache-Status"], body) == (200, "cached; hit", data)

    d = await measure(daemon, hit)
    assert d("cached_requests_total", outcome="hit") == 1
    # sendfile: the response writer saw only the headers; this is what went out
    assert d("cached_served_bytes_total", outcome="hit") == len(data)
    assert d("cached_upstream_requests_total", kind="data") == 0
    assert d("cached_upstream_bytes_total", kind="data") == 0
    assert d("cached_fills_started_total") == 0


async def test_collapsed_join_and_range(glance: FakeGlance, daemon: Daemon) -> None:
    data = os.urandom(12 * MiB)
    image = glance.add_image(data, rate=8 * MiB)

    async def two_at_once() -> None:
        first = asyncio.ensure_future(daemon.get(image.id))
        for _ in range(500):
            if image.id in daemon.filler.fills:
                break
            await asyncio.sleep(0.01)
        second = await daemon.get(image.id)
        assert second[1]["Cache-Status"] == "cached; fwd=uri-miss; collapsed"
        assert second[2] == data and (await first)[2] == data

    d = await measure(daemon, two_at_once, requests=2)
    assert d("cached_requests_total", outcome="miss") == 1
    assert d("cached_requests_total", outcome="collapsed") == 1
    assert d("cached_singleflight_joins_total") == 1
    assert d("cached_served_bytes_total", outcome="collapsed") == len(data)
    assert d("cached_upstream_bytes_total", kind="data") == len(data)  # one transfer for both

    other_data = os.urandom(20 * MiB)
    other = glance.add_image(other_data)

    async def a_range() -> None:
        status, headers, body = await daemon.get(other.id, Range="bytes=9437184-9437283")
        assert (status, len(body)) == (206, 100)
        assert headers["Cache-Status"] == "cached; fwd=uri-miss; stored"
        await wait_idle(daemon, other.id)

    d = await measure(daemon, a_range)
    assert d("cached_requests_total", outcome="miss") == 1
    assert d("cached_served_bytes_total", outcome="miss") == 100
    assert d("cached_upstream_requests_total", kind="range") == 1
    assert d("cached_upstream_bytes_total", kind="range") == 4 * MiB  # the chunk it is in
    assert d("cached_fills_finished_total", result="idle") == 1
    assert value(d.after, "cached_cache_entries", state="partial") == 1
    assert value(d.after, "cached_cache_partial_bytes") == 4 * MiB

    async def the_rest() -> None:
        status, headers, body = await daemon.get(other.id)
        assert (status, headers["Cache-Status"]) == (200, "cached; fwd=partial; stored")
        assert body == other_data
        await wait_complete(daemon, other.id)

    d = await measure(daemon, the_rest)
    assert d("cached_requests_total", outcome="partial") == 1
    assert d("cached_served_bytes_total", outcome="partial") == len(other_data)
    # only what was missing: the chunks before and after the one the range fetched
    assert (
        d("cached_upstream_bytes_total", kind="range")
        + d("cached_upstream_bytes_total", kind="data")
        == 16 * MiB
    )
    assert value(d.after, "cached_cache_partial_bytes") == 0


async def test_eviction(glance: FakeGlance, small: Daemon) -> None:
    first = glance.add_image(os.urandom(4 * MiB))
    second = glance.add_image(os.urandom(4 * MiB))
    assert (await small.get(first.id))[0] == 200
    await wait_complete(small, first.id)

    async def evicting() -> None:
        assert (await small.get(second.id))[0] == 200
        await wait_complete(small, second.id)
        for _ in range(500):
            if small.store.get(first.id) is None:
                return
            await asyncio.sleep(0.01)

    d = await measure(small, evicting)
    assert d("cached_evictions_total", reason="prune") == 1
    assert d("cached_evicted_bytes_total", reason="prune") == 4 * MiB
    assert value(d.after, "cached_cache_max_bytes") == 6 * MiB
    assert value(d.after, "cached_cache_entries", state="complete") == 1


async def test_verification_failure(glance: FakeGlance, daemon: Daemon) -> None:
    image = glance.add_image(os.urandom(3 * MiB), corrupt_at=MiB)

    async def corrupt() -> None:
        with pytest.raises(aiohttp.ClientPayloadError):
            await daemon.get(image.id)
        await wait_idle(daemon, image.id)

    d = await measure(daemon, corrupt)
    assert d("cached_fills_finished_total", result="invalid") == 1
    assert d("cached_fills_finished_total", result="verified") == 0
    assert value(d.after, "cached_cache_entries", state="invalid") == 1


async def test_pass_through_of_a_read_only_cache(
    glance: FakeGlance,
    tmpfs: Callable[..., Path],  # noqa: F811
) -> None:
    cache = tmpfs("size=16m")
    daemon = await start_daemon(cache, glance.url)
    try:
        before = await scrape(daemon)
        assert value(before, "cached_passthrough", directory=str(cache)) == 0
        async with manage(daemon).get(f"{daemon.admin_base}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["checks"]["cache"] == "caching"
        await remount_read_only(cache)
        await wait_guard(daemon, "read_only")  # the guard probes on its own schedule
        data = os.urandom(3 * MiB)
        image = glance.add_image(data)

        async def bypass() -> None:
            status, headers, body = await daemon.get(image.id)
            assert (status, headers["Cache-Status"], body) == (
                200,
                "cached; fwd=bypass; detail=read_only",
                data,
            )

        d = await measure(daemon, bypass)
        # The guard may have seen the remount before the first scrape of measure(): the
        # gauge is compared with 0 from before the remount, not as a delta.
        assert value(await scrape(daemon), "cached_passthrough", directory=str(cache)) == 1
        assert d("cached_requests_total", outcome="bypass") == 1
        assert d("cached_bypass_total", reason="read_only") == 1  # why (issue 19 item 10)
        assert d("cached_served_bytes_total", outcome="bypass") == len(data)
        assert d("cached_upstream_requests_total", kind="forward") == 1
        async with manage(daemon).get(f"{daemon.admin_base}/readyz") as resp:
            body = await resp.json()
            # knowingly passing through: still ready, and it says why
            assert resp.status == 200, body
            assert body["checks"]["cache"].startswith("pass-through (cache directory read_only")
    finally:
        await stop_daemon(daemon)


async def test_health_endpoints_are_never_proxied(glance: FakeGlance, daemon: Daemon) -> None:
    async with daemon.session.get(f"{daemon.url}/healthz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "alive"
    async with manage(daemon).get(f"{daemon.admin_base}/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert body["status"] == "ready"
        assert body["checks"]["upstream"] == "reachable"
    async with daemon.session.get(f"{daemon.url}/readyz") as resp:
        # The public listener says the state only (issue 19 item 13: no upstream address).
        assert (resp.status, await resp.json()) == (200, {"status": "ready"})
    assert not [r for r in glance.requests if r.path in ("/metrics", "/healthz", "/readyz")]


async def test_readyz_503_when_the_upstream_is_unreachable(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    daemon = await start_daemon(cache, "http://127.0.0.1:9")  # discard port: refused
    try:
        async with manage(daemon).get(f"{daemon.admin_base}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503
            assert body["status"] == "not ready"
            assert body["reasons"][0].startswith("upstream unreachable")
    finally:
        await stop_daemon(daemon)


async def test_metrics_auth_applies_admin_rules(glance: FakeGlance, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    token = "metrics-scraper-token"
    import hashlib

    digest = "sha256:" + hashlib.sha256(token.encode()).hexdigest()
    daemon = await start_daemon(
        cache, glance.url, metrics_auth=True, admin_tokens=[digest], keystone_url=""
    )
    try:
        url = f"{daemon.admin_base}/metrics"
        async with manage(daemon).get(url, headers=auth("token-p1")) as resp:
            assert resp.status == 403
        async with manage(daemon).get(url, headers=auth(token)) as resp:
            assert resp.status == 200
            assert "cached_requests_total" in await resp.text()
    finally:
        await stop_daemon(daemon)


async def test_access_log_counts_sendfile_bytes(
    glance: FakeGlance, daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(5 * MiB)
    image = glance.add_image(data)
    with caplog.at_level(logging.INFO, logger="cached.access"):
        assert (await daemon.get(image.id))[2] == data
        await wait_complete(daemon, image.id)
        assert (await daemon.get(image.id))[2] == data
        assert (await daemon.get(image.id, Range="bytes=10-19"))[2] == data[10:20]
        # the server logs once the response ended, which the client may see first
        for _ in range(500):
            lines = [r.getMessage() for r in caplog.records if r.name == "cached.access"]
            if len(lines) == 3:
                break
            await asyncio.sleep(0.01)
    lines = lines[1:]
    assert (
        f'/file HTTP/1.1" 200 {len(data)} image={image.id} cache=hit upstream_bytes=0' in (lines[0])
    )
    assert '" 206 10 ' in lines[1]
    assert "request_id=req-" in lines[0]
    assert "token-p1" not in "\n".join(lines)


async def test_a_bypass_with_a_detail_counts_as_bypass(
    glance: FakeGlance, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Also in the access log: a bypass with a detail fetched every byte it sent from the
    upstream (issue 8, logging; it logged ``upstream_bytes=0``)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    daemon = await start_daemon(
        cache, glance.url, image_cache_max_size="8M", max_image_fraction=0.5
    )
    try:
        data = os.urandom(5 * MiB)  # over half the cache: never admitted
        image = glance.add_image(data)

        async def too_large() -> None:
            status, headers, body = await daemon.get(image.id)
            assert (status, body) == (200, data)
            assert headers["Cache-Status"] == "cached; fwd=bypass; detail=too-large"

        with caplog.at_level(logging.INFO, logger="cached.access"):
            d = await measure(daemon, too_large)
            for _ in range(500):  # the server logs once the response ended
                lines = [r.getMessage() for r in caplog.records if "cache=bypass" in r.getMessage()]
                if lines:
                    break
                await asyncio.sleep(0.01)
        assert d("cached_requests_total", outcome="bypass") == 1
        assert d("cached_served_bytes_total", outcome="bypass") == len(data)
        # Every byte of it came from the upstream: "bandwidth saved" (served - upstream,
        # README) must not count it (it did: no upstream bytes were counted for a bypass).
        assert d("cached_upstream_bytes_total", kind="forward") == len(data)
        # The reason too, a bounded set (issue 19 item 10): too-large, no-space, a state...
        assert d("cached_bypass_total", reason="too-large") == 1
        assert (
            f" 200 {len(data)} image={image.id} cache=bypass:too-large "
            f"upstream_bytes={len(data)} " in (lines[0])
        )
    finally:
        await stop_daemon(daemon)


async def test_a_long_fill_reports_percent_and_rate(
    glance: FakeGlance, daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    """Progress lines come at most every PROGRESS_EVERY seconds per fill (the clock is passed
    in: the tick's loop time in the daemon)."""
    from cached.ops.lifecycle import PROGRESS_EVERY, Progress

    image = glance.add_image(os.urandom(24 * MiB), rate=4 * MiB)
    client = asyncio.ensure_future(daemon.get(image.id))
    progress = Progress(daemon.filler)
    with caplog.at_level(logging.INFO, logger="cached.lifecycle"):
        for _ in range(500):
            if image.id in daemon.filler.fills:
                break
            await asyncio.sleep(0.01)
        progress.log(0.0)  # first sight: the baseline
        fill = daemon.filler.fills[image.id]
        for _ in range(1000):
            if len(fill.written) >= 2:
                break
            await asyncio.sleep(0.01)
        progress.log(PROGRESS_EVERY / 2)  # too soon: nothing
        progress.log(PROGRESS_EVERY)
    lines = [r.getMessage() for r in caplog.records if r.name == "cached.lifecycle"]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"fill {image.id}: ")
    percent = int(lines[0].split(": ")[1].split("%")[0])
    assert 33 <= percent < 100  # at least 2 of 6 chunks written
    assert lines[0].endswith(" MB/s from the upstream")
    assert "of 24.0 MiB" in lines[0]
    image.rate = None
    assert (await client)[0] == 200
