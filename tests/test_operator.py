"""The operator's path (issue 19): management addresses, ``check-config`` against what
``serve`` refuses, and the tools finding the daemon. Real daemon subprocesses in front of a
fake Glance on loopback; nothing outside the test's temporary directories."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import Daemon, start_daemon, stop_daemon, wait_complete
from daemonproc import CachedProcess, cached_command, run_cached
from fakeglance import FakeGlance
from test_ops import NotifySocket

ADMIN_RE = re.compile(r"management API on (\S+)")
DASHBOARD = Path(__file__).resolve().parent.parent / "conf" / "grafana-dashboard.json"


@pytest.fixture
def procs() -> Iterator[list[CachedProcess]]:
    made: list[CachedProcess] = []
    yield made
    for proc in made:
        proc.kill()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cached-op-"))  # short: sun_path is 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def manage(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cached.ctl", *argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


async def get(url: str, path: str, unix: str = "") -> tuple[int, str]:
    connector = aiohttp.UnixConnector(unix) if unix else None
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get((url if not unix else "http://localhost") + path) as resp,
    ):
        return resp.status, await resp.text()


async def test_a_socket_for_the_tools_and_tcp_for_prometheus(
    glance: FakeGlance, tmp_path: Path, socket_dir: Path, procs: list[CachedProcess]
) -> None:
    """Item 2: admin_listen takes several addresses. The socket serves cached-manage (no
    host, no token: the configuration file names it), the TCP address serves /metrics."""
    sock = socket_dir / "admin.sock"
    conf = tmp_path / "cached.yaml"
    conf.write_text(f'admin_listen: ["unix:{sock}", "127.0.0.1:0"]\n')
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = CachedProcess(glance.url, cache, tmp_path / "cached.log", "-c", str(conf))
    procs.append(proc)
    public = await asyncio.to_thread(proc.start)
    managers = ADMIN_RE.findall(proc.output())
    assert managers[0] == f"unix:{sock}" and len(managers) == 2
    tcp = managers[1]
    assert tcp.startswith("http://127.0.0.1:")

    status, body = await get(tcp, "/metrics")
    assert status == 200 and "\ncached_cache_max_bytes " in body
    assert (await get("", "/metrics", unix=str(sock)))[0] == 200
    assert (await get(public, "/metrics"))[0] == 404  # not on the image API port

    res = await asyncio.to_thread(manage, "-c", str(conf), "list-cached")
    assert (res.returncode, res.stdout, res.stderr) == (0, "No cached images.\n", "")
    res = await asyncio.to_thread(manage, "-H", tcp, "list-queued")
    assert (res.returncode, res.stdout, res.stderr) == (0, "No queued images.\n", "")
    assert await asyncio.to_thread(proc.stop) == 0
    assert not sock.exists()  # removed at a clean stop


def test_several_management_addresses_are_checked_each(tmp_path: Path) -> None:
    """A routable TCP management address among several still needs authentication; the same
    address twice is an error naming it."""
    conf = tmp_path / "cached.yaml"
    conf.write_text(f'admin_listen: ["unix:{tmp_path}/a.sock", "0.0.0.0:9293"]\n')
    res = run_cached("check-config", "-c", str(conf))
    assert res.returncode == 2
    assert "option 'admin_listen': 0.0.0.0:9293 is reachable from other hosts" in res.stderr
    conf.write_text('admin_listen: "127.0.0.1:9293, 127.0.0.1:9293"\n')
    res = run_cached("check-config", "-c", str(conf))
    assert res.returncode == 2 and "127.0.0.1:9293 is listed twice" in res.stderr


def _config(path: Path, **options: object) -> Path:
    conf = path / "cached.yaml"
    conf.write_text("".join(f"{key}: {value}\n" for key, value in options.items()))
    return conf


@pytest.mark.parametrize(
    "case", ["no-parent", "tls-files", "keystone-ca", "socket-dir", "read-only"]
)
def test_check_config_refuses_what_serve_refuses(tmp_path: Path, case: str) -> None:
    """Item 5: check-config runs serve's checks short of binding: same refusal, same exit."""
    options: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "upstream": "http://127.0.0.1:9",
        "image_cache_dir": str(tmp_path / "cache"),
    }
    expected = ""
    wrap: list[str] = []
    if case == "no-parent":
        options["image_cache_dir"] = str(tmp_path / "missing" / "cache")
        expected = f"option 'image_cache_dir': {tmp_path / 'missing'} does not exist"
    elif case == "tls-files":
        options["tls_cert_file"] = str(tmp_path / "cert.pem")
        options["tls_key_file"] = str(tmp_path / "key.pem")
        expected = "tls_cert_file"
    elif case == "keystone-ca":  # keystoneauth1 reads it by path: checked at start
        options["keystone_authtoken"] = "{cafile: %s}" % (tmp_path / "keystone-ca.pem")
        expected = f"option 'keystone_authtoken.cafile': cannot load {tmp_path / 'keystone-ca.pem'}"
    elif case == "socket-dir":
        options["admin_listen"] = f"unix:{tmp_path / 'run' / 'admin.sock'}"
        expected = f"option 'admin_listen': directory {tmp_path / 'run'} does not exist"
    else:  # a read-only filesystem stops root too
        if os.geteuid() != 0:
            pytest.skip("a read-only mount needs root (CI runs as root)")
        (tmp_path / "cache").mkdir()
        cache = tmp_path / "cache"
        mount = f'mount -t tmpfs -o ro tmpfs {cache} && exec "$@"'
        wrap = ["unshare", "-m", "sh", "-c", mount, "-"]
        expected = f"option 'image_cache_dir': {cache}: cannot write there: Read-only file system"
    conf = _config(tmp_path, **options)
    results = {}
    for command in ("check-config", "serve"):
        res = subprocess.run(
            [*wrap, *cached_command(), command, "-c", str(conf)],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, check=False,
        )  # fmt: skip
        results[command] = (res.returncode, res.stderr)
        if command == "check-config":  # it creates nothing (serve may create the cache dir)
            assert (tmp_path / "cache").exists() == (case == "read-only")
    assert results["serve"][0] == 2 and expected in results["serve"][1], results
    status, said = results["check-config"]
    assert status == 2 and said.startswith("cached: configuration error: ")
    assert said.strip() in results["serve"][1].splitlines()  # serve logged more before it


