"""The cache management API end to end: Glance's v2 Cache API, the legacy cache-manage API,
the version document, admin checks (hashed tokens, a fake Keystone, loopback), progress."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import fakeglance
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from conftest import Daemon, start_daemon, stop_daemon, tree
from fakeglance import FakeGlance
from fakekeystone import FakeKeystone

from cached.app import MANAGER
from cached.edge.listeners import LISTENERS, Listeners
from cached.manage.access import Access, AdminGuard

MiB = 1 << 20
ADMIN_TOKEN = "token-admin"  # admin in the fake Glance too, so look-ups with it succeed
ADMIN_DIGEST = "sha256:" + hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
Reply = tuple[int, dict[str, str], bytes]


async def call(
    d: Daemon,
    method: str,
    path: str,
    token: str | None = ADMIN_TOKEN,
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    *,
    admin: bool = False,
) -> Reply:
    """One request as glanceclient sends it (octet-stream content type even on GET);
    ``admin``: on the daemon's management listener."""
    sent = {"Content-Type": "application/octet-stream", **(headers or {})}
    if token is not None:
        sent["X-Auth-Token"] = token
    session, base = d.session, d.url
    if admin:
        assert d.admin_session is not None
        session, base = d.admin_session, d.admin_base
    async with session.request(method, base + path, headers=sent, data=data) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def get_json(d: Daemon, path: str, token: str | None = ADMIN_TOKEN) -> Any:
    status, _, body = await call(d, "GET", path, token)
    assert status == 200, body
    return json.loads(body)


async def eventually(check: Any, within: float = 5.0) -> None:
    for _ in range(int(within / 0.02)):
        if await check() if asyncio.iscoroutinefunction(check) else check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition never held")


def cached_here(d: Daemon, image_id: str) -> bool:
    entry = d.store.get(image_id)
    return entry is not None and entry.complete


@pytest.fixture
async def admin_daemon(glance: FakeGlance, tmp_path: Path) -> AsyncIterator[Daemon]:
    (tmp_path / "cache").mkdir()
    d = await start_daemon(tmp_path / "cache", glance.url, admin_tokens=[ADMIN_DIGEST])
    yield d
    await stop_daemon(d)


# ----------------------------------------------------------------------------- versions
async def test_versions_of_a_file_upstream_advertise_the_cache_api(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "cache").mkdir()
    d = await start_daemon(tmp_path / "cache", f"file://{tmp_path / 'images'}")
    try:
        doc = await get_json(d, "/versions")
        status = {v["id"]: v["status"] for v in doc["versions"]}
        assert status["v2.18"] == "CURRENT" and status["v2.14"] == "SUPPORTED"
    finally:
        await stop_daemon(d)


