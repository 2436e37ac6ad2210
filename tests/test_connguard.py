"""Client connection limits (issue 9, item 3) against a real ``cached serve`` subprocess,
with raw sockets on loopback: header-read, keep-alive and body-inactivity timeouts and the
per-address connection cap; slow but progressing transfers are never cut."""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import rawhttp
from daemonproc import CachedProcess
from fakeglance import FakeGlance

MiB = 1 << 20
SHORT = {
    "client_header_timeout": 1.0,
    "client_keepalive_timeout": 2.0,  # longer: aiohttp also runs it from the connection start
    "client_body_timeout": 1.0,
    # The trickles below send ~20 bytes/s: above this minimum (the default, 32K, would cut
    # them once client_body_timeout's grace is over).
    "client_body_min_rate": 16,
}


async def _daemon(glance: FakeGlance, tmp_path: Path, options: dict[str, object]) -> CachedProcess:
    config = tmp_path / "cached.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()))
    (tmp_path / "cache").mkdir()
    daemon = CachedProcess(
        glance.url, tmp_path / "cache", tmp_path / "cached.log", "-c", str(config)
    )
    await asyncio.to_thread(daemon.start)
    return daemon


@pytest.fixture
async def short(glance: FakeGlance, tmp_path: Path) -> AsyncIterator[CachedProcess]:
    daemon = await _daemon(glance, tmp_path, SHORT)
    yield daemon
    await asyncio.to_thread(daemon.stop)
    assert "Traceback" not in daemon.output()


def _wait_closed(sock: socket.socket, limit: float = 20.0) -> bytes:
    """Everything the server sends until it closes; fails if it is still open at ``limit``."""
    sock.settimeout(limit)
    got = b""
    try:
        while piece := sock.recv(65536):
            got += piece
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {limit}s; received {got[:200]!r}") from None
    return got


async def test_a_silent_connection_is_closed(short: CachedProcess) -> None:
    sock = await asyncio.to_thread(rawhttp.connect, short.url)
    with sock:
        got = await asyncio.to_thread(_wait_closed, sock)
    assert got.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


def _trickle_headers(url: str) -> tuple[int, bytes]:
    """A header line every 0.2 s (each well within the timeout); returns how many were sent
    before the server answered or closed, and what it sent."""
    with rawhttp.connect(url) as sock:
        sock.sendall(b"GET /versions HTTP/1.1\r\nHost: cached\r\n")
        for sent in range(300):
            readable, _, _ = select.select([sock], [], [], 0.2)
            if readable:
                return sent, _wait_closed(sock)
            try:
                sock.sendall(f"X-Slow-{sent}: y\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                return sent, b""
    raise AssertionError("the headers were never cut off")


async def test_headers_sent_line_by_line_are_cut_off(short: CachedProcess) -> None:
    sent, got = await asyncio.to_thread(_trickle_headers, short.url)
    assert got.startswith(b"HTTP/1.1 408") or got == b"", got[:200]
    assert sent < 300


async def test_an_idle_kept_alive_connection_is_closed(short: CachedProcess) -> None:
    def exchange() -> tuple[int, bytes]:
        with rawhttp.connect(short.url) as sock:
            sock.sendall(b"GET /versions HTTP/1.1\r\nHost: cached\r\n\r\n")
            reply = rawhttp.read_reply(sock)
            return reply.status, _wait_closed(sock)

    status, after = await asyncio.to_thread(exchange)
    assert status == 200 and after == b""  # closed quietly once idle


async def test_a_stalled_request_body_is_cut(glance: FakeGlance, short: CachedProcess) -> None:
    def stall() -> bytes:
        with rawhttp.connect(short.url) as sock:
            sock.sendall(
                b"POST /v2/images HTTP/1.1\r\nHost: cached\r\nX-Auth-Token: token-p1\r\n"
                b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"na'
            )
            return _wait_closed(sock)

    got = await asyncio.to_thread(stall)
    assert not got.startswith(b"HTTP/1.1 2"), got[:200]
    assert not [i for i in glance.images.values() if i.name]  # nothing was created


async def test_slow_but_progressing_transfers_are_not_cut(
    glance: FakeGlance, short: CachedProcess
) -> None:
    body = b'{"name": "slow", "visibility": "private"}'

    def trickle_upload() -> rawhttp.Reply:
        with rawhttp.connect(short.url) as sock:
            head = (
                "POST /v2/images HTTP/1.1\r\nHost: cached\r\nX-Auth-Token: token-p1\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode())
            for i in range(0, len(body), 4):  # ~2 s in all, 0.2 s between pieces
                time.sleep(0.2)
                sock.sendall(body[i : i + 4])
            return rawhttp.read_reply(sock)

    reply = await asyncio.to_thread(trickle_upload)
    assert reply.status == 201, reply

    data = os.urandom(6 * MiB)
    image = glance.add_image(data)

    def slow_download() -> bytes:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.settimeout(20)
        with sock:
            sock.connect(rawhttp.address(short.url))
            sock.sendall(
                f"GET /v2/images/{image.id}/file HTTP/1.1\r\nHost: cached\r\n"
                "X-Auth-Token: token-p1\r\n\r\n".encode()
            )
            got = b""
            while True:  # ~3 s at 2 MiB/s: longer than every timeout
                piece = sock.recv(64 << 10)
                if not piece:
                    break
                got += piece
                if got.endswith(data[-1000:]) and len(got) > len(data):
                    break
                time.sleep(0.03)
            return got

    got = await asyncio.to_thread(slow_download)
    assert got.endswith(data) and b" 200 OK" in got[:20]


async def test_connections_per_address_are_capped(glance: FakeGlance, tmp_path: Path) -> None:
    daemon = await _daemon(glance, tmp_path, {"max_connections_per_address": 3})
    held: list[socket.socket] = []
    try:
        for _ in range(3):
            held.append(await asyncio.to_thread(rawhttp.connect, daemon.url))

        def one_more() -> bytes:
            with rawhttp.connect(daemon.url) as sock:
                return _wait_closed(sock)

        got = await asyncio.to_thread(one_more)
        assert got.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), got[:200]
        held.pop().close()

        def versions_until_admitted() -> int:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                raw = b"GET /versions HTTP/1.1\r\nHost: cached\r\nConnection: close\r\n\r\n"
                reply = rawhttp.request(daemon.url, raw)
                if reply.status != 503:
                    return reply.status
                time.sleep(0.05)
            raise AssertionError("a freed slot was never reused")

        assert await asyncio.to_thread(versions_until_admitted) == 200
    finally:
        for sock in held:
            sock.close()
        await asyncio.to_thread(daemon.stop)
    assert "Traceback" not in daemon.output()
