# ruff: noqa: E501  (the tables asserted here are wider than a line of code)
"""``cached-manage`` (cached/ctl): against fakes of the management API that speak API.md §3
(every output format, error and option), then against the real daemon (conftest's
``start_daemon`` in front of a :class:`fakeglance.FakeGlance`).

The CLI is blocking (it runs its own event loop), so each test runs ``main()`` in a thread
while the fakes keep answering in the test's loop; capsys sees what it prints.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import start_daemon, stop_daemon
from fakeglance import FakeGlance

from cached.ctl import cli as ctl_cli
from cached.ctl import main
from cached.ctl.client import Target, parse_target
from cached.ctl.render import human_size, iso_time, table

ADMIN = "admin-token"
A = "dd548660-cfd6-4a97-99a6-2aabc789ca47"
B = "6bcf1c1d-3b7d-4b97-a243-17e01f03d8b1"
C = "0e1f6b9a-5c3d-4e2f-8a7b-9c0d1e2f3a4b"
T1 = 1795586657.400065  # 2026-11-25T06:04:17.400065
T2 = 1795586657.400071


class FakeManage:
    """The legacy cache-manage API of one host, admin token only, as Glance 33 answers it.

    Args:
        prefix: ``/v2`` (Glance >= Stein) or ``/v1`` (up to Queens).
        delay: seconds every answer waits (a host that hangs).
        gate: a barrier every request waits at (at most 5 s, then 504) before it is answered:
            shared by several hosts, their requests are answered only if they arrive together.
        progress: what cached's ``GET /v2/cache/progress`` answers (None: 404, as Glance).
    """

    def __init__(
        self,
        prefix: str = "/v2",
        delay: float = 0.0,
        gate: asyncio.Barrier | None = None,
        unix: str = "",
    ) -> None:
        self.unix = unix  # listen on this Unix socket instead of a loopback port
        self.prefix = prefix
        self.delay = delay
        self.gate = gate
        self.cached: list[dict[str, Any]] = []
        self.queued: list[str] = []
        self.progress: dict[str, Any] | None = None
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    @property
    def label(self) -> str:
        return self.url.removeprefix("http://")

    async def start(self) -> None:
        app = web.Application(middlewares=[self._admin_only])
        p = self.prefix
        app.router.add_get(f"{p}/cached_images", self._list_cached)
        app.router.add_delete(f"{p}/cached_images", self._delete_all_cached)
        app.router.add_delete(f"{p}/cached_images/{{id}}", self._delete_cached)
        app.router.add_get(f"{p}/queued_images", self._list_queued)
        app.router.add_delete(f"{p}/queued_images", self._delete_all_queued)
        app.router.add_put(f"{p}/queued_images/{{id}}", self._queue)
        app.router.add_delete(f"{p}/queued_images/{{id}}", self._delete_queued)
        app.router.add_get("/v2/cache/progress", self._progress)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        if self.unix:
            await web.UnixSite(self.runner, self.unix).start()
            self.url = f"unix:{self.unix}"
            return
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @web.middleware
    async def _admin_only(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.headers)))
        await asyncio.sleep(self.delay)
        if self.gate is not None:
            try:
                await asyncio.wait_for(self.gate.wait(), 5)
            except TimeoutError:
                return web.Response(status=504, text="the other hosts were never asked")
        if request.headers.get("x-auth-token") != ADMIN:
            return web.Response(status=403, text="403 Forbidden\n\nAccess was denied.")
        return await handler(request)

    @staticmethod
    def _null() -> web.Response:
        return web.Response(body=b"null", content_type="application/json")

    async def _list_cached(self, request: web.Request) -> web.Response:
        return web.json_response({"cached_images": self.cached})

    async def _delete_all_cached(self, request: web.Request) -> web.Response:
        n, self.cached = len(self.cached), []
        return web.json_response({"num_deleted": n})

    async def _delete_cached(self, request: web.Request) -> web.Response:
        self.cached = [c for c in self.cached if c["image_id"] != request.match_info["id"]]
        return self._null()

    async def _list_queued(self, request: web.Request) -> web.Response:
        return web.json_response({"queued_images": self.queued})

    async def _delete_all_queued(self, request: web.Request) -> web.Response:
        n, self.queued = len(self.queued), []
        return web.json_response({"num_deleted": n})

    async def _queue(self, request: web.Request) -> web.Response:
        self.queued.append(request.match_info["id"])
        return self._null()

    async def _delete_queued(self, request: web.Request) -> web.Response:
        self.queued = [q for q in self.queued if q != request.match_info["id"]]
        return self._null()

    async def _progress(self, request: web.Request) -> web.Response:
        if self.progress is None:
            raise web.HTTPNotFound()
        return web.json_response({"progress": self.progress})

    def calls(self) -> list[tuple[str, str]]:
        """(method, path) of the legacy API calls, without progress lookups."""
        return [(m, p) for m, p, _ in self.requests if p != "/v2/cache/progress"]


def cached_image(image_id: str, size: int, hits: int = 0, accessed: float = T1) -> dict[str, Any]:
    # centralized_db driver's record (REFERENCE.md §1.1): extra "id" and "checksum".
    return {
        "id": 1,
        "image_id": image_id,
        "last_accessed": accessed,
        "last_modified": T2,
        "size": size,
        "hits": hits,
        "checksum": None,
    }


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., Awaitable[FakeManage]]]:
    started: list[FakeManage] = []

    async def make(**kwargs: Any) -> FakeManage:
        fake = FakeManage(**kwargs)
        await fake.start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.close()


@pytest.fixture
async def host(fakes: Callable[..., Awaitable[FakeManage]]) -> FakeManage:
    return await fakes()


def dead_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ctl(*argv: str, stdin: str = "") -> int:
    """Run ``cached-manage ARGV`` in a thread; its exit status (usage errors included)."""

    def run() -> int:
        saved = sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            return main(list(argv))
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            sys.stdin = saved

    return await asyncio.to_thread(run)


def on(fake: FakeManage, *argv: str) -> list[str]:
    return ["-H", fake.label, "--os-auth-token", ADMIN, *argv]


# ---- output formats ---------------------------------------------------------------------


def test_table_is_drawn_like_prettytable() -> None:
    # Centred cells put the odd space after odd-length text and before even-length text.
    out = table(
        ["ID", "Last Accessed (UTC)", "Size", "Hits"],
        [["abc", "x", 1, 22]],
        {"Size": "r", "Hits": "r"},
    )
    assert out == (
        "+-----+---------------------+------+------+\n"
        "|  ID | Last Accessed (UTC) | Size | Hits |\n"
        "+-----+---------------------+------+------+\n"
        "| abc |          x          |    1 |   22 |\n"
        "+-----+---------------------+------+------+"
    )
    assert table(["ID"], [["abcd"], ["ab"], ["abc"]]).splitlines()[3:6] == [
        "| abcd |",
        "|  ab  |",
        "| abc  |",
    ]


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (100000, "97.7 KiB"),
        (1 << 30, "1.0 GiB"),
        (int(2.5 * (1 << 40)), "2.5 TiB"),
        (None, "-"),
    ],
)
def test_human_sizes(size: int | None, text: str) -> None:
    assert human_size(size) == text


def test_times_are_glance_iso_and_zero_is_na() -> None:
    assert iso_time(T1) == "2026-11-25T06:04:17.400065"
    assert iso_time(1795586657) == "2026-11-25T06:04:17"  # the xattr driver's integer times
    assert iso_time(0) == "N/A"


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("ctl-a", Target("ctl-a", 9292)),
        ("ctl-a:29292", Target("ctl-a", 29292)),
        ("http://ctl-b:9393/", Target("ctl-b", 9393)),
        ("https://ctl-c", Target("ctl-c", 443, "https")),
        ("::1", Target("::1", 9292)),
        ("[::1]:8080", Target("::1", 8080)),
    ],
)
def test_host_forms(text: str, target: Target) -> None:
    assert parse_target(text, 9292) == target


@pytest.mark.parametrize("text", ["ctl-a:http", "ctl-a:70000", "ftp://x", ":9292", "[::1"])
def test_bad_hosts(text: str) -> None:
    with pytest.raises(ValueError):
        parse_target(text, 9292)


# ---- list-cached / list-queued ----------------------------------------------------------


async def test_list_cached_prints_glances_table(
    host: FakeManage, capsys: pytest.CaptureFixture[str]
) -> None:
    host.cached = [cached_image(A, 100000), cached_image(B, 5 << 30, hits=12, accessed=0)]
    assert await ctl(*on(host, "--bytes", "list-cached")) == 0
    out, err = capsys.readouterr()
    assert err == ""
    # REFERENCE.md §2.1, real glance-cache-manage output (plus a row never accessed).
    assert out == (
        "Found 2 cached images...\n"
        "+--------------------------------------+----------------------------+----------------------------+------------+------+\n"
        "|                  ID                  |    Last Accessed (UTC)     |    Last Modified (UTC)     |       Size | Hits |\n"
        "+--------------------------------------+----------------------------+----------------------------+------------+------+\n"
        "| dd548660-cfd6-4a97-99a6-2aabc789ca47 | 2026-11-25T06:04:17.400065 | 2026-11-25T06:04:17.400071 |     100000 |    0 |\n"
        "| 6bcf1c1d-3b7d-4b97-a243-17e01f03d8b1 |            N/A             | 2026-11-25T06:04:17.400071 | 5368709120 |   12 |\n"
        "+--------------------------------------+----------------------------+----------------------------+------------+------+\n"
    )
    # (beside it, the daemon's /v2/cache/progress is asked for directory problems)
    listing = [r for r in host.requests if r[:2] == ("GET", "/v2/cached_images")]
    assert len(listing) == 1 and listing[0][2]["x-auth-token"] == ADMIN


async def test_list_cached_human_sizes_by_default(
    host: FakeManage, capsys: pytest.CaptureFixture[str]
) -> None:
    host.cached = [cached_image(A, 1 << 30), cached_image(B, 100000)]
    assert await ctl(*on(host, "list-cached")) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[4].endswith("|  1.0 GiB |    0 |")
    assert rows[5].endswith("| 97.7 KiB |    0 |")


async def test_list_cached_json_keeps_byte_counts(
    host: FakeManage, capsys: pytest.CaptureFixture[str]
) -> None:
    host.cached = [cached_image(A, 1 << 30, hits=3)]
    assert await ctl(*on(host, "--json", "list-cached")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {
        "cached_images": [{"host": host.label, **cached_image(A, 1 << 30, hits=3)}],
        "errors": [],
    }


async def test_nothing_cached_or_queued(
    host: FakeManage, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await ctl(*on(host, "list-cached")) == 0
    assert await ctl(*on(host, "list-queued")) == 0
    assert capsys.readouterr() == ("No cached images.\nNo queued images.\n", "")


async def test_list_queued_shows_progress_or_dash(
    host: FakeManage, capsys: pytest.CaptureFixture[str]
) -> None:
    host.queued = [A, B, C]
    fetching = {"state": "fetching", "bytes_done": 256 << 20, "size": 1 << 30, "rate": 52_400_000.0}
    failed = {
        "state": "failed",
        "bytes_done": 0,
        "size": None,
        "rate": None,
        "failures": 2,
        "last_error": "upstream answered 503",
    }
    host.progress = {A: fetching, B: failed}
    assert await ctl(*on(host, "list-queued")) == 0
    assert capsys.readouterr().out == (
        "Found 3 queued images...\n"
        "+--------------------------------------+----------+----------+---------+-----------+\n"
        "|                  ID                  |  State   | Progress |    Size |      Rate |\n"
        "+--------------------------------------+----------+----------+---------+-----------+\n"
        "| dd548660-cfd6-4a97-99a6-2aabc789ca47 | fetching |    25.0% | 1.0 GiB | 52.4 MB/s |\n"
        "| 6bcf1c1d-3b7d-4b97-a243-17e01f03d8b1 |  failed  |        - |       - |         - |\n"
        "| 0e1f6b9a-5c3d-4e2f-8a7b-9c0d1e2f3a4b |    -     |        - |       - |         - |\n"
        "+--------------------------------------+----------+----------+---------+-----------+\n"
    )
    assert await ctl(*on(host, "--json", "list-queued")) == 0
    nothing = dict.fromkeys(["state", "bytes_done", "size", "rate", "failures", "last_error"])
    assert json.loads(capsys.readouterr().out)["queued_images"] == [
        {"host": host.label, "image_id": A, **nothing, **fetching},
        {"host": host.label, "image_id": B, **failed},
        {"host": host.label, "image_id": C, **nothing},
    ]
    host.progress = None  # a Glance: no progress resource
    assert await ctl(*on(host, "list-queued")) == 0
    assert capsys.readouterr().out.splitlines()[4] == (
        "| dd548660-cfd6-4a97-99a6-2aabc789ca47 |   -   |        - |    - |    - |"
    )


# ---- verbs that change something ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "request_", "verbose"),
    [
        (["queue-image", C], ("PUT", f"/v2/queued_images/{C}"), f"Queued image {C} for caching"),
        (
            ["delete-cached-image", A],
            ("DELETE", f"/v2/cached_images/{A}"),
            f"Deleted cached image {A}",
        ),
        (["delete-all-cached-images"], ("DELETE", "/v2/cached_images"), "Deleted 2 cached images"),
        (
            ["delete-queued-image", B],
            ("DELETE", f"/v2/queued_images/{B}"),
            f"Deleted queued image {B}",
        ),
        (["delete-all-queued-images"], ("DELETE", "/v2/queued_images"), "Deleted 1 queued images"),
    ],
)
async def test_forced_verbs(
    host: FakeManage,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    request_: tuple[str, str],
    verbose: str,
) -> None:
    host.cached = [cached_image(A, 10), cached_image(C, 20)]
    host.queued = [B]
    assert await ctl(*on(host, "-f", *argv)) == 0
    assert capsys.readouterr() == ("", "")  # silent without -v, like glance-cache-manage
    assert host.calls() == [request_]
    assert await ctl(*on(host, "-f", "-v", *argv)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == verbose.replace("2 cached", "0 cached").replace("1 queued", "0 queued")
    assert out[1].startswith("Completed in ") and out[1].endswith(" sec.")


async def test_confirmation_prompt(host: FakeManage, capsys: pytest.CaptureFixture[str]) -> None:
    host.cached = [cached_image(A, 10)]
    for answer in ("\n", "n\n", "nope\n", ""):
        assert await ctl(*on(host, "delete-all-cached-images"), stdin=answer) == 0
    assert host.calls() == []
    out = capsys.readouterr().out
    assert out.startswith("Delete all cached images? [y/N] ")
    assert await ctl(*on(host, "delete-cached-image", A), stdin="Y\n") == 0
    assert capsys.readouterr().out == f"Delete cached image {A}? [y/N] "
    assert host.calls() == [("DELETE", f"/v2/cached_images/{A}")]
    assert await ctl(*on(host, "-v", "queue-image", C), stdin="yes\n") == 0
    assert capsys.readouterr().out.startswith(
        f"Queue image {C} for caching? [y/N] Queued image {C} for caching\n"
    )


async def test_json_answers_of_verbs(host: FakeManage, capsys: pytest.CaptureFixture[str]) -> None:
    host.cached = [cached_image(A, 10)]
    assert await ctl(*on(host, "--json", "delete-all-cached-images"), stdin="y\n") == 0
    out, err = capsys.readouterr()
    assert err == "Delete all cached images? [y/N] "  # stdout stays JSON
    assert json.loads(out) == {"results": [{"host": host.label, "num_deleted": 1}], "errors": []}


# ---- errors and usage ---------------------------------------------------------------------


async def test_legacy_v1_prefix_is_the_fallback(
    fakes: Callable[..., Awaitable[FakeManage]], capsys: pytest.CaptureFixture[str]
) -> None:
    old = await fakes(prefix="/v1")
    old.queued = [A]
    assert await ctl(*on(old, "-f", "delete-queued-image", A)) == 0
    assert old.calls() == [
        ("DELETE", f"/v2/queued_images/{A}"),
        ("DELETE", f"/v1/queued_images/{A}"),
    ]
    assert old.queued == []


async def test_glance_error_messages(host: FakeManage, capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl("-H", host.label, "--os-auth-token", "member-token", "list-cached") == 1
    assert capsys.readouterr() == ("", "Not authorized to make this request.\n")
    old = FakeManage(prefix="/v0")
    await old.start()
    try:
        assert await ctl(*on(old, "list-queued")) == 1
    finally:
        await old.close()
    assert capsys.readouterr() == (
        "",
        "Cache management middleware not enabled on host 127.0.0.1\n",
    )
    port = dead_port()
    assert await ctl("-H", "127.0.0.1", "-p", str(port), "list-cached") == 1
    assert capsys.readouterr() == (
        "",
        f"Failed to show cached images. Got error:\n127.0.0.1:{port}: unreachable (Connection refused)\n",
    )


async def test_token_from_environment(
    host: FakeManage, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OS_AUTH_TOKEN", ADMIN)
    assert await ctl("-H", host.label, "list-cached") == 0
    assert host.requests[-1][2]["x-auth-token"] == ADMIN


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["queue-image", "abc"], "Image ID 'abc' is not a valid UUID."),
        (
            ["delete-cached-image"],
            "please specify the ID of the image for command 'delete-cached-image'",
        ),
        (["list-cached", A], "command 'list-cached' takes no image ID"),
        (["list-cached", A, B], "unrecognized arguments"),
        (["clean"], "invalid choice: 'clean'"),
        (["--all-hosts", "list-cached"], "--all-hosts: no hosts"),
        (["-H", "ctl-a:http", "list-cached"], "bad port in 'ctl-a:http'"),
    ],
)
async def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await ctl(*argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err


async def test_options_may_follow_the_verb(
    host: FakeManage, capsys: pytest.CaptureFixture[str]
) -> None:
    host.queued = [A]
    assert await ctl("list-queued", "-H", host.label, "--os-auth-token", ADMIN) == 0
    assert "Found 1 queued images..." in capsys.readouterr().out


async def test_help_verb(capsys: pytest.CaptureFixture[str]) -> None:
    assert await ctl("help", "queue-image") == 0
    assert (
        capsys.readouterr().out
        == "cached-manage queue-image <ID> [options]\n\n    Queue an image for caching.\n"
    )


# ---- several hosts --------------------------------------------------------------------------


async def test_all_hosts_one_table_and_a_line_per_failed_host(
    fakes: Callable[..., Awaitable[FakeManage]], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = await fakes(), await fakes()
    a.cached = [cached_image(A, 1 << 30, hits=2)]
    b.cached = [cached_image(A, 1 << 30), cached_image(B, 512)]
    port = dead_port()
    argv = [
        "--all-hosts",
        "-H",
        a.label,
        "-H",
        b.label,
        "-H",
        f"127.0.0.1:{port}",
        "--os-auth-token",
        ADMIN,
    ]
    assert await ctl(*argv, "list-cached") == 1
    out, err = capsys.readouterr()
    assert err == f"127.0.0.1:{port}: unreachable (Connection refused)\n"
    lines = out.splitlines()
    assert lines[0] == "Found 3 cached images on 2 hosts..."
    assert [c.strip() for c in lines[2].split("|")[1:3]] == ["Host", "ID"]
    hosts = [line.split("|")[1].strip() for line in lines[4:7]]
    assert hosts == [a.label, b.label, b.label]
    assert lines[6].endswith("|   512 B |    0 |")

    assert await ctl(*argv, "--json", "list-cached") == 1
    doc = json.loads(capsys.readouterr().out)
    assert [(r["host"], r["image_id"]) for r in doc["cached_images"]] == [
        (a.label, A),
        (b.label, A),
        (b.label, B),
    ]
    assert doc["errors"] == [
        {"host": f"127.0.0.1:{port}", "status": None, "error": "unreachable (Connection refused)"}
    ]


async def test_verbs_on_several_hosts(
    fakes: Callable[..., Awaitable[FakeManage]], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = await fakes(), await fakes()
    b.cached = [cached_image(A, 10)]
    argv = ["-H", a.url, "-H", b.url, "--os-auth-token", ADMIN, "-v", "delete-all-cached-images"]
    assert await ctl(*argv, stdin="y\n") == 0
    out = capsys.readouterr().out.splitlines()
    assert (
        out[0]
        == f"Delete all cached images on {a.label}, {b.label}? [y/N] {a.label}: Deleted 0 cached images"
    )
    assert out[1] == f"{b.label}: Deleted 1 cached images"


async def test_hosts_are_asked_at_once_with_a_timeout(
    fakes: Callable[..., Awaitable[FakeManage]], capsys: pytest.CaptureFixture[str]
) -> None:
    # Each host answers only once all three were asked: asked one after the other, they fail.
    gate = asyncio.Barrier(3)
    slow = [await fakes(gate=gate) for _ in range(3)]
    argv = [x for f in slow for x in ("-H", f.label)]
    assert await ctl(*argv, "--os-auth-token", ADMIN, "list-cached") == 0
    assert capsys.readouterr().out == "No cached images.\n"
    hung = await fakes(delay=5)
    assert await ctl(*argv, "-H", hung.label, "--timeout", "0.2", "list-cached") == 1
    err = capsys.readouterr().err
    assert f"{hung.label}: unreachable (no answer within 0.2 s)\n" in err


async def test_default_host_comes_from_the_config(
    host: FakeManage, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "cached.yaml"
    conf.write_text(
        f"listen: 0.0.0.0:{host.label.rpartition(':')[2]}\nupstream: http://glance:9292\n"
    )
    host.queued = [A]
    assert await ctl("-c", str(conf), "--os-auth-token", ADMIN, "list-queued") == 0
    assert "Found 1 queued images..." in capsys.readouterr().out
    conf.write_text("listen: [nonsense\n")
    assert await ctl("-c", str(conf), "list-queued") == 2
    assert "configuration error" in capsys.readouterr().err


async def test_port_alone_means_loopback_not_the_default_socket(
    fakes: Callable[..., Awaitable[FakeManage]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Another daemon's management socket at the default place, and a configuration file
    # naming it: "-p PORT" alone is 127.0.0.1:PORT (glance-cache-manage), never that daemon.
    other = await fakes(unix=str(tmp_path / "other.sock"))
    mine = await fakes()
    other.cached = [cached_image(A, 10)]
    mine.cached = [cached_image(B, 20)]
    monkeypatch.setattr(ctl_cli, "DEFAULT_SOCKET", other.unix)
    conf = tmp_path / "cached.yaml"
    conf.write_text(f"admin_listen: unix:{other.unix}\n")
    monkeypatch.setattr(ctl_cli, "DEFAULT_CONFIG", conf)
    port = mine.label.rpartition(":")[2]
    assert await ctl("-p", port, "--os-auth-token", ADMIN, "--json", "list-cached") == 0
    assert [r["image_id"] for r in json.loads(capsys.readouterr().out)["cached_images"]] == [B]
    assert other.calls() == []
    assert await ctl("-f", "-p", port, "--os-auth-token", ADMIN, "delete-all-cached-images") == 0
    assert other.cached == [cached_image(A, 10)] and mine.cached == []


async def test_no_host_reads_the_nodes_configuration_file(
    fakes: Callable[..., Awaitable[FakeManage]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The node's file names a socket and a TCP address for management: the socket is used.
    # A stray socket at the default place is not consulted while the file exists.
    node = await fakes(unix=str(tmp_path / "node.sock"))
    stray = await fakes(unix=str(tmp_path / "stray.sock"))
    node.queued = [A]
    stray.queued = [B]
    monkeypatch.setattr(ctl_cli, "DEFAULT_SOCKET", stray.unix)
    conf = tmp_path / "etc" / "cached.yaml"
    conf.parent.mkdir()
    conf.write_text(
        f"listen: 0.0.0.0:{dead_port()}\nadmin_tokens: ['sha256:{'0' * 64}']\n"
        f"admin_listen: ['unix:{node.unix}', '0.0.0.0:{dead_port()}']\n"
    )
    monkeypatch.setattr(ctl_cli, "DEFAULT_CONFIG", conf)
    assert await ctl("--os-auth-token", ADMIN, "--json", "list-queued") == 0
    assert [r["image_id"] for r in json.loads(capsys.readouterr().out)["queued_images"]] == [A]
    assert stray.calls() == []
    # Without the file: the default socket.
    conf.unlink()
    assert await ctl("--os-auth-token", ADMIN, "--json", "list-queued") == 0
    assert [r["image_id"] for r in json.loads(capsys.readouterr().out)["queued_images"]] == [B]
    # A broken file is an error naming it, never skipped for a guess.
    conf.write_text("listen: [nonsense\n")
    assert await ctl("list-queued") == 2
    assert f"configuration error: {conf}" in capsys.readouterr().err


async def test_console_script_streams_and_status(host: FakeManage) -> None:
    host.cached = [cached_image(A, 10)]

    async def run(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cached.ctl", *argv,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        out, err = await proc.communicate()
        return proc.returncode or 0, out.decode(), err.decode()

    status, out, err = await run(*on(host, "list-cached"))
    assert (status, err) == (0, "") and out.startswith("Found 1 cached images...\n")
    status, out, err = await run(*on(host, "delete-cached-image", A))  # stdin at EOF: "no"
    assert (status, host.calls()[-1]) == (0, ("GET", "/v2/cached_images"))
    status, out, err = await run("queue-image", "not-a-uuid")
    assert status == 2 and out == "" and "is not a valid UUID" in err


async def test_all_hosts_from_the_config_this_node_and_its_peers(
    fakes: Callable[..., Awaitable[FakeManage]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    here, peer = await fakes(), await fakes()
    here.queued, peer.queued = [A], [A, B]
    port = dead_port()
    conf = tmp_path / "cached.yaml"
    conf.write_text(
        f"listen: 0.0.0.0:{here.label.rpartition(':')[2]}\n"
        f"peers: [{peer.url}, http://127.0.0.1:{port}]\n"
    )
    assert await ctl("--all-hosts", "-c", str(conf), "--os-auth-token", ADMIN, "list-queued") == 1
    out, err = capsys.readouterr()
    assert out.startswith("Found 3 queued images on 2 hosts...\n")
    assert [line.split("|")[1].strip() for line in out.splitlines()[4:7]] == [
        here.label,
        peer.label,
        peer.label,
    ]
    assert err == f"127.0.0.1:{port}: unreachable (Connection refused)\n"


# ---- against the real daemon ----------------------------------------------------------------


async def wait_for(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def test_verbs_against_the_daemon(
    glance: FakeGlance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = glance.add_image(os.urandom(300_000), owner="p1")
    other = glance.add_image(os.urandom(1000), owner="p1")
    # No admin auth configured: the management socket is the operator's door.
    d = await start_daemon(tmp_path, glance.url, admin_listen=f"unix:{tmp_path / 'admin.sock'}")
    try:
        status, _, _ = await d.get(image.id)
        assert status == 200

        async def complete() -> bool:
            entry = d.store.get(image.id)
            return entry is not None and entry.complete

        await wait_for(complete)
        assert await ctl("-H", d.url.removeprefix("http://"), "list-cached") == 1
        assert capsys.readouterr().err == "Not authorized to make this request.\n"
        label = d.admin_url
        assert await ctl("-H", label, "--bytes", "list-cached") == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "Found 1 cached images..."
        row = [c.strip() for c in lines[4].split("|")[1:-1]]
        assert row[0] == image.id and row[3:] == ["300000", "0"]
        assert await ctl("-H", label, "-f", "-v", "queue-image", other.id) == 0
        assert capsys.readouterr().out.startswith(f"Queued image {other.id} for caching\n")
        assert await ctl("-H", label, "--json", "list-queued") == 0
        queued = json.loads(capsys.readouterr().out)["queued_images"]
        assert [(q["image_id"], q["state"], q["bytes_done"]) for q in queued] == [
            (other.id, "queued", 0)
        ]
        assert await ctl("-H", label, "-f", "delete-queued-image", other.id) == 0
        assert await ctl("-H", label, "-f", "delete-cached-image", image.id) == 0
        assert await ctl("-H", label, "list-cached") == 0
        assert await ctl("-H", label, "list-queued") == 0
        assert capsys.readouterr().out == "No cached images.\nNo queued images.\n"
        assert await ctl("-H", label, "-f", "-v", "queue-image", other.id) == 0
        assert await ctl("-H", label, "-f", "-v", "delete-all-queued-images") == 0
        assert await ctl("-H", label, "-f", "-v", "delete-all-cached-images") == 0
        out = capsys.readouterr().out.splitlines()
        assert (out[2], out[4]) == ("Deleted 1 queued images", "Deleted 0 cached images")
    finally:
        await stop_daemon(d)


async def test_the_management_socket_of_the_config_is_used(
    glance: FakeGlance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "admin.sock"
    d = await start_daemon(tmp_path, glance.url, admin_listen=f"unix:{sock}")
    try:
        conf = tmp_path / "cached.yaml"
        conf.write_text(f"listen: {d.url.removeprefix('http://')}\nadmin_listen: unix:{sock}\n")
        assert await ctl("-c", str(conf), "list-cached") == 0  # no token: the socket decides
        assert capsys.readouterr() == ("No cached images.\n", "")
        assert await ctl("--all-hosts", "-c", str(conf), "--json", "list-cached") == 0
        assert json.loads(capsys.readouterr().out) == {"cached_images": [], "errors": []}
    finally:
        await stop_daemon(d)


async def test_progress_of_a_fetch_on_the_daemon(
    glance: FakeGlance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = glance.add_image(os.urandom(8 << 20), owner="p1", rate=4 << 20)  # ~2 s
    d = await start_daemon(tmp_path, glance.url, admin_listen=f"unix:{tmp_path / 'admin.sock'}")
    try:
        # glance cache-queue: queued, and fetched at once with the caller's token.
        assert d.admin_session is not None
        async with d.admin_session.put(
            f"{d.admin_base}/v2/cache/{image.id}", headers={"X-Auth-Token": "token-admin"}
        ) as resp:
            assert resp.status == 202
        label = d.admin_url

        async def measured() -> bool:
            assert await ctl("-H", label, "--json", "list-queued") == 0
            (row,) = json.loads(capsys.readouterr().out)["queued_images"]
            return row["state"] == "fetching" and row["rate"] is not None

        await wait_for(measured)
        assert await ctl("-H", label, "list-queued") == 0
        cells = [c.strip() for c in capsys.readouterr().out.splitlines()[4].split("|")[1:-1]]
        assert cells[:2] == [image.id, "fetching"]
        assert cells[2].endswith("%") and cells[3] == "8.0 MiB" and cells[4].endswith(" MB/s")
    finally:
        await stop_daemon(d)


async def test_admin_tokens_of_the_daemon(
    glance: FakeGlance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    digest = "sha256:" + hashlib.sha256(b"token-admin").hexdigest()
    d = await start_daemon(tmp_path, glance.url, admin_tokens=[digest])
    label = d.url.removeprefix("http://")
    try:
        assert await ctl("-H", label, "--os-auth-token", "token-p1", "list-cached") == 1
        assert capsys.readouterr() == ("", "Not authorized to make this request.\n")
        assert await ctl("-H", label, "list-cached") == 1
        assert "401" in capsys.readouterr().err
        assert await ctl("-H", label, "--os-auth-token", "token-admin", "list-cached") == 0
        assert capsys.readouterr() == ("No cached images.\n", "")
    finally:
        await stop_daemon(d)


async def test_all_hosts_against_two_daemons(
    glance: FakeGlance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = glance.add_image(os.urandom(3 << 20), owner="p1")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    digest = "sha256:" + hashlib.sha256(b"token-admin").hexdigest()
    a = await start_daemon(tmp_path / "a", glance.url, admin_tokens=[digest])
    b = await start_daemon(tmp_path / "b", glance.url, admin_tokens=[digest])
    try:
        for d in (a, b):
            assert (await d.get(image.id))[0] == 200
        conf = tmp_path / "cached.yaml"
        conf.write_text(f"listen: {a.url.removeprefix('http://')}\npeers: [{b.url}]\n")
        token = ("--os-auth-token", "token-admin")
        assert await ctl("--all-hosts", "-c", str(conf), *token, "list-cached") == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "Found 2 cached images on 2 hosts..."
        rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[4:6]]
        hosts = [d.url.removeprefix("http://") for d in (a, b)]
        assert [(r[0], r[1], r[4]) for r in rows] == [(h, image.id, "3.0 MiB") for h in hosts]
    finally:
        await stop_daemon(a)
        await stop_daemon(b)