async def test_versions_of_a_glance_upstream_are_rewritten(
    glance: FakeGlance, admin_daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Glance without image_cache_dir: no 2.14-2.18 (REFERENCE.md §1.0).
    monkeypatch.setattr(fakeglance, "_VERSIONS", ["v2.9", "v2.7", "v2.1", "v2.0"])
    d = admin_daemon
    for path, expected in (("/versions", 200), ("/", 300)):
        status, headers, body = await call(d, "GET", path, token=None)
        assert status == expected and headers["Content-Type"].startswith("application/json")
        versions = json.loads(body)["versions"]
        ids = [v["id"] for v in versions]
        assert ids == ["v2.18", "v2.17", "v2.16", "v2.15", "v2.14", "v2.9", "v2.7", "v2.1", "v2.0"]
        assert [v["status"] for v in versions].count("CURRENT") == 1
        assert versions[0]["status"] == "CURRENT"
        assert all(v["links"][0]["href"] == d.url + "/v2/" for v in versions)


class OwnLinksGlance(FakeGlance):
    """A Glance configured with ``public_endpoint``: its links name itself, not the caller's
    Host; and it knows nothing of the cache API."""

    async def _versions(self, request: web.Request) -> web.Response:
        doc = {
            "versions": [
                {"id": v, "status": s, "links": [{"rel": "self", "href": f"{self.url}/v2/"}]}
                for v, s in (("v2.9", "CURRENT"), ("v2.0", "SUPPORTED"))
            ]
        }
        return web.json_response(doc, status=200 if request.path == "/versions" else 300)


async def test_version_links_naming_the_upstream_point_at_the_proxy(tmp_path: Path) -> None:
    async with OwnLinksGlance() as upstream:
        (tmp_path / "cache").mkdir()
        d = await start_daemon(tmp_path / "cache", upstream.url)
        try:
            versions = (await get_json(d, "/versions", token=None))["versions"]
            assert [(v["id"], v["status"]) for v in versions] == [
                ("v2.18", "CURRENT"),
                ("v2.17", "SUPPORTED"),
                ("v2.16", "SUPPORTED"),
                ("v2.15", "SUPPORTED"),
                ("v2.14", "SUPPORTED"),
                ("v2.9", "SUPPORTED"),
                ("v2.0", "SUPPORTED"),
            ]
            assert {v["links"][0]["href"] for v in versions} == {d.url + "/v2/"}
        finally:
            await stop_daemon(d)


# ---------------------------------------------------------------------------- v2 Cache API
async def test_cache_list_queue_and_fetch_at_once(glance: FakeGlance, admin_daemon: Daemon) -> None:
    d = admin_daemon
    assert await get_json(d, "/v2/cache") == {"cached_images": [], "queued_images": []}
    first = glance.add_image(os.urandom(MiB))
    status, _, body = await d.get(first.id)
    assert status == 200 and body == first.data
    await eventually(lambda: cached_here(d, first.id))

    slow = glance.add_image(os.urandom(8 * MiB), rate=16 * MiB)
    status, headers, body = await call(d, "PUT", f"/v2/cache/{slow.id}")
    assert (status, body, headers["Content-Length"]) == (202, b"", "0")
    state = await get_json(d, "/v2/cache")
    assert state["queued_images"] == [slow.id]  # queued while it is fetched
    await eventually(lambda: cached_here(d, slow.id))
    await eventually(lambda: not (d.cache_dir / "queue" / slow.id).exists())

    state = await get_json(d, "/v2/cache")
    assert state["queued_images"] == []
    rows = state["cached_images"]
    assert [r["image_id"] for r in rows] == [first.id, slow.id]
    assert rows[0]["id"] == 1 and rows[0]["hits"] == 0 and rows[0]["size"] == MiB
    assert rows[0]["checksum"] is None
    assert isinstance(rows[0]["last_accessed"], float)
    assert isinstance(rows[0]["last_modified"], float)
    assert sorted(rows[0]) == sorted(
        ["id", "image_id", "hits", "last_accessed", "last_modified", "size", "checksum"]
    )
    # Queuing a cached image changes nothing (unlike Glance, it is not fetched again).
    assert (await call(d, "PUT", f"/v2/cache/{first.id}"))[0] == 202
    # Nothing to fetch: not queued (a prefetch fetches queued images only), nothing running.
    assert (await get_json(d, "/v2/cache"))["queued_images"] == []
    assert first.id not in (await get_json(d, "/v2/cache/progress"))["progress"]
    assert len([r for r in glance.data_requests(first.id) if r.range != "bytes=0-0"]) == 1


async def test_queue_errors(glance: FakeGlance, admin_daemon: Daemon) -> None:
    d = admin_daemon
    unknown = "8a7e9b0e-4b1c-4d6e-9f3a-2b1c0d9e8f7a"
    assert (await call(d, "PUT", f"/v2/cache/{unknown}"))[0] == 404
    assert (await call(d, "PUT", "/v2/cache/..%2F..%2Fetc"))[0] == 404
    assert (await call(d, "PUT", "/v2/cache/not-an-id"))[0] == 404
    queued = glance.add_image(None)  # status "queued": no data yet
    status, _, body = await call(d, "PUT", f"/v2/cache/{queued.id}")
    assert status == 400 and b"Only images with status active" in body
    assert tree(d.cache_dir) == ["incomplete/", "invalid/", "queue/"]


async def test_lookups_use_the_callers_credentials(glance: FakeGlance, tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    member = hashlib.sha256(b"token-p2").hexdigest()
    d = await start_daemon(tmp_path / "cache", glance.url, admin_tokens=[f"sha256:{member}"])
    try:
        private = glance.add_image(b"x" * 1000, owner="p1")  # invisible to p2
        assert (await call(d, "PUT", f"/v2/cache/{private.id}", token="token-p2"))[0] == 404
        shows = [r for r in glance.requests if r.path == f"/v2/images/{private.id}"]
        assert [r.headers["x-auth-token"] for r in shows] == ["token-p2"]
    finally:
        await stop_daemon(d)


async def test_delete_one_image(glance: FakeGlance, admin_daemon: Daemon) -> None:
    d = admin_daemon
    image = glance.add_image(os.urandom(MiB))
    await d.get(image.id)
    await eventually(lambda: cached_here(d, image.id))
    status, _, body = await call(d, "DELETE", f"/v2/cache/{image.id}")
    assert (status, body) == (204, b"")
    assert tree(d.cache_dir) == ["incomplete/", "invalid/", "queue/"]
    assert await get_json(d, "/v2/cache") == {"cached_images": [], "queued_images": []}

    # Queued only (the upstream has forgotten it): still found, and dequeued.
    gone = "0f0e0d0c-0b0a-4909-8807-060504030201"
    assert (await call(d, "PUT", f"/v2/queued_images/{gone}"))[0] == 200
    assert (await call(d, "DELETE", f"/v2/cache/{gone}"))[0] == 204
    assert tree(d.cache_dir) == ["incomplete/", "invalid/", "queue/"]
    # Known upstream but not here: 204 like Glance; unknown everywhere: 404.
    assert (await call(d, "DELETE", f"/v2/cache/{image.id}"))[0] == 204
    assert (await call(d, "DELETE", f"/v2/cache/{gone}"))[0] == 404
    assert (await call(d, "DELETE", "/v2/cache/nope"))[0] == 404


@pytest.mark.parametrize(
    ("target", "cache_left", "queue_left"),
    [(None, 0, 0), ("", 0, 0), ("cache", 0, 1), ("CACHE", 0, 1), ("queue", 1, 0)],
)
async def test_clear(
    glance: FakeGlance,
    admin_daemon: Daemon,
    target: str | None,
    cache_left: int,
    queue_left: int,
) -> None:
    d = admin_daemon
    image = glance.add_image(os.urandom(MiB))
    await d.get(image.id)
    await eventually(lambda: cached_here(d, image.id))
    await call(d, "PUT", "/v2/queued_images/0f0e0d0c-0b0a-4909-8807-060504030201")
    headers = {} if target is None else {"x-image-cache-clear-target": target}
    status, _, body = await call(d, "DELETE", "/v2/cache", headers=headers)
    assert (status, body) == (204, b"")
    state = await get_json(d, "/v2/cache")
    assert (len(state["cached_images"]), len(state["queued_images"])) == (cache_left, queue_left)


@pytest.mark.parametrize("target", ["both", "cached", "all"])
async def test_clear_with_a_bad_target_is_400(admin_daemon: Daemon, target: str) -> None:
    headers = {"x-image-cache-clear-target": target}
    status, _, body = await call(admin_daemon, "DELETE", "/v2/cache", headers=headers)
    assert status == 400 and b"'cache', 'queue' or empty string" in body


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/v2/cache", "GET, DELETE"),
        ("PUT", "/v2/cache", "GET, DELETE"),
        ("GET", "/v2/cache/8a7e9b0e-4b1c-4d6e-9f3a-2b1c0d9e8f7a", "DELETE, PUT"),
        ("GET", "/v2/cache/clean", "POST"),
        ("DELETE", "/v2/cache/prune", "POST"),
        ("POST", "/v2/cache/nodes/8a7e9b0e-4b1c-4d6e-9f3a-2b1c0d9e8f7a", "GET"),
        ("POST", "/v2/cached_images", "GET, DELETE"),
        ("PUT", "/v1/cached_images/8a7e9b0e-4b1c-4d6e-9f3a-2b1c0d9e8f7a", "DELETE"),
        ("POST", "/v2.14/cache", "GET, DELETE"),
    ],
)
async def test_wrong_method_is_405_with_allow_and_never_proxied(
    glance: FakeGlance, admin_daemon: Daemon, method: str, path: str, allow: str
) -> None:
    status, headers, _ = await call(admin_daemon, method, path)
    assert (status, headers["Allow"]) == (405, allow)
    assert not [r for r in glance.requests if "cache" in r.path]


