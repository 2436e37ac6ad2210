"""Peer fill under faults (issue 17), with real ``cached serve`` members on loopback.

Each test starts three members (a cache directory each, their ``fleet_members`` urls being
the relays of tests/test_fleet.py) in front of a fake Glance that counts what it sends.
Where the fleet-wide upstream rate matters (an owner killed half-way), the fake's rate cap
is shared by all its connections (``FakeGlance.shared_rate``, one backend link).

Faults: a cold range on a non-owner, lists that disagree, a sibling whose cache directory
hangs or fills up, a byte flipped in the owner's copy, a sibling answering 5xx or a short
body, a key change by two rolling restarts, a signed request replayed, the owner killed
half-way. Each test prints what clients saw, the extra upstream bytes and the fallback time
(measured, never asserted).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import auth
from daemonproc import CachedProcess
from fakeglance import FakeGlance
from faultfs import FaultFS
from test_correctness import until
from test_fleet import (
    ADMIN,
    IDS,
    Member,
    Relay,
    as_member,
    download,
    fake_glance,
    scrape,
    transfers,
)

from cached.fleet import ring

MiB = 1 << 20
CHUNK = 4 * MiB  # the chunk size of images up to 32 GiB (cached/store/chunks.py)
SERVICE = {"service_token": "token-admin"}  # members fetch for siblings with it


@dataclass
class Rig:
    """Three members (IDS) in front of ``glance``; each can be restarted with changes."""

    tmp: Path
    glance: FakeGlance
    key: Path
    relays: dict[str, Relay]
    urls: dict[str, str]
    extra: dict[str, dict[str, Any]]
    caches: dict[str, Path]
    members: dict[str, Member] = field(default_factory=dict)
    fakes: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> a fake's address

    def config(self, m: str) -> Path:
        path = self.tmp / f"{m}.yaml"
        doc = {
            "fleet_self": m,
            "fleet_members": [{"id": i, "url": self.urls[i]} for i in IDS],
            "fleet_secret_file": str(self.key),
            "fleet_lookup_timeout": 2.0,
            "fleet_stall_timeout": 3.0,
            "fleet_min_copy_rate": 0,
            "admin_tokens": [ADMIN],
            **self.extra.get(m, {}),
        }
        if isinstance(doc["fleet_members"][0], str):  # ids only: a list of its own
            doc["fleet_members"] = [{"id": i, "url": self.urls[i]} for i in doc["fleet_members"]]
        path.write_text(yaml.safe_dump(doc))
        return path

    async def start(self, m: str) -> Member:
        member = self.members.get(m)
        if member is None:
            proc = CachedProcess(
                self.glance.url, self.caches[m], self.tmp / f"{m}.log", "-c", str(self.config(m))
            )
            member = self.members[m] = Member(m, proc, self.relays[m], member_url=self.urls[m])
        else:
            self.config(m)
        member.url = await asyncio.to_thread(member.proc.start)
        self.relays[m].target = ("127.0.0.1", int(member.url.rsplit(":", 1)[1]))
        return member

    async def restart(self, m: str, **changes: Any) -> Member:
        await asyncio.to_thread(self.members[m].proc.stop)
        self.extra.setdefault(m, {}).update(changes)
        return await self.start(m)

    def whole_log(self, m: str) -> str:
        """Everything member ``m`` logged, over all its runs."""
        return (self.tmp / f"{m}.log").read_text(errors="replace")


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path,
    glance: FakeGlance,
    extra: dict[str, dict[str, Any]] | None = None,
    caches: dict[str, Path] | None = None,
    fakes: dict[str, tuple[str, int]] | None = None,
) -> AsyncIterator[Rig]:
    """The members of IDS, but those in ``fakes``: their urls lead to that address."""
    key = tmp_path / "fleet.key"
    key.write_bytes(os.urandom(48).hex().encode())
    key.chmod(0o600)
    relays = {m: Relay() for m in IDS}
    urls = {m: await relay.start() for m, relay in relays.items()}
    dirs = dict(caches or {})
    for m in IDS:
        if m not in dirs:
            dirs[m] = tmp_path / f"cache-{m}"
            dirs[m].mkdir()
    built = Rig(
        tmp_path, glance, key, relays, urls, {m: dict(v) for m, v in (extra or {}).items()}, dirs
    )
    built.fakes = dict(fakes or {})
    try:
        for m, address in built.fakes.items():
            relays[m].target = address
        await asyncio.gather(*(built.start(m) for m in IDS if m not in built.fakes))
        yield built
    finally:
        for member in built.members.values():
            await asyncio.to_thread(member.proc.stop)
        for relay in relays.values():
            await relay.close()


def owned_by(owner: str, members: tuple[str, ...] = IDS) -> str:
    """An image id whose first member in ``members``' order is ``owner``."""
    return next(
        i for i in (str(uuid.uuid4()) for _ in range(1000)) if ring.order(members, i)[0] == owner
    )