def test_check_config_creates_nothing_and_checks_as_the_service_user(tmp_path: Path) -> None:
    """A good file passes without the cache directory being created (serve creates it);
    ``--user`` runs the checks as that user: a directory only root can write is refused."""
    conf = _config(tmp_path, upstream="http://127.0.0.1:9", image_cache_dir=tmp_path / "cache")
    res = run_cached("check-config", "-c", str(conf))
    assert res.returncode == 0, res.stderr
    assert "image_cache_dir: " + str(tmp_path / "cache") in res.stdout
    assert not (tmp_path / "cache").exists()
    if os.geteuid() != 0:
        pytest.skip("--user needs root")
    # A directory the service user may read (pytest's own are root's, mode 0700).
    shared = Path(tempfile.mkdtemp(prefix="cached-user-"))
    try:
        shared.chmod(0o755)
        (shared / "cache").mkdir(mode=0o755)  # root's: nobody may not write there
        conf = _config(shared, upstream="http://127.0.0.1:9", image_cache_dir=shared / "cache")
        conf.chmod(0o644)
        assert run_cached("check-config", "-c", str(conf)).returncode == 0  # root may
        res = run_cached("check-config", "--user", "nobody", "-c", str(conf))
        assert res.returncode == 2
        assert f"{shared / 'cache'}: cannot write there: Permission denied" in res.stderr
        conf.chmod(0o600)  # the service user cannot even read the file
        res = run_cached("check-config", "--user", "nobody", "-c", str(conf))
        assert (res.returncode, res.stderr) == (
            2, f"cached: configuration error: {conf}: cannot read: Permission denied\n"
        )  # fmt: skip
        res = run_cached("check-config", "--user", "no-such-user-here", "-c", str(conf))
        assert (res.returncode, res.stderr) == (2, "cached: --user: no user 'no-such-user-here'\n")
    finally:
        shutil.rmtree(shared)


