# ruff: noqa: E501  (the tables asserted here are wider than a line of code)
"""The real OpenStack clients against a real ``cached serve``: python-glanceclient's
``glance cache-*`` (the v2 Cache API) and Glance's ``glance-cache-manage`` (the legacy API),
from the glance virtualenv, and ``cached-manage`` next to them.

``cached serve`` runs as a subprocess in front of a :class:`fakeglance.FakeGlance` served by
the test's own event loop; the clients run through ``asyncio.create_subprocess_exec`` so the
fake keeps answering while they block. The daemon accepts the admin token by its sha256
(``admin_tokens``), as an operator would configure it.

The virtualenv is ``$CACHED_GLANCE_VENV`` (default ``~/.cache/cached-glance-venv``), built by
``.ci/glance-venv.sh`` when it is missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakeglance import FakeGlance

REPO = Path(__file__).resolve().parent.parent
ADMIN = "token-admin"  # admin in the fake Glance too: the daemon fetches with it
MiB = 1 << 20
LISTENING = re.compile(r"listening on (http://\S+)")

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="session")
def venv() -> Path:
    path = Path(
        os.environ.get("CACHED_GLANCE_VENV") or Path.home() / ".cache" / "cached-glance-venv"
    )
    if not all((path / "bin" / exe).exists() for exe in ("glance", "glance-cache-manage")):
        subprocess.run(
            ["bash", str(REPO / ".ci" / "glance-venv.sh"), str(path)], check=True, timeout=1800
        )
    return path


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def ok(self) -> str:
        """stdout, after checking that the command succeeded."""
        assert self.rc == 0, f"rc {self.rc}\nstdout:\n{self.out}\nstderr:\n{self.err}"
        return self.out


@dataclass
class Node:
    """``cached serve`` as a subprocess; ``log`` collects its stderr."""

    proc: asyncio.subprocess.Process
    url: str
    log: list[str] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None
    admin_url: str = ""  # the management listener (admin_listen), if any

    @property
    def port(self) -> str:
        return self.url.rpartition(":")[2]


async def start_node(workdir: Path, upstream: str, **options: Any) -> Node:
    """``cached serve --listen 127.0.0.1:0 --upstream URL --cache-dir DIR -c CONFIG``.

    ``workdir`` must exist; the config file written there holds ``options``.
    """
    config = workdir / "cached.yaml"
    config.write_text(json.dumps(options))  # noqa: ASYNC240 (a few bytes; JSON is YAML)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cached.cli", "serve", "--listen", "127.0.0.1:0",
        "--upstream", upstream, "--cache-dir", str(workdir / "cache"), "-c", str(config),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, cwd=workdir,
    )  # fmt: skip
    assert proc.stderr is not None
    log: list[str] = []
    try:
        async with asyncio.timeout(20):
            while not (match := LISTENING.search(log[-1] if log else "")):
                line = await proc.stderr.readline()
                if not line:
                    raise AssertionError("cached serve exited:\n" + "".join(log))
                log.append(line.decode(errors="replace"))
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    admin = re.search(r"management API on (\S+)", "".join(log))  # logged before the listeners
    node = Node(proc, match[1], log, admin_url=admin[1] if admin else "")

    async def drain() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            log.append(line.decode(errors="replace"))

    node.drain = asyncio.create_task(drain())
    return node


async def stop_node(node: Node) -> None:
    if node.proc.returncode is None:
        node.proc.terminate()
        try:
            await asyncio.wait_for(node.proc.wait(), 10)
        except TimeoutError:
            node.proc.kill()
            await node.proc.wait()
    if node.drain is not None:
        await node.drain


class Clients:
    """The clients, each run as a subprocess with a private HOME and no OS_* variables."""

    def __init__(self, venv: Path, home: Path) -> None:
        self.bin = venv / "bin"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
        self.env |= {"HOME": str(home), "PYTHONWARNINGS": "ignore"}

    async def run(self, *argv: str, stdin: str = "") -> Result:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return Result(proc.returncode or 0, out.decode(), err.decode())

    async def glance(self, node: Node, *args: str, token: str = ADMIN) -> Result:
        """``glance --os-image-url URL --os-auth-token TOKEN ARGS``."""
        return await self.run(
            str(self.bin / "glance"), "--os-image-url", node.url, "--os-auth-token", token, *args
        )

    async def cache_manage(
        self, node: Node, *args: str, token: str = ADMIN, stdin: str = ""
    ) -> Result:
        """``glance-cache-manage -H 127.0.0.1 -p PORT --os-auth-token TOKEN ARGS``."""
        return await self.run(
            str(self.bin / "glance-cache-manage"), "-H", "127.0.0.1", "-p", node.port,
            "--os-auth-token", token, *args, stdin=stdin,
        )  # fmt: skip

    async def ctl(self, node: Node, *args: str, token: str = ADMIN) -> Result:
        """``cached-manage -H 127.0.0.1 -p PORT --os-auth-token TOKEN ARGS``."""
        return await self.run(
            sys.executable, "-m", "cached.ctl", "-H", "127.0.0.1", "-p", node.port,
            "--os-auth-token", token, *args,
        )  # fmt: skip


@pytest.fixture
def clients(venv: Path, tmp_path: Path) -> Clients:
    return Clients(venv, tmp_path / "home")


@pytest.fixture
async def node(
    glance: FakeGlance, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Node]:
    options = {"admin_tokens": ["sha256:" + hashlib.sha256(ADMIN.encode()).hexdigest()]}
    options |= getattr(request, "param", {})
    (tmp_path / "node").mkdir()
    n = await start_node(tmp_path / "node", glance.url, **options)
    yield n
    await stop_node(n)
    (tmp_path / "node" / "cached.log").write_text("".join(n.log))  # for a failing test


def rows(table: str) -> list[list[str]]:
    """The data rows of a PrettyTable (the header row left out)."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in lines[1:]]


