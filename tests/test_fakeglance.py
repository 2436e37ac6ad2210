"""Tests of the fake Glance server itself (tests/fakeglance.py)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from fakeglance import FakeGlance

DATA = bytes(range(256)) * 1024  # 256 KiB
P1 = {"X-Auth-Token": "t1"}  # member of p1, the default owner
P2 = {"X-Auth-Token": "t2"}
READER = {"X-Auth-Token": "tr"}
ADMIN = {"X-Auth-Token": "ta"}


@pytest.fixture
async def glance() -> AsyncIterator[FakeGlance]:
    fake = FakeGlance()
    fake.add_token("t1", "p1")
    fake.add_token("t2", "p2")
    fake.add_token("tr", "p1", roles=("reader",))
    fake.add_token("ta", "admin", roles=("admin", "member", "reader"))
    async with fake:
        yield fake


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def fetch(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: object
) -> tuple[int, dict[str, str], bytes]:
    async with http.request(method, url, **kwargs) as r:  # type: ignore[arg-type]
        return r.status, dict(r.headers), await r.read()


async def test_versions_document_is_open_and_built_from_host(
    glance: FakeGlance, http: aiohttp.ClientSession
) -> None:
    async with http.get(glance.url + "/versions", headers={"Host": "node:9292"}) as r:
        assert r.status == 200
        versions = (await r.json())["versions"]
    assert versions[0] == {
        "id": "v2.18",
        "status": "CURRENT",
        "links": [{"rel": "self", "href": "http://node:9292/v2/"}],
    }
    assert [v["id"] for v in versions[1:]] == [f"v2.{n}" for n in range(17, -1, -1)]
    assert {v["status"] for v in versions[1:]} == {"SUPPORTED"}
    status, _, _ = await fetch(http, "GET", glance.url + "/")
    assert status == 300


async def test_auth_visibility_and_download_policy(
    glance: FakeGlance, http: aiohttp.ClientSession
) -> None:
    image = glance.add_image(DATA)
    file = f"{glance.url}/v2/images/{image.id}/file"
    status, headers, body = await fetch(http, "GET", file)
    assert status == 401 and b"could not verify" in body
    assert headers["x-openstack-request-id"].startswith("req-")
    assert (await fetch(http, "GET", file, headers={"X-Auth-Token": "bogus"}))[0] == 401
    assert (await fetch(http, "GET", file, headers=P2))[0] == 404
    assert (await fetch(http, "GET", file, headers=ADMIN))[0] == 200
    # reader may see the record but not download
    assert (await fetch(http, "GET", file[: -len("/file")], headers=READER))[0] == 200
    assert (await fetch(http, "GET", file, headers=READER))[0] == 403
    # deactivated: record visible, download forbidden except to admin
    image.status = "deactivated"
    assert (await fetch(http, "GET", file[: -len("/file")], headers=P1))[0] == 200
    assert (await fetch(http, "GET", file, headers=P1))[0] == 403
    assert (await fetch(http, "GET", file, headers=ADMIN))[0] == 200
    assert [r.status for r in glance.data_requests(image.id)] == [401, 401, 404, 200, 403, 403, 200]


@pytest.mark.parametrize(
    ("visibility", "members", "visible"),
    [("public", (), True), ("community", (), True), ("shared", ("p2",), True),
     ("shared", (), False), ("private", ("p2",), False)],
)  # fmt: skip
async def test_visibility_for_another_project(
    glance: FakeGlance, http: aiohttp.ClientSession, visibility: str, members: tuple[str, ...],
    visible: bool,
) -> None:  # fmt: skip
    image = glance.add_image(b"abc", visibility=visibility, members=members)
    status, _, _ = await fetch(http, "GET", f"{glance.url}/v2/images/{image.id}", headers=P2)
    assert status == (200 if visible else 404)


async def test_full_download_headers_and_accounting(
    glance: FakeGlance, http: aiohttp.ClientSession
) -> None:
    image = glance.add_image(DATA)
    status, headers, body = await fetch(
        http, "GET", f"{glance.url}/v2/images/{image.id}/file", headers=P1
    )
    assert (status, body) == (200, DATA)
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Content-Length"] == str(len(DATA))
    assert headers["Content-MD5"] == hashlib.md5(DATA).hexdigest()
    assert "ETag" not in headers and "Accept-Ranges" not in headers
    assert glance.bytes_sent == {image.id: len(DATA)}
    (req,) = glance.data_requests(image.id)
    assert (req.method, req.status, req.range, req.headers["x-auth-token"]) == (
        "GET", 200, None, "t1",
    )  # fmt: skip
    record = image.record()
    assert record["size"] == len(DATA) and record["checksum"] == headers["Content-MD5"]
    assert record["os_hash_value"] == hashlib.sha512(DATA).hexdigest()


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [("bytes=0-0", 0, 1), ("bytes=10-19", 10, 20), ("bytes=1000-", 1000, len(DATA)),
     ("bytes=-5", len(DATA) - 5, len(DATA)), ("bytes=100-999999999", 100, len(DATA)),
     ("bytes=-999999999", 0, len(DATA))],
)  # fmt: skip
async def test_range(
    glance: FakeGlance, http: aiohttp.ClientSession, header: str, start: int, stop: int
) -> None:
    image = glance.add_image(DATA)
    status, headers, body = await fetch(
        http, "GET", f"{glance.url}/v2/images/{image.id}/file", headers={**P1, "Range": header}
    )
    assert (status, body) == (206, DATA[start:stop])
    assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(DATA)}"
    assert headers["Content-Length"] == str(stop - start)
    assert headers["Content-MD5"] == hashlib.md5(DATA).hexdigest()  # of the whole image
    assert glance.data_requests(image.id)[0].range == header


@pytest.mark.parametrize(
    ("header", "status"),
    [(f"bytes={len(DATA)}-", 416), ("bytes=5-2", 416), ("bytes=x", 416), ("bytes=0-1,5-6", 400)],
)
async def test_bad_range(
    glance: FakeGlance, http: aiohttp.ClientSession, header: str, status: int
) -> None:
    image = glance.add_image(DATA)
    got, headers, _ = await fetch(
        http, "GET", f"{glance.url}/v2/images/{image.id}/file", headers={**P1, "Range": header}
    )
    assert got == status
    if status == 416:
        assert headers["Content-Range"] == f"bytes */{len(DATA)}"


async def test_store_without_ranges(glance: FakeGlance, http: aiohttp.ClientSession) -> None:
    image = glance.add_image(DATA, ranges_supported=False)
    file = f"{glance.url}/v2/images/{image.id}/file"
    assert (await fetch(http, "GET", file, headers={**P1, "Range": "bytes=0-0"}))[0] == 400
    assert (await fetch(http, "GET", file, headers=P1))[0] == 200


@pytest.mark.parametrize("chunked", [False, True])
async def test_cut_after_gives_a_short_read(
    glance: FakeGlance, http: aiohttp.ClientSession, chunked: bool
) -> None:
    image = glance.add_image(DATA, cut_after=100_000, no_content_length=chunked)
    got = bytearray()
    async with http.get(f"{glance.url}/v2/images/{image.id}/file", headers=P1) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for piece in r.content.iter_any():
                got += piece
    assert bytes(got) == DATA[:100_000]
    assert glance.bytes_sent[image.id] == 100_000


async def test_corrupt_at(glance: FakeGlance, http: aiohttp.ClientSession) -> None:
    image = glance.add_image(DATA, corrupt_at=300)
    file = f"{glance.url}/v2/images/{image.id}/file"
    _, headers, body = await fetch(http, "GET", file, headers=P1)
    assert len(body) == len(DATA) and body[300] == DATA[300] ^ 0xFF
    assert body[:300] == DATA[:300] and body[301:] == DATA[301:]
    assert headers["Content-MD5"] == hashlib.md5(DATA).hexdigest() == image.checksum
    _, _, covering = await fetch(http, "GET", file, headers={**P1, "Range": "bytes=290-309"})
    assert covering[10] == DATA[300] ^ 0xFF and covering[:10] == DATA[290:300]
    _, _, clean = await fetch(http, "GET", file, headers={**P1, "Range": "bytes=301-"})
    assert clean == DATA[301:]


async def test_no_content_length_is_chunked(
    glance: FakeGlance, http: aiohttp.ClientSession
) -> None:
    image = glance.add_image(DATA, no_content_length=True)
    file = f"{glance.url}/v2/images/{image.id}/file"
    status, headers, body = await fetch(http, "GET", file, headers=P1)
    assert (status, body) == (200, DATA)
    assert "Content-Length" not in headers and headers["Transfer-Encoding"] == "chunked"
    _, headers, _ = await fetch(http, "GET", file, headers={**P1, "Range": "bytes=0-0"})
    assert headers["Content-Length"] == "1"  # ranges keep their length


async def test_no_data_is_204(glance: FakeGlance, http: aiohttp.ClientSession) -> None:
    queued = glance.add_image(None)
    missing = glance.add_image(DATA, no_data_204=True)
    assert queued.status == "queued" and queued.record()["size"] is None
    for image in (queued, missing):
        status, _, body = await fetch(
            http, "GET", f"{glance.url}/v2/images/{image.id}/file", headers=P1
        )
        assert (status, body) == (204, b"")


async def test_delay_and_rate(glance: FakeGlance, http: aiohttp.ClientSession) -> None:
    image = glance.add_image(DATA[:50_000], delay=0.2)
    file = f"{glance.url}/v2/images/{image.id}/file"
    started = time.monotonic()
    assert (await fetch(http, "GET", file, headers=P1))[2] == image.data
    assert time.monotonic() - started >= 0.2
    image.delay, image.rate = 0.0, 200_000  # 50 kB at 200 kB/s: ~0.25 s
    started = time.monotonic()
    assert (await fetch(http, "GET", file, headers=P1))[2] == image.data
    assert time.monotonic() - started >= 0.2  # a lower bound: load only makes it longer


async def test_head_file_is_405(glance: FakeGlance, http: aiohttp.ClientSession) -> None:
    image = glance.add_image(DATA)
    status, headers, _ = await fetch(
        http, "HEAD", f"{glance.url}/v2/images/{image.id}/file", headers=P1
    )
    assert (status, headers["Allow"]) == (405, "GET, PUT")


async def test_create_and_chunked_upload(glance: FakeGlance, http: aiohttp.ClientSession) -> None:
    async with http.post(
        glance.url + "/v2/images", json={"name": "up"}, headers={**P2, "Host": "api:9292"}
    ) as r:
        assert r.status == 201
        record = await r.json()
        assert r.headers["Location"] == f"http://api:9292/v2/images/{record['id']}"
    assert (record["owner"], record["status"], record["name"]) == ("p2", "queued", "up")

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(DATA), 10_000):
            yield DATA[i : i + 10_000]

    file = f"{glance.url}/v2/images/{record['id']}/file"
    async with http.put(file, data=pieces(), headers=P2) as r:
        assert r.status == 204
        assert r.request_info.headers["Transfer-Encoding"] == "chunked"
    image = glance.images[record["id"]]
    assert image.status == "active" and image.checksum == hashlib.md5(DATA).hexdigest()
    assert (await fetch(http, "GET", file, headers=P2))[2] == DATA
    assert (await fetch(http, "PUT", file, data=b"again", headers=P2))[0] == 409


async def test_management_calls(glance: FakeGlance, http: aiohttp.ClientSession) -> None:
    image = glance.add_image(DATA)
    url = f"{glance.url}/v2/images/{image.id}"
    share = [{"op": "replace", "path": "/visibility", "value": "shared"}]
    assert (await fetch(http, "PATCH", url, json=share, headers=P2))[0] == 404
    status, _, body = await fetch(http, "PATCH", url, json=share, headers=P1)
    assert status == 200 and b'"visibility": "shared"' in body
    member = {"member": "p2"}
    assert (await fetch(http, "POST", url + "/members", json=member, headers=P1))[0] == 200
    assert (await fetch(http, "GET", url + "/file", headers=P2))[0] == 200
    assert (await fetch(http, "DELETE", url, headers=P2))[0] == 403
    assert (await fetch(http, "DELETE", url + "/members/p2", headers=P1))[0] == 204
    assert (await fetch(http, "GET", url, headers=P2))[0] == 404

    assert (await fetch(http, "POST", url + "/actions/deactivate", headers=P1))[0] == 403
    assert (await fetch(http, "POST", url + "/actions/deactivate", headers=ADMIN))[0] == 204
    assert image.status == "deactivated"
    assert (await fetch(http, "POST", url + "/actions/reactivate", headers=ADMIN))[0] == 204
    assert image.status == "active"

    async with http.get(glance.url + "/v2/images", headers=P1) as r:
        listing = await r.json()
    assert [i["id"] for i in listing["images"]] == [image.id]
    assert (listing["first"], listing["schema"]) == ("/v2/images", "/v2/schemas/images")

    assert (await fetch(http, "DELETE", url, headers=P1))[0] == 204
    assert image.id not in glance.images
    assert (await fetch(http, "GET", url, headers=P1))[0] == 404


async def test_unknown_paths_are_404_and_every_request_is_recorded(
    glance: FakeGlance, http: aiohttp.ClientSession
) -> None:
    status, headers, _ = await fetch(http, "GET", glance.url + "/v2/nothing?x=1", headers=P1)
    assert status == 404 and headers["x-openstack-request-id"].startswith("req-")
    (req,) = glance.requests
    assert (req.method, req.path, req.query, req.status) == ("GET", "/v2/nothing", "x=1", 404)


async def test_malformed_json_is_400(glance: FakeGlance, http: aiohttp.ClientSession) -> None:
    image = glance.add_image(DATA)
    url = f"{glance.url}/v2/images/{image.id}"
    assert (await fetch(http, "PATCH", url, json={"op": "x"}, headers=P1))[0] == 400
    assert (await fetch(http, "POST", glance.url + "/v2/images", data=b"{", headers=P1))[0] == 400


@pytest.mark.parametrize("knobs", [{"delay": 30.0}, {"rate": 10_000}])
async def test_close_cuts_running_downloads_at_once(
    http: aiohttp.ClientSession, knobs: dict[str, float]
) -> None:
    fake = FakeGlance()
    fake.add_token("t1", "p1")
    image = fake.add_image(DATA, **knobs)
    await fake.start()
    task = asyncio.create_task(
        fetch(http, "GET", f"{fake.url}/v2/images/{image.id}/file", headers=P1)
    )
    path = f"/v2/images/{image.id}/file"
    for _ in range(1000):  # until the download is being served (held by its knob)
        if any(r.path == path for r in fake.requests):
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError("the download never reached the fake")
    # The download would take 26-30 s: close() and the client's end come long before.
    await asyncio.wait_for(fake.close(), 10)
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(task, 10)