async def test_versions_during_an_upstream_outage(glance: FakeGlance, tmp_path: Path) -> None:
    """Item 7: glanceclient asks GET /versions before every cache command. While Glance is
    unreachable cached answers the last document it had (links to itself, the cache API
    advertised), or its own, instead of a 502; the cache API itself stays up."""
    cache = tmp_path / "cache"
    cache.mkdir()
    d = await start_daemon(cache, glance.url)
    try:
        async with d.session.get(f"{d.url}/versions") as resp:
            assert resp.status == 200
            before = await resp.json()
        await glance.close()  # the outage
        for path, status in (("/versions", 200), ("/", 300)):
            async with d.session.get(f"{d.url}{path}") as resp:
                assert resp.status == status
                doc = await resp.json()
            assert [v["id"] for v in doc["versions"]] == [v["id"] for v in before["versions"]]
            assert {"v2.14", "v2.18"} <= {v["id"] for v in doc["versions"]}
            hrefs = {link["href"] for v in doc["versions"] for link in v["links"]}
            assert hrefs == {f"{d.url}/v2/"}
        session = d.admin_session
        assert session is not None
        async with session.get(f"{d.admin_base}/versions") as resp:
            assert resp.status == 200
        async with session.get(f"{d.admin_base}/v2/cache") as resp:
            assert resp.status == 200  # what glance cache-list calls next
    finally:
        await stop_daemon(d)


async def test_versions_before_any_answer_from_the_upstream(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    d = await start_daemon(cache, dead)
    try:
        async with d.session.get(f"{d.url}/versions") as resp:
            assert resp.status == 200
            assert resp.headers["Cache-Status"] == "cached; hit; detail=upstream-unavailable"
            doc = await resp.json()
        current = [v["id"] for v in doc["versions"] if v["status"] == "CURRENT"]
        assert current == ["v2.18"]
    finally:
        await stop_daemon(d)


def test_an_upstream_url_naming_an_api_version_is_refused(tmp_path: Path) -> None:
    """Item 8: ``upstream: http://glance:9292/v2`` made every request a 404 (paths already
    start with /v2) while /readyz said ready; it is a configuration error naming the root."""
    res = run_cached("check-config", "--upstream", "http://127.0.0.1:9/v2", "--cache-dir",
                     str(tmp_path / "cache"))  # fmt: skip
    assert res.returncode == 2
    assert "must be the image API's root URL" in res.stderr
    assert "use 'http://127.0.0.1:9'" in res.stderr


async def test_an_upstream_that_is_not_the_image_api_is_not_ready(
    glance: FakeGlance, tmp_path: Path, procs: list[CachedProcess]
) -> None:
    """A path prefix that is not the API's root: said at start and in /readyz (503), though
    the host answers. The same daemon at the root is ready."""
    cache = tmp_path / "cache"
    cache.mkdir()
    conf = tmp_path / "cached.yaml"
    conf.write_text(f"admin_tokens: ['sha256:{hashlib.sha256(b'op-token').hexdigest()}']\n")
    proc = CachedProcess(
        glance.url + "/not-glance", cache, tmp_path / "cached.log", "-c", str(conf)
    )
    procs.append(proc)
    url = await asyncio.to_thread(proc.start)
    status, body = await get(url, "/readyz")
    assert (status, json.loads(body)) == (503, {"status": "not ready"})  # item 13: no details
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/readyz", headers={"X-Auth-Token": "op-token"}) as resp,
    ):
        assert resp.status == 503
        detail = await resp.json()  # an operator's token: the reason
    assert "without the image API's version document" in detail["checks"]["upstream"], detail
    assert glance.url not in json.dumps(detail)  # the path only, never the address
    deadline = asyncio.get_running_loop().time() + 20
    while "/readyz says not ready until it answers as the image API" not in proc.output():
        assert asyncio.get_running_loop().time() < deadline, proc.output()
        await asyncio.sleep(0.05)
    assert await asyncio.to_thread(proc.stop) == 0
    good = CachedProcess(glance.url, cache, tmp_path / "cached-2.log")
    procs.append(good)
    url = await asyncio.to_thread(good.start)
    status, body = await get(url, "/readyz")
    assert status == 200, body