async def cache_state(node: Node) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(node.url + "/v2/cache", headers={"X-Auth-Token": ADMIN}) as resp,
    ):
        assert resp.status == 200
        return dict(await resp.json())


async def download(node: Node, image_id: str, token: str = "token-p1") -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{node.url}/v2/images/{image_id}/file", headers={"X-Auth-Token": token}
        ) as resp,
    ):
        assert resp.status == 200
        await resp.read()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 (polling another process)
            await asyncio.sleep(0.05)


async def cached_ids(node: Node, *image_ids: str) -> None:
    """Wait until exactly these images are cached (complete) on the node."""

    async def done() -> bool:
        state = await cache_state(node)
        return sorted(r["image_id"] for r in state["cached_images"]) == sorted(image_ids)

    await eventually(done)


# ---- glance cache-* (python-glanceclient, the v2 Cache API) ------------------------------------


@pytest.mark.timeout(300)  # runs of the real glance client: ~70 s idle, over 90 s under load
@pytest.mark.parametrize(
    # Without prune_on_fill the cache may go past its size until a prune: cache-prune then
    # has something to do.
    "node",
    [{"image_cache_max_size": "1536K", "max_image_fraction": 1.0, "prune_on_fill": False}],
    indirect=True,
)
async def test_glance_cache_commands(glance: FakeGlance, node: Node, clients: Clients) -> None:
    x = glance.add_image(os.urandom(MiB), owner="p1")
    y = glance.add_image(os.urandom(MiB), owner="p1")
    empty = await clients.glance(node, "cache-list")
    assert empty.ok() == (
        "+----+-------+---------------------+---------------------+------+------+\n"
        "| ID | State | Last Accessed (UTC) | Last Modified (UTC) | Size | Hits |\n"
        "+----+-------+---------------------+---------------------+------+------+\n"
        "+----+-------+---------------------+---------------------+------+------+\n"
    )

    queued = await clients.glance(node, "cache-queue", x.id, y.id)  # fetched at once
    assert (queued.rc, queued.out, queued.err) == (0, "", "")
    await cached_ids(node, x.id, y.id)
    await download(node, x.id)  # a hit
    listed = await clients.glance(node, "cache-list")
    assert listed.rc == 0
    by_id = {r[0]: r for r in rows(listed.out)}
    assert by_id.keys() == {x.id, y.id}
    assert by_id[x.id][1] == "cached" and by_id[x.id][4:] == [str(MiB), "1"]
    iso = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?")
    assert all(iso.fullmatch(by_id[i][c]) for i in (x.id, y.id) for c in (2, 3))
    assert by_id[y.id][1] == "cached" and by_id[y.id][4:] == [str(MiB), "0"]  # never read

    nodes = await clients.glance(node, "cache-nodes-list", x.id)
    assert nodes.rc == 0 and rows(nodes.out) == [[node.url]]

    # Over the 1.5 MiB limit: prune evicts the least recently used (y, never read).
    pruned = await clients.glance(node, "cache-prune")
    assert (pruned.rc, pruned.out) == (0, f"Pruned 1 file(s), {MiB} byte(s).\n")
    cleaned = await clients.glance(node, "cache-clean")
    assert (cleaned.rc, cleaned.out, cleaned.err) == (0, "", "")
    await cached_ids(node, x.id)

    queue_y = await clients.cache_manage(node, "-f", "queue-image", y.id)  # legacy: only queued
    assert queue_y.rc == 0
    listed = await clients.glance(node, "cache-list")
    assert [r[:2] for r in rows(listed.out)] == [[x.id, "cached"], [y.id, "queued"]]
    assert rows(listed.out)[1][2:] == ["N/A"] * 4

    assert (await clients.glance(node, "cache-clear", "--target", "queue")).rc == 0
    assert await cache_state(node) == {
        "cached_images": [await row_of(node, x.id)],
        "queued_images": [],
    }
    assert (await clients.cache_manage(node, "-f", "queue-image", y.id)).rc == 0
    assert (await clients.glance(node, "cache-clear", "--target", "cache")).rc == 0
    assert await cache_state(node) == {"cached_images": [], "queued_images": [y.id]}
    await download(node, x.id)
    await cached_ids(node, x.id)
    cleared = await clients.glance(node, "cache-clear")
    assert (cleared.rc, cleared.out, cleared.err) == (0, "", "")
    assert await cache_state(node) == {"cached_images": [], "queued_images": []}

    await download(node, x.id)
    await cached_ids(node, x.id)
    deleted = await clients.glance(node, "cache-delete", x.id)
    assert (deleted.rc, deleted.out, deleted.err) == (0, "", "")
    assert await cache_state(node) == {"cached_images": [], "queued_images": []}


