"""Peer fill (issue 17) where trust and credentials decide: siblings over https verified with
``upstream_ca_file`` (one refused for a certificate the CA did not sign), a fleet without
service credentials, stale allowances (``auth_stale_if_error``), a member-list change, and
callers' tokens that never reach a sibling.

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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import aiohttp
import trustme
import yaml
from daemonproc import CachedProcess
from test_fleet import (
    ADMIN,
    Member,
    Relay,
    download,
    fake_glance,
    same,
    scrape,
    transfers,
)
from test_tls import trusting, write_ca, write_pair

MiB = 1 << 20
IDS = ("ctl-a", "ctl-b", "ctl-c")
STALE = "cached; hit; detail=stale-auth"


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
        await super()._serve(cast(asyncio.StreamReader, _Heard(reader, self.heard)), writer)


class Fleet:
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
            proc = CachedProcess(self.glance_url, cache, log, "-c", str(config))
            member = Member(m, proc, self.relays[m], member_url=self.urls[m])
            self.members[m] = member
            member.url = await asyncio.to_thread(proc.start)
            self.relays[m].target = ("127.0.0.1", int(member.url.rsplit(":", 1)[1]))
        return {m: self.members[m] for m in ids}

    async def stop(self) -> None:
        for member in self.members.values():
            await asyncio.to_thread(member.proc.stop)

    async def close(self) -> None:
        await self.stop()
        for relay in self.relays.values():
            await relay.close()


@contextlib.asynccontextmanager
async def fleet_of(
    tmp_path: Path, glance_url: str, common: dict[str, object] | None = None, scheme: str = "http"
) -> AsyncIterator[Fleet]:
    fleet = Fleet(tmp_path, glance_url, common or {}, scheme)
    try:
        yield fleet
    finally:
        await fleet.close()


def tokens_in(heard: bytes) -> list[str]:
    """Caller or service tokens (or any X-Auth-Token header) in bytes siblings sent."""
    low = heard.lower()
    found = [t for t in ("token-p1", "token-p2", "token-admin") if t.encode() in low]
    return found + (["x-auth-token"] if b"x-auth-token" in low else [])


def upstream_tokens(glance_requests: list[object]) -> list[str | None]:
    return [getattr(r, "headers", {}).get("X-Auth-Token") for r in glance_requests]


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