async def test_watchdog_pings_about_every_half_of_watchdogsec(
    glance: FakeGlance, tmp_path: Path, procs: list[CachedProcess]
) -> None:
    """Item 15: sd_watchdog_enabled(3) advises a ping about every half of the timeout; cached
    pinged every 0.5 s whatever WatchdogSec was. With 2 s, consecutive pings are at least
    ~0.75 s apart (half, less half a tick of the loop that sends them), and keep coming.
    (A lower bound only: the daemon cannot ping earlier than its rule, however loaded the
    machine is.)"""
    notify = NotifySocket()
    try:
        cache = tmp_path / "cache"
        cache.mkdir()
        env = {**notify.env, "WATCHDOG_USEC": "2000000"}
        proc = CachedProcess(glance.url, cache, tmp_path / "cached.log", env=env)
        procs.append(proc)
        await asyncio.to_thread(proc.start)
        pings: list[float] = []
        while len(pings) < 4:
            await asyncio.to_thread(notify.wait_for, "WATCHDOG", 20.0)
            pings.append(time.monotonic())
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert min(gaps) >= 0.75, gaps
        assert await asyncio.to_thread(proc.stop) == 0
    finally:
        notify.close()


def _series(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        head, _, number = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if labels else name):
            return float(number)
    raise AssertionError(f"{name}{labels} not scraped")


async def test_process_reload_and_directory_series(
    glance: FakeGlance, tmp_path: Path, procs: list[CachedProcess]
) -> None:
    """Item 14: process_* series (open descriptors against LimitNOFILE), the last reload's
    outcome and time as Prometheus has them for itself, the cache directory's state."""
    cache = tmp_path / "cache"
    cache.mkdir()
    conf = tmp_path / "cached.yaml"
    conf.write_text("image_cache_max_size: 1G\n")
    proc = CachedProcess(glance.url, cache, tmp_path / "cached.log", "-c", str(conf))
    procs.append(proc)
    url = await asyncio.to_thread(proc.start)
    text = (await get(url, "/metrics"))[1]
    assert _series(text, "process_open_fds") > 0
    assert _series(text, "process_max_fds") > 0
    assert _series(text, "cached_config_last_reload_successful") == 1
    started = _series(text, "cached_config_last_reload_success_timestamp_seconds")
    assert _series(text, "cached_directory_state", directory=str(cache), state="ok") == 1
    assert _series(text, "cached_directory_state", directory=str(cache), state="hung") == 0

    async def reload() -> str:
        before = json.loads((await get(url, "/healthz"))[1])["reload"]["finished"]
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGHUP)
        deadline = asyncio.get_running_loop().time() + 20
        while json.loads((await get(url, "/healthz"))[1])["reload"]["finished"] == before:
            assert asyncio.get_running_loop().time() < deadline, "the reload never finished"
            await asyncio.sleep(0.05)
        return (await get(url, "/metrics"))[1]

    conf.write_text("image_cache_max_size: lots\n")
    text = await reload()
    assert _series(text, "cached_config_last_reload_successful") == 0
    assert _series(text, "cached_config_last_reload_success_timestamp_seconds") == started
    conf.write_text("image_cache_max_size: 2G\n")
    text = await reload()
    assert _series(text, "cached_config_last_reload_successful") == 1
    assert _series(text, "cached_config_last_reload_success_timestamp_seconds") > started
    conf.write_text("image_cache_max_size: 2G\nmax_header_size: 32K\n")  # needs a restart
    text = await reload()
    assert _series(text, "cached_config_last_reload_successful") == 0
    assert await asyncio.to_thread(proc.stop) == 0


