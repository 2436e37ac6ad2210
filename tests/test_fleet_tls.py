"""Peer fill (issue 17) where trust and credentials decide: siblings over https verified with
``upstream_ca_file`` (one refused for a certificate the CA did not sign), a fleet without
service credentials (or with credentials Keystone refuses), stale allowances
(``auth_stale_if_error``), a member-list change, and callers' tokens that never reach a
sibling.

Real ``cached serve`` processes (a cache directory each) and the fake Glance, as in
tests/test_fleet.py, whose helpers are reused. Each member's url in ``fleet_members`` is a
TCP relay (the urls are known before the members start); here the relay also keeps what the
siblings sent *to* the member (their requests), so a test can look for tokens in it. TLS
passes through a relay unchanged: siblings verify the member's own certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import pytest
import trustme
import yaml
from conftest import auth
from daemonproc import CachedProcess
from fakeglance import FakeGlance, Request
from fakekeystone import FakeKeystone
from test_correctness import until
from test_fleet import (
    ADMIN,
    Member,
    Relay,
    as_member,
    ask_at,
    download,
    fake_glance,
    same,
    scrape,
    transfers,
)
from test_tls import trusting, write_ca, write_pair

from cached.fleet import ring

MiB = 1 << 20
IDS = ("ctl-a", "ctl-b", "ctl-c")


def says(cache_status: str | None, what: str) -> bool:
    """Whether ``Cache-Status`` is this member's ``what`` ("hit", ...), the cache named
    ``cached`` or ``cached-<id>``."""
    pattern = rf"cached(-[a-z0-9-]+)?; {re.escape(what)}"
    return cache_status is not None and re.fullmatch(pattern, cache_status) is not None


class _Heard:
    """A relay's reader towards the member that keeps what it reads (the siblings' requests)."""

    def __init__(self, reader: asyncio.StreamReader, heard: bytearray):
        self._reader = reader
        self._heard = heard

    async def read(self, n: int) -> bytes:
        data = await self._reader.read(n)
        self._heard += data
        return data


@dataclass
class Tap(Relay):
    """A relay that also keeps the bytes siblings sent to its member."""

    heard: bytearray = field(default_factory=bytearray)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Members start at once: a sibling may call before this member said where it listens.
        await until(lambda: self.target is not None, "the member listens", within=60)
        await super()._serve(cast(asyncio.StreamReader, _Heard(reader, self.heard)), writer)


class Members:
    """The members of a test fleet, which may be restarted with another ``fleet_members``;
    ``common``: configuration every member gets; ``scheme``: of the member urls."""

    def __init__(
        self, tmp_path: Path, glance_url: str, common: dict[str, object], scheme: str
    ) -> None:
        self.tmp_path = tmp_path
        self.glance_url = glance_url
        self.common = common
        self.scheme = scheme
        self.key = tmp_path / "fleet.key"
        self.key.write_bytes(os.urandom(48).hex().encode())
        self.key.chmod(0o600)
        self.relays: dict[str, Tap] = {}
        self.urls: dict[str, str] = {}
        self.members: dict[str, Member] = {}

    async def start(
        self, ids: tuple[str, ...], extra: dict[str, dict[str, object]] | None = None
    ) -> dict[str, Member]:
        """Start members ``ids`` (each with the list ``ids``); their cache directories and
        relays are kept across restarts."""
        for m in ids:
            if m not in self.relays:
                self.relays[m] = Tap()
                url = await self.relays[m].start()
                self.urls[m] = url.replace("http://", f"{self.scheme}://")
        procs = {}
        for m in ids:
            config = self.tmp_path / f"{m}.yaml"
            settings = {
                "fleet_self": m,
                "fleet_members": [{"id": i, "url": self.urls[i]} for i in ids],
                "fleet_secret_file": str(self.key),
                "fleet_lookup_timeout": 2.0,  # a loaded test machine (tests/test_fleet.py)
                "fleet_min_copy_rate": 0,
                "admin_tokens": [ADMIN],
                **self.common,
                **(extra or {}).get(m, {}),
            }
            config.write_text(yaml.safe_dump(settings))
            cache = self.tmp_path / f"cache-{m}"
            cache.mkdir(exist_ok=True)
            log = self.tmp_path / f"{m}.log"
            procs[m] = CachedProcess(self.glance_url, cache, log, "-c", str(config))
            self.members[m] = Member(m, procs[m], self.relays[m], member_url=self.urls[m])
        # All at once: the urls siblings call (the relays) are known before any starts.
        listening = await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs.values()))
        for m, url in zip(procs, listening, strict=True):
            self.members[m].url = url
            self.relays[m].target = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        return {m: self.members[m] for m in ids}

    async def stop(self) -> None:
        running = [m.proc for m in self.members.values() if m.proc.proc is not None]
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in running))

    async def close(self) -> None:
        await self.stop()
        for relay in self.relays.values():
            await relay.close()


@contextlib.asynccontextmanager
async def fleet_of(
    tmp_path: Path, glance_url: str, common: dict[str, object] | None = None, scheme: str = "http"
) -> AsyncIterator[Members]:
    fleet = Members(tmp_path, glance_url, common or {}, scheme)
    try:
        yield fleet
    finally:
        await fleet.close()


def tokens_in(heard: bytes) -> list[str]:
    """Caller or service tokens (or any X-Auth-Token header) in bytes siblings sent."""
    low = heard.lower()
    found = [t for t in ("token-p1", "token-p2", "token-admin") if t.encode() in low]
    return found + (["x-auth-token"] if b"x-auth-token" in low else [])


def data_gets(glance: FakeGlance, image_id: str) -> list[Request]:
    """The upstream data GETs of ``image_id`` (transfers), callers' probes left out."""
    return [r for r in glance.data_requests(image_id) if r.range != "bytes=0-0"]


