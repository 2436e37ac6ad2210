"""The daemon as a systemd service, for real: ``cached serve`` subprocesses talking sd_notify to
a datagram socket bound by the test, reloading on SIGHUP, draining on SIGTERM; the shipped
unit checked by ``systemd-analyze verify``, a real scrape by ``promtool check metrics``, the
alert rules by ``promtool check rules`` and ``promtool test rules``.

The tools come from Debian's ``systemd`` and ``prometheus`` packages (``.ci/run`` installs
them). Where one is missing the test skips, unless ``$CACHED_TOOLS_REQUIRED`` (set by CI)
says it must run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import auth, start_daemon, stop_daemon
from daemonproc import CachedProcess, cached_command, run_cached
from fakeglance import FakeGlance

from cached import config as configuration
from cached.app import CONFIG, MANAGER
from cached.config import Config
from cached.ops import reloadcmd
from cached.ops.lifecycle import RELOADABLES, Reloadables, Reloader
from cached.ops.sdnotify import Notifier

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent
PING_USEC = 300_000  # WatchdogSec=0.3s: cached pings every 0.1 s


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CACHED_TOOLS_REQUIRED"):
            pytest.fail(f"{tool} is required here ($CACHED_TOOLS_REQUIRED) but not installed")
        pytest.skip(f"{tool} not installed (apt-get install systemd prometheus)")
    return path


class NotifySocket:
    """A datagram socket at an abstract address, as systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self) -> None:
        self.name = f"cached-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.received: list[dict[str, str]] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": "@" + self.name, "WATCHDOG_USEC": str(PING_USEC)}

    def receive(self, timeout: float) -> dict[str, str] | None:
        """The next message (``KEY=value`` lines as a dict), or None after ``timeout`` s."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.received.append(message)
        return message

    def wait_for(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """Read messages until one has ``key``; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None and key in message:
                return message
        raise AssertionError(f"no {key}= within {timeout}s; got {self.received}")

    def drain(self) -> None:
        while self.receive(0.001) is not None:
            pass

    def states(self) -> list[str]:
        """The state changes received, in order (pings and plain STATUS updates left out)."""
        keys = ("READY", "RELOADING", "STOPPING")
        return [k for m in self.received for k in keys if k in m]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.fixture
def procs() -> Iterator[list[CachedProcess]]:
    made: list[CachedProcess] = []
    yield made
    for proc in made:
        proc.kill()


def spawn(
    procs: list[CachedProcess],
    tmp_path: Path,
    upstream: str,
    *extra: str,
    env: dict[str, str] | None = None,
) -> CachedProcess:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    proc = CachedProcess(upstream, cache, tmp_path / f"cached-{len(procs)}.log", *extra, env=env)
    procs.append(proc)
    return proc


async def get(url: str, token: str | None = "token-p1", **headers: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={**(auth(token) if token else {}), **headers}) as resp,
    ):
        return resp.status, await resp.read()


async def wait_log(proc: CachedProcess, text: str) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        output = await asyncio.to_thread(proc.output)
        if text in output:
            return output
        await asyncio.sleep(0.02)
    raise AssertionError(f"{text!r} never logged:\n{proc.output()}")