async def test_the_management_socket_can_belong_to_an_operator_group(
    glance: FakeGlance, tmp_path: Path, socket_dir: Path, procs: list[CachedProcess]
) -> None:
    """Item 17: admin_socket_group makes the socket 0660 and that group's, so operators
    other than root and the service user can manage; an unknown group is refused by
    check-config and serve alike."""
    if os.geteuid() != 0:
        pytest.skip("chown to another group needs root (CI runs as root)")
    import grp

    group = grp.getgrgid(65534).gr_name  # nogroup (Debian), nobody elsewhere
    sock = socket_dir / "admin.sock"
    conf = tmp_path / "cached.yaml"
    conf.write_text(f"admin_listen: unix:{sock}\nadmin_socket_group: {group}\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = CachedProcess(glance.url, cache, tmp_path / "cached.log", "-c", str(conf))
    procs.append(proc)
    await asyncio.to_thread(proc.start)
    st = sock.stat()
    assert (st.st_mode & 0o777, st.st_gid) == (0o660, 65534)
    assert await asyncio.to_thread(proc.stop) == 0
    conf.write_text(f"admin_listen: unix:{sock}\nadmin_socket_group: no-such-group-here\n")
    for command in ("check-config", "serve"):
        res = run_cached(command, "-c", str(conf), "--cache-dir", str(cache), "--upstream",
                         glance.url, "--listen", "127.0.0.1:0")  # fmt: skip
        assert res.returncode == 2, (command, res.stderr)
        assert "option 'admin_socket_group': no group 'no-such-group-here'" in res.stderr


async def test_a_cache_that_can_never_fill_says_so(
    glance: FakeGlance, tmp_path: Path, procs: list[CachedProcess]
) -> None:
    """Item 9: min_free_space above the free space: every download passes through, and the
    daemon says so at start, in STATUS= and in /readyz (still ready: downloads are
    answered)."""
    notify = NotifySocket()
    try:
        cache = tmp_path / "cache"
        cache.mkdir()
        conf = tmp_path / "cached.yaml"
        digest = hashlib.sha256(b"op-token").hexdigest()
        conf.write_text(f"min_free_space: 1P\nadmin_tokens: ['sha256:{digest}']\n")
        proc = CachedProcess(
            glance.url, cache, tmp_path / "cached.log", "-c", str(conf), env=notify.env
        )
        procs.append(proc)
        url = await asyncio.to_thread(proc.start)
        said = "no image can be cached: min_free_space keeps 1.0 PiB free on"
        deadline = asyncio.get_running_loop().time() + 20
        while said not in proc.output():
            assert asyncio.get_running_loop().time() < deadline, proc.output()
            await asyncio.sleep(0.05)

        def status_says() -> None:
            while said not in notify.wait_for("STATUS", 20.0)["STATUS"]:
                pass

        await asyncio.to_thread(status_says)
        assert (await get(url, "/readyz"))[0] == 200
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{url}/readyz", headers={"X-Auth-Token": "op-token"}) as resp,
        ):
            body = await resp.json()
        assert resp.status == 200 and body["warnings"][0].startswith(said), body
        assert await asyncio.to_thread(proc.stop) == 0
    finally:
        notify.close()


async def test_every_dashboard_panel_has_one_unit_and_real_series(daemon: Daemon) -> None:
    """Item 14: the dashboard's panels each have one unit for their one axis (no seconds and
    counts on one axis), include evictions, the prefetch queue and partial bytes, and query
    only series the daemon really exposes (a misspelt name draws an empty panel)."""
    dashboard = json.loads(DASHBOARD.read_text())  # noqa: ASYNC240 (a small file, once)
    titles = " / ".join(p["title"] for p in dashboard["panels"])
    for wanted in ("Evictions", "Prefetch queue", "Partial entries' bytes", "Event-loop lag"):
        assert wanted in titles, titles
    session = daemon.admin_session
    assert session is not None
    async with session.get(f"{daemon.admin_base}/metrics") as resp:
        scrape = await resp.text()
    exposed = {
        line.split("{")[0].split(" ")[0]
        for line in scrape.splitlines()
        if line and not line.startswith("#")
    }
    for panel in dashboard["panels"]:
        assert isinstance(panel["fieldConfig"]["defaults"].get("unit"), str), panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\b((?:cached|process)_[a-z_]+)\b", target["expr"]):
                assert name in exposed, (panel["title"], name)


async def test_status_says_when_the_upstream_is_unreachable(
    tmp_path: Path, procs: list[CachedProcess]
) -> None:
    """Item 14: STATUS= (systemctl status) no longer says only "caching" while Glance is
    unreachable."""
    notify = NotifySocket()
    try:
        cache = tmp_path / "cache"
        cache.mkdir()
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        proc = CachedProcess(dead, cache, tmp_path / "cached.log", env=notify.env)
        procs.append(proc)
        await asyncio.to_thread(proc.start)

        def status_says() -> str:
            while True:
                status = notify.wait_for("STATUS", 20.0)["STATUS"]
                if "upstream unreachable" in status:
                    return status

        status = await asyncio.to_thread(status_says)
        assert status.startswith("caching; 0 images cached"), status
        assert await asyncio.to_thread(proc.stop) == 0
    finally:
        notify.close()


