"""Hostile and careless requests against the daemon (issue 9): each gets a clear answer and
leaves the daemon serving."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import uuid
from pathlib import Path

import pytest
import rawhttp
import yaml
from conftest import Daemon, auth, start_daemon, stop_daemon
from daemonproc import run_cached
from fakeglance import FakeGlance

MiB = 1 << 20
ADMIN_DIGEST = "sha256:" + hashlib.sha256(b"admin-secret").hexdigest()


def _get(daemon: Daemon, path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: cached", "X-Auth-Token: token-p1", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


async def test_hostile_ranges(glance: FakeGlance, daemon: Daemon) -> None:
    image = glance.add_image(bytes(range(256)) * 4)
    path = f"/v2/images/{image.id}/file"

    async def ask(value: str) -> rawhttp.Reply:
        raw = _get(daemon, path, f"Range: {value}")
        return await asyncio.to_thread(rawhttp.request, daemon.url, raw)

    many = "9" * 5000
    reply = await ask(f"bytes={many}-")  # int() of > 4,300 digits raises: was a 500
    assert reply.status == 416 and reply.headers["content-range"] == "bytes */1024"
    reply = await ask(f"bytes=0-{many}")
    assert reply.status == 206 and reply.headers["content-range"] == "bytes 0-1023/1024"
    assert reply.body == image.data
    reply = await ask(f"bytes=-{many}")
    assert reply.status == 206 and reply.body == image.data
    # Range digits are ASCII (RFC 9110 §14.1.1, RFC 5234 DIGIT): Arabic-Indic 1-2 is no range
    reply = await ask("bytes=\u0661-\u0662")
    assert reply.status == 416 and b"Invalid Range header." in reply.body  # as Glance
    reply = await ask("bytes=1-2")
    assert reply.status == 206 and reply.body == image.data[1:3]


async def test_suffix_range_of_an_empty_image(glance: FakeGlance, daemon: Daemon) -> None:
    image = glance.add_image(b"")
    # RFC 9110 §14.1.1: the one satisfiable range of an empty representation; it selects
    # all of it (nothing), which a 206 cannot describe: the whole, empty image.
    status, headers, body = await daemon.get(image.id, Range="bytes=-10")
    assert (status, body) == (200, b"") and headers["Content-Length"] == "0"
    status, headers, _ = await daemon.get(image.id, Range="bytes=0-")
    assert status == 416 and headers["Content-Range"] == "bytes */0"


def test_check_config_masks_every_credential(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"admin-secret").hexdigest()
    config = tmp_path / "cached.yaml"
    config.write_text(
        "upstream: http://glance:s3cret-in-url@glance-api:9292\n"
        f"image_cache_dir: {tmp_path}\n"
        "access_tokens: [file-token-1, file-token-2]\n"
        f"admin_tokens: ['sha256:{digest}']\n"
        "keystone_url: http://keystone:5000/v3\n"
        "keystone_username: cached\n"
        "keystone_password: hunter2-password\n"
        "keystone_project_name: service\n"
    )
    res = run_cached("check-config", "-c", str(config))
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    for secret in ("file-token-1", "file-token-2", digest, "hunter2-password", "s3cret-in-url"):
        assert secret not in out
    shown = yaml.safe_load(res.stdout)  # YAML that loads back; set secrets are comments
    assert "access_tokens" not in shown and "admin_tokens" not in shown
    assert "# access_tokens: (2 set) (not shown)\n" in res.stdout
    assert "# admin_tokens: (1 set) (not shown)\n" in res.stdout
    assert shown["upstream"] == "http://glance:***@glance-api:9292"
    assert shown["keystone_url"] == "http://keystone:5000/v3"


async def test_502_names_no_internal_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = await start_daemon(tmp_path, f"http://127.0.0.1:{port}", admin_tokens=[ADMIN_DIGEST])
    image_id = str(uuid.uuid4())
    try:
        for method, path, headers in (
            ("GET", f"/v2/images/{image_id}/file", auth()),  # the download path
            ("GET", f"/v2/images/{image_id}/file", {**auth(), "Range": "bytes=0-1,4-5"}),  # bypass
            ("GET", "/v2/images", auth()),  # pass-through
            ("POST", "/v2/images", {**auth(), "Content-Type": "application/json"}),
            # (GET /versions is answered from the last good document, or cached's own, in
            # an outage: tests/test_operator.py, issue 19 item 7.)
            ("PUT", f"/v2/cache/{image_id}", {"X-Auth-Token": "admin-secret"}),  # management
        ):
            caplog.clear()
            # no Accept: Glance's text page (aiohttp's */* would get webob's HTML one)
            async with d.session.request(
                method, d.url + path, headers=headers, skip_auto_headers=("Accept",)
            ) as resp:
                body = await resp.text()
                assert resp.status == 502, (method, path, resp.status, body)
                request_id = resp.headers["x-openstack-request-id"]
            assert body == "502 Bad Gateway\n\nThe image service is unreachable.\n\n   "
            assert resp.headers["Content-Type"] == "text/plain; charset=UTF-8"
            logged = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
            assert logged and str(port) in logged[0], caplog.text  # the operator sees it
    finally:
        await stop_daemon(d)


async def test_file_upstream_keeps_to_its_directory(tmp_path: Path) -> None:
    images, cache = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    cache.mkdir()
    secret = tmp_path / "outside"
    secret.write_bytes(b"root:x:0:0:secret\n")
    inside = str(uuid.uuid4())
    (images / inside).write_bytes(b"image data")
    out_link, in_link, fifo = (str(uuid.uuid4()) for _ in range(3))
    (images / out_link).symlink_to(secret)  # ln -s /etc/passwd <uuid>
    (images / in_link).symlink_to(images / inside)  # within the store: still an image
    os.mkfifo(images / fifo)  # opening it must not hang the daemon
    d = await start_daemon(cache, f"file://{images}")
    try:
        for image_id in (out_link, fifo):
            for path, headers in (
                (f"/v2/images/{image_id}/file", {}),
                (f"/v2/images/{image_id}/file", {"Range": "bytes=0-1,3-4"}),  # pass-through
                (f"/v2/images/{image_id}", {}),
            ):
                async with d.session.get(d.url + path, headers=headers) as resp:
                    body = await resp.read()
                    assert resp.status == 404 and b"secret" not in body, (path, body)
        async with d.session.get(d.url + "/v2/images") as resp:
            listed = {image["id"] for image in (await resp.json())["images"]}
        assert listed == {inside, in_link}
        status, _, body = await d.get(in_link)
        assert (status, body) == (200, b"image data")
        async with d.session.get(d.file_url(inside), headers={"Range": "bytes=0-1,3-4"}) as r:
            assert r.status == 400  # as Glance answers several ranges
        async with d.session.get(d.file_url(inside), headers={"Range": "bytes=-4"}) as r:
            assert r.status == 206 and await r.read() == b"data"
    finally:
        await stop_daemon(d)


def _upload_with_expect(url: str, head: list[str], body: bytes) -> tuple[bytes, rawhttp.Reply]:
    """Send the head with ``Expect: 100-continue``, the body once the interim 100 came."""
    with rawhttp.connect(url, timeout=15) as sock:
        lines = [*head, "Expect: 100-continue", f"Content-Length: {len(body)}"]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            got = sock.recv(1)
            assert got, "closed before the interim response"
            interim += got
        sock.sendall(body)
        return interim, rawhttp.read_reply(sock)


async def test_expect_100_continue_is_not_forwarded(glance: FakeGlance, daemon: Daemon) -> None:
    glance.send_100_continue = False  # like Glance under uWSGI: no interim 100, ever
    body = b'{"name": "uploaded", "disk_format": "raw", "container_format": "bare"}'
    head = [
        "POST /v2/images HTTP/1.1",
        "Host: cached",
        "X-Auth-Token: token-p1",
        "Content-Type: application/json",
    ]
    interim, reply = await asyncio.to_thread(_upload_with_expect, daemon.url, head, body)
    assert interim.startswith(b"HTTP/1.1 100 Continue")  # cached's own, to its client
    assert reply.status == 201, reply  # was: stuck until the upstream read timeout, then 502
    image_id = json.loads(reply.body)["id"]
    creates = [r for r in glance.requests if r.method == "POST" and r.path == "/v2/images"]
    assert "expect" not in creates[-1].headers

    data = os.urandom(3 * MiB)  # curl sends Expect with every upload over 1 MiB
    head = [
        f"PUT /v2/images/{image_id}/file HTTP/1.1",
        "Host: cached",
        "X-Auth-Token: token-p1",
        "Content-Type: application/octet-stream",
    ]
    interim, reply = await asyncio.to_thread(_upload_with_expect, daemon.url, head, data)
    assert reply.status == 204, reply
    assert glance.images[image_id].data == data
    status, _, got = await daemon.get(image_id)
    assert status == 200 and got == data


async def test_a_body_on_get_versions_does_not_desync_the_upstream(
    glance: FakeGlance, daemon: Daemon
) -> None:
    """Found by the HTTP fuzzer: the client's Content-Length went upstream without the body,
    so Glance read the next request on that pooled connection as this one's body."""
    raw = b"GET /versions HTTP/1.1\r\nHost: cached\r\nContent-Length: 5\r\n\r\nhello"
    for _ in range(3):
        reply = await asyncio.to_thread(rawhttp.request, daemon.url, raw, 10)
        assert reply.status == 200 and b"v2.18" in reply.body
    assert all(r.headers.get("content-length") in (None, "0") for r in glance.requests)