# --------------------------------------------------------------------------- sd_notify
async def test_ready_status_watchdog_reloading_stopping_in_order(
    glance: FakeGlance, tmp_path: Path, notify: NotifySocket, procs: list[CachedProcess]
) -> None:
    data = os.urandom(3 * MiB)
    image = glance.add_image(data)
    proc = spawn(procs, tmp_path, glance.url, env=notify.env)
    url = await asyncio.to_thread(proc.start)
    ready = await asyncio.to_thread(notify.wait_for, "READY")
    # READY only once it serves: the index is loaded and the port answers
    assert ready["STATUS"] == "caching; 0 images cached, 0 partial; 0 B of 10.0 GiB used; 0 filling"
    assert "listening on" in proc.output()
    assert notify.received[0] == {"STATUS": "loading the cache index"}
    for _ in range(3):
        await asyncio.to_thread(notify.wait_for, "WATCHDOG")

    assert (await get(f"{url}/v2/images/{image.id}/file"))[1] == data
    status = await asyncio.to_thread(notify.wait_for, "STATUS")
    while "1 images cached" not in status["STATUS"]:
        status = await asyncio.to_thread(notify.wait_for, "STATUS")
    assert status["STATUS"] == (
        "caching; 1 images cached, 0 partial; 3.0 MiB of 10.0 GiB used; 0 filling"
    )

    proc.signal(signal.SIGHUP)
    reloading = await asyncio.to_thread(notify.wait_for, "RELOADING")
    assert reloading["MONOTONIC_USEC"].isdigit()
    await asyncio.to_thread(notify.wait_for, "READY")

    proc.signal(signal.SIGTERM)
    stopping = await asyncio.to_thread(notify.wait_for, "STOPPING")
    assert stopping["STATUS"].startswith("draining")
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert notify.states() == ["READY", "RELOADING", "READY", "STOPPING"]


async def test_a_stuck_event_loop_stops_the_watchdog_pings(
    glance: FakeGlance, tmp_path: Path, notify: NotifySocket, procs: list[CachedProcess]
) -> None:
    freeze = tmp_path / "freeze"
    env = {**notify.env, "CACHED_DEBUG_FREEZE_FILE": str(freeze)}
    proc = spawn(procs, tmp_path, glance.url, env=env)
    await asyncio.to_thread(proc.start)
    await asyncio.to_thread(notify.wait_for, "READY")
    await asyncio.to_thread(notify.wait_for, "WATCHDOG")

    freeze.touch()
    proc.signal(signal.SIGUSR2)
    # Logged on the loop right before it blocks: every ping sent before is queued by now.
    await wait_log(proc, "event loop frozen")
    await asyncio.to_thread(notify.drain)
    # Five ping intervals without a single ping: systemd would have killed it (the pings come
    # from the loop itself, not from a thread that would go on pinging).
    silent = await asyncio.to_thread(notify.receive, 5 * PING_USEC / 1e6)
    assert silent is None, silent
    freeze.unlink()
    await asyncio.to_thread(notify.wait_for, "WATCHDOG")
    assert await asyncio.to_thread(proc.stop) == 0


# --------------------------------------------------------------------------- reload
def write_config(path: Path, **options: object) -> None:
    lines = [f"{key}: {value}" for key, value in options.items()]
    path.write_text("\n".join(lines) + "\n")


async def scrape_value(url: str, name: str) -> float:
    status, body = await get(f"{url}/metrics", token=None)
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the scrape")