async def row_of(node: Node, image_id: str) -> dict[str, Any]:
    state = await cache_state(node)
    (row,) = [r for r in state["cached_images"] if r["image_id"] == image_id]
    return dict(row)


async def test_glance_cache_commands_need_an_admin(
    glance: FakeGlance, node: Node, clients: Clients
) -> None:
    image = glance.add_image(os.urandom(1000), owner="p1")
    # One after the other: glanceclient caches the image schema under $HOME, and clients run
    # at once in one $HOME can read another's half-written schema file ("Expecting value").
    listed = await clients.glance(node, "cache-list", token="token-p1")
    queued = await clients.glance(node, "cache-queue", image.id, token="token-p1")
    cleared = await clients.glance(node, "cache-clear", token="token-p1")
    assert listed.rc == 1 and "403" in listed.err
    assert queued.err == f"You are not permitted to queue the image '{image.id}' for caching.\n"
    assert cleared.err == "You are not permitted to delete image(s) from cache.\n"
    assert await cache_state(node) == {"cached_images": [], "queued_images": []}


# ---- glance-cache-manage (the legacy API), and cached-manage beside it -------------------------


@pytest.mark.timeout(300)  # ~25 runs of the real glance-cache-manage, ~1 CPU s each
async def test_glance_cache_manage_commands(
    glance: FakeGlance, node: Node, clients: Clients
) -> None:
    x = glance.add_image(os.urandom(100_000), owner="p1")
    y, z = (glance.add_image(os.urandom(1000), owner="p1") for _ in range(2))
    await download(node, x.id)
    await cached_ids(node, x.id)
    queued = await clients.cache_manage(node, "-f", "-v", "queue-image", y.id)
    assert queued.ok().startswith(f"Queued image {y.id} for caching\nCompleted in ")
    theirs, ours, their_queue, our_queue = await asyncio.gather(
        clients.cache_manage(node, "list-cached"),
        clients.ctl(node, "--bytes", "list-cached"),
        clients.cache_manage(node, "list-queued"),
        clients.ctl(node, "list-queued"),
    )
    assert theirs.ok().startswith("Found 1 cached images...\n")
    (row,) = rows(theirs.out)
    assert (row[0], row[3:]) == (x.id, ["100000", "0"])  # a miss is no hit
    assert (ours.rc, ours.out, ours.err) == (0, theirs.out, "")  # the same table, byte for byte
    assert their_queue.ok() == (
        "Found 1 queued images...\n"
        "+--------------------------------------+\n"
        "|                  ID                  |\n"
        "+--------------------------------------+\n"
        f"| {y.id} |\n"
        "+--------------------------------------+\n"
    )
    assert our_queue.ok().startswith("Found 1 queued images...\n")
    assert rows(our_queue.out) == [[y.id, "queued", "-", "-", "-"]]  # size unknown until fetched

    refused, wrong, bad, _ = await asyncio.gather(
        clients.cache_manage(node, "delete-all-cached-images", stdin="n\n"),
        clients.cache_manage(node, "list-cached", token="token-p1"),
        clients.cache_manage(node, "-f", "delete-cached-image", "not-a-uuid"),
        clients.cache_manage(node, "-f", "queue-image", z.id),
    )
    assert (refused.rc, refused.out) == (0, "Delete all cached images? [y/N] ")
    assert (wrong.rc, wrong.out) == (1, "Not authorized to make this request.\n")
    assert (bad.rc, bad.out) == (1, "Image ID 'not-a-uuid' is not a valid UUID.\n")
    assert await cache_state(node) == {
        "cached_images": [await row_of(node, x.id)],
        "queued_images": [y.id, z.id],
    }

    one_queued, one_cached = await asyncio.gather(
        clients.cache_manage(node, "-f", "-v", "delete-queued-image", y.id),
        clients.cache_manage(node, "-f", "-v", "delete-cached-image", x.id),
    )
    assert one_queued.ok().startswith(f"Deleted queued image {y.id}\n")
    assert one_cached.ok().startswith(f"Deleted cached image {x.id}\n")
    assert await cache_state(node) == {"cached_images": [], "queued_images": [z.id]}
    await download(node, x.id)
    await cached_ids(node, x.id)
    all_queued, all_cached = await asyncio.gather(
        clients.cache_manage(node, "-f", "-v", "delete-all-queued-images"),
        clients.cache_manage(node, "-f", "-v", "delete-all-cached-images"),
    )
    assert all_queued.ok().startswith("Deleted 1 queued images\n")
    assert all_cached.ok().startswith("Deleted 1 cached images\n")
    assert await cache_state(node) == {"cached_images": [], "queued_images": []}


