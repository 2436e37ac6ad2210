"""Shielding the upstream from slow clients (issue 13 item 2), against a real ``cached
serve`` and a worker-limited upstream: the fake Glance behind a semaphore of four "workers"
taken when a request's headers arrive and held until its answer is sent, as uWSGI's
workers are (``tests/test_real_glance.py`` has the same with a real Glance).

- small bodies are read whole before the upstream is contacted: eight connections that
  trickle a 100-byte body hold no worker, and downloads (hits, misses) and API calls go on;
- a body slower than ``client_body_min_rate`` is cut, though bytes keep coming;
- one client may hold at most ``max_upstream_requests_per_client`` upstream requests;
  another address is not affected.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import rawhttp
from aiohttp import web
from aiohttp.typedefs import Handler
from conftest import TOKENS, auth
from daemonproc import CachedProcess
from fakeglance import FakeGlance

MiB = 1 << 20


class WorkerLimitedGlance(FakeGlance):
    """The fake Glance with ``workers`` request slots, like uWSGI: a request takes one when
    its headers arrive (before its body is read) and frees it when its answer is sent."""

    def __init__(self, workers: int) -> None:
        super().__init__()
        self.workers = asyncio.Semaphore(workers)
        self.busy = 0

    def make_app(self) -> web.Application:
        app = super().make_app()

        @web.middleware
        async def worker(request: web.Request, handler: Handler) -> web.StreamResponse:
            async with self.workers:
                self.busy += 1
                try:
                    response = await handler(request)
                    await response.prepare(request)
                    await response.write_eof()
                    return response
                finally:
                    self.busy -= 1

        app.middlewares.insert(0, worker)
        return app


@pytest.fixture
async def limited() -> AsyncIterator[WorkerLimitedGlance]:
    fake = WorkerLimitedGlance(workers=4)
    for token, (project, roles) in TOKENS.items():
        fake.add_token(token, project, roles)
    await fake.start()
    yield fake
    await fake.close()


async def _daemon(upstream: str, tmp_path: Path, options: dict[str, Any]) -> CachedProcess:
    config = tmp_path / "cached.yaml"
    config.write_text(json.dumps(options))
    (tmp_path / "cache").mkdir()
    proc = CachedProcess(upstream, tmp_path / "cache", tmp_path / "cached.log", "-c", str(config))
    await asyncio.to_thread(proc.start)
    return proc


class Trickle:
    """A ``POST /v2/images`` whose ``length``-byte body is sent one byte per ``every`` s on
    its own thread until the body is complete, :meth:`stop`, or the server cuts it."""

    def __init__(self, url: str, length: int = 100, every: float = 0.25) -> None:
        self.sock = rawhttp.connect(url, timeout=60)
        self.length, self.every = length, every
        self.sent = 0
        self.cut = False
        self.reply = b""
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        body = json.dumps({"name": "x" * (self.length - 12)}).encode()[: self.length]
        body = body.ljust(self.length, b" ")
        try:
            self.sock.sendall(
                b"POST /v2/images HTTP/1.1\r\nHost: cached\r\nX-Auth-Token: token-p1\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % self.length
            )
            while self.sent < self.length and not self._stop.wait(self.every):
                self.sock.sendall(body[self.sent : self.sent + 1])
                self.sent += 1
            if self.sent == self.length:
                self.reply = self.sock.recv(65536)
        except OSError:
            self.cut = True

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        self.sock.close()


async def _until(check: Any, what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {within}s: {what}")
        await asyncio.sleep(0.02)


async def test_downloads_go_on_while_slow_bodies_trickle(
    limited: WorkerLimitedGlance, tmp_path: Path
) -> None:
    # A short read timeout: a request that waits for a worker fails fast (502) instead of
    # after a minute.
    proc = await _daemon(limited.url, tmp_path, {"upstream_read_timeout": 3})
    hit_data, miss_data = os.urandom(MiB), os.urandom(MiB)
    hit, miss = limited.add_image(hit_data), limited.add_image(miss_data)
    trickles: list[Trickle] = []
    async with aiohttp.ClientSession() as session:
        try:

            async def download(image_id: str) -> tuple[int, bytes]:
                url = f"{proc.url}/v2/images/{image_id}/file"
                async with session.get(url, headers=auth()) as resp:
                    return resp.status, await resp.read()

            assert await download(hit.id) == (200, hit_data)
            trickles = [Trickle(proc.url) for _ in range(8)]  # twice the upstream's workers
            # Three bytes of each body sent: relayed as they came, they would hold every
            # worker by now.
            await _until(lambda: all(t.sent >= 3 for t in trickles), "the bodies trickle")
            assert limited.busy == 0  # none of them reached the upstream
            assert await download(hit.id) == (200, hit_data)  # its probe found a worker
            assert await download(miss.id) == (200, miss_data)
            async with session.get(f"{proc.url}/v2/images", headers=auth()) as resp:
                assert resp.status == 200
            assert all(not t.cut and t.sent < t.length for t in trickles)  # still trickling
        finally:
            for trickle in trickles:
                trickle.stop()
            await asyncio.to_thread(proc.stop)
    assert "Traceback" not in proc.output()


async def test_a_buffered_body_reaches_the_upstream_whole(
    limited: WorkerLimitedGlance, tmp_path: Path
) -> None:
    proc = await _daemon(limited.url, tmp_path, {})
    try:
        trickle = Trickle(proc.url, length=40, every=0.01)
        await asyncio.to_thread(trickle.thread.join, 30)
        trickle.stop()
        assert trickle.reply.startswith(b"HTTP/1.1 201 "), trickle.reply[:200]
        (post,) = [r for r in limited.requests if r.method == "POST"]
        assert post.headers["content-length"] == "40"
    finally:
        await asyncio.to_thread(proc.stop)


async def test_a_body_slower_than_the_minimum_rate_is_cut(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """A byte every 0.2 s never lets the inactivity timeout (1 s) run out; 5 bytes/s is
    below the minimum rate (100 bytes/s), so the body is cut once the 1 s grace is over."""
    proc = await _daemon(
        glance.url, tmp_path, {"client_body_timeout": 1, "client_body_min_rate": 100}
    )
    try:
        trickle = Trickle(proc.url, length=100, every=0.2)  # 20 s for the whole body
        await asyncio.to_thread(trickle.thread.join, 60)
        trickle.stop()
        assert trickle.cut and trickle.sent < 100 and not trickle.reply
        assert not [r for r in glance.requests if r.method == "POST"]
        assert "came slower than 100 bytes/s (client_body_min_rate)" in proc.output()
    finally:
        await asyncio.to_thread(proc.stop)


def _upload_head(url: str, image_id: str, length: int, first: bytes) -> socket.socket:
    sock = rawhttp.connect(url, timeout=60)
    sock.sendall(
        f"PUT /v2/images/{image_id}/file HTTP/1.1\r\nHost: cached\r\nX-Auth-Token: token-p1\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode()
        + first
    )
    return sock


def _get_from(url: str, source: str, path: str) -> rawhttp.Reply:
    host, port = rawhttp.address(url)
    with socket.socket() as sock:
        sock.settimeout(30)
        sock.bind((source, 0))
        sock.connect((host, port))
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: cached\r\nX-Auth-Token: token-p1\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        return rawhttp.read_reply(sock)


async def test_upstream_requests_per_client_are_capped(glance: FakeGlance, tmp_path: Path) -> None:
    proc = await _daemon(
        glance.url,
        tmp_path,
        {"max_upstream_requests_per_client": 2, "client_body_buffer_size": 1024},
    )
    images = [glance.add_image(None, status="queued") for _ in range(2)]
    uploads: list[socket.socket] = []
    try:
        for image in images:  # streamed (larger than the buffer), stalled half-way
            uploads.append(_upload_head(proc.url, image.id, MiB, b"x" * 4096))
        await _until(
            lambda: len([r for r in glance.requests if r.method == "PUT"]) == 2,
            "both uploads reached the upstream",
        )
        third = await asyncio.to_thread(_get_from, proc.url, "127.0.0.1", "/v2/images")
        assert third.status == 503 and third.headers["retry-after"] == "1", third
        assert b"Too many requests of yours" in third.body
        # never sent (the daemon's own GET /versions, its upstream check, may have gone)
        assert not [r for r in glance.requests if r.method == "GET" and r.path == "/v2/images"]
        other = await asyncio.to_thread(_get_from, proc.url, "127.0.0.2", "/v2/images")
        assert other.status == 200  # another client is not affected
        uploads.pop().close()  # one upload ends (cut): its slot is free again

        def admitted() -> int:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                reply = _get_from(proc.url, "127.0.0.1", "/v2/images")
                if reply.status != 503:
                    return reply.status
                time.sleep(0.05)
            raise AssertionError("a freed slot was never reused")

        assert await asyncio.to_thread(admitted) == 200
    finally:
        for sock in uploads:
            sock.close()
        await asyncio.to_thread(proc.stop)
    assert "(max_upstream_requests_per_client)" in proc.output()


async def test_the_relay_pool_is_bounded_and_probes_have_their_own(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Pass-through requests use at most ``upstream_relay_connections`` upstream connections
    (it was unbounded); a hit's authorisation probe does not wait for one."""
    proc = await _daemon(
        glance.url,
        tmp_path,
        {
            "upstream_relay_connections": 2,
            "max_upstream_requests_per_client": 0,
            "client_body_buffer_size": 1024,
        },
    )
    data = os.urandom(MiB)
    image = glance.add_image(data)
    queued = [glance.add_image(None, status="queued") for _ in range(3)]
    uploads: list[socket.socket] = []

    def puts() -> int:
        return len([r for r in glance.requests if r.method == "PUT"])

    async with aiohttp.ClientSession() as session:
        try:

            async def download() -> tuple[int, bytes]:
                url = f"{proc.url}/v2/images/{image.id}/file"
                async with session.get(url, headers=auth()) as resp:
                    return resp.status, await resp.read()

            assert await download() == (200, data)
            for target in queued[:2]:
                uploads.append(_upload_head(proc.url, target.id, MiB, b"x" * 4096))
            await _until(lambda: puts() == 2, "two uploads at the upstream")
            uploads.append(_upload_head(proc.url, queued[2].id, MiB, b"x" * 4096))
            assert await download() == (200, data)  # the probe did not queue
            assert puts() == 2  # the third upload waits for a relay connection
            uploads.pop(0).close()
            await _until(lambda: puts() == 3, "the third upload got the freed connection")
        finally:
            for sock in uploads:
                sock.close()
            await asyncio.to_thread(proc.stop)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("client_body_buffer_size", "lots", "not a size"),
        ("client_body_min_rate", -1, "size must not be negative"),
        ("max_upstream_requests_per_client", 1.5, "must be a whole number >= 0"),
        ("upstream_relay_connections", True, "must be a whole number >= 0"),
        ("auth_stale_after_failures", 1, "one failed probe is not an outage"),
    ],
)
def test_bad_shielding_options_are_refused(option: str, value: object, message: str) -> None:
    from cached import config as configuration
    from cached.errors import ConfigError

    with pytest.raises(ConfigError, match=f"cached.yaml: option '{option}': .*{message}"):
        configuration.build({option: value}, "cached.yaml")