@pytest.mark.parametrize(
    "path", ["/v2/cache/nodes/", "/v2/cache/a/b", "/v1/cached_images/x/y", "/v2/queued_images/"]
)
async def test_other_paths_under_management_are_404_and_never_proxied(
    glance: FakeGlance, admin_daemon: Daemon, path: str
) -> None:
    assert (await call(admin_daemon, "GET", path))[0] == 404
    assert (await call(admin_daemon, "GET", path, token="token-p1"))[0] == 403
    assert not [r for r in glance.requests if "cache" in r.path or "queued" in r.path]


async def test_a_body_on_a_get_is_400(admin_daemon: Daemon) -> None:
    status, _, body = await call(admin_daemon, "GET", "/v2/cache", data=b"{}")
    assert status == 400 and b"A body is not expected" in body
    assert (await call(admin_daemon, "GET", "/v2.14/cache"))[0] == 200


async def test_clean_and_prune_answers(glance: FakeGlance, tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    d = await start_daemon(
        tmp_path / "cache",
        glance.url,
        image_cache_max_size=MiB,
        prune_on_fill=False,
        admin_listen=f"unix:{tmp_path / 'admin.sock'}",
    )
    try:
        images = [glance.add_image(os.urandom(MiB)) for _ in range(2)]
        for image in images:
            await d.get(image.id)
            await eventually(lambda i=image: cached_here(d, i.id))
        status, headers, body = await call(d, "POST", "/v2/cache/clean", None, admin=True)
        assert (status, body) == (200, b"")
        status, headers, body = await call(d, "POST", "/v2/cache/prune", None, admin=True)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert json.loads(body) == {"total_files_pruned": 1, "total_bytes_pruned": MiB}
        assert json.loads((await call(d, "POST", "/v2/cache/prune", None, admin=True))[2]) == {
            "total_files_pruned": 0,
            "total_bytes_pruned": 0,
        }
    finally:
        await stop_daemon(d)


async def test_nodes_list_this_node_and_peers_holding_the_image(
    glance: FakeGlance, tmp_path: Path
) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    peer = await start_daemon(tmp_path / "b", glance.url, admin_tokens=[ADMIN_DIGEST])
    d = await start_daemon(
        tmp_path / "a",
        glance.url,
        admin_tokens=[ADMIN_DIGEST],
        peers=[peer.url, "http://127.0.0.1:9"],  # the second one is down
        worker_self_reference_url="http://node-a:9292",
    )
    try:
        both, here, peer_only = (glance.add_image(os.urandom(1000)) for _ in range(3))
        for node, image in ((d, both), (peer, both), (d, here), (peer, peer_only)):
            await node.get(image.id)
            await eventually(lambda n=node, i=image: cached_here(n, i.id))
        nodes = "/v2/cache/nodes/{}"
        assert await get_json(d, nodes.format(both.id)) == ["http://node-a:9292", peer.url]
        assert await get_json(d, nodes.format(here.id)) == ["http://node-a:9292"]
        assert await get_json(d, nodes.format(peer_only.id)) == [peer.url]
        assert await get_json(peer, nodes.format(here.id)) == []  # no peers configured there
        unknown = "8a7e9b0e-4b1c-4d6e-9f3a-2b1c0d9e8f7a"
        assert (await call(d, "GET", nodes.format(unknown)))[0] == 404
    finally:
        await stop_daemon(d)
        await stop_daemon(peer)


# ---------------------------------------------------------------------------- legacy API
@pytest.mark.parametrize("prefix", ["/v1", "/v2"])
async def test_legacy_cache_manage_api(
    glance: FakeGlance, admin_daemon: Daemon, prefix: str
) -> None:
    d = admin_daemon
    image = glance.add_image(os.urandom(MiB))
    await d.get(image.id)
    await eventually(lambda: cached_here(d, image.id))

    doc = await get_json(d, f"{prefix}/cached_images")
    assert [sorted(r) for r in doc["cached_images"]] == [
        ["hits", "image_id", "last_accessed", "last_modified", "size"]
    ]
    assert doc["cached_images"][0]["image_id"] == image.id
    assert await get_json(d, f"{prefix}/queued_images") == {"queued_images": []}

    other = glance.add_image(os.urandom(1000))
    status, headers, body = await call(d, "PUT", f"{prefix}/queued_images/{other.id}")
    assert (status, body, headers["Content-Type"]) == (
        200,
        b"null",
        "application/json; charset=utf-8",
    )
    assert await get_json(d, f"{prefix}/queued_images") == {"queued_images": [other.id]}
    # Legacy queuing waits for the prefetch schedule: queued, no fetch started.
    progress = (await get_json(d, "/v2/cache/progress"))["progress"]
    assert progress[other.id]["state"] == "queued"
    assert glance.data_requests(other.id) == []
    assert (await call(d, "PUT", f"{prefix}/queued_images/not-a-uuid"))[0] == 400

    assert (await call(d, "DELETE", f"{prefix}/queued_images/{other.id}"))[2] == b"null"
    assert await get_json(d, f"{prefix}/queued_images") == {"queued_images": []}
    for image_id in (other.id, "0f0e0d0c-0b0a-4909-8807-060504030201"):
        await call(d, "PUT", f"{prefix}/queued_images/{image_id}")
    assert (await call(d, "DELETE", f"{prefix}/queued_images"))[2] == b'{"num_deleted": 2}'

    assert (await call(d, "DELETE", f"{prefix}/cached_images/{image.id}"))[2] == b"null"
    assert tree(d.cache_dir) == ["incomplete/", "invalid/", "queue/"]
    await d.get(image.id)
    await eventually(lambda: cached_here(d, image.id))
    assert (await call(d, "DELETE", f"{prefix}/cached_images"))[2] == b'{"num_deleted": 1}'
    assert (await call(d, "DELETE", f"{prefix}/cached_images"))[2] == b'{"num_deleted": 0}'


async def test_legacy_queue_can_start_at_once(glance: FakeGlance, tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    d = await start_daemon(
        tmp_path / "cache",
        glance.url,
        legacy_queue_immediate=True,
        admin_listen=f"unix:{tmp_path / 'admin.sock'}",
    )
    try:
        image = glance.add_image(os.urandom(MiB))
        assert (await call(d, "PUT", f"/v2/queued_images/{image.id}", admin=True))[0] == 200
        await eventually(lambda: cached_here(d, image.id))
        await eventually(lambda: not (d.cache_dir / "queue" / image.id).exists())
    finally:
        await stop_daemon(d)


# ----------------------------------------------------------------------------- admin only
async def test_admin_tokens(glance: FakeGlance, admin_daemon: Daemon) -> None:
    d = admin_daemon
    image = glance.add_image(os.urandom(1000))
    await d.get(image.id)
    await eventually(lambda: cached_here(d, image.id))
    for method, path in (
        ("GET", "/v2/cache"),
        ("GET", "/v2/cached_images"),
        ("DELETE", f"/v2/cache/{image.id}"),
        ("POST", "/v2/cache/prune"),
        ("GET", "/v2/cache/progress"),
    ):
        status, _, body = await call(d, method, path, token=None)
        assert status == 401, (method, path)
        status, _, body = await call(d, method, path, token="token-p1")
        assert status == 403 and image.id.encode() not in body, (method, path)
    assert cached_here(d, image.id)
    doc = await get_json(d, "/v2/cache")
    assert [r["image_id"] for r in doc["cached_images"]] == [image.id]


async def test_keystone_decides_who_is_admin(glance: FakeGlance, tmp_path: Path) -> None:
    ks = FakeKeystone()
    ks.add_token("ks-admin", "admin", ["admin", "member"])
    ks.add_token("ks-member", "p1", ["member", "reader"])
    await ks.start()
    (tmp_path / "cache").mkdir()
    d = await start_daemon(
        tmp_path / "cache",
        glance.url,
        keystone_url=ks.url + "/v3",
        keystone_username="glance",
        keystone_password="glance-secret",
        keystone_project_name="service",
    )
    try:
        assert (await call(d, "GET", "/v2/cache", token="ks-admin"))[0] == 200
        assert (await call(d, "GET", "/v2/cache", token="ks-admin"))[0] == 200
        assert (await call(d, "GET", "/v2/cache", token="ks-member"))[0] == 403
        assert (await call(d, "GET", "/v2/cache", token="ks-member"))[0] == 403
        assert (await call(d, "GET", "/v2/cache", token="made-up"))[0] == 401
        assert len(ks.recorded("POST", "/v3/auth/tokens")) == 1  # the service token, once
        checks = ks.recorded("GET", "/v3/auth/tokens")
        # The admin's answer is remembered; refusals are asked again every time.
        assert [c.subject_token for c in checks] == [
            "ks-a...(8)",
            "ks-m...(9)",
            "ks-m...(9)",
            "made...(7)",
        ]
        assert all(c.status in (200, 404) and c.auth_token.startswith("gAAA") for c in checks)
        ks.revoke("ks-admin")  # within admin_cache_ttl the answer stands
        assert (await call(d, "GET", "/v2/cache", token="ks-admin"))[0] == 200
    finally:
        await stop_daemon(d)
        await ks.close()


async def test_keystone_down_is_503(glance: FakeGlance, tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    d = await start_daemon(
        tmp_path / "cache",
        glance.url,
        keystone_url="http://127.0.0.1:9",
        service_token="svc",
        admin_tokens=[ADMIN_DIGEST],
    )
    try:
        assert (await call(d, "GET", "/v2/cache", token="someone"))[0] == 503
        assert (await call(d, "GET", "/v2/cache"))[0] == 200  # admin tokens need no Keystone
    finally:
        await stop_daemon(d)


class _Peer:
    def __init__(self, host: str):
        self.host = host

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.host, 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize(
    ("remote", "trusted", "access"),
    [
        ("127.0.0.1", False, Access.FORBIDDEN),  # loopback is not a credential (issue 9)
        ("::1", False, Access.FORBIDDEN),
        ("::ffff:127.0.0.1", False, Access.FORBIDDEN),
        ("10.0.0.5", False, Access.FORBIDDEN),
        # allow_unauthenticated_management: the old loopback rule, explicitly
        ("127.0.0.1", True, Access.ADMIN),
        ("127.9.9.9", True, Access.ADMIN),
        ("::1", True, Access.ADMIN),
        ("::ffff:127.0.0.1", True, Access.ADMIN),
        ("10.0.0.5", True, Access.FORBIDDEN),
        ("::ffff:10.0.0.5", True, Access.FORBIDDEN),
        ("2001:db8::1", True, Access.FORBIDDEN),
    ],
)
async def test_without_auth_loopback_is_admin_only_when_opted_in(
    remote: str, trusted: bool, access: Access
) -> None:
    app = web.Application()
    app[LISTENERS] = Listeners(loopback_trusted=trusted)
    request = make_mocked_request(
        "GET", "/v2/cache", headers={"X-Auth-Token": ADMIN_TOKEN}, transport=_Peer(remote), app=app
    )
    assert await AdminGuard((), None, 60).check(request) is access


# ---------------------------------------------------------------- deletes, progress
async def test_delete_while_downloading_and_filling(
    glance: FakeGlance, admin_daemon: Daemon
) -> None:
    d = admin_daemon
    image = glance.add_image(os.urandom(12 * MiB), rate=12 * MiB)  # ~1 s
    download = asyncio.create_task(d.get(image.id))
    await eventually(lambda: image.id in d.filler.fills and d.filler.fills[image.id].written)
    fill = d.filler.fills[image.id]
    status, _, _ = await call(d, "DELETE", f"/v2/cache/{image.id}")
    assert status == 204
    status, _, body = await download  # the reader finishes from the deleted file
    assert status == 200 and body == image.data
    await asyncio.wait_for(fill.closed.wait(), 5)
    assert tree(d.cache_dir) == ["incomplete/", "invalid/", "queue/"]  # never re-created
    assert d.store.get(image.id) is None
    assert await get_json(d, "/v2/cache") == {"cached_images": [], "queued_images": []}


async def test_progress_of_a_queued_fetch(glance: FakeGlance, admin_daemon: Daemon) -> None:
    d = admin_daemon
    image = glance.add_image(os.urandom(16 * MiB), rate=16 * MiB)  # ~1 s
    assert (await call(d, "PUT", f"/v2/cache/{image.id}"))[0] == 202
    seen: dict[str, Any] = {}

    async def fetching_with_a_rate() -> bool:
        nonlocal seen
        seen = (await get_json(d, "/v2/cache/progress"))["progress"].get(image.id, {})
        return seen.get("state") == "fetching" and bool(seen.get("rate"))

    await eventually(fetching_with_a_rate)
    assert 0 < seen["bytes_done"] < 16 * MiB and seen["size"] == 16 * MiB
    assert 1 * MiB < seen["rate"] < 64 * MiB
    assert seen["failures"] == 0 and seen["last_error"] is None
    await eventually(lambda: cached_here(d, image.id))
    await eventually(lambda: not (d.cache_dir / "queue" / image.id).exists())
    assert (await get_json(d, "/v2/cache/progress"))["progress"] == {}
    assert d.app[MANAGER].prefetcher is not None


async def test_static_admin_token_queues_with_the_service_credentials(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """An admin token from the config means nothing to Glance: look the image up as us."""
    image = glance.add_image(os.urandom(1 << 20), owner="p1")
    static = "static-admin-secret"  # unknown to Glance
    digest = "sha256:" + hashlib.sha256(static.encode()).hexdigest()
    d = await start_daemon(tmp_path, glance.url, admin_tokens=[digest], service_token="token-admin")
    try:
        headers = {"X-Auth-Token": static}
        async with d.session.put(f"{d.url}/v2/cache/{image.id}", headers=headers) as resp:
            assert resp.status == 202
        for _ in range(200):
            entry = d.store.get(image.id)
            if entry is not None and entry.complete:
                break
            await asyncio.sleep(0.02)
        assert d.store.get(image.id) is not None and d.store.get(image.id).complete
        unknown = "00000000-0000-4000-8000-000000000000"
        async with d.session.put(f"{d.url}/v2/cache/{unknown}", headers=headers) as resp:
            assert resp.status == 404
    finally:
        await stop_daemon(d)
