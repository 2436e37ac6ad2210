"""Counting clients (issue 13 item 6): a cap on connections in all, IPv6 clients counted by
their /64, and clients behind a trusted load balancer (HAProxy) told apart by the
``X-Forwarded-For`` it sends. A real ``cached serve``, raw sockets from several loopback
addresses (127.0.0.x); the address arithmetic on :class:`cached.edge.clients.Clients` itself."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import rawhttp
from aiohttp.test_utils import make_mocked_request
from daemonproc import CachedProcess
from fakeglance import FakeGlance

from cached import config as configuration
from cached.edge.clients import Clients, parse_networks
from cached.edge.connguard import ConnectionGuard, Limits, Refusal
from cached.errors import ConfigError

MiB = 1 << 20


async def _daemon(glance: FakeGlance, tmp_path: Path, options: dict[str, Any]) -> CachedProcess:
    config = tmp_path / "cached.yaml"
    config.write_text(json.dumps(options))
    (tmp_path / "cache").mkdir()
    proc = CachedProcess(glance.url, tmp_path / "cache", tmp_path / "cached.log", "-c", str(config))
    await asyncio.to_thread(proc.start)
    return proc


def _connect_from(url: str, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(20)
    sock.bind((source, 0))
    sock.connect(rawhttp.address(url))
    return sock


def _refused(sock: socket.socket) -> bool:
    """Whether the server's first bytes, unasked, are a 503 (a refused connection)."""
    return sock.recv(65536).startswith(b"HTTP/1.1 503 ")


def _versions(sock: socket.socket) -> int:
    sock.sendall(b"GET /versions HTTP/1.1\r\nHost: cached\r\n\r\n")
    return rawhttp.read_reply(sock).status


async def test_connections_are_capped_in_all(glance: FakeGlance, tmp_path: Path) -> None:
    """Ten addresses, each under its own cap of 20, may not hold more than 30 in all."""
    proc = await _daemon(
        glance, tmp_path, {"max_connections_per_address": 20, "max_connections": 30}
    )
    held: list[socket.socket] = []
    try:
        for i in range(30):
            held.append(await asyncio.to_thread(_connect_from, proc.url, f"127.0.0.{2 + i % 10}"))

        def refused_from(source: str) -> bool:
            with _connect_from(proc.url, source) as sock:
                return _refused(sock)

        # Each address holds 3 of its 20: refused for the total (was: admitted, up to 200).
        assert await asyncio.to_thread(refused_from, "127.0.0.12")
        assert "too many open in all (max_connections)" in proc.output()
        held.pop().close()

        def versions_until_admitted() -> int:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                raw = b"GET /versions HTTP/1.1\r\nHost: cached\r\nConnection: close\r\n\r\n"
                reply = rawhttp.request(proc.url, raw)
                if reply.status != 503:
                    return reply.status
                time.sleep(0.05)
            raise AssertionError("a freed connection was never reused")

        assert await asyncio.to_thread(versions_until_admitted) == 200
    finally:
        for sock in held:
            sock.close()
        await asyncio.to_thread(proc.stop)


