"""Fleet-wide changes and management (issue 17), on loopback with three real ``cached serve``
processes and a fake Glance (the fixtures of tests/test_fleet.py): a delete through one
member drops every copy, a deactivation through one is seen by all, ``cache-nodes-list``
names exactly the holders (and the members that did not answer), each member's view of
the fleet, ``Cache-Status`` names, ``fleet_listen``, and ``cached-manage``'s fleet verbs.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from conftest import auth
from daemonproc import CachedProcess
from test_correctness import until
from test_fleet import (
    IDS,
    Member,
    Relay,
    as_member,
    ask_at,
    download,
    fake_glance,
    fleet,
    scrape,
    transfers,
)

from cached import metrics
from cached.fleet import ring

MiB = 1 << 20


async def cached_ids(session: aiohttp.ClientSession, member: Member) -> set[str]:
    """The images ``member`` lists as cached (its management API)."""
    async with session.get(f"{member.url}/v2/cache", headers=auth("token-admin")) as resp:
        assert resp.status == 200
        return {row["image_id"] for row in (await resp.json())["cached_images"]}


async def on_every_member(
    session: aiohttp.ClientSession, glance: Any, members: dict[str, Member], size: int
) -> tuple[str, bytes]:
    """A new image, downloaded through every member (each then holds a verified copy)."""
    data = bytes(range(256)) * (size // 256)
    image = glance.add_image(data)
    for member in members.values():
        status, _, body = await download(session, member.url, image.id)
        assert status == 200 and body == data
    for member in members.values():
        assert image.id in await cached_ids(session, member)
    return image.id, data


async def test_a_delete_through_one_member_drops_every_copy(tmp_path: Path) -> None:
    """An image on all three members is deleted through A while C is stopped: A and B drop
    their copies at once; C, started again on its cache directory (where its copy still
    is), gets A's retried notice and drops its copy too. The management API's delete is
    node-local (glance-cache-manage's meaning): it drops one member's copy only."""
    async with fake_glance() as glance, fleet(tmp_path, glance) as members:
        a, b, c = (members[m] for m in IDS)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            image_id, _ = await on_every_member(session, glance, members, 2 * MiB)
            await asyncio.to_thread(c.proc.stop)
            async with session.delete(f"{a.url}/v2/images/{image_id}", headers=auth()) as r:
                assert r.status == 204
            assert image_id not in await cached_ids(session, a)
            await until(lambda: "deleted through sibling ctl-a" in b.proc.output(), "B told")
            assert image_id not in await cached_ids(session, b)
            await until(
                lambda: "sibling ctl-c did not take the delete" in a.proc.output(), "C missed it"
            )
            c.url = await asyncio.to_thread(c.proc.start)
            c.relay.target = ("127.0.0.1", int(c.url.rsplit(":", 1)[1]))
            await until(
                lambda: "deleted through sibling ctl-a" in c.proc.output(), "C told", within=40
            )
            assert image_id not in await cached_ids(session, c)
            got = await scrape(session, a.url)
            assert got['cached_fleet_notices_total{action="delete",result="done"}'] == 2
            assert got['cached_fleet_notices_total{action="delete",result="retried"}'] >= 1
            assert got['cached_fleet_notices_pending{action="delete"}'] == 0

            # The management API's delete is node-local.
            image_id, _ = await on_every_member(session, glance, members, 1 * MiB)
            async with session.delete(
                f"{a.url}/v2/cache/{image_id}", headers=auth("token-admin")
            ) as r:
                assert r.status == 204
            assert image_id not in await cached_ids(session, a)
            for member in (b, c):
                assert image_id in await cached_ids(session, member)


async def test_a_deactivation_through_one_member_is_seen_by_all(tmp_path: Path) -> None:
    """With auth_cache_ttl 30, each member remembers that token-p1 may download the image.
    Deactivated through B, A and C are told to forget: their next download re-checks with
    Glance and is refused (as B's is), though they keep their copies; reactivated through
    C, every member serves it again from its copy."""
    ttl = {m: {"auth_cache_ttl": 30} for m in IDS}
    async with fake_glance() as glance, fleet(tmp_path, glance, ttl) as members:
        a, b, c = (members[m] for m in IDS)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            image_id, data = await on_every_member(session, glance, members, 1 * MiB)
            action = f"/v2/images/{image_id}/actions/deactivate"
            async with session.post(b.url + action, headers=auth("token-admin")) as r:
                assert r.status == 204
            for member in (a, c):
                await until(
                    lambda m=member: "changed through sibling ctl-b" in m.proc.output(),  # type: ignore[misc]
                    f"{member.id} told",
                )
            for member in (a, b, c):
                status, _, _ = await download(session, member.url, image_id)
                assert status == 403, member.id
                assert image_id in await cached_ids(session, member)  # the copy stays
            action = f"/v2/images/{image_id}/actions/reactivate"
            async with session.post(c.url + action, headers=auth("token-admin")) as r:
                assert r.status == 204
            for member in (a, b):
                await until(
                    lambda m=member: "changed through sibling ctl-c" in m.proc.output(),  # type: ignore[misc]
                    f"{member.id} told",
                )
            before = len(glance.data_requests(image_id))
            for member in (a, b, c):
                status, cache_status, body = await download(session, member.url, image_id)
                assert (status, body == data) == (200, True)
                assert cache_status is not None and cache_status.endswith("; hit")
            probes = [r.range for r in glance.data_requests(image_id)[before:]]
            assert probes == ["bytes=0-0"] * 3  # re-checked each, no data fetched
            got = await scrape(session, a.url)
            assert got['cached_fleet_peer_requests_total{outcome="forgotten"}'] == 2


async def nodes_of(
    session: aiohttp.ClientSession, member: Member, image_id: str
) -> tuple[list[str], str | None]:
    url = f"{member.url}/v2/cache/nodes/{image_id}"
    async with session.get(url, headers=auth("token-admin")) as resp:
        assert resp.status == 200
        return await resp.json(), resp.headers.get("x-cached-unreachable")


async def test_cache_nodes_list_names_the_holders_and_the_silent(tmp_path: Path) -> None:
    """``GET /v2/cache/nodes/{id}`` lists exactly the members holding a verified copy,
    asked by signed HEAD; with B stopped (SIGSTOP) it still answers, within the bound
    (0.5 s with the default fleet_lookup_timeout), without B and naming B's url in
    x-cached-unreachable."""
    default_lookup: dict[str, dict[str, object]] = {m: {"fleet_lookup_timeout": 0.2} for m in IDS}
    async with fake_glance() as glance, fleet(tmp_path, glance, default_lookup) as members:
        a, b, c = (members[m] for m in IDS)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            data = bytes(range(256)) * 4096
            image = glance.add_image(data)
            for member in (a, b):
                assert (await download(session, member.url, image.id))[2] == data
            for member in (a, b, c):
                holders, silent = await nodes_of(session, member, image.id)
                assert (sorted(holders), silent) == (sorted([a.member_url, b.member_url]), None)
            b.proc.signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                holders, silent = await nodes_of(session, c, image.id)
                took = time.monotonic() - started
            finally:
                b.proc.signal(signal.SIGCONT)
            assert (holders, silent) == ([a.member_url], b.member_url)
            # Asked by signed HEAD, never through the siblings' GET /v2/cache.
            for member in (a, b, c):
                assert '"GET /v2/cache ' not in member.proc.output()
                assert '"HEAD /cached-peer/v1/images/' in member.proc.output()
            print(f"cache-nodes-list with a member stopped: answered in {took * 1000:.0f} ms")


async def test_each_member_tells_its_view_of_the_fleet(tmp_path: Path) -> None:
    """``GET /cached-peer/v1/state`` (signed) and ``GET /v2/cache/fleet`` (the operator's
    token): the member's id, list digest, cache state, counts and its siblings' health and
    bytes; unsigned: 401; a daemon without a fleet answers 404 to /v2/cache/fleet."""
    async with fake_glance() as glance, fleet(tmp_path, glance) as members:
        a, b, _ = (members[m] for m in IDS)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            data = bytes(range(256)) * 8192
            image = glance.add_image(data)
            for member in (a, b):
                assert (await download(session, member.url, image.id))[2] == data
            path = "/cached-peer/v1/state"
            assert (await ask_at(session, a.url + path, "GET", {})).status == 401
            signed = as_member(tmp_path, "ctl-c").sign("GET", path, "ctl-a")
            async with session.get(a.url + path, headers=signed) as resp:
                assert resp.status == 200
                state = await resp.json()
            async with session.get(f"{b.url}/v2/cache/fleet", headers=auth("token-admin")) as r:
                assert r.status == 200
                view = await r.json()
            async with session.get(f"{b.url}/v2/cache/fleet", headers=auth("token-p1")) as r:
                assert r.status == 403
        assert state["id"] == "ctl-a" and view["id"] == "ctl-b"
        assert state["list"] == view["list"] and state["members"] == list(IDS)
        assert state["cache"] == "ok" and state["counts"]["complete"] == 1
        assert set(view["siblings"]) == {"ctl-a", "ctl-c"}
        sent = state["siblings"]["ctl-b"]["bytes_sent"]
        received = view["siblings"]["ctl-a"]["bytes_received"]
        assert sent == received == len(data)  # B filled from A's copy
        assert view["siblings"]["ctl-a"]["up"] is True


async def test_fleet_listen_takes_the_peer_routes_and_only_them(tmp_path: Path) -> None:
    """With ``fleet_listen``, each member's url in fleet_members names its fleet listener:
    peer fill goes through it (B's miss names A's hit first in Cache-Status, RFC 9211);
    the peer routes answer 404 on the public listener, and the fleet listener answers
    nothing but them (404, never relayed to the upstream)."""
    extra: dict[str, dict[str, object]] = {m: {"fleet_listen": "127.0.0.1:0"} for m in IDS}
    async with fake_glance() as glance, fleet(tmp_path, glance, extra) as members:
        fleet_urls = {}
        for member in members.values():
            found = re.search(r"fleet listener on (http://\S+)", member.proc.output())
            assert found is not None, member.proc.output()
            fleet_urls[member.id] = found[1]
            member.relay.target = ("127.0.0.1", int(found[1].rsplit(":", 1)[1]))
        a, b, _ = (members[m] for m in IDS)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            data = bytes(range(256)) * 8192
            image = glance.add_image(data)
            status, cache_status, body = await download(session, a.url, image.id)
            assert (status, cache_status, body == data) == (
                200,
                "cached-ctl-a; fwd=uri-miss; stored",
                True,
            )
            status, cache_status, body = await download(session, b.url, image.id)
            assert (status, body == data) == (200, True)
            assert cache_status == "cached-ctl-a; hit, cached-ctl-b; fwd=uri-miss; stored"
            assert transfers(glance, image.id) == [None]  # A's fill only
            path = f"/cached-peer/v1/images/{image.id}"
            signed = as_member(tmp_path, "ctl-c").sign("HEAD", path, "ctl-a")
            on_fleet = await ask_at(session, fleet_urls["ctl-a"] + path, "HEAD", signed)
            assert on_fleet.status == 200
            assert on_fleet.headers["X-Cached-Peer-State"] == "complete"
            assert (await ask_at(session, a.url + path, "HEAD", signed)).status == 404
            before = len(glance.requests)
            for where in ("/v2/cache", "/versions", f"/v2/images/{image.id}/file", "/healthz"):
                resp = await ask_at(
                    session, fleet_urls["ctl-a"] + where, "GET", auth("token-admin")
                )
                assert resp.status == 404, where
            assert len(glance.requests) == before


async def test_fleet_listen_speaks_tls_like_the_public_listener(tmp_path: Path) -> None:
    """With tls_cert_file, the fleet listener speaks TLS with the same certificate, and
    siblings verify it like the upstream (upstream_ca_file): B fills from A's copy through
    A's fleet listener over https; the public listener still serves clients over https."""
    ca = trustme.CA()
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    leaf = ca.issue_cert("127.0.0.1")
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    secret = tmp_path / "fleet.key"
    secret.write_bytes(b"s" * 48)
    secret.chmod(0o600)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    ids = ("ctl-a", "ctl-b")
    relays = {m: Relay() for m in ids}
    urls = {m: (await r.start()).replace("http://", "https://") for m, r in relays.items()}
    procs: dict[str, CachedProcess] = {}
    async with fake_glance() as glance:
        try:
            public = {}
            for m in ids:
                conf = tmp_path / f"{m}.yaml"
                conf.write_text(
                    yaml.safe_dump(
                        {
                            "fleet_self": m,
                            "fleet_members": [{"id": i, "url": urls[i]} for i in ids],
                            "fleet_secret_file": str(secret),
                            "fleet_listen": "127.0.0.1:0",
                            "fleet_lookup_timeout": 2.0,
                            "tls_cert_file": str(cert),
                            "tls_key_file": str(key),
                            "upstream_ca_file": str(ca_file),
                            "admin_tokens": ["sha256:" + "0" * 64],
                        }
                    )
                )
                (tmp_path / f"cache-{m}").mkdir()
                procs[m] = CachedProcess(
                    glance.url, tmp_path / f"cache-{m}", tmp_path / f"{m}.log", "-c", str(conf)
                )
                public[m] = await asyncio.to_thread(procs[m].start)
                found = re.search(r"fleet listener on (https://\S+)", procs[m].output())
                assert found is not None, procs[m].output()
                relays[m].target = ("127.0.0.1", int(found[1].rsplit(":", 1)[1]))
            assert public["ctl-a"].startswith("https://")
            data = bytes(range(256)) * 8192
            image = glance.add_image(data)
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=client),
                timeout=aiohttp.ClientTimeout(total=60),
            ) as session:
                assert (await download(session, public["ctl-a"], image.id))[2] == data
                status, cache_status, body = await download(session, public["ctl-b"], image.id)
            assert (status, body == data) == (200, True)
            assert cache_status == "cached-ctl-a; hit, cached-ctl-b; fwd=uri-miss; stored"
            assert transfers(glance, image.id) == [None]
            assert relays["ctl-a"].sent >= len(data)  # through A's fleet listener
        finally:
            for proc in procs.values():
                await asyncio.to_thread(proc.stop)
            for relay in relays.values():
                await relay.close()