def token_of(request: Request) -> str | None:
    return next((v for k, v in request.headers.items() if k.lower() == "x-auth-token"), None)


def no_tokens_reached_siblings(fleet: Members) -> None:
    """What siblings sent every member (peer requests) carries no token, no X-Auth-Token."""
    heard = {m: bytes(relay.heard) for m, relay in fleet.relays.items()}
    assert any(b"/cached-peer/v1/" in h for h in heard.values())  # peer requests were seen
    assert {m: tokens_in(h) for m, h in heard.items()} == {m: [] for m in heard}


# ------------------------------------------------------------------- 1. https between siblings
async def test_siblings_over_https_verified_with_the_upstream_ca(tmp_path: Path) -> None:
    """Members listen with tls_cert_file (certificates from one CA made here) and verify
    siblings with upstream_ca_file. A cold image leaves the upstream once for the fleet, the
    copies going over TLS; C's certificate is signed by another CA: nobody takes C's copy
    (the fill goes to the upstream, the client gets the right bytes) and the failure is
    counted. C itself verifies A and B and takes their copies."""
    ca, rogue = trustme.CA(), trustme.CA()
    extra: dict[str, dict[str, object]] = {}
    for m in IDS:
        issuer = rogue if m == "ctl-c" else ca
        cert, key = write_pair(issuer.issue_cert("127.0.0.1"), tmp_path, m)
        extra[m] = {"tls_cert_file": cert, "tls_key_file": key}
    common: dict[str, object] = {"upstream_ca_file": write_ca(ca, tmp_path)}
    client = trusting(ca)
    rogue.configure_trust(client)  # the test's client also talks to C
    async with (
        fake_glance() as glance,
        fleet_of(tmp_path, glance.url, common, scheme="https") as fleet,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as session,
    ):
        members = await fleet.start(IDS, extra)
        a, b, c = (members[m] for m in IDS)
        assert all(m.url.startswith("https://") for m in (a, b, c))
        data = os.urandom(16 * MiB)
        image = glance.add_image(data)
        for member in (a, b, c):
            status, _, body = await download(session, member.url, image.id)
            assert status == 200 and same(body, data)
        assert transfers(glance, image.id) == [None]  # once for the fleet, from A
        for member in (b, c):
            assert re.search(
                rf"{image.id} \[0, {len(data)}\) from sibling ctl-[ab]", member.proc.output()
            )
        # The copies went over TLS: what siblings sent A is a TLS stream, no HTTP in clear.
        assert a.relay.sent >= len(data) and bytes(a.relay.heard[:1]) == b"\x16"
        assert b"cached-peer" not in a.relay.heard and b"HTTP/1.1" not in a.relay.heard

        # An image C holds: A does not take C's copy (its certificate is not the CA's).
        held = os.urandom(8 * MiB)
        by_c = glance.add_image(held)
        assert (await download(session, c.url, by_c.id))[2] == held
        assert len(transfers(glance, by_c.id)) == 1
        status, _, body = await download(session, a.url, by_c.id)
        assert status == 200 and same(body, held)
        assert transfers(glance, by_c.id) == [None, None]  # C's fill, then A's own
        out = a.proc.output()
        assert f"{by_c.id} [0, " not in out  # no sibling's bytes
        assert "sibling ctl-c is down" in out and "certificate verify failed" in out.lower()
        got = await scrape(session, a.url)
        failures = got["cached_fleet_sibling_failures_total"]
        assert failures >= 1
        assert got['cached_fleet_transfers_total{source="upstream"}'] == 2  # image, by_c
        print(f"https fleet: 1 upstream GET for 3 members; C refused {failures:.0f} time(s) by A")


