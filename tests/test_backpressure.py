"""Pass-through answers are bounded in memory: a client that does not read stops the
upstream read (issue 9, item 7). A real ``cached serve`` subprocess, its RSS compared with a
baseline taken in the same test."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import rawhttp
from aiohttp import web
from daemonproc import CachedProcess
from rawhttp import rss

MiB = 1 << 20
BIG = 64 * MiB
CLIENTS = 20
PIECE = bytes(MiB)


class BigUpstream:
    """An upstream answering every GET with 64 MiB, counting what it managed to send."""

    def __init__(self) -> None:
        self.sent = 0
        self.started = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        response.content_length = BIG
        await response.prepare(request)
        self.started += 1
        try:
            for _ in range(BIG // MiB):
                await response.write(PIECE)
                self.sent += MiB
        except ConnectionError:
            pass
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"


async def wait_until_stalled(upstream: BigUpstream, clients: int) -> None:
    """Until every request reached the upstream and its sending stopped moving."""
    deadline = time.monotonic() + 60
    last, steady = -1, 0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        if upstream.started >= clients and upstream.sent == last:
            steady += 1
            if steady >= 4:
                return
        else:
            steady = 0
        last = upstream.sent
    raise AssertionError(f"upstream never stalled: {upstream.started} started, {last} sent")


def _open_without_reading(url: str, path: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.settimeout(10)
    sock.connect(rawhttp.address(url))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: cached\r\n\r\n".encode())
    return sock


async def test_pass_through_to_clients_that_do_not_read(tmp_path: Path) -> None:
    upstream = BigUpstream()
    await upstream.start()
    # All the clients come from one address: more than the per-client cap of upstream
    # requests (16 by default, issue 13), which is not what is measured here.
    config = tmp_path / "cached.yaml"
    config.write_text(f"max_upstream_requests_per_client: {CLIENTS}\n")
    daemon = CachedProcess(
        upstream.url, tmp_path / "cache", tmp_path / "cached.log", "-c", str(config)
    )
    (tmp_path / "cache").mkdir()
    sockets: list[socket.socket] = []
    try:
        url = await asyncio.to_thread(daemon.start)
        assert daemon.proc is not None
        # Baseline: the daemon after one whole pass-through answer, read by its client.
        reply = await asyncio.to_thread(
            rawhttp.request, url, b"GET /v2/warm-up HTTP/1.1\r\nHost: cached\r\n\r\n", 60
        )
        assert reply.status == 200 and len(reply.body) == BIG
        baseline = rss(daemon.proc.pid)
        upstream.started = 0
        for i in range(CLIENTS):
            sockets.append(await asyncio.to_thread(_open_without_reading, url, f"/v2/big/{i}"))
        await wait_until_stalled(upstream, CLIENTS)
        grown = rss(daemon.proc.pid) - baseline
        # Was ~9 MiB per client (the upstream read buffer filled at 4 MiB, paused at 8).
        assert grown < CLIENTS * 2 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
        assert upstream.sent < CLIENTS * 12 * MiB + BIG  # kernel buffers, not ours
        for sock in sockets:
            sock.close()
        sockets.clear()
        reply = await asyncio.to_thread(
            rawhttp.request, url, b"GET /versions HTTP/1.1\r\nHost: cached\r\n\r\n"
        )
        assert reply.status == 200
        assert daemon.proc.poll() is None
        print(f"baseline {baseline / MiB:.0f} MiB, +{grown / MiB:.1f} MiB with {CLIENTS} clients")
    finally:
        for sock in sockets:
            sock.close()
        await asyncio.to_thread(daemon.stop)
        assert upstream.runner is not None
        await upstream.runner.cleanup()


def remount_ro(path: Path) -> None:
    """Remount ``path`` read-only; retried while a write is open there (the cache guard's
    probe file lives a moment: the kernel then answers EBUSY)."""
    deadline = time.monotonic() + 10
    while True:
        done = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"cannot remount {path} read-only: {done.stderr.decode()}")
        time.sleep(0.05)


def test_file_upstream_pass_through_to_clients_that_do_not_read(tmp_path: Path) -> None:
    """The file upstream answers a passed-through download (here: the cache is read-only)
    a piece at a time behind each client's drain."""
    images, cache = tmp_path / "images", tmp_path / "cache"
    images.mkdir()
    cache.mkdir()
    image_id = str(uuid.uuid4())
    with open(images / image_id, "wb") as f:
        f.write(os.urandom(BIG))
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(cache)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"needs root to mount a tmpfs: {mount.stderr.decode().strip()}")
    daemon = CachedProcess(f"file://{images}", cache, tmp_path / "cached.log")
    sockets: list[socket.socket] = []
    try:
        url = daemon.start()
        assert daemon.proc is not None
        remount_ro(cache)
        path = f"/v2/images/{image_id}/file"
        raw = f"GET {path} HTTP/1.1\r\nHost: cached\r\n\r\n".encode()
        reply = rawhttp.request(url, raw, 60)
        assert reply.status == 200 and len(reply.body) == BIG
        assert reply.headers["cache-status"].startswith("cached; fwd=bypass")  # any reason
        baseline = rss(daemon.proc.pid)
        for _ in range(CLIENTS):
            sockets.append(_open_without_reading(url, path))
        grown = _settled_growth(daemon.proc.pid, baseline)
        assert grown < CLIENTS * 2 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
        print(f"file: baseline {baseline / MiB:.0f} MiB, +{grown / MiB:.1f} MiB")
        for sock in sockets:
            sock.close()
        sockets.clear()
        assert daemon.proc.poll() is None
    finally:
        for sock in sockets:
            sock.close()
        daemon.stop()
        subprocess.run(["umount", "-l", str(cache)], check=False)


def _settled_growth(pid: int, baseline: int) -> int:
    """RSS growth once it stopped changing (every sender blocked on its client)."""
    deadline = time.monotonic() + 60
    last, steady = -1, 0
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss(pid)
        steady = steady + 1 if abs(now - last) < 256 << 10 else 0
        if steady >= 4:
            return now - baseline
        last = now
    raise AssertionError("RSS never settled")