async def test_reload_applies_a_good_file_and_refuses_a_bad_one(
    glance: FakeGlance, tmp_path: Path, notify: NotifySocket, procs: list[CachedProcess]
) -> None:
    conf = tmp_path / "cached.yaml"
    write_config(conf, image_cache_max_size="1G", cache_prune_interval=600)
    proc = spawn(procs, tmp_path, glance.url, "-c", str(conf), env=notify.env)
    url = await asyncio.to_thread(proc.start)
    await asyncio.to_thread(notify.wait_for, "READY")
    assert await scrape_value(url, "cached_cache_max_bytes") == 1 << 30
    new_admin = "a-new-admin-token"
    digest = hashlib.sha256(new_admin.encode()).hexdigest()
    assert (await get(f"{url}/v2/cache", token=new_admin))[0] in (401, 403)

    write_config(
        conf,
        image_cache_max_size="2G",
        cache_prune_interval=5,
        admin_tokens=f'["sha256:{digest}"]',
        log_level="DEBUG",
        max_header_size="32K",
    )
    proc.signal(signal.SIGHUP)
    await asyncio.to_thread(notify.wait_for, "RELOADING")
    await asyncio.to_thread(notify.wait_for, "READY")
    output = await wait_log(proc, "reloaded:")
    assert (
        "reloaded: applied image_cache_max_size, cache_prune_interval, log_level, admin_tokens"
        in output
    )
    assert "reload: max_header_size changed: takes effect after a restart" in output
    assert "prune runs every 5 s" in output
    assert await scrape_value(url, "cached_cache_max_bytes") == 2 << 30
    assert (await get(f"{url}/v2/cache", token=new_admin))[0] == 200
    await wait_log(proc, "DEBUG")  # the new level is live

    conf.write_text("image_cache_max_size: lots\n")
    proc.signal(signal.SIGHUP)
    await asyncio.to_thread(notify.wait_for, "RELOADING")
    await asyncio.to_thread(notify.wait_for, "READY")
    output = await wait_log(proc, "reload refused")
    refused = [line for line in output.splitlines() if "reload refused" in line]
    assert len(refused) == 1
    assert "option 'image_cache_max_size': not a size: 'lots'" in refused[0]
    assert await scrape_value(url, "cached_cache_max_bytes") == 2 << 30
    assert (await get(f"{url}/v2/cache", token=new_admin))[0] == 200
    assert await asyncio.to_thread(proc.stop) == 0


@pytest.mark.parametrize("management", ["none", "socket", "tcp"])
async def test_cached_reload_waits_for_the_verdict(
    glance: FakeGlance, tmp_path: Path, procs: list[CachedProcess], management: str
) -> None:
    """``cached reload --pid`` (the unit's ExecReload): returns once the reload it caused is
    done; 0 when every change is in force, 3 naming the options that need a restart (never
    "applied" for them), 1 with the daemon's reason when refused. It finds the daemon from
    the process's own sockets and prefers its management listener, a socket or a TCP
    address (issue 19 item 6: with a TCP admin_listen it used to ask the public listener)."""
    conf = tmp_path / "cached.yaml"
    options: dict[str, object] = {"image_cache_max_size": "1G"}
    socket_path = Path(tempfile.mkdtemp(prefix="cached-admin-")) / "admin.sock"  # sun_path
    if management == "socket":
        options["admin_listen"] = f"unix:{socket_path}"
    elif management == "tcp":
        options["admin_listen"] = "127.0.0.1:0"
    write_config(conf, **options)
    proc = spawn(procs, tmp_path, glance.url, "-c", str(conf))
    url = await asyncio.to_thread(proc.start)
    assert proc.proc is not None
    pid = str(proc.proc.pid)

    async def max_bytes() -> float:
        if management == "none":
            return await scrape_value(url, "cached_cache_max_bytes")
        if management == "tcp":
            return await scrape_value(proc.admin_url, "cached_cache_max_bytes")
        async with (  # /metrics is only served on the management socket
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(socket_path))) as session,
            session.get("http://localhost/metrics") as resp,
        ):
            text = await resp.text()
        prefix = "cached_cache_max_bytes "
        return float(next(x for x in text.splitlines() if x.startswith(prefix)).split()[1])

    async def reload() -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(run_cached, "reload", "--pid", pid, "--timeout", "20")

    write_config(conf, **{**options, "image_cache_max_size": "2G", "max_header_size": "32K"})
    res = await reload()
    assert res.returncode == 3, res.stderr
    assert res.stdout == "" and "applied" not in res.stderr.replace("applied image_cache", "")
    if management != "none":  # the management listener also says what was applied
        assert res.stderr == (
            "cached: reload incomplete: applied image_cache_max_size; not in force until a "
            "restart (systemctl restart cached): max_header_size\n"
        )
    else:
        assert res.stderr == (
            "cached: reload incomplete: not in force until a restart (systemctl restart "
            "cached): max_header_size\n"
        )
    # No waiting here: the reload was done when the command returned.
    assert await max_bytes() == 2 << 30

    write_config(conf, **{**options, "image_cache_max_size": "lots"})
    res = await reload()
    assert res.returncode == 1
    if management != "none":
        assert res.stderr.startswith("cached: reload refused: ")
        assert "option 'image_cache_max_size': not a size: 'lots'" in res.stderr
    else:  # the public listener does not quote the file: the log does
        assert res.stderr == (
            "cached: reload refused (the reason is in the daemon's log; only a management "
            "listener, admin_listen, reports it here)\n"
        )
        assert "option 'image_cache_max_size': not a size: 'lots'" in proc.output()
    assert await max_bytes() == 2 << 30

    write_config(conf, **{**options, "max_header_size": "32K"})
    res = await reload()  # the file now differs from the start only in max_header_size
    assert res.returncode == 3 and "max_header_size" in res.stderr
    assert await max_bytes() == 1 << 30
    write_config(conf, **options)
    res = await reload()
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout.startswith("cached: reload applied")
    assert await asyncio.to_thread(proc.stop) == 0
    res = await reload()  # no such process any more
    assert (res.returncode, res.stderr) == (1, f"cached: reload: no process {pid}\n")
    shutil.rmtree(socket_path.parent)