# ------------------------------------------------------------ 2. no service credentials
async def test_without_service_credentials_nobody_fills_for_a_sibling(tmp_path: Path) -> None:
    """No service credentials anywhere: a cold image on a non-owner is fetched by that member
    with its caller's token (nobody is asked to fetch it); a member asked to fetch answers
    404 without touching the upstream; holders' copies are used. Cold clients on every
    member at once (a different caller's token on each, the image public): at most one
    upstream data GET per member, each with the token of a caller of that member."""
    async with (
        fake_glance() as glance,
        fleet_of(tmp_path, glance.url) as fleet,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        members = await fleet.start(IDS)
        data = os.urandom(16 * MiB)
        image = glance.add_image(data)
        owner, second, third = (members[m] for m in ring.order(IDS, image.id))
        status, _, body = await download(session, second.url, image.id)
        assert status == 200 and same(body, data)
        assert [(r.range, token_of(r)) for r in data_gets(glance, image.id)] == [(None, "token-p1")]
        assert "fetches it" not in second.proc.output()

        # Asked (signed) to fetch an image it neither holds nor fills: 404, no upstream call.
        other = glance.add_image(os.urandom(MiB))
        path = f"/cached-peer/v1/images/{other.id}/fetch"
        signed = as_member(tmp_path, second.id).sign("GET", path, owner.id)
        assert (await ask_at(session, owner.url + path, "GET", signed)).status == 404
        assert [r for r in glance.requests if other.id in r.path] == []

        # The holder's copy is used by the owner and the third member: still one GET.
        for member in (owner, third):
            status, _, body = await download(session, member.url, image.id)
            assert status == 200 and same(body, data)
            assert re.search(rf"{image.id} \[0, {len(data)}\) from sibling", member.proc.output())
        assert len(data_gets(glance, image.id)) == 1

        # Cold clients on every member at once, 4 each, a caller's token per member.
        callers = dict(zip(IDS, ("token-p1", "token-p2", "token-admin"), strict=True))
        cold_data = os.urandom(16 * MiB)
        cold = glance.add_image(cold_data, visibility="public", rate=16 * MiB)
        before = {m: await scrape(session, members[m].url) for m in IDS}
        results = await asyncio.gather(
            *(download(session, members[m].url, cold.id, callers[m]) for m in IDS for _ in range(4))
        )
        assert all(r[0] == 200 and same(r[2], cold_data) for r in results)
        gets = data_gets(glance, cold.id)
        assert 1 <= len(gets) <= len(IDS)
        assert all(token_of(r) in callers.values() for r in gets)
        went = []
        for m in IDS:
            after = await scrape(session, members[m].url)
            key = 'cached_fleet_transfers_total{source="upstream"}'
            upstream = after[key] - before[m][key]
            assert upstream <= 1  # one upstream GET per cold member at most
            if upstream:
                went.append(m)
        # Each upstream GET carried the token of a caller of a member that went upstream.
        assert sorted(token_of(r) or "" for r in gets) == sorted(callers[m] for m in went)
        print(
            f"no service credentials, 3 x 4 cold clients: {len(gets)} upstream data GET(s), "
            f"by {', '.join(went)}; the others followed an upstream-fed fill (a fill still "
            "choosing its source when a sibling looks is not followed: then it fetches too)"
        )
        no_tokens_reached_siblings(fleet)


async def test_a_member_that_cannot_fetch_for_a_sibling_is_not_down(tmp_path: Path) -> None:
    """Service credentials configured (a Keystone service user) but refused by Keystone: the
    members have none to fetch with. A non-owner's cold miss asks the owner to fetch (the
    credentials are configured); the owner declines (404) and the fill takes the upstream
    with the caller's token. Declining is no failure: the owner is not down, and its copy
    of the next image is taken at once. (Before, the 404 to a fetch made the owner down, as a
    broken sibling: skipped by every lookup for 1 s, doubling to 30 s.)"""
    keystone = FakeKeystone()
    await keystone.start()
    common: dict[str, object] = {
        "keystone_authtoken": {
            "auth_url": keystone.url,
            "auth_type": "password",
            "username": "glance",
            "password": "not-the-password",  # Keystone refuses the service user
            "project_name": "service",
            "user_domain_name": "Default",
            "project_domain_name": "Default",
        }
    }
    try:
        async with (
            fake_glance() as glance,
            fleet_of(tmp_path, glance.url, common) as fleet,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        ):
            members = await fleet.start(IDS)
            data = os.urandom(8 * MiB)
            image = glance.add_image(data)
            owner, second, _ = (members[m] for m in ring.order(IDS, image.id))
            status, _, body = await download(session, second.url, image.id)
            assert status == 200 and same(body, data)
            assert [token_of(r) for r in data_gets(glance, image.id)] == ["token-p1"]
            assert f"cannot fetch {image.id} for a sibling" in owner.proc.output()
            out = second.proc.output()
            assert f"sibling {owner.id} fetches it" in out  # asked, and declined
            assert f"sibling {owner.id} is down" not in out
            got = await scrape(session, second.url)
            assert got["cached_fleet_sibling_failures_total"] == 0

            # The owner's copy of another image it owns: taken by the second member.
            next_id = next(
                i
                for i in (str(uuid.UUID(int=n, version=4)) for n in range(1, 10_000))
                if ring.order(IDS, i)[0] == owner.id
            )
            glance.add_image(data, image_id=next_id)
            assert (await download(session, owner.url, next_id))[2] == data
            assert (await download(session, second.url, next_id))[2] == data
            assert len(data_gets(glance, next_id)) == 1
            assert f"{next_id} [0, {len(data)}) from sibling {owner.id}" in (second.proc.output())
    finally:
        await keystone.close()


# ------------------------------------------------------------- 3. stale allowances
async def test_a_stale_allowance_never_starts_a_fill_from_a_sibling(tmp_path: Path) -> None:
    """auth_stale_if_error: with the upstream failing every download (503), a caller allowed
    before gets a stale hit for an image its member holds; an image its member holds only a
    range of, or dropped (the caller was allowed it there), is not filled from the sibling
    holding it whole: 503, and no peer request at all."""
    common: dict[str, object] = {"auth_stale_if_error": 300, "auth_stale_after_failures": 2}
    async with (
        fake_glance() as glance,
        fleet_of(tmp_path, glance.url, common) as fleet,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        members = await fleet.start(IDS)
        a, b, c = (members[m] for m in IDS)
        held_data, part_data = os.urandom(8 * MiB), os.urandom(16 * MiB)
        held, part = glance.add_image(held_data), glance.add_image(part_data)
        for member in (a, b):
            assert (await download(session, member.url, held.id))[2] == held_data
        assert (await download(session, a.url, part.id))[2] == part_data
        want = {**auth(), "Range": f"bytes={MiB}-{2 * MiB - 1}"}  # B: a range of it only
        async with session.get(f"{b.url}/v2/images/{part.id}/file", headers=want) as resp:
            assert resp.status == 206 and await resp.read() == part_data[MiB : 2 * MiB]
        assert len(data_gets(glance, part.id)) == 1  # A's fill; B's range from A's copy
        # C held it whole (a copy of A's) and dropped it: cold there, the caller allowed.
        assert (await download(session, c.url, part.id))[2] == part_data
        drop = f"{c.url}/v2/cache/{part.id}"
        async with session.delete(drop, headers=auth("token-admin")) as resp:
            assert resp.status == 204
        assert len(data_gets(glance, part.id)) == 1

        glance.fail_downloads = 503
        # Known down after two failed probes in a row (the caller's included): a stale hit.
        got = [await download(session, b.url, held.id) for _ in range(2)]
        assert got[0][:2] == (503, None)
        assert got[1][0] == 200 and got[1][2] == held_data
        assert says(got[1][1], "hit; detail=stale-auth")
        peers_before = {m.id: len(m.peer_lines()) for m in (a, b, c)}
        sibling_fills = len(re.findall(rf"{part.id} \[\d+, \d+\) from sibling", b.proc.output()))
        for member, headers in (
            (b, auth()),  # the whole image
            (b, {**auth(), "Range": f"bytes={MiB}-{2 * MiB - 1}"}),  # even bytes B has
            (c, auth()),  # a member that dropped its copy
        ):
            url = f"{member.url}/v2/images/{part.id}/file"
            async with session.get(url, headers=headers) as resp:
                await resp.read()
                assert (resp.status, resp.headers.get("Cache-Status")) == (503, None)
        assert {m.id: len(m.peer_lines()) for m in (a, b, c)} == peers_before
        after = len(re.findall(rf"{part.id} \[\d+, \d+\) from sibling", b.proc.output()))
        assert after == sibling_fills
        assert len(data_gets(glance, part.id)) == 1


# ------------------------------------------------------------ 4. a member-list change
async def test_a_non_owners_copy_is_used_after_a_member_list_change(tmp_path: Path) -> None:
    """The members are restarted with a fourth one, ctl-d, which owns the image under the
    new list; only the old owner holds it. D's miss takes the old owner's copy, and so does
    the other old member's: one upstream data GET in all. (With service credentials: a
    member that found no copy would ask D to fetch it.)"""
    ids4 = (*IDS, "ctl-d")
    image_id = next(
        i
        for i in (str(uuid.UUID(int=n, version=4)) for n in range(1, 10_000))
        if ring.order(ids4, i)[0] == "ctl-d"
    )
    holder_id = ring.order(IDS, image_id)[0]
    common: dict[str, object] = {"service_token": "token-admin"}
    async with (
        fake_glance() as glance,
        fleet_of(tmp_path, glance.url, common) as fleet,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        members = await fleet.start(IDS)
        data = os.urandom(16 * MiB)
        glance.add_image(data, image_id=image_id)
        holder = members[holder_id]
        assert (await download(session, holder.url, image_id))[2] == data
        assert len(data_gets(glance, image_id)) == 1

        await fleet.stop()
        members = await fleet.start(ids4)
        d = members["ctl-d"]
        status, cache_status, body = await download(session, d.url, image_id)
        assert status == 200 and same(body, data) and not says(cache_status, "hit")
        assert re.search(
            rf"{image_id} \[0, {len(data)}\) from sibling {holder_id}", d.proc.output()
        )
        assert "fetches it" not in d.proc.output()
        other = next(m for m in IDS if m != holder_id)
        assert (await download(session, members[other].url, image_id))[2] == data
        assert len(data_gets(glance, image_id)) == 1
        status, cache_status, _ = await download(session, d.url, image_id)
        assert status == 200 and says(cache_status, "hit")  # its own verified copy
        mismatches = [
            (await scrape(session, m.url))["cached_fleet_list_mismatches_total"]
            for m in members.values()
        ]
        assert mismatches == [0] * len(ids4)  # every member restarted with the same list
        print(f"after the list change: {len(data_gets(glance, image_id))} upstream data GET")


# ------------------------------------------------- 5. callers' tokens stay with the member
async def test_callers_tokens_never_reach_siblings(tmp_path: Path) -> None:
    """Everything siblings send each other (captured by the relays in front of the members)
    carries no caller's token, nor the service token, nor any X-Auth-Token: not in lookups,
    copies, follows of an upstream-fed fill, nor a request to fetch for a sibling."""
    common: dict[str, object] = {"service_token": "token-admin"}
    async with (
        fake_glance() as glance,
        fleet_of(tmp_path, glance.url, common) as fleet,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        members = await fleet.start(IDS)
        data = os.urandom(8 * MiB)
        image = glance.add_image(data, rate=8 * MiB)
        owner, second, third = (members[m] for m in ring.order(IDS, image.id))
        # A cold miss on a non-owner: the owner is asked to fetch it, and followed while it
        # fills from the upstream (8 MiB/s); the third member follows that fill too.
        first = asyncio.create_task(download(session, second.url, image.id))
        await until(
            lambda: len(data_gets(glance, image.id)) == 1, "the owner's fill started", within=30
        )
        status, _, body = await download(session, third.url, image.id)
        assert status == 200 and same(body, data)
        assert (await first)[2] == data
        assert f"sibling {owner.id} fetches it" in second.proc.output()
        for member in (second, third):
            assert f"{image.id} [0, {len(data)}) from sibling {owner.id}" in member.proc.output()
        assert [token_of(r) for r in data_gets(glance, image.id)] == ["token-admin"]
        no_tokens_reached_siblings(fleet)
        # The owner's access log: the peer requests it answered (HEAD and GET); no member
        # logged a token either.
        assert any('"GET /cached-peer/v1/images/' in line for line in owner.peer_lines())
        assert [m.id for m in members.values() if tokens_in(m.proc.output().encode())] == []


pytestmark = pytest.mark.timeout(240)