@pytest.mark.parametrize(
    "node", [{"admin_tokens": [], "admin_listen": "127.0.0.1:0"}], indirect=True
)
async def test_without_auth_configured_the_management_listener_is_the_operators(
    glance: FakeGlance, node: Node, clients: Clients
) -> None:
    """Loopback is not a credential (issue 9): the real clients are refused on the public
    listener and work on the management listener (admin_listen)."""
    image = glance.add_image(os.urandom(1000), owner="p1")
    await download(node, image.id)
    refused = await clients.glance(node, "cache-list", token="token-p1")
    assert refused.rc != 0 and "403" in refused.out + refused.err
    assert node.admin_url.startswith("http://127.0.0.1:")
    admin = Node(node.proc, node.admin_url, node.log)
    await cached_ids(admin, image.id)
    listed, legacy, ours = await asyncio.gather(
        clients.glance(admin, "cache-list", token="token-p1"),
        clients.cache_manage(admin, "list-cached", token="token-p1"),
        clients.run(sys.executable, "-m", "cached.ctl", "-p", admin.port, "--json", "list-cached"),
    )
    assert [r[:2] for r in rows(listed.out)] == [[image.id, "cached"]]
    assert legacy.out.startswith("Found 1 cached images...\n")
    assert [r["image_id"] for r in json.loads(ours.out)["cached_images"]] == [image.id]
