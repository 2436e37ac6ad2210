"""Shared fixtures: a programmable fake Glance and an in-process daemon in front of it."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from blockbuster import BlockBusterFunction, blockbuster_ctx
from fakeglance import FakeGlance

from cached import config as configuration
from cached.app import DIRECTORIES, FILLER, PROXY, STORE, make_app
from cached.download.proxy import Proxy
from cached.edge import listeners, tls
from cached.fill.registry import Filler
from cached.ops.logs import AccessLogger
from cached.store import Store

TOKENS = {
    "token-p1": ("p1", ("member", "reader")),
    "token-p2": ("p2", ("member", "reader")),
    "token-reader": ("p1", ("reader",)),
    "token-admin": ("admin", ("admin", "member", "reader")),
}


def auth(token: str = "token-p1") -> dict[str, str]:
    return {"X-Auth-Token": token}


# Blocking calls blockbuster does not patch itself, but cached makes: on a regular file
# (and on NFS above all) each of them can stall the loop.
_MORE_BLOCKING = (
    "os.fstat",
    "os.close",
    "os.pread",
    "os.pwrite",
    "os.pwritev",
    "os.fsync",
    "os.fdatasync",
    "os.ftruncate",
    "os.posix_fallocate",
    "xattr.getxattr",
    "xattr.setxattr",
    "xattr.listxattr",
    "xattr.removexattr",
)


def _nonblocking_fd(fd: object, *_: object, **__: object) -> bool:
    """Whether ``fd`` is a socket or pipe in non-blocking mode (closing one does not wait)."""
    try:
        return isinstance(fd, int) and not os.get_blocking(fd)
    except OSError:
        return False


@pytest.fixture(autouse=True)
def no_machine_wide_paths(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cached-manage`` run in-process never finds the host's own daemon: its default
    configuration file and management socket (``/etc/cached/cached.yaml``,
    ``/run/cached/admin.sock``) point into an empty temporary directory. A test that wants
    them sets them there itself; the install test reaches the real paths only inside a
    private mount namespace (tests/test_install.py)."""
    from cached.ctl import cli as ctl_cli

    home = tmp_path_factory.mktemp("machine-paths")
    monkeypatch.setattr(ctl_cli, "DEFAULT_CONFIG", home / "etc-cached" / "cached.yaml")
    monkeypatch.setattr(ctl_cli, "DEFAULT_SOCKET", str(home / "run-cached" / "admin.sock"))


@pytest.fixture(autouse=True)
def no_blocking_calls_on_the_loop() -> Iterator[None]:
    """Fail any test whose event loop makes a blocking file or socket call (STYLE habit 2).

    The daemon's own modules must do such work in threads; the fixtures around it (the fake
    Glance, test helpers reading small files) are let through by name. To blockbuster's own
    list we add the file-descriptor and xattr calls of ``_MORE_BLOCKING``.
    """
    with blockbuster_ctx(scanned_modules=["cached"]) as bb:
        for name in _MORE_BLOCKING:
            function = BlockBusterFunction(None, name, scanned_modules=["cached"])
            if name == "os.close":
                function.can_block_predicate = _nonblocking_fd
            if name == "os.fstat":  # asyncio's own sendfile sizes the file on the loop
                function.can_block_in("asyncio/unix_events.py", "_sock_sendfile_native")
            bb.functions[name] = function.activate()
        yield


@pytest.fixture
async def glance() -> AsyncIterator[FakeGlance]:
    fake = FakeGlance()
    for token, (project, roles) in TOKENS.items():
        fake.add_token(token, project, roles)
    await fake.start()
    yield fake
    await fake.close()