def same(body: bytes, data: bytes) -> bool:
    return hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


def upstream_bytes(glance: FakeGlance, image_id: str) -> int:
    return glance.bytes_sent.get(image_id, 0)


def fallback(glance: FakeGlance, image_id: str, since: float) -> str:
    """How long after ``since`` (monotonic) the first upstream data GET of ``image_id`` that
    came later arrived (the fallback), for the report."""
    later = [
        r.at - since
        for r in glance.data_requests(image_id)
        if r.range != "bytes=0-0" and r.at > since
    ]
    return f"{min(later) * 1000:.0f} ms" if later else "none"


async def timed_download(
    session: aiohttp.ClientSession, url: str, image_id: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, float, float]:
    """Status, body, time to the first body byte and to the last (seconds); a cut body is
    what arrived."""
    began = time.monotonic()
    first = None
    got = bytearray()
    async with session.get(
        f"{url}/v2/images/{image_id}/file", headers={**auth(), **(headers or {})}
    ) as resp:
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async for piece in resp.content.iter_any():
                if first is None:
                    first = time.monotonic() - began
                got += piece
        return resp.status, bytes(got), first or 0.0, time.monotonic() - began


async def peer_outcomes(session: aiohttp.ClientSession, member: Member) -> dict[str, float]:
    """``cached_fleet_peer_requests`` by outcome, as ``member`` counts them (this run)."""
    got = await scrape(session, member.url)
    prefix = 'cached_fleet_peer_requests_total{outcome="'
    return {k[len(prefix) : -2]: v for k, v in got.items() if k.startswith(prefix)}


# ------------------------------------------------------------------ the fake's shared cap
async def test_the_fake_glance_rate_cap_is_shared_by_all_connections() -> None:
    """Two downloads at once under a 4 MiB/s shared cap take together at least what one
    link at that rate needs (a lower bound: the bucket never sends faster)."""
    async with fake_glance() as glance:
        glance.shared_rate = 4 * MiB
        images = [glance.add_image(os.urandom(2 * MiB)) for _ in range(2)]
        began = time.monotonic()
        async with aiohttp.ClientSession() as session:

            async def get(image_id: str) -> bytes:
                async with session.get(
                    f"{glance.url}/v2/images/{image_id}/file", headers=auth()
                ) as resp:
                    return await resp.read()

            bodies = await asyncio.gather(*(get(i.id) for i in images))
        took = time.monotonic() - began
        assert [len(b) for b in bodies] == [2 * MiB, 2 * MiB]
        burst = glance._cap.burst if glance._cap else 0
        assert took >= (4 * MiB - burst) / (4 * MiB) - 0.05
        print(f"2 x 2 MiB under a shared 4 MiB/s cap: {took:.2f}s")