async def test_cacheds_own_errors_speak_json_to_json_clients(tmp_path: Path) -> None:
    """Item 12: cached's own 502 is Glance's JSON error for a client that accepts JSON (the
    text page otherwise), and says when to retry."""
    cache = tmp_path / "cache"
    cache.mkdir()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    d = await start_daemon(cache, dead)
    try:
        headers = {"X-Auth-Token": "token-p1", "Accept": "application/json"}
        async with d.session.get(f"{d.url}/v2/images", headers=headers) as resp:
            assert resp.status == 502
            assert resp.headers["Retry-After"] == "10"
            assert await resp.json() == {
                "code": "502 Bad Gateway",
                "title": "Bad Gateway",
                "message": "The image service is unreachable.<br /><br />\n\n\n",
            }
        plain = {"X-Auth-Token": "t", "Accept": "text/plain"}
        async with d.session.get(f"{d.url}/v2/images", headers=plain) as resp:
            assert resp.status == 502 and resp.headers["Retry-After"] == "10"
            assert resp.headers["Content-Type"] == "text/plain; charset=UTF-8"
        # */* (aiohttp's default): webob's HTML page, as Glance sends it
        async with d.session.get(f"{d.url}/v2/images", headers={"X-Auth-Token": "t"}) as resp:
            assert resp.status == 502 and resp.headers["Retry-After"] == "10"
            assert resp.headers["Content-Type"] == "text/html; charset=UTF-8"
    finally:
        await stop_daemon(d)