@dataclass
class Daemon:
    """A running daemon (real TCP server on loopback) and its parts."""

    url: str
    app: web.Application
    runner: web.AppRunner
    cache_dir: Path
    session: aiohttp.ClientSession
    admin_url: str = ""  # the management listener (unix:/path or http(s)://host:port)
    admin_session: aiohttp.ClientSession | None = None  # connected to it
    socket_dir: Path | None = None  # made for the default management socket

    @property
    def admin_base(self) -> str:
        """The URL prefix for requests on :attr:`admin_session`."""
        return "http://localhost" if self.admin_url.startswith("unix:") else self.admin_url

    @property
    def store(self) -> Store:
        return self.app[STORE]

    @property
    def filler(self) -> Filler:
        return self.app[FILLER]

    @property
    def proxy(self) -> Proxy:
        return self.app[PROXY]

    def file_url(self, image_id: str) -> str:
        return f"{self.url}/v2/images/{image_id}/file"

    async def get(
        self, image_id: str, token: str = "token-p1", **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        async with self.session.get(
            self.file_url(image_id), headers={**auth(token), **headers}
        ) as resp:
            body = await resp.read()
            return resp.status, dict(resp.headers), body


def manage(daemon: Daemon) -> aiohttp.ClientSession:
    """The session on the daemon's management socket (URLs start with ``admin_base``)."""
    assert daemon.admin_session is not None, "started with admin_listen pointing elsewhere"
    return daemon.admin_session


async def start_daemon(cache_dir: Path, upstream: str, **options: object) -> Daemon:
    """The daemon's app served on its configured listeners (``listen`` defaults to a free
    loopback port, ``admin_listen`` to a Unix socket in a new temporary directory: the
    operator's door, :attr:`Daemon.admin_session`; TLS options as in the configuration file).
    """
    values = {
        "upstream": upstream,
        "image_cache_dir": str(cache_dir),
        "listen": "127.0.0.1:0",
        **options,
    }
    socket_dir = None
    if "admin_listen" not in options:
        socket_dir = Path(tempfile.mkdtemp(prefix="cached-admin-"))  # short: sun_path is 108 B
        values["admin_listen"] = f"unix:{socket_dir / 'admin.sock'}"
    if "image_cache_max_size" in options:
        # Tests of pruning fill a tiny cache with images as large as it; admission (which
        # keeps images over half the cache out by default) has tests of its own.
        values.setdefault("max_image_fraction", 1.0)
    cfg = configuration.build(values)
    app = make_app(cfg)
    # The daemon's own access logger: it also feeds the request metrics.
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("cached.access"),
        shutdown_timeout=1,
    )
    await runner.setup()
    server_tls = await asyncio.to_thread(tls.server_tls, cfg)
    sockets = await listeners.start(runner, cfg, server_tls)
    session = aiohttp.ClientSession(auto_decompress=False)
    admin_session = None
    if sockets.management_url.startswith("unix:"):
        path = sockets.management_url.removeprefix("unix:")
        admin_session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path))
    elif sockets.management_url:
        admin_session = aiohttp.ClientSession()
    return Daemon(
        sockets.urls[0],
        app,
        runner,
        cache_dir,
        session,
        sockets.management_url,
        admin_session,
        socket_dir,
    )


async def stop_daemon(daemon: Daemon) -> None:
    await daemon.session.close()
    if daemon.admin_session is not None:
        await daemon.admin_session.close()
    await daemon.runner.cleanup()
    if daemon.socket_dir is not None:
        shutil.rmtree(daemon.socket_dir, ignore_errors=True)


@pytest.fixture
async def daemon(glance: FakeGlance, tmp_path: Path) -> AsyncIterator[Daemon]:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    d = await start_daemon(cache_dir, glance.url)
    yield d
    await stop_daemon(d)


async def wait_until(check: Callable[[], object], what: str, within: float = 10.0) -> None:
    """Until ``check()`` is true, polling on the loop; fails naming ``what`` after ``within`` s."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened within {within}s: {what}")
        await asyncio.sleep(0.005)


async def wait_complete(daemon: Daemon, image_id: str) -> None:
    """Until the image's entry is complete (verified and committed)."""
    for _ in range(500):
        entry = daemon.store.get(image_id)
        if entry is not None and entry.complete:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{image_id} never completed")


async def wait_idle(daemon: Daemon, image_id: str) -> None:
    """Until no fill holds the image's file open."""
    for _ in range(500):
        if image_id not in daemon.filler.fills:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the fill of {image_id} never ended")


async def wait_guard(daemon: Daemon, state: str, name: str = "cache", within: float = 30) -> None:
    """Until the daemon's guard of ``name`` says ``state`` (it probes on its own schedule)."""
    guard = {g.name: g for g in daemon.app[DIRECTORIES]}[name]
    deadline = asyncio.get_running_loop().time() + within
    while guard.state.value != state:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name} guard still {guard.state.value}: {guard.reason}")
        await asyncio.sleep(0.02)


def data_gets(glance: FakeGlance, image_id: str) -> list[str | None]:
    """Ranges of the data requests the upstream saw, without the 1-byte authorisation probes."""
    return [r.range for r in glance.data_requests(image_id) if r.range != "bytes=0-0"]


def tree(root: Path) -> list[str]:
    """Every file under ``root`` relative to it, sorted (directories end with '/')."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirnames:
            out.append(os.path.normpath(os.path.join(rel, d)) + "/")
        for f in filenames:
            out.append(os.path.normpath(os.path.join(rel, f)))
    return sorted(out)