def test_listening_addresses_read_from_proc() -> None:
    assert reloadcmd._tcp_host("0100007F") == "127.0.0.1"
    assert reloadcmd._tcp_host("00000000") == "127.0.0.1"  # 0.0.0.0: asked on loopback
    assert reloadcmd._tcp_host("0000000000000000FFFF00000100007F") == "::ffff:7f00:1"
    assert reloadcmd._tcp_host("00000000000000000000000001000000") == "::1"
    assert reloadcmd._tcp_host("0" * 32) == "::1"


async def test_sighups_during_a_reload_make_exactly_one_more() -> None:
    """A signal that arrives while a reload reads the file may come after the file changed:
    it is not dropped, and any number of them make one more reload, not one each."""
    release, loads = threading.Event(), []
    config = configuration.build({})

    def load() -> Config:  # in the reload's thread
        loads.append(1)
        assert release.wait(20)
        return config

    reloader = Reloader(load, config, Reloadables(), Notifier({}), lambda: "")
    reloader.request()
    deadline = time.monotonic() + 20
    while not loads:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    for _ in range(3):
        reloader.request()
    release.set()
    while reloader.reloads.finished < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await asyncio.sleep(0)
    assert (len(loads), reloader.reloads.started) == (2, 2)
    assert reloader.reloads.result == "applied"


async def reload_in_process(app: aiohttp.web.Application, **changes: object) -> Config:
    """What a SIGHUP does to the parts, in the test's own daemon: apply ``changes``."""
    old = app[CONFIG]
    new = dataclasses.replace(old, **changes)
    assert app[RELOADABLES].apply(old, new) == []
    return new


async def test_a_shorter_auth_cache_ttl_applies_to_answers_already_remembered(
    glance: FakeGlance, tmp_path: Path
) -> None:
    d = await start_daemon(tmp_path, glance.url, auth_cache_ttl=3600)
    try:
        image = glance.add_image(b"x" * 1000)
        for _ in range(2):
            assert (await d.get(image.id))[0] == 200
        assert d.proxy.authorizer.probes == 1  # the second download reused the answer
        await reload_in_process(d.app, auth_cache_ttl=0)
        assert (await d.get(image.id))[0] == 200
        assert d.proxy.authorizer.probes == 2  # asked again: nothing is reused any more
    finally:
        await stop_daemon(d)


