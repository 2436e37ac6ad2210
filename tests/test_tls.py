"""TLS end to end with a real local CA made in the test (trustme): the listener (hit, miss,
wrong host, expired, unknown CA, a certificate rotated on SIGHUP while a download runs), the
upstream and Keystone (verification on by default, with a CA bundle or the system store;
``upstream_insecure`` only where its opt-out is the thing tested), and the management
listener's client certificates."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import signal
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import rawhttp
import trustme
from conftest import TOKENS, auth, start_daemon, stop_daemon, wait_complete
from cryptography import x509
from daemonproc import CachedProcess, run_cached
from fakeglance import FakeGlance
from fakekeystone import FakeKeystone
from scrapes import measure

MiB = 1 << 20
PAST = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


def write_pair(leaf: trustme.LeafCert, directory: Path, name: str = "server") -> tuple[str, str]:
    """The certificate chain and key of ``leaf`` as PEM files; their paths."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return str(cert), str(key)


def write_ca(ca: trustme.CA, directory: Path, name: str = "ca") -> str:
    path = directory / f"{name}.pem"
    path.write_bytes(ca.cert_pem.bytes())
    return str(path)


def serial(leaf: trustme.LeafCert) -> int:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number


async def served_serial(url: str, context: ssl.SSLContext) -> int:
    """The serial number of the certificate a new TLS connection to ``url`` is shown."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    _, writer = await asyncio.open_connection(parts.hostname, parts.port, ssl=context)
    try:
        return int(writer.get_extra_info("peercert")["serialNumber"], 16)
    finally:
        writer.close()
        await writer.wait_closed()


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client context that trusts ``ca`` only (verification on, host names checked)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def tls_glance(ca: trustme.CA) -> AsyncIterator[FakeGlance]:
    """The fake Glance over HTTPS with a certificate for 127.0.0.1 from ``ca``."""
    fake = FakeGlance()
    for token, (project, roles) in TOKENS.items():
        fake.add_token(token, project, roles)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    await fake.start(ssl_context=context)
    yield fake
    await fake.close()


async def download(url: str, context: ssl.SSLContext, token: str = "token-p1") -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=auth(token), ssl=context) as resp,
    ):
        assert resp.status == 200, await resp.text()
        return await resp.read()


# ---------------------------------------------------------------------------- listener
async def test_listener_serves_misses_and_hits_over_tls(
    glance: FakeGlance, ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path)
    d = await start_daemon(tmp_path, glance.url, tls_cert_file=cert, tls_key_file=key)
    try:
        assert d.url.startswith("https://127.0.0.1:")
        data = os.urandom(3 * MiB + 7)
        image = glance.add_image(data)
        assert await download(d.file_url(image.id), trusting(ca)) == data  # miss
        await wait_complete(d, image.id)
        assert await download(d.file_url(image.id), trusting(ca)) == data  # hit, no sendfile
    finally:
        await stop_daemon(d)


def plain_request(url: str, request: bytes) -> rawhttp.Reply:
    """``request`` sent in the clear to ``url``'s port; the reply (blocking)."""
    with rawhttp.connect(url) as sock:
        sock.sendall(request)
        return rawhttp.read_reply(sock)


async def test_plain_http_to_a_tls_port_is_answered_400_as_nginx_does(
    glance: FakeGlance, ca: trustme.CA, tmp_path: Path
) -> None:
    """Issue 19 item 20: plain HTTP sent to a TLS listener (public or management) gets a
    400 naming the mistake, then the connection closes; before, it was closed without a
    word (the TLS layer refused the first bytes). TLS on the same ports goes on working."""
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path)
    d = await start_daemon(
        tmp_path,
        glance.url,
        tls_cert_file=cert,
        tls_key_file=key,
        admin_listen="127.0.0.1:0",
    )
    try:
        image = glance.add_image(os.urandom(100_000))
        host = urllib.parse.urlsplit(d.url).netloc
        request = f"GET /v2/images/{image.id}/file HTTP/1.1\r\nHost: {host}\r\n\r\n"
        for url in (d.url, d.admin_url):
            assert url.startswith("https://")
            reply = await asyncio.to_thread(plain_request, url, request.encode())
            assert reply.status == 400
            assert reply.headers["connection"] == "close"
            assert b"The plain HTTP request was sent to HTTPS port" in reply.body
        assert glance.data_requests(image.id) == []  # never got as far as a request
        # a connection that goes before its first byte, then TLS as before
        await asyncio.to_thread(lambda: rawhttp.connect(d.url).close())
        assert len(await download(d.file_url(image.id), trusting(ca))) == 100_000
    finally:
        await stop_daemon(d)


async def test_a_tls_hit_counts_its_bytes_once(
    glance: FakeGlance, ca: trustme.CA, tmp_path: Path
) -> None:
    """Over TLS a hit is read in pieces and written through the response (no sendfile): the
    response writer counts those bytes already. Before, each piece was also counted as sent
    by sendfile: metrics and the access log said twice the image size."""
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path)
    d = await start_daemon(tmp_path, glance.url, tls_cert_file=cert, tls_key_file=key)
    try:
        data = os.urandom(3 * MiB + 7)
        image = glance.add_image(data)
        assert await download(d.file_url(image.id), trusting(ca)) == data  # miss
        await wait_complete(d, image.id)

        async def hit() -> None:
            assert await download(d.file_url(image.id), trusting(ca)) == data

        delta = await measure(d, hit)
        assert delta("cached_requests_total", outcome="hit") == 1
        assert delta("cached_served_bytes_total", outcome="hit") == len(data)
    finally:
        await stop_daemon(d)


