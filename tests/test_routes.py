"""Image changes and downloads in every path form the upstream routes (issue 9, item 2), and
image ids in either case as one cache entry."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import rawhttp
from conftest import Daemon, auth, data_gets, start_daemon, stop_daemon, wait_complete
from fakeglance import FakeGlance
from yarl import URL

from cached.edge import routes

ID = "0b8e9b3a-5c1d-4f8e-9a3b-7c6d5e4f3a2b"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (f"/v2/images/{ID}", (ID, "")),
        (f"/v2.1/images/{ID}", (ID, "")),
        (f"/v2.16/images/{ID}/members/p2", (ID, "/members/p2")),
        (f"/v2/images/x/../{ID}", (ID, "")),
        (f"/v2/images/./{ID}/./file", (ID, "/file")),
        (f"//v2//images//{ID}//file", (ID, "/file")),
        (f"/v2/images/{ID.replace('-', '%2D')}", (ID, "")),
        (f"/v2/%69mages/{ID}%2Ffile", (ID, "/file")),
        (f"/v2/images/x/..%2F{ID}", (ID, "")),
        (f"/v2/images/{ID.upper()}?x=1", (ID, "")),
        (f"/v2/images/{ID}/actions/deactivate", (ID, "/actions/deactivate")),
        ("/v2/images/not-a-uuid", None),
        (f"/v3/images/{ID}", None),
        (f"/v2.x/images/{ID}", None),
        (f"/v2/images/{ID}/../../cache", None),
        ("/v2/images", None),
    ],
)
def test_canonical_image_route(target: str, expected: tuple[str, str] | None) -> None:
    route = routes.image_route(target)
    assert (None if route is None else (route.image_id, route.rest)) == expected


@pytest.fixture
async def remembering(glance: FakeGlance, tmp_path: Path) -> Daemon:
    """A daemon that reuses download authorisations for 300 s."""
    d = await start_daemon(tmp_path, glance.url, auth_cache_ttl=300)
    yield d  # type: ignore[misc]
    await stop_daemon(d)


FORMS = {
    "v2.1": "/v2.1/images/{id}",
    "v2.16": "/v2.16/images/{id}",
    "dot segments": "/v2/images/x/../{id}",
    "percent-encoded": "/v2/images/{encoded}",
}


def _spell(form: str, image_id: str) -> URL:
    path = FORMS[form].format(id=image_id, encoded=image_id.replace("-", "%2D"))
    return URL(path, encoded=True)


@pytest.mark.parametrize("form", FORMS)
async def test_delete_in_any_form_drops_the_copy(
    glance: FakeGlance, remembering: Daemon, form: str
) -> None:
    d = remembering
    image = glance.add_image(b"x" * 1000)
    assert (await d.get(image.id))[0] == 200
    await wait_complete(d, image.id)
    url = URL(d.url).join(_spell(form, image.id))
    async with d.session.delete(url, headers=auth()) as resp:
        assert resp.status == 204
    assert image.id not in glance.images
    assert d.store.get(image.id) is None  # the copy went with the image
    status, _, _ = await d.get(image.id)
    assert status == 404  # not served from a remembered authorisation


@pytest.mark.parametrize("form", FORMS)
async def test_member_removed_in_any_form_is_refused_at_once(
    glance: FakeGlance, remembering: Daemon, form: str
) -> None:
    d = remembering
    image = glance.add_image(b"y" * 1000, visibility="shared", members={"p2"})
    assert (await d.get(image.id, token="token-p2"))[0] == 200
    await wait_complete(d, image.id)
    url = URL(d.url).join(URL(str(_spell(form, image.id)) + "/members/p2", encoded=True))
    async with d.session.delete(url, headers=auth()) as resp:
        assert resp.status == 204
    status, _, _ = await d.get(image.id, token="token-p2")
    assert status == 404
    assert d.store.get(image.id) is not None  # a member change keeps the copy


@pytest.mark.parametrize("form", FORMS)
async def test_deactivated_in_any_form_is_refused_at_once(
    glance: FakeGlance, remembering: Daemon, form: str
) -> None:
    d = remembering
    image = glance.add_image(b"z" * 1000, visibility="public")
    assert (await d.get(image.id))[0] == 200
    url = URL(d.url).join(URL(str(_spell(form, image.id)) + "/actions/deactivate", encoded=True))
    async with d.session.post(url, headers=auth("token-admin")) as resp:
        assert resp.status == 204
    status, _, _ = await d.get(image.id)
    assert status == 403


@pytest.mark.parametrize("form", FORMS)
async def test_downloads_on_any_form_use_the_cache(
    glance: FakeGlance, daemon: Daemon, form: str
) -> None:
    image = glance.add_image(bytes(range(256)) * 64)
    url = URL(daemon.url).join(URL(str(_spell(form, image.id)) + "/file", encoded=True))
    for outcome in ("cached; fwd=uri-miss; stored", "cached; hit"):
        async with daemon.session.get(url, headers=auth()) as resp:
            assert resp.status == 200 and await resp.read() == image.data
            assert resp.headers["Cache-Status"] == outcome
        await wait_complete(daemon, image.id)
    assert data_gets(glance, image.id) == [None]


async def test_an_upper_case_id_is_the_same_entry(glance: FakeGlance, daemon: Daemon) -> None:
    glance.ids_ignore_case = True  # like Glance on MySQL
    image = glance.add_image(b"q" * 5000)
    status, headers, body = await daemon.get(image.id.upper())
    assert status == 200 and body == image.data
    await wait_complete(daemon, image.id)
    status, headers, body = await daemon.get(image.id)
    assert status == 200 and headers["Cache-Status"] == "cached; hit"
    status, headers, body = await daemon.get(image.id.upper())
    assert status == 200 and headers["Cache-Status"] == "cached; hit"
    assert sorted(daemon.store.entries) == [image.id]
    assert data_gets(glance, image.id) == [None]


async def test_an_upper_case_id_the_upstream_does_not_know(
    glance: FakeGlance, daemon: Daemon
) -> None:
    """Glance 33 on SQLite: 404 for the upper-case spelling, even when the image is cached."""
    image = glance.add_image(b"w" * 5000)
    assert (await daemon.get(image.id))[0] == 200
    await wait_complete(daemon, image.id)
    status, _, body = await daemon.get(image.id.upper())
    assert status == 404 and image.id.upper().encode() in body
    assert sorted(daemon.store.entries) == [image.id]


async def test_a_download_with_empty_segments_uses_the_cache(
    glance: FakeGlance, daemon: Daemon
) -> None:
    image = glance.add_image(b"e" * 3000)
    raw = (
        f"GET /v2//images//{image.id}//file HTTP/1.1\r\nHost: cached\r\n"
        "X-Auth-Token: token-p1\r\nConnection: close\r\n\r\n"
    ).encode()
    reply = await asyncio.to_thread(rawhttp.request, daemon.url, raw)
    assert reply.status == 200 and reply.body == image.data
    assert reply.headers["cache-status"] == "cached; fwd=uri-miss; stored"


VND = "application/vnd.openstack.images-"
CACHE = frozenset({"v2.14", "v2.16", "v2.18"})  # a Glance with a cache directory


@pytest.mark.parametrize(
    ("target", "accept", "expected"),
    [
        # URL versioning: the first segment is the version, stripped
        ("/v2/metadefs/namespaces", [], ("api", "/v2/metadefs/namespaces", True)),
        ("/v2.1/images", ["application/json"], ("api", "/v2/images", True)),
        ("/v2.14/images", [], ("api", "/v2/images", True)),
        ("/v2.8/images", [], ("choices", "", False)),  # multi-store only
        ("/v2.19/images", [], ("choices", "", False)),
        ("/V2/images", [], ("choices", "", False)),
        ("/v2.01/images", [], ("choices", "", False)),
        ("/metadefs/namespaces", [], ("choices", "", False)),
        ("/", [], ("choices", "", False)),
        ("/v2/images/", [], ("api", "/v2/images", False)),  # trailing '/': no route
        ("/v2/images/x/..", [], ("api", "/v2/images", False)),
        # media-type versioning: the path is not stripped
        ("/metadefs/namespaces", [VND + "v2"], ("api", "/v2/metadefs/namespaces", True)),
        ("//metadefs/./namespaces", [VND + "v2.17"], ("api", "/v2/metadefs/namespaces", True)),
        ("/v2/images", [VND + "v2"], ("api", "/v2/v2/images", True)),
        ("/images", [VND + "v2.19"], ("choices", "", False)),
        ("/images", [VND + "v2.8"], ("choices", "", False)),
        # what cached does not read exactly is refused, never guessed
        ("/images", [VND + "v2;q=1"], ("unread", "", False)),
        ("/images", [VND + "v2, */*"], ("unread", "", False)),
        ("/images", ["*/*", VND + "v2"], ("unread", "", False)),
        ("/images", ["APPLICATION/VND.OPENSTACK.IMAGES-v2"], ("unread", "", False)),
        ("/images", [VND + "V2"], ("unread", "", False)),
        # the version document, whatever the Accept
        ("/versions/images", [VND + "v2;q=1"], ("versions", "", False)),
    ],
)
def test_route_as_glance_negotiates_the_version(
    target: str, accept: list[str], expected: tuple[str, str, bool]
) -> None:
    found = routes.route(target, accept, CACHE)
    assert (found.kind.value, found.path, found.may_route) == expected


def test_a_version_the_upstream_allows_only_with_options_is_unsure_until_known() -> None:
    unsure = routes.route(f"/v2.14/images/{ID}/file", [], None)
    assert unsure.kind is routes.Kind.API and not unsure.certain
    assert unsure.download is None  # passed through, not served from the cache
    assert unsure.image is not None  # a 2xx change on it still forgets the image
    assert routes.route(f"/v2.14/images/{ID}/file", [], CACHE).download is not None
    assert routes.route(f"/v2.14/images/{ID}/file", [], frozenset()).kind is routes.Kind.CHOICES


async def test_upstream_versions_are_read_once_for_concurrent_callers() -> None:
    calls = 0
    gate = asyncio.Event()

    async def fetch() -> list[str]:
        nonlocal calls
        calls += 1
        await gate.wait()
        return ["v2.18", "v2.16", "v2.14", "v2.9", "v2.0"]

    known = routes.UpstreamVersions(fetch)
    waiters = [asyncio.ensure_future(known.learn()) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*waiters)
    assert calls == 1 and known.known == CACHE


async def test_upstream_versions_stay_unknown_while_unreachable() -> None:
    async def fetch() -> list[str]:
        raise OSError("unreachable")

    known = routes.UpstreamVersions(fetch)
    await known.learn()
    assert known.known is None