async def test_a_higher_prefetch_concurrency_starts_waiting_fetches_at_once(
    glance: FakeGlance, tmp_path: Path
) -> None:
    d = await start_daemon(
        tmp_path, glance.url, service_token="token-admin", prefetch_concurrency=1
    )
    prefetcher = d.app[MANAGER].prefetcher
    images = [glance.add_image(os.urandom(MiB)) for _ in range(2)]
    assert d.admin_session is not None
    try:
        for image in images:
            image.pause()
            async with d.admin_session.put(f"{d.admin_base}/v2/queued_images/{image.id}") as resp:
                assert resp.status == 200
        run = asyncio.create_task(prefetcher.run())

        async def states() -> list[str]:
            return sorted(p["state"] for p in (await prefetcher.progress()).values())

        async def until(wanted: list[str]) -> None:
            deadline = time.monotonic() + 20
            while (now := await states()) != wanted:
                assert time.monotonic() < deadline, now
                await asyncio.sleep(0.02)

        await until(["fetching", "waiting"])
        await reload_in_process(d.app, prefetch_concurrency=2)
        await until(["fetching", "fetching"])  # the first one still runs
        for image in images:
            image.resume()
        counts = await asyncio.wait_for(run, 20)
        assert sum(counts.values()) == 2 and all(d.store.get(i.id) for i in images)
    finally:
        for image in images:
            image.resume()
        await stop_daemon(d)


