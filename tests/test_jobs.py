"""The periodic jobs: prune (LRU, in-use entries kept), clean (stalled partial and invalid
entries), prefetch (service credentials, bounded concurrency, failures kept queued with
backoff, a queue that survives restarts) and their schedules."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Daemon, manage, start_daemon, stop_daemon, tree, wait_complete
from fakeglance import FakeGlance
from fakekeystone import FakeKeystone

from cached import config as configuration
from cached.app import MANAGER, SCHEDULER
from cached.identity import keystone as identity
from cached.jobs.prefetch import STATUS_XATTR, Outcome, Prefetcher, QueueStatus, write_status
from cached.store import xattrs

MiB = 1 << 20
EMPTY = ["incomplete/", "invalid/", "queue/"]


async def eventually(check: Any, within: float = 5.0) -> None:
    for _ in range(int(within / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


def cached_here(d: Daemon, image_id: str) -> bool:
    entry = d.store.get(image_id)
    return entry is not None and entry.complete


async def cache(d: Daemon, glance: FakeGlance, size: int = MiB, **knobs: Any) -> str:
    image = glance.add_image(os.urandom(size), **knobs)
    status, _, _ = await d.get(image.id)
    assert status == 200
    await eventually(lambda: cached_here(d, image.id))
    return image.id


async def legacy_queue(d: Daemon, image_id: str) -> None:
    url = f"{d.admin_base}/v2/queued_images/{image_id}"
    async with manage(d).put(url) as resp:
        assert resp.status == 200


async def download_corrupt(d: Daemon, image_id: str) -> None:
    """A download whose digest does not match: the client is cut off before the last byte."""
    with pytest.raises(aiohttp.ClientPayloadError):
        await d.get(image_id)
    await eventually(lambda: (d.cache_dir / "invalid" / image_id).exists())


def prefetcher(d: Daemon) -> Prefetcher:
    return d.app[MANAGER].prefetcher


def data_gets(glance: FakeGlance, image_id: str) -> list[Any]:
    return [r for r in glance.data_requests(image_id) if r.range != "bytes=0-0"]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


# --------------------------------------------------------------------------------- prune
async def test_prune_evicts_least_recently_used_also_what_is_being_read(
    glance: FakeGlance, cache_dir: Path
) -> None:
    """A complete entry being read is evicted like the others (issue 14 item 3: skipping
    entries in use made most bytes of a busy cache bypass it); its readers keep their open
    file. What a fill works on is never evicted (tests/test_pressure.py)."""
    d = await start_daemon(
        cache_dir,
        glance.url,
        image_cache_max_size=6 * MiB,
        max_image_fraction=1.0,
        prune_on_fill=False,
    )
    try:
        ids = [await cache(d, glance, 2 * MiB) for _ in range(4)]
        for age, image_id in zip((400, 300, 200, 100), ids, strict=True):
            d.store.get(image_id).last_accessed = time.time() - age  # type: ignore[union-attr]
        d.store.get(ids[0]).readers = 1  # type: ignore[union-attr]  # the oldest is being read
        # A partial entry not in use is evicted too, by when it was last written or read.
        partial = glance.add_image(os.urandom(6 * MiB))
        assert (await d.get(partial.id, Range="bytes=0-0"))[0] == 206
        await eventually(lambda: partial.id not in d.filler.fills)
        entry = d.store.get(partial.id)
        assert entry is not None and entry.present_bytes() == 4 * MiB
        entry.last_accessed = entry.last_modified = time.time() - 150

        result = await d.app[MANAGER].maintenance.prune()
        # 8 MiB + the 4 MiB chunk of the partial entry > 6 MiB: entries go from the least
        # recently used on (the one being read first) until 6 MiB are left.
        assert (result.files, result.bytes) == (3, 2 * MiB + 2 * MiB + 2 * MiB)
        assert tree(cache_dir) == sorted([*EMPTY, f"incomplete/{partial.id}", ids[3]])
        assert sorted(d.store.entries) == sorted([partial.id, ids[3]])
    finally:
        await stop_daemon(d)


async def test_prune_stops_at_the_limit(glance: FakeGlance, cache_dir: Path) -> None:
    d = await start_daemon(cache_dir, glance.url, image_cache_max_size=2 * MiB, prune_on_fill=False)
    try:
        ids = [await cache(d, glance) for _ in range(4)]
        for age, image_id in zip((100, 400, 300, 200), ids, strict=True):
            d.store.get(image_id).last_accessed = time.time() - age  # type: ignore[union-attr]
        result = await d.app[MANAGER].maintenance.prune()
        assert (result.files, result.bytes) == (2, 2 * MiB)
        assert tree(cache_dir) == sorted([*EMPTY, ids[0], ids[3]])
        assert d.store.total_size() == 2 * MiB
    finally:
        await stop_daemon(d)


async def test_prune_runs_on_its_schedule(glance: FakeGlance, cache_dir: Path) -> None:
    d = await start_daemon(cache_dir, glance.url, image_cache_max_size=MiB, cache_prune_interval=1)
    try:
        old = await cache(d, glance)  # the least recently used (the prune may come any time)
        new = await cache(d, glance)
        await eventually(lambda: d.store.get(old) is None, within=3)
        assert tree(cache_dir) == sorted([*EMPTY, new])
    finally:
        await stop_daemon(d)


async def test_a_new_entry_that_would_not_fit_prunes_at_once(
    glance: FakeGlance, cache_dir: Path
) -> None:
    d = await start_daemon(cache_dir, glance.url, image_cache_max_size=5 * MiB // 2)
    try:  # the schedule (600 s) never runs here: the fill itself makes room
        first = await cache(d, glance)
        second = await cache(d, glance)
        assert d.store.get(first) is not None  # 2 MiB fit
        third = await cache(d, glance)
        await eventually(lambda: d.store.get(first) is None, within=3)
        assert tree(cache_dir) == sorted([*EMPTY, second, third])
    finally:
        await stop_daemon(d)


# --------------------------------------------------------------------------------- clean
async def test_clean_removes_stalled_partial_and_invalid_entries(
    glance: FakeGlance, cache_dir: Path
) -> None:
    d = await start_daemon(cache_dir, glance.url, image_cache_stall_time=60)
    try:
        stalled, recent = (glance.add_image(os.urandom(9 * MiB)) for _ in range(2))
        for image in (stalled, recent):
            assert (await d.get(image.id, Range="bytes=0-0"))[0] == 206
            await eventually(lambda i=image: i.id not in d.filler.fills)
        d.store.get(stalled.id).last_modified -= 120  # type: ignore[union-attr]
        # Being filled (slowly) and untouched for long: kept.
        filling = glance.add_image(os.urandom(8 * MiB), rate=4 * MiB)
        download = asyncio.create_task(d.get(filling.id))
        await eventually(lambda: filling.id in d.filler.fills)
        d.filler.fills[filling.id].entry.last_modified -= 120
        # Failed verification: kept aside in invalid/ until a clean.
        bad = glance.add_image(os.urandom(MiB), corrupt_at=1000)
        await download_corrupt(d, bad.id)

        result = await d.app[MANAGER].maintenance.clean()
        assert (result.stalled, result.invalid) == (1, 1)
        assert tree(cache_dir) == sorted(
            [*EMPTY, f"incomplete/{recent.id}", f"incomplete/{filling.id}"]
        )
        assert d.store.invalid == set()
        download.cancel()
    finally:
        await stop_daemon(d)


async def test_clean_runs_on_its_schedule(glance: FakeGlance, cache_dir: Path) -> None:
    d = await start_daemon(cache_dir, glance.url, cache_clean_interval=1)
    try:
        bad = glance.add_image(os.urandom(MiB), corrupt_at=5)
        with pytest.raises(aiohttp.ClientPayloadError):  # cut once it is in invalid/
            await d.get(bad.id)
        # The file goes in a worker thread, the index entry on the loop right after: wait for both.
        await eventually(
            lambda: not (cache_dir / "invalid" / bad.id).exists() and not d.store.invalid,
            within=3,
        )
    finally:
        await stop_daemon(d)


# ------------------------------------------------------------------------------ prefetch
async def test_prefetch_schedule_fetches_the_queue_with_service_credentials(
    glance: FakeGlance, cache_dir: Path
) -> None:
    d = await start_daemon(
        cache_dir, glance.url, cache_prefetcher_interval=1, service_token="token-admin"
    )
    try:
        images = [glance.add_image(os.urandom(MiB), owner="p2") for _ in range(2)]
        for image in images:
            await legacy_queue(d, image.id)
        assert all(data_gets(glance, i.id) == [] for i in images)  # not before the run
        for image in images:
            await eventually(lambda i=image: cached_here(d, i.id), within=3)
        await eventually(lambda: tree(cache_dir) == sorted([*EMPTY, *(i.id for i in images)]))
        used = {r.headers["x-auth-token"] for i in images for r in data_gets(glance, i.id)}
        assert used == {"token-admin"}
    finally:
        await stop_daemon(d)


async def test_queue_survives_a_restart(glance: FakeGlance, cache_dir: Path) -> None:
    image = glance.add_image(os.urandom(MiB))
    d = await start_daemon(cache_dir, glance.url, service_token="token-admin")
    await legacy_queue(d, image.id)
    await stop_daemon(d)
    d = await start_daemon(cache_dir, glance.url, service_token="token-admin")
    try:
        async with manage(d).get(f"{d.admin_base}/v2/queued_images") as resp:
            assert await resp.json() == {"queued_images": [image.id]}
        assert await prefetcher(d).run() == {
            Outcome.CACHED: 1,
            Outcome.FAILED: 0,
            Outcome.DROPPED: 0,
            Outcome.REFUSED: 0,
            Outcome.DELETED: 0,
        }
        assert tree(cache_dir) == sorted([*EMPTY, image.id])
    finally:
        await stop_daemon(d)


async def test_failures_stay_queued_with_the_reason_and_back_off(
    glance: FakeGlance, cache_dir: Path
) -> None:
    d = await start_daemon(
        cache_dir,
        glance.url,
        service_token="token-admin",
        prefetch_retry_initial=5,
        prefetch_retry_max=8,
    )
    marker = cache_dir / "queue" / "%s"
    try:
        image = glance.add_image(os.urandom(6 * MiB), cut_after=5 * MiB)
        await legacy_queue(d, image.id)
        assert (await prefetcher(d).run())[Outcome.FAILED] == 1
        attrs = await asyncio.to_thread(xattrs.read_all, str(marker) % image.id)
        status = json.loads(attrs[STATUS_XATTR])
        assert status["failures"] == 1 and "broke off" in status["last_error"]
        assert status["next_attempt"] - status["last_attempt"] == 5
        entry = d.store.get(image.id)
        await eventually(lambda: entry is not None and entry.present_bytes() > 0)  # flushed
        async with manage(d).get(f"{d.admin_base}/v2/cache/progress") as resp:
            shown = (await resp.json())["progress"][image.id]
        assert shown["state"] == "failed" and shown["last_error"] == status["last_error"]
        assert shown["bytes_done"] == 4 * MiB  # the first chunk was kept for a resume

        requests = len(data_gets(glance, image.id))
        assert (await prefetcher(d).run())[Outcome.FAILED] == 0  # not due yet
        assert len(data_gets(glance, image.id)) == requests

        await asyncio.to_thread(
            write_status, Path(str(marker) % image.id), QueueStatus(1, "x", 1.0, 0.0)
        )  # time passes
        image.cut_after = 1000  # per response: the resumed transfer breaks off too
        assert (await prefetcher(d).run())[Outcome.FAILED] == 1
        attrs = await asyncio.to_thread(xattrs.read_all, str(marker) % image.id)
        status = json.loads(attrs[STATUS_XATTR])
        assert status["failures"] == 2
        assert status["next_attempt"] - status["last_attempt"] == 8  # 10, capped

        image.cut_after = None
        await asyncio.to_thread(
            write_status, Path(str(marker) % image.id), QueueStatus(2, "x", 1.0, 0.0)
        )
        assert (await prefetcher(d).run())[Outcome.CACHED] == 1
        assert tree(cache_dir) == sorted([*EMPTY, image.id])  # dequeued, record gone with it
    finally:
        await stop_daemon(d)


async def test_prefetch_concurrency_is_bounded(glance: FakeGlance, cache_dir: Path) -> None:
    d = await start_daemon(cache_dir, glance.url, service_token="token-admin")
    try:
        images = [glance.add_image(os.urandom(2 * MiB), rate=8 * MiB) for _ in range(4)]
        for image in images:
            await legacy_queue(d, image.id)
        run = asyncio.create_task(prefetcher(d).run())
        most = 0
        while not run.done():
            most = max(most, len(d.filler.fills))
            await asyncio.sleep(0.01)
        assert run.result()[Outcome.CACHED] == 4 and most == 2
    finally:
        await stop_daemon(d)


async def test_prefetch_joins_a_clients_fill(glance: FakeGlance, cache_dir: Path) -> None:
    d = await start_daemon(cache_dir, glance.url, service_token="token-admin")
    try:
        image = glance.add_image(os.urandom(8 * MiB), rate=16 * MiB)
        download = asyncio.create_task(d.get(image.id))
        await eventually(lambda: image.id in d.filler.fills)
        await legacy_queue(d, image.id)
        assert (await prefetcher(d).run())[Outcome.CACHED] == 1
        assert (await download)[2] == image.data
        assert len(data_gets(glance, image.id)) == 1  # one upstream transfer for both
    finally:
        await stop_daemon(d)


async def test_deleting_an_image_being_prefetched(glance: FakeGlance, cache_dir: Path) -> None:
    d = await start_daemon(cache_dir, glance.url)
    try:
        image = glance.add_image(os.urandom(8 * MiB), rate=16 * MiB)
        url = f"{d.admin_base}/v2/cache/{image.id}"
        async with manage(d).put(url, headers={"X-Auth-Token": "token-p1"}) as resp:
            assert resp.status == 202
        task = prefetcher(d).start(image.id)  # the task PUT started
        await eventually(lambda: image.id in d.filler.fills)
        fill = d.filler.fills[image.id]
        async with manage(d).delete(url) as resp:
            assert resp.status == 204
        assert await task is Outcome.DROPPED
        await asyncio.wait_for(fill.closed.wait(), 5)
        assert tree(cache_dir) == EMPTY  # neither committed nor re-queued
        assert d.store.get(image.id) is None
    finally:
        await stop_daemon(d)


# ------------------------------------------------------------------------------ wiring
async def test_scheduler_jobs(glance: FakeGlance, cache_dir: Path) -> None:
    d = await start_daemon(
        cache_dir, glance.url, cache_prefetcher_interval=7, cache_prune_interval=8
    )
    try:
        jobs = {j.id: j for j in d.app[SCHEDULER].get_jobs()}
        assert sorted(jobs) == ["audit", "clean", "prefetch", "prune", "scrub"]
        assert {n: j.trigger.interval.total_seconds() for n, j in jobs.items()} == {
            "prefetch": 7,
            "prune": 8,
            "clean": 3600,
            "scrub": 86400,
            "audit": 3600,  # image_safety_audit_interval (cached/safety/audit.py)
        }
        assert all(j.max_instances == 1 and j.coalesce for j in jobs.values())
    finally:
        await stop_daemon(d)


async def test_service_credentials_from_keystone_password_auth() -> None:
    ks = FakeKeystone()
    await ks.start()
    cfg = configuration.build(
        {
            "keystone_url": ks.url,
            "keystone_username": "glance",
            "keystone_password": "glance-secret",
            "keystone_project_name": "service",
        }
    )
    _, service = identity.build(cfg)
    creds = await service.credentials()
    assert creds is not None and (await service.credentials()) == creds
    token = creds.get("x-auth-token")
    assert token is not None and token.startswith("gAAAA")
    assert len(ks.recorded("POST", "/v3/auth/tokens")) == 1
    await ks.close()


async def test_a_fill_renews_a_service_token_the_upstream_refuses(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Issue 16: the upstream answers 401 to the daemon's own token (revoked at Keystone):
    the fill forgets it, keystoneauth1 fetches a new one, and the transfer is tried once more;
    the client's download completes and the image is cached."""
    from fakeglance import Token

    ks = FakeKeystone()
    await ks.start()
    known = glance.tokens

    class Issued(dict[str, Token]):
        """Glance's view: the first token Keystone issued is revoked, later ones are good."""

        def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
            if key in known:
                return known[key]
            issued = [t for t in ks._tokens if t.startswith("gAAAA")]
            return Token("service", ("admin", "service")) if key in issued[1:] else default

    glance.tokens = Issued()
    cache = tmp_path / "cache"
    cache.mkdir()
    d = await start_daemon(
        cache,
        glance.url,
        keystone_authtoken={
            "auth_url": ks.url,
            "auth_type": "password",
            "username": "glance",
            "password": "glance-secret",
            "project_name": "service",
            "user_domain_name": "Default",
            "project_domain_name": "Default",
        },
    )
    try:
        image = glance.add_image(os.urandom(3 << 20))
        status, _, body = await d.get(image.id)
        assert (status, body) == (200, image.data)
        await wait_complete(d, image.id)
        assert len(ks.recorded("POST", "/v3/auth/tokens")) == 2  # the first one, renewed
    finally:
        await stop_daemon(d)
        await ks.close()