@pytest.mark.parametrize("problem", ["wrong host", "expired", "unknown CA"])
async def test_clients_refuse_a_bad_listener_certificate(
    glance: FakeGlance, ca: trustme.CA, tmp_path: Path, problem: str
) -> None:
    leaf = {
        "wrong host": lambda: ca.issue_cert("glance.example"),
        "expired": lambda: ca.issue_cert("127.0.0.1", not_before=PAST, not_after=PAST),
        "unknown CA": lambda: trustme.CA().issue_cert("127.0.0.1"),
    }[problem]()
    cert, key = write_pair(leaf, tmp_path)
    d = await start_daemon(tmp_path, glance.url, tls_cert_file=cert, tls_key_file=key)
    try:
        image = glance.add_image(os.urandom(1000))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await download(d.file_url(image.id), trusting(ca))
        assert glance.data_requests(image.id) == []  # nothing was asked for them
    finally:
        await stop_daemon(d)


async def test_a_key_that_does_not_match_is_a_clear_start_error(
    ca: trustme.CA, tmp_path: Path
) -> None:
    cert, _ = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "a")
    _, other_key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path, "b")
    conf = tmp_path / "cached.yaml"
    conf.write_text(f"tls_cert_file: {cert}\ntls_key_file: {other_key}\n")
    res = run_cached(
        "serve", "-c", str(conf), "--upstream", "http://127.0.0.1:9", "--cache-dir", str(tmp_path)
    )
    assert res.returncode == 2
    assert res.stderr.startswith(
        f"cached: configuration error: option 'tls_cert_file'/'tls_key_file': cannot load {cert}"
    )


async def test_certificate_rotated_on_sighup_without_cutting_a_running_download(
    glance: FakeGlance, ca: trustme.CA, tmp_path: Path
) -> None:
    old, new = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    cert, key = write_pair(old, tmp_path)
    conf = tmp_path / "cached.yaml"
    conf.write_text(f"tls_cert_file: {cert}\ntls_key_file: {key}\n")
    (tmp_path / "cache").mkdir()
    proc = CachedProcess(glance.url, tmp_path / "cache", tmp_path / "log", "-c", str(conf))
    url = await asyncio.to_thread(proc.start)
    data = os.urandom(4 * MiB)
    image = glance.add_image(data, rate=64 << 10)  # held slow until the rotation is done
    context = trusting(ca)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"{url}/v2/images/{image.id}/file", headers=auth(), ssl=context
            ) as running:
                assert running.status == 200
                first = await running.content.readexactly(64 << 10)
                assert running.connection is not None and running.connection.transport
                peer = running.connection.transport.get_extra_info("peercert")
                assert int(peer["serialNumber"], 16) == serial(old)

                write_pair(new, tmp_path)
                proc.signal(signal.SIGHUP)
                for _ in range(500):
                    if "reloaded the TLS certificate" in proc.output():
                        break
                    await asyncio.sleep(0.02)
                else:
                    raise AssertionError(f"no reload logged:\n{proc.output()}")

                assert await served_serial(url, context) == serial(new)  # a new connection

                image.rate = None  # let the running download finish
                rest = await running.read()
                assert first + rest == data
    finally:
        await asyncio.to_thread(proc.stop)


async def test_a_bad_certificate_on_sighup_keeps_the_running_one(
    glance: FakeGlance, ca: trustme.CA, tmp_path: Path
) -> None:
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = write_pair(leaf, tmp_path)
    conf = tmp_path / "cached.yaml"
    conf.write_text(f"tls_cert_file: {cert}\ntls_key_file: {key}\n")
    (tmp_path / "cache").mkdir()
    proc = CachedProcess(glance.url, tmp_path / "cache", tmp_path / "log", "-c", str(conf))
    url = await asyncio.to_thread(proc.start)
    try:
        await asyncio.to_thread(Path(cert).write_text, "not a certificate\n")
        proc.signal(signal.SIGHUP)
        for _ in range(500):
            if "certificate not reloaded" in proc.output():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"no reload error logged:\n{proc.output()}")
        assert await served_serial(url, trusting(ca)) == serial(leaf)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{url}/versions", ssl=trusting(ca)) as resp,
        ):
            assert resp.status == 200
        assert proc.proc is not None and proc.proc.poll() is None
    finally:
        await asyncio.to_thread(proc.stop)