async def test_behind_a_trusted_proxy(glance: FakeGlance, tmp_path: Path) -> None:
    """127.0.0.2 plays the controllers' HAProxy: its connections are not held to the
    per-address cap, and each request counts as the client its X-Forwarded-For names.
    127.0.0.1, not trusted, is capped as before and its X-Forwarded-For is not believed."""
    proc = await _daemon(
        glance,
        tmp_path,
        {
            "trusted_proxies": ["127.0.0.2"],
            "max_connections_per_address": 3,
            "max_upstream_requests_per_client": 1,
            "client_body_buffer_size": 1024,
        },
    )
    held: list[socket.socket] = []
    try:
        for _ in range(6):  # twice the per-address cap, through the "load balancer"
            sock = await asyncio.to_thread(_connect_from, proc.url, "127.0.0.2")
            held.append(sock)
            assert await asyncio.to_thread(_versions, sock) == 200  # admitted
        for _ in range(3):
            held.append(await asyncio.to_thread(_connect_from, proc.url, "127.0.0.1"))
        extra = await asyncio.to_thread(_connect_from, proc.url, "127.0.0.1")
        assert await asyncio.to_thread(_refused, extra)  # an untrusted address: capped
        extra.close()
        for sock in held[6:]:
            sock.close()
        del held[6:]

        # Compute node 10.0.0.7 has an upload at the upstream through the balancer.
        image = glance.add_image(None, status="queued")
        upload = held[0]
        upload.sendall(
            f"PUT /v2/images/{image.id}/file HTTP/1.1\r\nHost: cached\r\n"
            "X-Auth-Token: token-p1\r\nX-Forwarded-For: 10.0.0.7\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {MiB}\r\n\r\n".encode()
            + b"x" * 4096
        )
        deadline = time.monotonic() + 20
        while not [r for r in glance.requests if r.method == "PUT"]:
            assert time.monotonic() < deadline, "the upload never reached the upstream"
            await asyncio.sleep(0.02)

        def list_images(sock: socket.socket, forwarded: str) -> int:
            sock.sendall(
                "GET /v2/images HTTP/1.1\r\nHost: cached\r\nX-Auth-Token: token-p1\r\n"
                f"X-Forwarded-For: {forwarded}\r\n\r\n".encode()
            )
            return rawhttp.read_reply(sock).status

        # The same node again (its one upstream request is taken): 503; another node: 200.
        assert await asyncio.to_thread(list_images, held[1], "10.0.0.7") == 503
        assert await asyncio.to_thread(list_images, held[2], "10.0.0.8") == 200
        # A spoofed hop left of the balancer's own entry changes nothing.
        assert await asyncio.to_thread(list_images, held[3], "10.0.0.99, 10.0.0.7") == 503
        # From an untrusted peer the header is the client's own claim: ignored.
        with _connect_from(proc.url, "127.0.0.1") as direct:
            assert await asyncio.to_thread(list_images, direct, "10.0.0.7") == 200
    finally:
        for sock in held:
            sock.close()
        await asyncio.to_thread(proc.stop)


def test_ipv6_clients_are_counted_by_their_prefix() -> None:
    guard = ConnectionGuard(Limits(max_per_address=2, max_connections=0))
    keys = []
    for address in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9"):  # one /64, two addresses
        key, refused = guard.admit(address)
        assert refused is None
        keys.append(key)
    assert keys == ["2001:db8:1:2::/64"] * 2
    assert guard.admit("2001:db8:1:2:abcd::1") == (None, Refusal.FROM_THERE)
    assert guard.admit("2001:db8:1:3::1")[1] is None  # the next /64 is another client
    guard.release(keys[0])
    assert guard.admit("2001:db8:1:2::77") == ("2001:db8:1:2::/64", None)

    exact = Clients(ipv6_prefix=128)
    assert exact.key("2001:db8::1") == "2001:db8::1"
    assert Clients().key("::ffff:10.1.2.3") == "10.1.2.3"  # IPv4-mapped: the IPv4 address
    assert Clients(ipv6_prefix=48).key("2001:db8:1:2::1") == "2001:db8:1::/48"
    assert Clients().key(None) is None  # a Unix-socket caller


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("10.0.0.5", "192.0.2.1", "192.0.2.1"),
        ("10.0.0.5", "198.51.100.9, 192.0.2.1", "192.0.2.1"),  # the rightmost untrusted
        ("10.0.0.5", "192.0.2.1, 10.0.0.6", "192.0.2.1"),  # a chain of trusted proxies
        ("10.0.0.5", "192.0.2.1, not-an-address", "10.0.0.5"),  # garbage: the proxy itself
        ("10.0.0.5", None, "10.0.0.5"),
        ("192.0.2.50", "192.0.2.1", "192.0.2.50"),  # not a trusted peer: header ignored
    ],
)
def test_the_client_behind_trusted_proxies(peer: str, forwarded: str | None, client: str) -> None:
    clients = Clients(trusted=parse_networks(["10.0.0.0/24"]))
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    request = make_mocked_request("GET", "/v2/images", headers=headers)
    request = request.clone(remote=peer)
    assert clients.address_of(request) == client


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("trusted_proxies", "10.0.0.1", "must be a list"),
        ("trusted_proxies", ["10.0.0.300"], "not an address or network: '10.0.0.300'"),
        ("client_ipv6_prefix", 0, "from 1 to 128"),
        ("client_ipv6_prefix", 129, "from 1 to 128"),
        ("max_connections", -1, "whole number >= 0"),
    ],
)
def test_bad_client_options_are_refused(option: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=f"x.yaml: option '{option}': .*{message}"):
        configuration.build({option: value}, "x.yaml")
