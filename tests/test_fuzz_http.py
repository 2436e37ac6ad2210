"""HTTP-level fuzzing of a live ``cached serve`` (issue 9): malformed request lines and
headers, hostile Range values, management API paths and bodies, thrown at the daemon over
raw sockets for a fixed time.

``CACHED_FUZZ_SECONDS`` sets the time box (default 8 s; CI runs 60 s), ``CACHED_FUZZ_SEED``
replays a run (the seed is printed). Asserted throughout: no 5xx carries a traceback; at the
end: the daemon is alive and answering, its RSS stayed bounded, and its log holds no
unhandled-exception traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import time
import uuid
from pathlib import Path

import pytest
import rawhttp
from daemonproc import CachedProcess
from fakeglance import FakeGlance
from rawhttp import rss

MiB = 1 << 20
SECONDS = float(os.environ.get("CACHED_FUZZ_SECONDS", "8"))
ADMIN = "fuzz-admin"


class Fuzzer:
    """Builds hostile requests from pieces: mostly almost-valid, sometimes plain garbage."""

    def __init__(self, rnd: random.Random, images: list[str]) -> None:
        self.r = rnd
        self.images = images

    def pick(self, *options: str) -> str:
        return self.r.choice(options)

    def number(self) -> str:
        return self.pick(
            str(self.r.randint(0, 5000)),
            str(self.r.randint(0, 1 << 70)),
            "9" * self.r.randint(20, 6000),
            "0" * self.r.randint(1, 50) + "7",
            "-1",
            "\u0661\u0662",
            "1e3",
            " 5 ",
            "",
            "0x10",
        )

    def range_value(self) -> str:
        spec = lambda: f"{self.number()}-{self.number()}"  # noqa: E731
        return self.pick(
            f"bytes={spec()}",
            f"bytes=-{self.number()}",
            f"bytes={self.number()}-",
            f"bytes={spec()},{spec()}",
            f"bytes={','.join(spec() for _ in range(self.r.randint(2, 200)))}",
            f"BYTES = {spec()}",
            f"items={spec()}",
            "bytes",
            "bytes=",
            "=",
            f"bytes={spec()}" + "\u00e9",
        )

    def image_id(self) -> str:
        known = self.r.choice(self.images)
        return self.pick(
            known,
            known.upper(),
            str(uuid.uuid4()),
            known.replace("-", ""),
            known + "x",
            "../" + known,
            known.replace("-", "%2D"),
            "%00",
            "%zz",
            "a" * self.r.randint(1, 3000),
            "\u2603",
        )

    def path(self) -> str:
        i = self.image_id()
        prefix = self.pick("/v2", "/v2.1", "/v2.18", "/v1", "/v2.x", "//v2", "/v2/.", "/v3")
        tail = self.pick(
            f"/images/{i}/file",
            f"/images/{i}",
            f"/images/{i}/members/p2",
            f"/images/{i}/actions/deactivate",
            "/images",
            "/images?limit=" + self.number(),
            f"/cache/{i}",
            "/cache",
            "/cache/clean",
            "/cache/prune",
            f"/cache/nodes/{i}",
            "/cache/progress",
            "/cached_images",
            f"/cached_images/{i}",
            "/queued_images",
            f"/queued_images/{i}",
            "/schemas/image",
            f"/images/{i}/file/../../{i}/file",
            "/%2e%2e/%2e%2e/etc/passwd",
        )
        return self.pick(
            prefix + tail, "/versions", "/", "*", "http://evil/v2/images", prefix + tail
        )

    def method(self) -> str:
        return self.pick(
            "GET", "GET", "GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS",
            "get", "CONNECT", "TRACE", "BREW", "G\u00c9T", "",
        )  # fmt: skip

    def headers(self) -> list[str]:
        out = [self.pick("Host: cached", "Host: cached", "Host:", "Host: a\r\nHost: b")]
        token = self.pick(ADMIN, "token-p1", "token-p2", "token-reader", "nope", "")
        if token:
            out.append(f"X-Auth-Token: {token}")
        for _ in range(self.r.randint(0, 6)):
            out.append(
                self.pick(
                    f"Range: {self.range_value()}",
                    f"Range: {self.range_value()}",
                    f"If-Range: {self.pick('x', '', 'W/1')}",
                    f"x-image-cache-clear-target: {self.pick('cache', 'queue', 'both', '')}",
                    "Expect: 100-continue",
                    "Expect: nonsense",
                    f"Content-Type: {self.pick('application/json', 'text/plain', '')}",
                    "Transfer-Encoding: chunked",
                    "Transfer-Encoding: gzip, chunked",
                    f"Content-Length: {self.number()}",
                    "Connection: keep-alive, Upgrade",
                    "Upgrade: websocket",
                    "X-Folded: a\r\n b",
                    "Bad Header: x",
                    ": empty-name",
                    "X-Long: " + "x" * self.r.randint(1000, 20000),
                    "X-Nul: a\x00b",
                    "X-Forwarded-For: 127.0.0.1",
                    "Accept-Encoding: gzip",
                )
            )
        return out

    def body(self) -> bytes:
        return self.pick(
            "",
            "",
            "{}",
            "null",
            '{"member": "p9"}',
            '[{"op": "replace", "path": "/name", "value": "x"}]',
            "[" * self.r.randint(1, 5000),
            '{"a": ' * 200,
            "\xff\xfe",
            "0\r\n\r\n",
            "zz\r\nbroken chunk\r\n",
        ).encode("utf-8", "surrogateescape")

    def sane_request(self) -> bytes:
        """Well-formed HTTP with hostile contents: reaches the handlers."""
        method = self.pick("GET", "GET", "GET", "GET", "PUT", "POST", "DELETE", "PATCH", "HEAD")
        headers = ["Host: cached", "Connection: close"]
        token = self.pick(ADMIN, ADMIN, "token-p1", "token-p2", "token-reader", "nope")
        headers.append(f"X-Auth-Token: {token}")
        for _ in range(self.r.randint(0, 3)):
            headers.append(
                self.pick(
                    f"Range: {self.range_value()}",
                    f"Range: {self.range_value()}",
                    "If-Range: x",
                    f"x-image-cache-clear-target: {self.pick('cache', 'queue', 'both', '')}",
                    "Content-Type: application/json",
                    "Expect: 100-continue",
                )
            )
        body = self.body() if method in ("PUT", "POST", "PATCH") or self.r.random() < 0.1 else b""
        if body:
            headers.append(f"Content-Length: {len(body)}")
        head = "\r\n".join([f"{method} {self.path()} HTTP/1.1", *headers]) + "\r\n\r\n"
        return head.encode("utf-8", "surrogateescape") + body

    def request(self) -> bytes:
        if self.r.random() < 0.6:
            return self.sane_request()
        if self.r.random() < 0.05:  # plain garbage
            return self.r.randbytes(self.r.randint(1, 2000))
        version = self.pick("HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "")
        line = f"{self.method()} {self.path()} {version}".strip()
        body = self.body()
        headers = self.headers()
        if (
            body
            and self.r.random() < 0.7
            and not any(h.startswith("Content-Length") for h in headers)
        ):
            headers.append(f"Content-Length: {len(body)}")
        headers.append("Connection: close")
        eol = "\r\n" if self.r.random() < 0.95 else "\n"
        head = eol.join([line, *headers]) + eol + eol
        return head.encode("utf-8", "surrogateescape") + body


def _exchange(url: str, raw: bytes) -> bytes:
    """Send one request; everything the daemon answers until it closes (or 10 s pass)."""
    with socket.create_connection(rawhttp.address(url), timeout=10) as sock:
        try:
            sock.sendall(raw)  # no half-close: asyncio closes a connection at the client's EOF
        except OSError:
            pass  # it may close on us early: then read what it said
        got = b""
        try:
            while piece := sock.recv(1 << 16):
                got += piece
                if len(got) > 4 * MiB or _complete(got):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return got


def _complete(got: bytes) -> bool:
    """A whole response with a Content-Length is in (aiohttp may linger before closing)."""
    head, sep, body = got.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value)
    return False


def _run(url: str, fuzzer: Fuzzer, seconds: float) -> dict[int, int]:
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        raw = fuzzer.request()
        answer = _exchange(url, raw)
        status = 0
        while answer.startswith(b"HTTP/1.1 100 ") and b"\r\n\r\n" in answer:
            answer = answer.partition(b"\r\n\r\n")[2]  # the interim answer to an Expect
        if answer.startswith(b"HTTP/1."):
            try:
                status = int(answer.split(b" ", 2)[1])
            except (IndexError, ValueError):
                status = -1
        statuses[status] = statuses.get(status, 0) + 1
        if status >= 500:
            text = answer[:65536]
            assert b"Traceback" not in text and b'File "' not in text, (raw[:500], text[:2000])
            assert b"Error(" not in text and b"127.0.0.1:" not in text, (raw[:500], text[:2000])
    return statuses


@pytest.mark.timeout(SECONDS + 120)
async def test_fuzz_a_live_daemon(glance: FakeGlance, tmp_path: Path) -> None:
    images = [glance.add_image(os.urandom(s), visibility="public").id for s in (0, 1, 5000)]
    images.append(glance.add_image(os.urandom(3 * MiB)).id)
    glance.add_token(ADMIN, "admin", ("admin", "member", "reader"))
    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    config = tmp_path / "cached.yaml"
    options = {
        "admin_tokens": [f"sha256:{digest}"],
        "client_header_timeout": 1,
        "client_body_timeout": 1,
        "image_cache_max_size": "64M",
    }
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()))
    (tmp_path / "cache").mkdir()
    daemon = CachedProcess(
        glance.url, tmp_path / "cache", tmp_path / "cached.log", "-c", str(config)
    )
    url = await asyncio.to_thread(daemon.start)
    seed = int(os.environ.get("CACHED_FUZZ_SEED", random.randrange(1 << 32)))
    print(f"CACHED_FUZZ_SEED={seed}")
    try:
        assert daemon.proc is not None
        warm = b"GET /versions HTTP/1.1\r\nHost: cached\r\nConnection: close\r\n\r\n"
        assert (await asyncio.to_thread(rawhttp.request, url, warm)).status == 200
        baseline = rss(daemon.proc.pid)
        fuzzer = Fuzzer(random.Random(seed), images)
        statuses = await asyncio.to_thread(_run, url, fuzzer, SECONDS)
        print(f"statuses: {dict(sorted(statuses.items()))}")
        assert daemon.proc.poll() is None, "the daemon died"
        reply = await asyncio.to_thread(rawhttp.request, url, warm)
        assert reply.status == 200, reply
        grown = rss(daemon.proc.pid) - baseline
        assert grown < 200 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
        print(f"{sum(statuses.values())} requests, RSS +{grown / MiB:.1f} MiB")
    finally:
        await asyncio.to_thread(daemon.stop)
    log = daemon.output()
    assert "Traceback" not in log, log[log.find("Traceback") - 2000 : log.find("Traceback") + 4000]