# ---------------------------------------------------------------------------- upstream
async def test_upstream_over_tls_verified_with_a_ca_bundle(
    tls_glance: FakeGlance, ca: trustme.CA, tmp_path: Path
) -> None:
    assert tls_glance.url.startswith("https://")
    d = await start_daemon(tmp_path, tls_glance.url, upstream_ca_file=write_ca(ca, tmp_path))
    try:
        data = os.urandom(2 * MiB)
        image = tls_glance.add_image(data)
        status, _, body = await d.get(image.id)
        assert (status, body == data) == (200, True)
        async with d.session.get(f"{d.url}/v2/images/{image.id}", headers=auth()) as resp:
            assert resp.status == 200  # passed through over TLS as well
        async with d.session.get(f"{d.url}/versions") as resp:
            assert resp.status in (200, 300)  # the version document is fetched over TLS
    finally:
        await stop_daemon(d)


@pytest.mark.parametrize("problem", ["wrong host", "expired", "unknown CA"])
async def test_upstream_with_a_bad_certificate_is_refused(
    ca: trustme.CA, tmp_path: Path, problem: str
) -> None:
    leaf = {
        "wrong host": lambda: ca.issue_cert("glance.example"),
        "expired": lambda: ca.issue_cert("127.0.0.1", not_before=PAST, not_after=PAST),
        "unknown CA": lambda: trustme.CA().issue_cert("127.0.0.1"),
    }[problem]()
    fake = FakeGlance()
    fake.add_token("token-p1", "p1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    await fake.start(ssl_context=context)
    image = fake.add_image(os.urandom(1000))
    d = await start_daemon(tmp_path, fake.url, upstream_ca_file=write_ca(ca, tmp_path))
    try:
        status, _, body = await d.get(image.id)
        assert status in (502, 503), body
        assert fake.requests == []  # no request got through the handshake
        assert not (tmp_path / image.id).exists()
    finally:
        await stop_daemon(d)
        await fake.close()


async def test_the_system_store_is_the_default_and_does_not_know_a_private_ca(
    tls_glance: FakeGlance, tmp_path: Path
) -> None:
    d = await start_daemon(tmp_path, tls_glance.url)
    try:
        image = tls_glance.add_image(os.urandom(1000))
        assert (await d.get(image.id))[0] in (502, 503)
        assert tls_glance.requests == []
    finally:
        await stop_daemon(d)


async def test_upstream_insecure_is_explicit_and_logged_at_start(
    tls_glance: FakeGlance, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cached.tls"):
        d = await start_daemon(tmp_path, tls_glance.url, upstream_insecure=True)
    try:
        assert any(
            "NOT verified" in r.message and r.levelno == logging.WARNING for r in caplog.records
        )
        data = os.urandom(1000)
        image = tls_glance.add_image(data)
        assert (await d.get(image.id))[:3:2] == (200, data)  # verification off: it passes
    finally:
        await stop_daemon(d)


# ---------------------------------------------------------------------------- Keystone
@pytest.mark.parametrize("with_bundle", [True, False])
async def test_keystone_over_tls(
    glance: FakeGlance, ca: trustme.CA, tmp_path: Path, with_bundle: bool
) -> None:
    ks = FakeKeystone()
    ks.add_token("ks-admin", "admin", ["admin", "member"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    await ks.start(ssl_context=context)
    assert ks.url.startswith("https://")
    options: dict[str, object] = {
        "keystone_url": ks.url + "/v3",
        "keystone_username": "glance",
        "keystone_password": "glance-secret",
        "keystone_project_name": "service",
    }
    if with_bundle:
        options["keystone_ca_file"] = write_ca(ca, tmp_path)
    d = await start_daemon(tmp_path, glance.url, **options)
    try:
        async with d.session.get(f"{d.url}/v2/cache", headers=auth("ks-admin")) as resp:
            # Verified: the admin's token is checked; unverifiable: Keystone unavailable.
            assert resp.status == (200 if with_bundle else 503)
    finally:
        await stop_daemon(d)
        await ks.close()


# ---------------------------------------------------------------- management listener
async def test_management_listener_requires_a_client_certificate(
    glance: FakeGlance, ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = write_pair(ca.issue_cert("127.0.0.1"), tmp_path)
    clients = trustme.CA()
    d = await start_daemon(
        tmp_path,
        glance.url,
        tls_cert_file=cert,
        tls_key_file=key,
        admin_listen="127.0.0.1:0",
        admin_tls_client_ca=write_ca(clients, tmp_path, "clients"),
    )
    try:
        assert d.admin_url.startswith("https://127.0.0.1:")
        anonymous = trusting(ca)
        with pytest.raises(aiohttp.ClientError):
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{d.admin_url}/v2/cache", ssl=anonymous) as resp,
            ):
                await resp.read()
        stranger = trusting(ca)
        trustme.CA().issue_cert("operator").configure_cert(stranger)
        with pytest.raises(aiohttp.ClientError):
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"{d.admin_url}/v2/cache", ssl=stranger) as resp,
            ):
                await resp.read()
        operator = trusting(ca)
        clients.issue_cert("operator").configure_cert(operator)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{d.admin_url}/v2/cache", ssl=operator) as resp,
        ):
            assert resp.status == 200  # no token: the certificate is the credential
        async with d.session.get(f"{d.url}/v2/cache", ssl=anonymous) as resp:
            assert resp.status == 403  # the public listener: loopback is not a credential
    finally:
        await stop_daemon(d)