# --------------------------------------------------------------------------- drain
def refused(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


async def test_sigterm_lets_a_running_download_finish_exactly(
    glance: FakeGlance, tmp_path: Path, notify: NotifySocket, procs: list[CachedProcess]
) -> None:
    data = os.urandom(16 * MiB)
    image = glance.add_image(data, rate=4 * MiB)  # about 4 s
    proc = spawn(procs, tmp_path, glance.url, env=notify.env)
    url = await asyncio.to_thread(proc.start)
    await asyncio.to_thread(notify.wait_for, "READY")
    client = asyncio.ensure_future(get(f"{url}/v2/images/{image.id}/file"))
    for _ in range(1000):
        if glance.bytes_sent.get(image.id, 0) > 2 * MiB:
            break
        await asyncio.sleep(0.01)
    proc.signal(signal.SIGTERM)
    await asyncio.to_thread(notify.wait_for, "STOPPING")
    assert await asyncio.to_thread(refused, url)  # no new connections while draining
    status, body = await client
    assert status == 200 and body == data
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert (tmp_path / "cache" / image.id).is_file()  # its fill completed and was committed


# --------------------------------------------------------------------------- logs
async def test_tokens_never_reach_the_log(
    glance: FakeGlance, tmp_path: Path, procs: list[CachedProcess]
) -> None:
    service = "service-token-" + uuid.uuid4().hex
    conf = tmp_path / "cached.yaml"
    admin = "sha256:" + hashlib.sha256(b"token-admin").hexdigest()  # loopback is no admin
    write_config(conf, service_token=service, log_level="DEBUG", admin_tokens=[admin])
    glance.add_token(service, "admin", ("admin",))
    proc = spawn(procs, tmp_path, glance.url, "-c", str(conf))
    url = await asyncio.to_thread(proc.start)
    data = os.urandom(MiB)
    image = glance.add_image(data)
    assert (await get(f"{url}/v2/images/{image.id}/file"))[1] == data
    assert (await get(f"{url}/v2/images/{image.id}/file", token="no-such-token"))[0] == 401
    assert (await get(f"{url}/v2/images/{image.id}", token="token-p2"))[0] == 404
    queued = glance.add_image(os.urandom(MiB))
    async with aiohttp.ClientSession() as session:  # prefetch with the service token
        async with session.put(f"{url}/v2/cache/{queued.id}", headers=auth("token-admin")) as r:
            assert r.status == 202
    await wait_log(proc, f"prefetch: cached {queued.id}")
    assert await asyncio.to_thread(proc.stop) == 0
    log = proc.output()
    assert f"image={image.id} cache=hit" in log or f"image={image.id} cache=miss" in log
    for token in ("token-p1", "token-p2", "token-admin", "no-such-token", service):
        assert token not in log


async def test_journald_format_without_timestamps(
    glance: FakeGlance, tmp_path: Path, procs: list[CachedProcess]
) -> None:
    """Under systemd (``$JOURNAL_STREAM`` names stderr): a syslog priority, no timestamp."""
    proc = spawn(procs, tmp_path, glance.url)
    proc.log.touch()
    st = proc.log.stat()
    proc.env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    await asyncio.to_thread(proc.start)
    assert await asyncio.to_thread(proc.stop) == 0
    lines = proc.output().splitlines()
    assert any(line.startswith("<6>cached: listening on http://127.0.0.1:") for line in lines)
    assert all(line.startswith("<") for line in lines), lines


# --------------------------------------------------------------------------- tools
async def test_promtool_checks_a_real_scrape(
    glance: FakeGlance, tmp_path: Path, procs: list[CachedProcess]
) -> None:
    promtool = require("promtool")
    admin_port = _free_port()
    proc = spawn(procs, tmp_path, glance.url, "-c", str(_admin_conf(tmp_path, admin_port)))
    url = await asyncio.to_thread(proc.start)
    data = os.urandom(2 * MiB)
    image = glance.add_image(data)
    metrics_url = f"http://127.0.0.1:{admin_port}/metrics"
    assert (await get(f"{url}/v2/images/{image.id}/file"))[1] == data
    # The miss's client has its last byte once the digest matched; the commit comes after.
    await _scrape_until(metrics_url, b'cached_fills_finished_total{result="verified"} 1.0')
    assert (await get(f"{url}/v2/images/{image.id}/file"))[1] == data
    await get(f"{url}/v2/images/{image.id}/file", Range="bytes=0-9")
    # the image API port does not serve metrics when admin_listen is set
    assert (await get(f"{url}/metrics", token=None))[0] == 404
    # Counted when the response is done, which may be just after the client has it.
    body = await _scrape_until(metrics_url, b'cached_requests_total{outcome="hit"} 2.0')
    res = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    status, _ = await get(f"http://127.0.0.1:{admin_port}/readyz", token=None)
    assert status == 200
    assert await asyncio.to_thread(proc.stop) == 0


async def _scrape_until(url: str, line: bytes, within: float = 30) -> bytes:
    """Scrape ``url`` until its body has ``line``; fails after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        status, body = await get(url, token=None)
        assert status == 200
        if line in body:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"never scraped {line!r} within {within}s:\n{body.decode()}")
        await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _admin_conf(tmp_path: Path, port: int) -> Path:
    conf = tmp_path / "admin.yaml"
    write_config(conf, admin_listen=f"127.0.0.1:{port}")
    return conf


def test_promtool_checks_and_tests_the_alert_rules() -> None:
    promtool = require("promtool")
    rules = ROOT / "conf" / "prometheus-alerts.yaml"
    res = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(
        [promtool, "test", "rules", "prometheus-alerts-test.yaml"],
        cwd=ROOT / "tests" / "data",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require("systemd-analyze")
    unit = (ROOT / "systemd" / "cached.service").read_text()
    # verify wants ExecStart's binary to exist: point it at this installation's cached
    binary = shutil.which("cached") or cached_command()[0]
    assert "ExecStart=/usr/local/bin/cached " in unit
    copy = tmp_path / "cached.service"
    copy.write_text(unit.replace("/usr/local/bin/cached", binary))
    res = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    # Only lines about our unit count (the host's own units may have warnings of their own).
    ours = [line for line in (res.stdout + res.stderr).splitlines() if "cached.service" in line]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr


def test_the_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every query of the Grafana dashboard, as recording rules for ``promtool check rules``."""
    import json

    promtool = require("promtool")
    dashboard = json.loads((ROOT / "conf" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    rules = [
        {"record": f"cached:dashboard_{i}", "expr": e.replace("$instance", ".*")}
        for i, e in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