async def manage(*argv: str) -> tuple[int, str, str]:
    """``cached-manage ARGV`` (a subprocess); its status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cached.ctl",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cached_manage_sees_the_whole_fleet(tmp_path: Path) -> None:
    """From A's configuration (fleet_members, no peers), ``--all-hosts`` asks every member:
    ``list-cached --by-image`` gives one row per image with the hosts holding it;
    ``queue-image`` queues on the image's owner only, which fetches it; ``fleet-status``
    shows every member, that their lists agree, and the bytes between them; a stopped
    member is reported down (exit status 1)."""
    async with fake_glance() as glance, fleet(tmp_path, glance) as members:
        a, b, c = (members[m] for m in IDS)
        conf = tmp_path / "manage.yaml"
        conf.write_text(
            yaml.safe_dump(
                {
                    "listen": a.url.removeprefix("http://"),
                    "fleet_self": "ctl-a",
                    "fleet_members": [{"id": m.id, "url": m.member_url} for m in (a, b, c)],
                    "fleet_secret_file": str(tmp_path / "fleet.key"),
                    "admin_tokens": ["sha256:" + "0" * 64],
                }
            )
        )
        common = ("-c", str(conf), "--all-hosts", "--os-auth-token", "token-admin")
        label = {
            m.id: (m.url if m is a else m.member_url).removeprefix("http://") for m in (a, b, c)
        }
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            both = glance.add_image(bytes(range(256)) * 4096)
            alone = glance.add_image(bytes(range(256)) * 2048)
            for member in (a, b):
                assert (await download(session, member.url, both.id))[0] == 200
            assert (await download(session, c.url, alone.id))[0] == 200

            status, out, err = await manage(*common, "--json", "list-cached", "--by-image")
            assert (status, err) == (0, "")
            rows = {r["image_id"]: r for r in json.loads(out)["images"]}
            assert sorted(rows[both.id]["hosts"]) == sorted([label["ctl-a"], label["ctl-b"]])
            assert rows[alone.id]["hosts"] == [label["ctl-c"]]
            status, out, err = await manage(*common, "list-cached", "--by-image")
            assert status == 0 and out.startswith("Found 2 cached images on 3 hosts...\n"), out
            assert "2/3" in out and "1/3" in out

            queued = glance.add_image(bytes(range(256)) * 1024)
            owner = members[ring.order(IDS, queued.id)[0]]
            status, out, err = await manage(*common, "-f", "-v", "queue-image", queued.id)
            assert status == 0, err
            assert f"queued on the image's owner {owner.id} only" in err
            for member in members.values():  # (fetched at the owner's next prefetch run)
                assert (queued.id in await queued_ids(session, member)) == (member is owner)

            status, out, err = await manage(*common, "--json", "fleet-status")
            assert (status, err) == (0, "")
            doc = json.loads(out)
            assert doc["lists_agree"] is True and doc["errors"] == []
            views = {v["id"]: v for v in doc["members"]}
            assert set(views) == set(IDS)
            assert views["ctl-b"]["siblings"]["ctl-a"]["bytes_received"] == len(both.data or b"")
            status, out, err = await manage(*common, "fleet-status")
            assert status == 0 and "member lists agree" in out, out

            await asyncio.to_thread(c.proc.stop)
            status, out, err = await manage(*common, "fleet-status", "--timeout", "3")
            assert status == 1
            assert "ctl-c: down (unreachable" in out, out
            print(out)


async def queued_ids(session: aiohttp.ClientSession, member: Member) -> set[str]:
    """The images ``member`` has queued (its management API)."""
    async with session.get(f"{member.url}/v2/cache", headers=auth("token-admin")) as resp:
        assert resp.status == 200
        return set((await resp.json())["queued_images"])


@pytest.mark.parametrize(
    ("cache_status", "outcome", "logged"),
    [
        ("cached; hit", "hit", "hit"),
        ("cached-ctl-2; hit", "hit", "hit"),
        ("cached-ctl-1; hit, cached-ctl-2; fwd=uri-miss; stored", "miss", "miss"),
        (
            "cached-ctl-1; fwd=uri-miss; stored, cached-ctl-2; fwd=uri-miss; collapsed",
            "collapsed",
            "collapsed",
        ),
        ("cached-ctl-2; fwd=partial; stored", "partial", "partial"),
        ("cached-ctl-2; fwd=bypass; detail=too-large", "bypass", "bypass:too-large"),
        ("cached-ctl-2; fwd=bypass", "bypass", "bypass:other"),
        ("cached-ctl-1; hit, other-cache; hit", None, "-"),  # not ours, last
        ("cached-; hit", None, "-"),
        ("cachedx; hit", None, "-"),
    ],
)
def test_outcomes_follow_the_member_names(
    cache_status: str, outcome: str | None, logged: str
) -> None:
    """metrics.outcome_of and the access log's cache= read cached's own Cache-Status member
    (the last of the list, named cached or cached-<id>), whoever came before it."""
    assert metrics.outcome_of(cache_status) == outcome
    assert metrics.log_outcome(cache_status) == logged


pytestmark = pytest.mark.timeout(180)