# ------------------------------------------------------------------ a cold range
async def test_a_cold_range_on_a_non_owner_fetches_only_its_chunks(tmp_path: Path) -> None:
    """A cold 1 MiB range at 40 MiB of a 64 MiB image, asked of a non-owner: it asks the
    owner for the covering chunk, and the owner, which neither holds nor fills the image,
    fetches that chunk alone from the upstream. The third member's range then comes from the
    owner's chunk (no second upstream transfer). TTFB printed."""
    service = {m: dict(SERVICE) for m in IDS}
    async with fake_glance() as glance, rig(tmp_path, glance, service) as fleet:
        data = os.urandom(64 * MiB)
        image = glance.add_image(data, image_id=owned_by("ctl-a"))
        owner, second, third = (fleet.members[m] for m in ring.order(IDS, image.id))
        span = {"Range": f"bytes={40 * MiB}-{41 * MiB - 1}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            status, body, ttfb, took = await timed_download(session, second.url, image.id, span)
            assert status == 206 and body == data[40 * MiB : 41 * MiB]
            sent = upstream_bytes(glance, image.id)
            assert transfers(glance, image.id) == [f"bytes={40 * MiB}-{44 * MiB - 1}"]
            assert sent <= CHUNK + MiB + 16  # the chunk (and 1-byte authorisation probes)
            assert f"sibling {owner.id} fetches it" in second.proc.output()
            status, body, ttfb3, _ = await timed_download(session, third.url, image.id, span)
            assert status == 206 and body == data[40 * MiB : 41 * MiB]
            assert transfers(glance, image.id) == [f"bytes={40 * MiB}-{44 * MiB - 1}"]
            print(
                f"cold 1 MiB range at 40 MiB on a non-owner: TTFB {ttfb * 1000:.0f} ms, "
                f"done {took * 1000:.0f} ms, upstream data bytes {sent} (chunk {CHUNK}); "
                f"the third member's range from the owner's chunk: TTFB {ttfb3 * 1000:.0f} ms"
            )


async def test_a_whole_image_asked_of_a_member_fetching_ranges_only_is_fetched_by_it(
    tmp_path: Path,
) -> None:
    """A (the owner) is fetching a range for its own client (the upstream holds it after its
    first piece) when B's cold client asks for the whole image: B follows A's fill (HEAD
    says it fills from the upstream), and A fetches the rest of the image for it instead of
    answering 404 (before: B fell back to the upstream for the whole image, a second copy)."""
    service = {m: dict(SERVICE) for m in IDS}
    async with fake_glance() as glance, rig(tmp_path, glance, service) as fleet:
        data = os.urandom(32 * MiB)
        image = glance.add_image(data, image_id=owned_by("ctl-a"))
        a, b = fleet.members["ctl-a"], fleet.members["ctl-b"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            image.pause()
            span = {"Range": f"bytes=0-{MiB - 1}"}
            ranged = asyncio.create_task(timed_download(session, a.url, image.id, span))
            await until(lambda: len(transfers(glance, image.id)) == 1, "A's range transfer")
            whole = asyncio.create_task(timed_download(session, b.url, image.id))
            await until(lambda: len(transfers(glance, image.id)) == 2, "a second transfer")
            image.resume()
            results = await asyncio.gather(ranged, whole)
        assert (results[0][0], results[0][1]) == (206, data[:MiB])
        assert results[1][0] == 200 and same(results[1][1], data)
        asked = transfers(glance, image.id)
        print(
            f"whole image asked of a member fetching a range: upstream transfers {asked}, "
            f"{upstream_bytes(glance, image.id) / len(data):.2f} x the image"
        )
        assert asked == [f"bytes=0-{CHUNK - 1}", f"bytes={CHUNK}-{len(data) - 1}"]
        assert "sibling ctl-a failed" not in b.proc.output()


# ------------------------------------------------------------------ lists that disagree
async def test_members_whose_lists_disagree_fetch_an_image_at_most_twice(tmp_path: Path) -> None:
    """C's fleet_members lacks B (A and B list all three): for an image B owns, C asks A or
    fetches itself, and refuses B's requests (B is no member of its fleet). 3 x 4 cold
    clients at once: at most two upstream copies, every body right; the members count and
    log the other list."""
    extra: dict[str, dict[str, Any]] = {m: dict(SERVICE) for m in IDS}
    extra["ctl-c"]["fleet_members"] = ["ctl-a", "ctl-c"]  # ids: the rig adds the urls
    async with fake_glance() as glance:
        glance.shared_rate = 32 * MiB
        async with rig(tmp_path, glance, extra) as fleet:
            a, b, c = (fleet.members[m] for m in IDS)
            data = os.urandom(32 * MiB)
            image = glance.add_image(data, image_id=owned_by("ctl-b"))
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                began = time.monotonic()
                results = await asyncio.gather(
                    *(timed_download(session, m.url, image.id) for m in (a, b, c) for _ in range(4))
                )
                took = time.monotonic() - began
                assert [(r[0], same(r[1], data)) for r in results] == [(200, True)] * 12
                fetched = len(transfers(glance, image.id))
                extra_bytes = upstream_bytes(glance, image.id) - len(data)
                mismatches = {
                    m.id: (await scrape(session, m.url)).get(
                        "cached_fleet_list_mismatches_total", 0.0
                    )
                    for m in (a, b, c)
                }
                refused = (await peer_outcomes(session, c)).get("refused", 0.0)
            print(
                f"lists disagree: {fetched} upstream data GET(s), {extra_bytes} extra upstream "
                f"bytes, 12 bodies right in {took:.1f}s; mismatches counted {mismatches}; "
                f"C refused {refused:.0f} request(s) from B"
            )
            assert fetched <= 2
            assert mismatches["ctl-a"] >= 1  # C's lookups, with C's list
            assert "has another fleet_members list" in a.proc.output()


# ------------------------------------------------------------------ the owner killed
async def test_the_owner_killed_half_way_costs_little_more_than_one_copy(tmp_path: Path) -> None:
    """Cold clients on B and C: each asks the owner A to fetch the 64 MiB image and follows
    its fill (upstream capped at 32 MiB/s for all); A is killed (-9) once half the image left
    the upstream. The first of B and C in the image's order goes on from the upstream where
    A's bytes stopped, the other follows it (it asks again a member still saying it takes
    A's copy: test_a_member_follows_the_earlier_member_failing_over_from_the_same_sibling):
    upstream bytes at most 1.1 x the image, both bodies whole and right."""
    clients = ("ctl-b", "ctl-c")
    service = {m: dict(SERVICE) for m in IDS}
    async with fake_glance() as glance, rig(tmp_path, glance, service) as fleet:
        glance.shared_rate = 32 * MiB
        data = os.urandom(64 * MiB)
        image = glance.add_image(data, image_id=owned_by("ctl-a"))
        a = fleet.members["ctl-a"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            fetches = [
                asyncio.create_task(timed_download(session, fleet.members[m].url, image.id))
                for m in clients
            ]
            await until(
                lambda: upstream_bytes(glance, image.id) >= 32 * MiB, "half left", within=30
            )
            killed_at = time.monotonic()
            at = upstream_bytes(glance, image.id)
            await asyncio.to_thread(a.proc.kill)
            results = await asyncio.gather(*fetches)
            took = time.monotonic() - killed_at
        sent = upstream_bytes(glance, image.id)
        print(
            f"owner killed at {at / MiB:.1f} MiB, clients on {[m for m in clients]}: "
            f"{[(r[0], same(r[1], data)) for r in results]}, TTFB "
            f"{[round(r[2] * 1000) for r in results]} ms, done {took:.2f}s after the kill; "
            f"upstream resumed {fallback(glance, image.id, killed_at)} after the kill; "
            f"upstream {sent / len(data):.3f} x the image ({transfers(glance, image.id)})"
        )
        assert [(r[0], same(r[1], data)) for r in results] == [(200, True)] * len(clients)
        for m in clients:
            assert "sibling ctl-a failed at byte" in fleet.members[m].proc.output()
        assert sent <= 1.1 * len(data)


# ------------------------------------------------------------------ a flipped byte
def incomplete_file(cache: Path, image_id: str) -> Path:
    return cache / "incomplete" / image_id


async def test_a_byte_flipped_in_the_owners_copy_is_caught_and_skipped(tmp_path: Path) -> None:
    """A byte of A's copy changes on A's disk after its fill wrote it (its own digest,
    computed on the stream, matched; its client had read that byte before): B's fill from A
    fails the upstream's digest (B's client is cut, nothing is a hit), A is told the copy
    is suspect and drops it on re-verification, and B's next fill skips A: the right bytes,
    from the upstream."""
    async with fake_glance() as glance, rig(tmp_path, glance) as fleet:
        data = os.urandom(16 * MiB)
        image = glance.add_image(data, image_id=owned_by("ctl-a"), rate=8 * MiB)
        a, b = fleet.members["ctl-a"], fleet.members["ctl-b"]
        flip = 3 * MiB + 12345
        path = incomplete_file(fleet.caches["ctl-a"], image.id)
        got = bytearray()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def read_through_a() -> int:
                async with session.get(
                    f"{a.url}/v2/images/{image.id}/file", headers=auth()
                ) as resp:
                    async for piece in resp.content.iter_any():
                        got.extend(piece)
                    return resp.status

            first = asyncio.create_task(read_through_a())

            def written() -> bool:
                if len(got) <= flip + MiB or not path.exists():
                    return False
                with path.open("rb") as f:
                    f.seek(flip - 2048)
                    return f.read(4096) == data[flip - 2048 : flip + 2048]

            await until(written, "A wrote the byte and its client read it", within=30)
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, bytes([data[flip] ^ 0x01]), flip)
            finally:
                os.close(fd)
            assert await first == 200 and same(bytes(got), data)
            await until(lambda: "cached " + image.id in a.proc.output(), "A committed")
            image.rate = None

            status, body, _, cut_after = await timed_download(session, b.url, image.id)
            assert not same(body, data)  # cut: never the whole body
            assert f"image {image.id} failed verification" in b.proc.output()
            await until(
                lambda: f"re-verified {image.id}: corrupt, dropped" in a.proc.output(),
                "A dropped its copy",
                within=30,
            )
            before = upstream_bytes(glance, image.id)
            status2, body2, _, took = await timed_download(session, b.url, image.id)
            assert status2 == 200 and same(body2, data)
            assert transfers(glance, image.id) == [None, None]  # A's fill, B's second
            extra_bytes = upstream_bytes(glance, image.id) - before
        print(
            f"flipped byte at the owner: B's client got {status} and {len(body)} of "
            f"{len(data)} bytes, cut after {cut_after:.2f}s; the next fill skipped A: 200, "
            f"right, in {took:.2f}s, {extra_bytes} extra upstream bytes"
        )


# ------------------------------------------------------------------ 5xx and short bodies
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serve_sibling(head: Handler, get: Handler) -> AsyncIterator[tuple[str, int]]:
    """A fake sibling's peer image routes (``head``, ``get``) on a loopback port, every other
    path 404; yields its address."""
    app = web.Application()
    app.router.add_route("HEAD", "/cached-peer/v1/images/{image_id}", head)
    app.router.add_get("/cached-peer/v1/images/{image_id}{fetch:(/fetch)?}", get)

    async def other(request: web.Request) -> web.Response:
        return web.Response(status=404)

    app.router.add_route("*", "/{tail:.*}", other)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        yield host, port
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def fake_sibling(
    data: dict[str, bytes], mode: str, head_delay: float = 0.0
) -> AsyncIterator[tuple[tuple[str, int], list[str]]]:
    """A sibling that says it holds every image of ``data`` (``complete``) and then fails
    its GETs: ``5xx`` answers 500, ``short`` sends half the range asked and hangs up; its
    ``HEAD`` answers take ``head_delay`` seconds. It
    checks no signature (it is the caller's check that matters here). Yields its address and
    the requests it saw."""
    seen: list[str] = []

    async def head(request: web.Request) -> web.Response:
        seen.append(f"HEAD {request.path}")
        await asyncio.sleep(head_delay)
        image = data.get(request.match_info["image_id"])
        if image is None:
            return web.Response(headers={"X-Cached-Peer-State": "absent"})
        state = {"X-Cached-Peer-State": "complete", "X-Cached-Peer-Size": str(len(image))}
        return web.Response(headers=state)

    async def get(request: web.Request) -> web.StreamResponse:
        seen.append(f"GET {request.path} {request.headers.get('Range')}")
        image = data[request.match_info["image_id"]]
        if mode == "5xx":
            return web.Response(status=500, text="broken sibling")
        first, last = request.headers["Range"].removeprefix("bytes=").split("-")
        start, end = int(first), int(last) + 1
        response = web.StreamResponse(status=206)
        response.content_length = end - start
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(image)}"
        await response.prepare(request)
        await response.write(image[start : start + (end - start) // 2])
        assert request.transport is not None
        request.transport.close()
        return response

    async with serve_sibling(head, get) as address:
        yield address, seen


@pytest.mark.parametrize("mode", ["5xx", "short"])
async def test_a_sibling_answering_5xx_or_a_short_body_is_left(tmp_path: Path, mode: str) -> None:
    """C (a fake) says it holds the image it owns, then answers 500, or half the body and
    hangs up: A's fill takes the rest from the upstream (all of it after a 500, the half
    C did not send after a short body), the client's body is right, C is down for a while."""
    data = os.urandom(16 * MiB)
    image_id = owned_by("ctl-c")
    async with fake_glance() as glance, fake_sibling({image_id: data}, mode) as (address, seen):
        glance.add_image(data, image_id=image_id)
        async with rig(tmp_path, glance, fakes={"ctl-c": address}) as fleet:
            a = fleet.members["ctl-a"]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                began = time.monotonic()
                status, body, ttfb, took = await timed_download(session, a.url, image_id)
            assert status == 200 and same(body, data)
            assert any(s.startswith("GET ") for s in seen), seen
            out = a.proc.output()
            assert "sibling ctl-c failed at byte" in out and "sibling ctl-c is down" in out
            sent = upstream_bytes(glance, image_id)
            print(
                f"sibling {mode}: client 200, right body, TTFB {ttfb * 1000:.0f} ms, upstream "
                f"asked {fallback(glance, image_id, began)} after the client's GET, done in "
                f"{took:.2f}s; upstream bytes {sent} ({sent / len(data):.2f} x the image)"
            )
            if mode == "short":
                assert sent <= len(data) // 2 + CHUNK


async def test_a_fill_choosing_its_source_answers_a_later_member_once_it_chose(
    tmp_path: Path,
) -> None:
    """A's fill is choosing its source (C, a fake, takes 0.5 s to answer A's lookup) when
    B, after A in the image's order, looks the image up: A answers B once it chose (the
    upstream), and B follows A's fill: one upstream copy. Before, A answered "pending" at
    once, B never follows a fill still choosing, and took the upstream too (two copies; as
    when both non-owners lost the owner they followed at the same moment)."""
    data = os.urandom(16 * MiB)
    image_id = next(
        i
        for i in (str(uuid.uuid4()) for _ in range(1000))
        if ring.order(IDS, i).index("ctl-a") < ring.order(IDS, i).index("ctl-b")
    )
    async with (
        fake_glance() as glance,
        fake_sibling({}, "5xx", head_delay=0.5) as (address, seen),
    ):
        glance.add_image(data, image_id=image_id, rate=16 * MiB)
        async with rig(tmp_path, glance, fakes={"ctl-c": address}) as fleet:
            a, b = fleet.members["ctl-a"], fleet.members["ctl-b"]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                first = asyncio.create_task(timed_download(session, a.url, image_id))
                await until(lambda: len(seen) >= 1, "A asked C")
                second = asyncio.create_task(timed_download(session, b.url, image_id))
                results = await asyncio.gather(first, second)
            assert [(r[0], same(r[1], data)) for r in results] == [(200, True)] * 2
            print(
                f"B looked up while A chose: {len(transfers(glance, image_id))} upstream "
                f"GET(s); B's TTFB {results[1][2]:.2f}s (C answers in 0.5 s)"
            )
            assert transfers(glance, image_id) == [None]
            assert f"{image_id} [0, {len(data)}) from sibling ctl-a" in b.proc.output()


async def test_a_member_takes_the_owners_fill_without_waiting_for_a_later_sibling(
    tmp_path: Path,
) -> None:
    """The image's order is A (the owner), C (a fake), B. A fills from the upstream; then
    C's answers hang (a member busy choosing, or slow) and B, whose lookup timeout is 30 s
    (its HEADs' too), is asked for the image: A's answer (its fill, fed by the upstream)
    decides, and B follows it without waiting for C. Before, B waited for every sibling
    before it: a burst of cold misses became a chain, each member waiting for the choice
    of the one before it."""
    data = os.urandom(16 * MiB)
    image_id = next(
        i
        for i in (str(uuid.uuid4()) for _ in range(1000))
        if ring.order(IDS, i) == ["ctl-a", "ctl-c", "ctl-b"]
    )
    release = asyncio.Event()  # C's HEADs hang while it is clear and ``hang`` is set
    hang = False
    seen: list[str] = []

    async def head(request: web.Request) -> web.Response:
        seen.append(f"HEAD {request.path}")
        if hang:
            await release.wait()
        return web.Response(headers={"X-Cached-Peer-State": "absent"})

    async def get(request: web.Request) -> web.Response:
        seen.append(f"GET {request.path}")
        return web.Response(status=500)

    async with fake_glance() as glance, serve_sibling(head, get) as address:
        glance.add_image(data, image_id=image_id, rate=4 * MiB)
        waits = ("fleet_lookup_timeout", "fleet_headers_timeout", "fleet_stall_timeout")
        extra = {"ctl-b": dict.fromkeys(waits, 30.0)}
        async with rig(tmp_path, glance, extra, fakes={"ctl-c": address}) as fleet:
            a, b = fleet.members["ctl-a"], fleet.members["ctl-b"]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
                first = asyncio.create_task(timed_download(session, a.url, image_id))
                # Past A's probe (1 byte) and its lookup (C answered): A's bytes flow.
                await until(lambda: upstream_bytes(glance, image_id) > MiB, "A fills")
                hang = True
                second = asyncio.create_task(timed_download(session, b.url, image_id))
                try:
                    # A's fill takes 4 s (16 MiB at 4 MiB/s); waiting for C would take 30.
                    done, _ = await asyncio.wait({second}, timeout=20)
                    assert done, "B waited for C, after A's answer"
                    heads = seen.count(f"HEAD /cached-peer/v1/images/{image_id}")
                    assert not release.is_set() and heads >= 2  # A's, then B's, held
                finally:
                    release.set()
                results = await asyncio.gather(first, second)
            assert [(r[0], same(r[1], data)) for r in results] == [(200, True)] * 2
            assert transfers(glance, image_id) == [None]
            assert f"{image_id} [0, {len(data)}) from sibling ctl-a" in b.proc.output()
            assert not [s for s in seen if s.startswith("GET")]


@contextlib.asynccontextmanager
async def failing_over_sibling(
    data: bytes, feeder: str, copy_answers: int
) -> AsyncIterator[tuple[tuple[str, int], list[str]]]:
    """A sibling whose fill of every image takes its bytes from ``feeder``: its first
    ``copy_answers`` HEADs say ``filling; source=copy`` from ``feeder``, the later ones
    ``filling; source=upstream`` (it failed over, being first of the order left). Its GETs
    send the range asked, whole. No signature is checked. Yields its address and requests."""
    seen: list[str] = []

    async def head(request: web.Request) -> web.Response:
        seen.append(f"HEAD {request.path}")
        heads = sum(s.startswith("HEAD") for s in seen)
        source = "copy" if heads <= copy_answers else "upstream"
        headers = {"X-Cached-Peer-State": f"filling; source={source}"}
        headers["X-Cached-Peer-Size"] = str(len(data))
        if source == "copy":
            headers["X-Cached-Peer-From"] = feeder
        return web.Response(headers=headers)

    async def get(request: web.Request) -> web.StreamResponse:
        seen.append(f"GET {request.path} {request.headers.get('Range')}")
        first, last = request.headers["Range"].removeprefix("bytes=").split("-")
        start, end = int(first), int(last) + 1
        response = web.StreamResponse(status=206)
        response.content_length = end - start
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        await response.prepare(request)
        await response.write(data[start:end])
        await response.write_eof()
        return response

    async with serve_sibling(head, get) as address:
        yield address, seen


async def test_a_member_follows_the_earlier_member_failing_over_from_the_same_sibling(
    tmp_path: Path,
) -> None:
    """The image's order is A, B, C. C's fill takes A's copy (A, a fake, sends half and hangs
    up); B (a fake) still says it fills from a copy of A's when C looks again, and says it
    fills from the upstream once asked again. C asks B again and follows B's fill: the rest
    leaves the upstream once per fleet (here: not at all, B's fake serves it). Before, C took
    the upstream for the rest at once: the race that made an owner killed half-way cost up to
    1.5 x the image with clients on both other members."""
    data = os.urandom(16 * MiB)
    image_id = next(
        i
        for i in (str(uuid.uuid4()) for _ in range(1000))
        if ring.order(IDS, i) == ["ctl-a", "ctl-b", "ctl-c"]
    )
    async with (
        fake_glance() as glance,
        fake_sibling({image_id: data}, "short") as (a_address, a_seen),
        failing_over_sibling(data, "ctl-a", copy_answers=2) as (b_address, b_seen),
    ):
        glance.add_image(data, image_id=image_id)
        fakes = {"ctl-a": a_address, "ctl-b": b_address}
        async with rig(tmp_path, glance, fakes=fakes) as fleet:
            c = fleet.members["ctl-c"]
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                status, body, _, _ = await timed_download(session, c.url, image_id)
            print(
                f"C after A's short body: B asked {b_seen}, upstream data GETs "
                f"{transfers(glance, image_id)}"
            )
            assert (status, same(body, data)) == (200, True)
            assert any(s.startswith("GET") for s in a_seen)
            # (C resumes at the first byte it read: at most half, aiohttp dropping what it
            # had received but not read when A hung up)
            gets = [s.split() for s in b_seen if s.startswith("GET")]
            assert [(path, rng.endswith(f"-{len(data) - 1}")) for _, path, rng in gets] == [
                (f"/cached-peer/v1/images/{image_id}", True)
            ]
            resumed = int(gets[0][2].removeprefix("bytes=").split("-")[0])
            assert 0 <= resumed <= len(data) // 2
            assert transfers(glance, image_id) == []
            assert f"[{resumed}, {len(data)}) from sibling ctl-b" in c.proc.output()


# ------------------------------------------------------------------ the key change
async def test_a_key_change_by_two_rolling_restarts_refuses_nothing(tmp_path: Path) -> None:
    """The fleet key changes: every member is restarted accepting the new key as previous,
    then every member again signing with it (the old one as previous). After each restart a
    peer fill in both directions between the restarted member and the others; no peer
    request is refused (401) at any step. Then a signed request captured on its way to A is
    replayed: to B (401, signed for A) and to A within the ±30 s window (accepted: the
    signature carries no nonce; the replay reads only what the captured request read, the
    same method, path and Range)."""
    async with fake_glance() as glance, rig(tmp_path, glance) as fleet:
        new_key = tmp_path / "fleet-new.key"
        new_key.write_bytes(os.urandom(48).hex().encode())
        new_key.chmod(0o600)
        old_key = fleet.key
        refused: dict[str, float] = {}
        fills = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def peer_fill(holder: Member, taker: Member) -> None:
                nonlocal fills
                data = os.urandom(2 * MiB)
                image = glance.add_image(data)
                assert (await download(session, holder.url, image.id))[2] == data
                assert (await download(session, taker.url, image.id))[2] == data
                assert transfers(glance, image.id) == [None]  # taken from the holder
                fills += 1

            async def count_refused() -> None:
                for m in fleet.members.values():
                    got = (await peer_outcomes(session, m)).get("refused", 0.0)
                    refused[m.id] = refused.get(m.id, 0.0) + got

            steps = [
                {"fleet_previous_secret_file": str(new_key)},
                {"fleet_secret_file": str(new_key), "fleet_previous_secret_file": str(old_key)},
            ]
            for changes in steps:
                for i, m in enumerate(IDS):
                    await count_refused()  # before its counters go with the restart
                    member = await fleet.restart(m, **changes)
                    others = [fleet.members[IDS[(i + k) % 3]] for k in (1, 2)]
                    await peer_fill(member, others[0])
                    await peer_fill(others[1], member)
            await count_refused()
            logs = {m: fleet.whole_log(m) for m in IDS}
            assert all(" refused: " not in text for text in logs.values())
            assert refused == {m: 0.0 for m in IDS}

            # Replays of one signed request captured on its way to A.
            a, b = fleet.members["ctl-a"], fleet.members["ctl-b"]
            data = os.urandom(MiB)
            image = glance.add_image(data)
            assert (await download(session, a.url, image.id))[2] == data
            path = f"/cached-peer/v1/images/{image.id}"
            signer = as_member(tmp_path, "ctl-c")
            signer = type(signer)("ctl-c", signer.members, new_key.read_bytes().strip())
            captured = {"Range": "bytes=0-99", **signer.sign("GET", path, "ctl-a", "bytes=0-99")}
            answers = []
            for url in (a.url, b.url, a.url):
                async with session.get(url + path, headers=captured) as resp:
                    answers.append((resp.status, await resp.read() if resp.status == 206 else b""))
            assert answers == [(206, data[:100]), (401, b""), (206, data[:100])]
        print(
            f"key change: 6 restarts, {fills} peer fills, 0 refused; a captured request "
            f"replayed to another member: 401; to its target within 30 s: answered again "
            f"(206, the same 100 bytes)"
        )


# ------------------------------------------------------------------ a hung or full sibling
@pytest.fixture
def hanging_share(tmp_path: Path) -> Iterator[FaultFS]:
    """A FUSE pass-through (tests/faultfs.py) that can be made to hang; root and fusepy."""
    if os.geteuid() != 0:
        pytest.skip("a FUSE share needs root")
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as exc:
        pytest.skip(f"FUSE tests need fusepy and libfuse2: {exc}")
    backing, point = tmp_path / "backing", tmp_path / "fuse"
    backing.mkdir()
    point.mkdir()
    fs = FaultFS(backing, point, tmp_path / "faultfs.mode")
    try:
        fs.mount()
    except RuntimeError as exc:
        pytest.skip(f"cannot mount a FUSE share here: {exc}")
    try:
        yield fs
    finally:
        fs.unmount()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 40 MiB tmpfs (root; skipped otherwise), unmounted afterwards."""
    point = tmp_path / "tmpfs"
    point.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"mounting a tmpfs was refused (run as root): {res.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


async def test_a_sibling_whose_cache_hangs_is_left(tmp_path: Path, hanging_share: FaultFS) -> None:
    """B holds the image on a share that then stops answering (every call blocks): A's
    GET from B gets no headers within fleet_headers_timeout (2 s here), A leaves B for the
    upstream and its client gets the right body."""
    caches = {"ctl-b": hanging_share.mountpoint}
    extra = {"ctl-a": {"fleet_headers_timeout": 2.0}}
    async with fake_glance() as glance, rig(tmp_path, glance, extra, caches) as fleet:
        a, b = fleet.members["ctl-a"], fleet.members["ctl-b"]
        data = os.urandom(16 * MiB)
        image = glance.add_image(data, image_id=owned_by("ctl-b"))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            assert (await download(session, b.url, image.id))[2] == data
            await until(lambda: f"cached {image.id}" in b.proc.output(), "B committed")
            hanging_share.set("block")
            try:
                began = time.monotonic()
                status, body, ttfb, took = await timed_download(session, a.url, image.id)
            finally:
                hanging_share.set("ok")
        assert status == 200 and same(body, data)
        out = a.proc.output()
        assert "sibling ctl-b failed at byte 0" in out or f"{image.id} [0, " not in out, out
        print(
            f"hung sibling: client 200, right body, TTFB {ttfb:.2f}s (headers timeout 2 s), "
            f"upstream asked {fallback(glance, image.id, began)} after the client's GET, "
            f"done in {took:.2f}s; {upstream_bytes(glance, image.id) - len(data)} extra "
            f"upstream bytes beyond B's first copy ({transfers(glance, image.id)})"
        )


async def test_a_sibling_whose_cache_fills_up_is_left(tmp_path: Path, small_tmpfs: Path) -> None:
    """B (the owner, its cache on a 40 MiB tmpfs) fetches a 32 MiB image for A; a quarter
    in, its disk is full (another file takes the rest): B's fill fails, A's stream from B is
    cut, A goes on from the upstream where B's bytes stopped; A's client gets the right
    body. Before that, a 48 MiB image B cannot hold at all: B does not fetch it (refused
    before any byte), A takes it from the upstream at once."""
    cache = small_tmpfs / "cache"
    cache.mkdir()
    service = {m: dict(SERVICE) for m in IDS}
    async with fake_glance() as glance, rig(tmp_path, glance, service, {"ctl-b": cache}) as fleet:
        glance.shared_rate = 16 * MiB
        a, b = fleet.members["ctl-a"], fleet.members["ctl-b"]
        data = os.urandom(32 * MiB)
        image = glance.add_image(data, image_id=owned_by("ctl-b"))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            big = os.urandom(48 * MiB)
            too_big = glance.add_image(big, image_id=owned_by("ctl-b"))
            began = time.monotonic()
            status, body, ttfb, _ = await timed_download(session, a.url, too_big.id)
            assert status == 200 and same(body, big)
            assert upstream_bytes(glance, too_big.id) <= len(big) + 16  # one copy, from A
            print(
                f"sibling without room for the image: client 200, right body, TTFB "
                f"{ttfb * 1000:.0f} ms, upstream asked {fallback(glance, too_big.id, began)} "
                f"after the client's GET; {transfers(glance, too_big.id)}; B said: "
                f"{[line[24:] for line in b.proc.output().splitlines() if 'no room' in line]}"
            )

            fetch = asyncio.create_task(timed_download(session, a.url, image.id))
            await until(lambda: upstream_bytes(glance, image.id) >= 8 * MiB, "8 MiB left")
            full_at = time.monotonic()
            junk = bytes(MiB)
            with (small_tmpfs / "junk").open("wb", buffering=0) as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(junk)
            status, body, ttfb, _ = await fetch
            took = time.monotonic() - full_at
        assert status == 200 and same(body, data)
        assert "sibling ctl-b failed at byte" in a.proc.output()
        why = [line for line in b.proc.output().splitlines() if image.id in line and "WARN" in line]
        print(f"B: {why[:2]}")
        sent = upstream_bytes(glance, image.id)
        print(
            f"full sibling: client 200, right body, TTFB {ttfb * 1000:.0f} ms, done "
            f"{took:.2f}s after the disk filled, upstream resumed "
            f"{fallback(glance, image.id, full_at)} after; upstream {sent / len(data):.2f} x the "
            f"image ({transfers(glance, image.id)})"
        )


pytestmark = pytest.mark.timeout(240)
