"""Peer fill between the members of a fleet (issue 17), on loopback: three real ``cached
serve`` processes, each with its own cache directory, a fake Glance counting the data GETs
it answers, and the peer protocol's trust, against a live daemon.

Every member's URL in ``fleet_members`` is a small TCP relay owned by the test, in front of
the member's real (ephemeral) port: the URLs are known before any member starts (no port
guessing), the relay counts the bytes a member sends its siblings, and can pace them like a
slow link so that a member can be killed in the middle of a stream.

``fleet_lookup_timeout`` is 2 s here (200 ms by default): on a loaded two-core test machine
a sibling's answer may take longer than on a controller, and a lookup that times out takes
the upstream, which the counts below would read as a failure of peer fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import TOKENS, auth
from daemonproc import CachedProcess
from fakeglance import FakeGlance
from test_correctness import until

from cached.config import FleetMember
from cached.fleet import trust

MiB = 1 << 20
IDS = ("ctl-a", "ctl-b", "ctl-c")
PEER_LINE = re.compile(r'"(?:HEAD|GET) /cached-peer/v1/')


@dataclass
class Relay:
    """A TCP relay to ``target`` (set once the member listens); ``rate`` (bytes/s, None:
    unpaced) paces what the member sends back; ``sent`` counts it."""

    target: tuple[str, int] | None = None
    rate: int | None = None
    sent: int = 0
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.target is not None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, back: bool) -> None:
            try:
                while data := await src.read(64 * 1024):
                    if back and self.rate:
                        await asyncio.sleep(len(data) / self.rate)
                    dst.write(data)
                    await dst.drain()
                    if back:
                        self.sent += len(data)
            except (ConnectionError, OSError):
                pass
            # The member went away (killed) or the caller did: cut the other side at once.
            dst.transport.abort()

        there = asyncio.create_task(pump(reader, up_writer, back=False))
        back = asyncio.create_task(pump(up_reader, writer, back=True))
        self.tasks |= {there, back}
        await asyncio.wait({there, back}, return_when=asyncio.FIRST_COMPLETED)
        up_writer.transport.abort()
        writer.transport.abort()

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.server is not None:
            self.server.close()


@dataclass
class Member:
    id: str
    proc: CachedProcess
    relay: Relay
    url: str = ""  # the member's own listener (clients call it)

    def peer_lines(self) -> list[str]:
        """Access-log lines of the peer requests this member answered in its current run."""
        return [line for line in self.proc.output().splitlines() if PEER_LINE.search(line)]


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path, glance: FakeGlance) -> AsyncIterator[dict[str, Member]]:
    key = tmp_path / "fleet.key"
    key.write_bytes(os.urandom(48).hex().encode())
    key.chmod(0o600)
    relays = {m: Relay() for m in IDS}
    urls = {m: await relay.start() for m, relay in relays.items()}
    members: dict[str, Member] = {}
    try:
        for m in IDS:
            config = tmp_path / f"{m}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "fleet_self": m,
                        "fleet_members": [{"id": i, "url": urls[i]} for i in IDS],
                        "fleet_secret_file": str(key),
                        "fleet_lookup_timeout": 2.0,
                        "fleet_stall_timeout": 3.0,
                    }
                )
            )
            cache = tmp_path / f"cache-{m}"
            cache.mkdir()
            proc = CachedProcess(glance.url, cache, tmp_path / f"{m}.log", "-c", str(config))
            members[m] = Member(m, proc, relays[m])
            members[m].url = await asyncio.to_thread(proc.start)
            port = int(members[m].url.rsplit(":", 1)[1])
            relays[m].target = ("127.0.0.1", port)
        yield members
    finally:
        for member in members.values():
            await asyncio.to_thread(member.proc.stop)
        for relay in relays.values():
            await relay.close()


@contextlib.asynccontextmanager
async def fake_glance() -> AsyncIterator[FakeGlance]:
    glance = FakeGlance()
    for token, (project, roles) in TOKENS.items():
        glance.add_token(token, project, roles)
    await glance.start()
    try:
        yield glance
    finally:
        await glance.close()


def transfers(glance: FakeGlance, image_id: str) -> list[str | None]:
    """The Range of every data GET of ``image_id`` the upstream answered, the callers'
    authorisation probes (``bytes=0-0``) left out."""
    return [r.range for r in glance.data_requests(image_id) if r.range != "bytes=0-0"]


async def download(
    session: aiohttp.ClientSession, url: str, image_id: str, token: str = "token-p1"
) -> tuple[int, str | None, bytes]:
    async with session.get(f"{url}/v2/images/{image_id}/file", headers=auth(token)) as resp:
        return resp.status, resp.headers.get("Cache-Status"), await resp.read()


async def test_a_cold_image_leaves_the_upstream_once_per_fleet(tmp_path: Path) -> None:
    """A cold 32 MiB image downloaded from A, then from B and C: identical verified bodies,
    exactly one upstream data GET, B and C filled from a sibling's copy and each holding
    its own (a hit next time). Callers the upstream refuses cause no peer request."""
    async with fake_glance() as glance, fleet(tmp_path, glance) as members:
        data = os.urandom(32 * MiB)
        image = glance.add_image(data)
        a, b, c = (members[m] for m in IDS)
        async with aiohttp.ClientSession() as session:
            status, _, body = await download(session, a.url, image.id)
            assert status == 200 and body == data
            assert len(transfers(glance, image.id)) == 1

            # Refused callers (another project's token; an unknown token) ask no sibling.
            before = {m.id: len(m.peer_lines()) for m in members.values()}
            assert before["ctl-b"] >= 1 and before["ctl-c"] >= 1  # A's lookup: they are logged
            for member in (b, c):
                for token in ("token-p2", "no-such-token"):
                    status, _, _ = await download(session, member.url, image.id, token)
                    assert status in (401, 403, 404)
            assert {m.id: len(m.peer_lines()) for m in members.values()} == before

            for member in (b, c):
                status, cache_status, body = await download(session, member.url, image.id)
                assert status == 200 and hashlib.sha256(body).digest() == (
                    hashlib.sha256(data).digest()
                )
                assert cache_status is not None and "hit" not in cache_status
                out = member.proc.output()
                assert re.search(rf"{image.id} \[0, {len(data)}\) from sibling ctl-", out), out
                assert f"cached {image.id}: {len(data)} bytes, sha512 verified" in out
            assert transfers(glance, image.id) == [None]  # one whole-image GET, from A
            assert any('"GET /cached-peer/v1/images/' in line for line in a.peer_lines())
            # Each member keeps its own verified copy: a hit, from its own disk.
            for member in (a, b, c):
                status, cache_status, body = await download(session, member.url, image.id)
                assert (status, cache_status, body == data) == (200, "cached; hit", True)
            assert transfers(glance, image.id) == [None]
            # The copies served to siblings went through the members' relays.
            served = sum(m.relay.sent for m in members.values())
            assert served >= 2 * len(data)
            print(f"upstream data GETs: 1; bytes sent between siblings: {served}")


async def test_a_sibling_killed_mid_stream_hands_over_to_the_upstream(tmp_path: Path) -> None:
    """A holds the image; B fills from A through a link paced at 4 MiB/s; A is killed
    (SIGKILL) once 8 MiB went out. B's fill goes on from the upstream at the first byte A
    did not deliver, and B's client gets the whole, correct body."""
    async with fake_glance() as glance, fleet(tmp_path, glance) as members:
        data = os.urandom(32 * MiB)
        image = glance.add_image(data)
        a, b = members["ctl-a"], members["ctl-b"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            assert (await download(session, a.url, image.id))[2] == data
            a.relay.rate = 4 * MiB
            a.relay.sent = 0
            fetch = asyncio.create_task(download(session, b.url, image.id))
            await until(lambda: a.relay.sent >= 8 * MiB, "A sent 8 MiB to B", within=30)
            killed_at = time.monotonic()
            await asyncio.to_thread(a.proc.kill)
            status, _, body = await fetch
            took = time.monotonic() - killed_at
            assert status == 200 and len(body) == len(data)
            assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
            out = b.proc.output()
            assert "sibling ctl-a failed at byte" in out and "the next source takes over" in out
            resumed = transfers(glance, image.id)
            assert len(resumed) == 2 and resumed[0] is None  # A's whole GET, then B's rest
            assert resumed[1] is not None
            first = int(resumed[1].removeprefix("bytes=").split("-")[0])
            assert 8 * MiB <= first < len(data)
            print(
                f"A killed after {a.relay.sent} bytes relayed; B resumed at byte {first} "
                f"from the upstream ({len(data) - first} bytes), client done {took:.1f}s later"
            )
            # B's copy is its own and verified: a hit.
            assert (await download(session, b.url, image.id))[:2] == (200, "cached; hit")


async def test_peer_requests_must_be_signed_for_the_member(tmp_path: Path) -> None:
    """Unsigned, badly signed, stale and misdirected peer requests get a bare 401; a request
    signed for the member is answered: HEAD says complete or absent, GET serves a range."""
    async with fake_glance() as glance, fleet(tmp_path, glance) as members:
        data = os.urandom(2 * MiB)
        image = glance.add_image(data)
        a = members["ctl-a"]
        key = (tmp_path / "fleet.key").read_bytes().strip()
        fleet_list = tuple(FleetMember(i, "x") for i in IDS)
        as_b = trust.Trust("ctl-b", fleet_list, key)
        path = f"/cached-peer/v1/images/{image.id}"
        async with aiohttp.ClientSession() as session:

            async def ask(method: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
                async with session.request(method, a.url + path, headers=headers) as resp:
                    await resp.read()
                    return resp

            absent = await ask("HEAD", as_b.sign("HEAD", path, "ctl-a"))
            assert absent.status == 200 and absent.headers["X-Cached-Peer-State"] == "absent"
            for refused in (
                {},  # unsigned
                as_b.sign("HEAD", path, "ctl-c"),  # signed for another member
                as_b.sign("HEAD", path, "ctl-a", now=time.time() - 31),  # stale
                trust.Trust("ctl-b", fleet_list, b"x" * 48).sign("HEAD", path, "ctl-a"),
                as_b.sign("GET", path, "ctl-a"),  # signed for another method
                trust.Trust("ctl-a", fleet_list, key).sign("HEAD", path, "ctl-a"),  # itself
                {**as_b.sign("HEAD", path, "ctl-a"), "X-Cached-Peer-Sender": "ctl-c"},
            ):
                resp = await ask("HEAD", refused)
                assert (resp.status, resp.headers.get("X-Cached-Peer-State")) == (401, None)
            assert (await download(session, a.url, image.id))[2] == data
            complete = await ask("HEAD", as_b.sign("HEAD", path, "ctl-a"))
            assert complete.headers["X-Cached-Peer-State"] == "complete"
            assert complete.headers["X-Cached-Peer-Size"] == str(len(data))
            ranged = {"Range": "bytes=100-1099"}
            signed = {**ranged, **as_b.sign("GET", path, "ctl-a", "bytes=100-1099")}
            async with session.get(a.url + path, headers=signed) as resp:
                assert resp.status == 206 and await resp.read() == data[100:1100]
            unsigned_range = {**ranged, **as_b.sign("GET", path, "ctl-a", "bytes=0-1099")}
            async with session.get(a.url + path, headers=unsigned_range) as resp:
                assert resp.status == 401  # the Range is signed too
            health = "/cached-peer/v1/health"
            async with session.get(a.url + health, headers=as_b.sign("GET", health, "ctl-a")) as r:
                assert r.status == 200 and (await r.json())["id"] == "ctl-a"


pytestmark = pytest.mark.timeout(240)