async def test_a_refused_download_comes_in_the_shape_the_client_asked_for(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Item 12: the authorisation probe carries the client's Accept (and none when it sent
    none: aiohttp's */* made Glance answer HTML to every client), so the refusal relayed is
    the one Glance gives that client; cached's own 4xx/503 answers on the public listener
    are Glance's error, in the shape asked for, with Retry-After on a 503."""
    image = glance.add_image(b"x" * 1000)  # p1's
    cache = tmp_path / "cache"
    cache.mkdir()
    d = await start_daemon(cache, glance.url)
    try:
        for accept in ("application/json", "text/plain", None):
            headers = {"X-Auth-Token": "token-p2"} | ({"Accept": accept} if accept else {})
            async with d.session.get(
                d.file_url(image.id), headers=headers, skip_auto_headers=("Accept",)
            ) as resp:
                assert resp.status == 404
            probe = glance.data_requests(image.id)[-1]
            assert probe.headers.get("accept") == accept, probe.headers
        # cached's own answers (never asked upstream): Glance's 404 for an id it cannot find,
        # the public /metrics, a versioned media type cached cannot route
        as_json = {"X-Auth-Token": "token-p1", "Accept": "application/json"}
        for url, status, message in [
            (f"{d.url}/v2/images/not-a-uuid/file", 404, "No image found with ID not-a-uuid"),
            (f"{d.url}/metrics", 404, "Metrics are served on the admin_listen address."),
        ]:
            async with d.session.get(url, headers=as_json) as resp:
                assert resp.status == status
                assert resp.headers["Content-Type"] == "application/json"
                assert await resp.json() == {
                    "message": f"{message}<br /><br />\n\n\n",
                    "code": "404 Not Found",
                    "title": "Not Found",
                }
            async with d.session.get(
                url, headers={"X-Auth-Token": "token-p1"}, skip_auto_headers=("Accept",)
            ) as resp:
                assert resp.status == status
                assert resp.headers["Content-Type"] == "text/plain; charset=UTF-8"
                assert await resp.text() == f"404 Not Found\n\n{message}\n\n   "
        # an upstream that answers 503 to the probe: relayed as it is (Glance's answer)
        glance.fail_downloads = 503
        async with d.session.get(d.file_url(image.id), headers=as_json) as resp:
            assert resp.status == 503
        glance.fail_downloads = None
    finally:
        await stop_daemon(d)


def _overwrite(path: Path, data: bytes) -> None:
    with path.open("r+b") as f:
        f.write(data)


async def test_a_stale_allowance_without_a_copy_is_a_json_503_with_retry_after(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Item 12: cached's own 503 (allowed only on a stale authorisation, but the copy fails
    its re-verification, and no transfer is made on a stale allowance) is Glance's JSON
    error for a JSON client, and says when to retry."""
    image = glance.add_image(os.urandom(3 << 20))
    cache = tmp_path / "cache"
    cache.mkdir()
    d = await start_daemon(
        cache, glance.url, auth_stale_if_error=600, auth_stale_after_failures=2, auth_cache_ttl=0
    )
    try:
        headers = {"X-Auth-Token": "token-p1", "Accept": "application/json"}
        async with d.session.get(d.file_url(image.id), headers=headers) as resp:
            assert resp.status == 200
            await resp.read()
        await wait_complete(d, image.id)
        # the copy went bad; the allowance stays
        await asyncio.to_thread(_overwrite, cache / image.id, b"\0" * 4096)
        glance.fail_downloads = 503
        async with d.session.get(d.file_url(image.id), headers=headers) as resp:
            assert resp.status == 503  # the upstream's, relayed: not known down after one
        async with d.session.get(d.file_url(image.id), headers=headers) as resp:
            assert resp.status == 503  # cached's: allowed (stale), nothing here to serve
            assert resp.headers["Retry-After"] == "10"
            assert resp.headers["Content-Type"] == "application/json"
            body = await resp.json()
            assert (body["code"], body["title"]) == (
                "503 Service Unavailable",
                "Service Unavailable",
            )
    finally:
        await stop_daemon(d)


async def test_reload_prunes_at_once_and_takes_auth_stale_if_error(
    glance: FakeGlance, tmp_path: Path, procs: list[CachedProcess]
) -> None:
    """Item 20: lowering image_cache_max_size by reload prunes at once (it waited for the
    next scheduled prune: STATUS read "70.0 MiB of 60.0 MiB"); auth_stale_if_error is
    reloadable (a restart forgot the allowances it depends on)."""
    images = [glance.add_image(os.urandom(3 << 20)) for _ in range(3)]
    cache = tmp_path / "cache"
    cache.mkdir()
    conf = tmp_path / "cached.yaml"
    base = "max_image_fraction: 1.0\ncache_prune_interval: 1h\nauth_stale_after_failures: 2\n"
    conf.write_text(base + "image_cache_max_size: 12M\nauth_stale_if_error: 60\n")
    proc = CachedProcess(glance.url, cache, tmp_path / "cached.log", "-c", str(conf))
    procs.append(proc)
    url = await asyncio.to_thread(proc.start)
    assert proc.proc is not None
    async with aiohttp.ClientSession() as session:
        for image in images:
            async with session.get(
                f"{url}/v2/images/{image.id}/file", headers={"X-Auth-Token": "token-p1"}
            ) as resp:
                assert resp.status == 200 and await resp.read() == image.data

    async def cache_bytes() -> float:
        return _series((await get(url, "/metrics"))[1], "cached_cache_bytes")

    deadline = asyncio.get_running_loop().time() + 20
    while await cache_bytes() < 9 << 20:  # the three fills commit
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    conf.write_text(base + "image_cache_max_size: 5M\nauth_stale_if_error: 120\n")
    pid = str(proc.proc.pid)
    res = await asyncio.to_thread(run_cached, "reload", "--pid", pid, "--timeout", "20")
    assert (res.returncode, res.stderr) == (0, ""), res.stderr  # both applied, in force
    deadline = asyncio.get_running_loop().time() + 20
    while await cache_bytes() > 5 << 20:
        assert asyncio.get_running_loop().time() < deadline, "never pruned"
        await asyncio.sleep(0.05)
    kept = [i for i in images if (cache / i.id).exists()]
    assert len(kept) == 1
    await glance.close()  # an outage: the allowance from before the reload still counts
    file_url = f"{url}/v2/images/{kept[0].id}/file"
    async with aiohttp.ClientSession() as session:
        # Known down after auth_stale_after_failures (2) failed probes in a row (issue 13).
        async with session.get(file_url, headers={"X-Auth-Token": "token-p1"}) as resp:
            assert resp.status == 502
    async with (
        aiohttp.ClientSession() as session,
        session.get(file_url, headers={"X-Auth-Token": "token-p1"}) as resp,
    ):
        assert resp.status == 200 and await resp.read() == kept[0].data
        assert resp.headers["Cache-Status"] == "cached; hit; detail=stale-auth"
    assert await asyncio.to_thread(proc.stop) == 0


async def test_the_log_an_operator_reads(
    glance: FakeGlance, tmp_path: Path, procs: list[CachedProcess]
) -> None:
    """Item 18: apscheduler's start-up chatter is gone; health polls and scrapes are not
    access-logged (failures are); the query string is logged with tokens masked; an upload
    logs the bytes received."""
    image = glance.add_image(None)  # queued: it takes an upload
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = CachedProcess(glance.url, cache, tmp_path / "cached.log")
    procs.append(proc)
    url = await asyncio.to_thread(proc.start)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await get(url, path))[0] == 200
    upload = os.urandom(70_000)
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{url}/v2/images?limit=5&token=very-secret&marker=x",
            headers={"X-Auth-Token": "token-p1"},
        ) as resp:
            assert resp.status == 200
        async with session.put(
            f"{url}/v2/images/{image.id}/file",
            data=upload,
            headers={"X-Auth-Token": "token-p1", "Content-Type": "application/octet-stream"},
        ) as resp:
            assert resp.status == 204
    deadline = asyncio.get_running_loop().time() + 20
    while f"PUT /v2/images/{image.id}/file" not in proc.output():
        assert asyncio.get_running_loop().time() < deadline, proc.output()
        await asyncio.sleep(0.05)
    assert await asyncio.to_thread(proc.stop) == 0
    log = proc.output()
    assert "apscheduler" not in log
    assert "GET /healthz" not in log and "GET /readyz" not in log and "GET /metrics" not in log
    assert '"GET /v2/images?limit=5&token=***&marker=x HTTP/1.1" 200' in log
    assert "very-secret" not in log
    put = next(line for line in log.splitlines() if f"PUT /v2/images/{image.id}/file" in line)
    assert '" 204 0 ' in put and put.endswith(f" received={len(upload)}"), put


async def test_a_chunked_relay_logs_its_payload_bytes(
    glance: FakeGlance, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 11: a passed-through answer without Content-Length (chunked, as Glance's cache
    middleware sends a miss) counted its chunk framing as bytes sent: the access log and
    cached_served_bytes_total now count the payload."""
    cache = tmp_path / "cache"
    cache.mkdir()
    d = await start_daemon(cache, glance.url, image_cache_max_size="8M", max_image_fraction=0.5)
    try:
        data = os.urandom(5 << 20)  # over half the cache: passed through, as Glance sends it
        image = glance.add_image(data, no_content_length=True)
        with caplog.at_level(logging.INFO, logger="cached.access"):
            status, headers, body = await d.get(image.id)
            assert (status, body) == (200, data)
            assert "Content-Length" not in headers  # relayed chunked
            deadline = asyncio.get_running_loop().time() + 10
            while not (
                lines := [r.getMessage() for r in caplog.records if image.id in r.getMessage()]
            ):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.02)
        assert (
            f'/file HTTP/1.1" 200 {len(data)} image={image.id} cache=bypass:too-large' in lines[0]
        )
    finally:
        await stop_daemon(d)


async def test_downloads_of_an_image_without_data_stop_crashing_glance(
    glance: FakeGlance, tmp_path: Path
) -> None:
    """Item 19: the authorisation probe's Range GET of an image without data (queued,
    uploading, importing) makes Glance 33 crash (a traceback each time) where a plain GET
    answers 204. After one such answer, that image is probed without Range: the client
    still gets 204, Glance no more tracebacks; once the data is there, it is a download."""
    glance.range_crash = True
    image = glance.add_image(None)  # queued
    cache = tmp_path / "cache"
    cache.mkdir()
    d = await start_daemon(cache, glance.url)
    try:
        for _ in range(4):
            status, _, body = await d.get(image.id)
            assert (status, body) == (204, b"")
        # The first download's probe only (it was one per download); the client may send it
        # twice, retrying once on a kept-alive connection the server hung up on.
        assert 1 <= glance.range_crashes <= 2
        data = os.urandom(100_000)
        image.data, image.status = data, "active"  # the upload finished
        image.checksum = hashlib.md5(data).hexdigest()
        status, _, body = await d.get(image.id)
        assert (status, body) == (200, data)
    finally:
        await stop_daemon(d)
