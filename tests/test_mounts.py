"""Declared directories (issue 10): real tmpfs and FUSE mounts under a real ``cached serve``.

Every scenario mounts, unmounts or breaks a filesystem under a running daemon subprocess
with downloads in flight, and checks the bytes clients got and what is on disk afterwards.
Mounting needs root: without it these tests skip, unless ``$CACHED_MOUNT_REQUIRED`` is set
(CI sets it: there a refused mount is a failure, never a silent skip).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import auth, tree
from daemonproc import CachedProcess
from fakeglance import FakeGlance
from faultfs import FaultFS

from cached.cachedir import mounts
from cached.cachedir.mounts import Identity, ProbeSpec, State

MiB = 1 << 20
LAYOUT = ["incomplete/", "invalid/", "queue/"]


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


class Mounts:
    """Mounts made by one test; all undone at its end (lazily, innermost first)."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def mount(self, *args: str) -> None:
        res = _run("mount", *args)
        if res.returncode != 0:
            raise AssertionError(f"mount {' '.join(args)} failed: {res.stderr}")
        self.points.append(Path(args[-1]))

    def tmpfs(self, path: Path, size: str = "64m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        self.mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
        return path

    def bind(self, source: Path, target: Path) -> None:
        self.mount("--bind", str(source), str(target))

    def remount(self, path: Path, options: str) -> None:
        """``mount -o remount,...``; a file still open for writing (a fill closing its file
        just after its commit) makes ``ro`` busy for a moment: try again, bounded."""
        deadline = time.monotonic() + 15
        while True:
            res = _run("mount", "-o", f"remount,{options}", str(path))
            if res.returncode == 0:
                return
            assert "busy" in res.stderr and time.monotonic() < deadline, res.stderr
            time.sleep(0.05)

    def umount(self, path: Path) -> None:
        """``umount -l``: a share that goes away with files still open on it."""
        res = _run("umount", "-l", str(path))
        assert res.returncode == 0, res.stderr

    def cleanup(self) -> None:
        for path in reversed(self.points):
            while mounts.is_mount_point(path):
                if _run("umount", "-l", str(path)).returncode != 0:
                    break


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Mounts]:
    made = Mounts()
    probe = tmp_path / "can-mount"
    probe.mkdir()
    res = _run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe))
    if res.returncode != 0:
        reason = f"mounting a tmpfs was refused (run as root): {res.stderr.strip()}"
        if os.environ.get("CACHED_MOUNT_REQUIRED"):
            pytest.fail(reason)
        pytest.skip(reason)
    _run("umount", str(probe))
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def faultfs(tmp_path: Path, mounted: Mounts) -> Iterator[FaultFS]:
    """A FUSE pass-through at ``tmp_path/fuse`` over ``tmp_path/backing``."""
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as exc:  # fusepy, or libfuse2 under it, missing
        if os.environ.get("CACHED_MOUNT_REQUIRED"):
            raise
        pytest.skip(f"FUSE tests need fusepy and libfuse2 (see .ci/run): {exc}")
    backing, point = tmp_path / "backing", tmp_path / "fuse"
    backing.mkdir()
    point.mkdir()
    fs = FaultFS(backing, point, tmp_path / "faultfs.mode")
    fs.mount()
    try:
        yield fs
    finally:
        fs.unmount()


@dataclass
class Node:
    """A ``cached serve`` subprocess and a client session for it."""

    proc: CachedProcess
    session: aiohttp.ClientSession

    async def get(self, image_id: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        url = f"{self.proc.url}/v2/images/{image_id}/file"
        async with self.session.get(url, headers={**auth(), **headers}) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    async def answer(self, path: str) -> tuple[int, Any]:
        # As an admin: loopback is no credential for the management API.
        async with self.session.get(self.proc.url + path, headers=auth("token-admin")) as resp:
            body = await resp.read()
            try:
                return resp.status, json.loads(body)
            except ValueError:
                return resp.status, body

    async def guards(self) -> dict[str, dict[str, Any]]:
        status, doc = await asyncio.wait_for(self.answer("/v2/cache/progress"), 10)
        assert status == 200, doc
        return {d["name"]: d for d in doc["directories"]}

    async def wait_state(self, state: str, name: str = "cache", within: float = 30) -> float:
        """Until the guard ``name`` says ``state``; returns how long that took (seconds)."""
        started = time.monotonic()
        while True:
            guard = (await self.guards())[name]
            # ok counts once the index is rebuilt from what the directory holds now
            if guard["state"] == state and (state != "ok" or guard.get("indexed", True)):
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise AssertionError(f"{name} is still {guard['state']}: {guard['reason']}")
            await asyncio.sleep(0.02)

    async def wait_cached(self, image_id: str, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while True:
            status, doc = await self.answer("/v2/cache")
            if status == 200 and image_id in {i["image_id"] for i in doc["cached_images"]}:
                return
            assert time.monotonic() < deadline, f"{image_id} never listed as cached: {doc}"
            await asyncio.sleep(0.02)

    async def wait_stored(self, image_id: str, data: bytes, within: float = 30) -> float:
        """Download until the cache takes part again (every answer exact); returns how long
        that took (seconds)."""
        started = time.monotonic()
        while True:
            status, headers, body = await self.get(image_id)
            assert (status, body) == (200, data), headers
            if headers["Cache-Status"] == "cached; fwd=uri-miss; stored":
                return time.monotonic() - started
            assert time.monotonic() - started < within, headers["Cache-Status"]
            await asyncio.sleep(0.2)

    async def cached_ids(self) -> set[str]:
        status, doc = await self.answer("/v2/cache")
        assert status == 200, doc
        return {i["image_id"] for i in doc["cached_images"]}


@pytest.fixture
async def start_node(tmp_path: Path) -> AsyncIterator[Any]:
    nodes: list[Node] = []

    async def start(upstream: str, cache: Path, **options: Any) -> Node:
        config = tmp_path / f"cached{len(nodes)}.yaml"
        options.setdefault("admin_tokens", [f"sha256:{hashlib.sha256(b'token-admin').hexdigest()}"])
        config.write_text(json.dumps(options))  # JSON is YAML
        proc = CachedProcess(upstream, cache, tmp_path / "cached.log", "-c", str(config))
        await asyncio.to_thread(proc.start)
        node = Node(proc, aiohttp.ClientSession(auto_decompress=False))
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        await node.session.close()
        await asyncio.to_thread(node.proc.stop)


FAST = {"probe_interval": 0.2, "probe_timeout": 1.0}


def _bypass(state: str) -> str:
    return f"cached; fwd=bypass; detail={state}"


# --- the mount table and the probe, in-process -------------------------------------------


def test_mountinfo_is_parsed_with_escapes_and_stacking() -> None:
    text = (
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "40 27 0:40 / /srv/my\\040share rw,nosuid - nfs4 server:/export rw,vers=4.2\n"
        "41 27 0:41 / /srv/my\\040share ro - tmpfs tmpfs ro\n"
    )
    table = mounts.parse_mountinfo(text)
    assert [m.mount_point for m in table] == ["/", "/srv/my share", "/srv/my share"]
    top = mounts.mount_of("/srv/my share/images", table)
    assert top is not None and (top.mount_id, top.fstype, top.read_only) == (41, "tmpfs", True)
    root = mounts.mount_of("/srv/other", table)
    assert root is not None and root.fstype == "ext4"
    assert mounts.mount_of("/srv/my shared", table) is root  # a prefix is not a parent


def test_probe_states_on_a_real_tmpfs(tmp_path: Path, mounted: Mounts) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    cache = ProbeSpec(require_mount=True, writable=True, needs_xattrs=True)
    verdict = mounts.probe(plain, cache, None)
    assert verdict.state is State.VANISHED and "not a mount point" in verdict.reason
    assert os.listdir(plain) == []

    point = mounted.tmpfs(tmp_path / "share", "4m")
    verdict = mounts.probe(point, cache, None)
    assert verdict.state is State.OK, verdict.reason
    assert verdict.identity is not None and verdict.identity.mounted
    assert os.listdir(point) == []  # the probe file is unnamed (O_TMPFILE)

    wrong = ProbeSpec(require_mount=True, fstype="nfs4", writable=True)
    assert mounts.probe(point, wrong, None).state is State.VANISHED

    mounted.remount(point, "ro")
    verdict = mounts.probe(point, cache, None)
    assert verdict.state is State.READ_ONLY, verdict.reason
    store = ProbeSpec(require_mount=True)  # a store may well be read-only
    assert mounts.probe(point, store, None).state is State.OK

    baseline = verdict.identity
    mounted.umount(point)
    verdict = mounts.probe(point, ProbeSpec(writable=True), baseline)
    assert verdict.state is State.VANISHED and "no longer a mount point" in verdict.reason
    other = Identity(baseline.mount_id, baseline.st_dev + 1, mounted=False) if baseline else None
    assert mounts.probe(point, ProbeSpec(), other).state is State.VANISHED  # st_dev changed


# --- the cache directory ------------------------------------------------------------------


async def test_start_on_an_unmounted_required_cache_dir(
    tmp_path: Path, mounted: Mounts, glance: FakeGlance, start_node: Any
) -> None:
    """Problem 1: nothing is created in the bare mount point, everything passes through and
    the reason is visible; mounting the share later starts caching without a restart."""
    cache = tmp_path / "cache"
    cache.mkdir()
    node = await start_node(glance.url, cache, image_cache_mount={"require_mount": True, **FAST})
    data = os.urandom(3 * MiB)
    image = glance.add_image(data)
    for _ in range(2):
        status, headers, body = await node.get(image.id)
        assert (status, headers["Cache-Status"]) == (200, _bypass("vanished"))
        assert body == data
    assert tree(cache) == []
    guard = (await node.guards())["cache"]
    assert guard["state"] == "vanished" and "not a mount point" in guard["reason"]
    assert "is not mounted" in node.proc.output()
    assert (await node.answer("/versions"))[0] == 200
    # cached-manage says why too (stderr: its stdout stays glance-cache-manage's table)
    port = node.proc.url.rsplit(":", 1)[1]
    manage = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "cached.ctl",
            "-H",
            "127.0.0.1",
            "-p",
            port,
            "--os-auth-token",
            "token-admin",
            "list-cached",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert manage.returncode == 0, manage.stderr
    assert f"cache directory {cache} is vanished since" in manage.stderr
    assert "not a mount point" in manage.stderr

    mounted.tmpfs(cache)
    took = await node.wait_state("ok")
    status, headers, body = await node.get(image.id)
    assert (status, headers["Cache-Status"], body) == (200, "cached; fwd=uri-miss; stored", data)
    await node.wait_cached(image.id)
    status, headers, body = await node.get(image.id)
    assert (status, headers["Cache-Status"], body) == (200, "cached; hit", data)
    assert tree(cache) == sorted([*LAYOUT, image.id])
    print(f"\nstart unmounted: caching resumed {took:.2f}s after the mount")


async def test_share_unmounted_under_load_then_back_empty_then_populated(
    tmp_path: Path, mounted: Mounts, glance: FakeGlance, start_node: Any
) -> None:
    """Problem 2: a cache share that goes away under a running daemon is detected without a
    failed write; an empty share mounted back is laid out afresh and caches again, and the
    original share mounted back brings its entries back as hits."""
    share = mounted.tmpfs(tmp_path / "share")  # the "server side": outlives the unmount
    cache = tmp_path / "cache"
    cache.mkdir()
    mounted.bind(share, cache)
    node = await start_node(glance.url, cache, image_cache_mount=FAST)
    kept = os.urandom(2 * MiB)
    kept_image = glance.add_image(kept)
    assert (await node.get(kept_image.id))[2] == kept
    await node.wait_cached(kept_image.id)

    slow = os.urandom(8 * MiB)
    slow_image = glance.add_image(slow, rate=4 * MiB)  # about 2 s
    in_flight = asyncio.create_task(node.get(slow_image.id))
    await asyncio.sleep(0.3)  # let it start: the umount happens mid-download
    gone = time.time()
    await asyncio.to_thread(mounted.umount, cache)
    detected = await node.wait_state("vanished")
    try:
        status, _, body = await in_flight
        assert (status, body) == (200, slow)  # whole and right, or cut below: never wrong
    except aiohttp.ClientPayloadError:
        pass
    guard = (await node.guards())["cache"]
    assert "no longer a mount point" in guard["reason"]
    other = os.urandom(MiB)
    other_image = glance.add_image(other)
    for image_id, data in ((kept_image.id, kept), (other_image.id, other)):
        status, headers, body = await node.get(image_id)
        assert (status, headers["Cache-Status"], body) == (200, _bypass("vanished"), data)
    assert tree(cache) == []  # nothing written into the bare mount point
    assert "no longer a mount point" in node.proc.output()

    # an empty share comes back: laid out afresh, the index forgets what is not there
    mounted.tmpfs(cache, "32m")
    back_empty = await node.wait_state("ok")
    assert await node.cached_ids() == set()
    status, headers, body = await node.get(other_image.id)
    assert (status, headers["Cache-Status"], body) == (200, "cached; fwd=uri-miss; stored", other)
    await node.wait_cached(other_image.id)
    assert tree(cache) == sorted([*LAYOUT, other_image.id])

    # the original share comes back: its complete entries are hits again
    mounted.umount(cache)
    await node.wait_state("vanished")
    mounted.bind(share, cache)
    back_populated = await node.wait_state("ok")
    await node.wait_cached(kept_image.id)
    status, headers, body = await node.get(kept_image.id)
    assert (status, headers["Cache-Status"], body) == (200, "cached; hit", kept)
    assert other_image.id not in await node.cached_ids()
    # nothing on the share claims bytes it lacks: whatever it lists is served whole and right
    for image_id in await node.cached_ids():
        data = {kept_image.id: kept, slow_image.id: slow}[image_id]
        assert (await node.get(image_id))[2] == data
    print(
        f"\nunmount under load: detected within {detected:.2f}s (of {time.time() - gone:.1f}s); "
        f"back empty ok and caching after {back_empty:.2f}s; "
        f"back populated ok after {back_populated:.2f}s"
    )


async def test_cache_remounted_read_only(
    tmp_path: Path, mounted: Mounts, glance: FakeGlance, start_node: Any
) -> None:
    """Problem 4 (read-only): noticed by the probe, before any write fails; hits go on, new
    images pass through, nothing changes on disk; read-write again resumes caching."""
    cache = mounted.tmpfs(tmp_path / "cache")
    node = await start_node(glance.url, cache, image_cache_mount=FAST)
    data = os.urandom(2 * MiB)
    image = glance.add_image(data)
    assert (await node.get(image.id))[2] == data
    await node.wait_cached(image.id)
    before = tree(cache)

    mounted.remount(cache, "ro")
    took = await node.wait_state("read_only")
    status, headers, body = await node.get(image.id)
    assert (status, headers["Cache-Status"], body) == (200, "cached; hit", data)
    new = os.urandom(MiB)
    new_image = glance.add_image(new)
    status, headers, body = await node.get(new_image.id)
    assert (status, headers["Cache-Status"], body) == (200, _bypass("read_only"), new)
    assert tree(cache) == before
    assert [r.range for r in glance.data_requests(new_image.id)] == ["bytes=0-0", None]

    mounted.remount(cache, "rw")
    await node.wait_state("ok")
    status, headers, body = await node.get(new_image.id)
    assert (status, headers["Cache-Status"], body) == (200, "cached; fwd=uri-miss; stored", new)
    print(f"\nremount read-only: detected within {took:.2f}s")


# --- the file store -----------------------------------------------------------------------


async def test_store_share_gone_is_503_never_404(
    tmp_path: Path, mounted: Mounts, start_node: Any
) -> None:
    """Problem 3: a missing store share answers 503 naming the state, for downloads, records
    and lists, and serves again once it is back."""
    share = mounted.tmpfs(tmp_path / "share")
    images = tmp_path / "images"
    images.mkdir()
    mounted.bind(share, images)
    data = os.urandom(MiB)
    image_id = "0b4dcd22-6c61-4d5c-9b87-4a0e8b4f6d10"
    (images / image_id).write_bytes(data)
    cache = tmp_path / "cache"
    cache.mkdir()
    node = await start_node(
        f"file://{images}", cache, upstream_mount={"require_mount": True, **FAST}
    )
    assert (await node.get(image_id))[2] == data

    mounted.umount(images)
    await node.wait_state("vanished", "store")
    for path in (f"/v2/images/{image_id}/file", f"/v2/images/{image_id}", "/v2/images"):
        async with node.session.get(node.proc.url + path) as resp:
            body = await resp.json()
            assert resp.status == 503, (path, body)
            assert resp.headers["Content-Type"].startswith("application/json")
            assert body["code"] == "503 Service Unavailable"
            assert body["title"] == "Service Unavailable"
            assert "vanished" in body["message"] and str(images) not in body["message"]
    assert tree(images) == []
    # /readyz: the upstream (the store) is not reachable; before it said "reachable", 200.
    async with node.session.get(node.proc.url + "/readyz", headers=auth("token-admin")) as resp:
        ready = await resp.json()
        assert resp.status == 503, ready
        assert "vanished" in ready["checks"]["upstream"], ready

    mounted.bind(share, images)
    await node.wait_state("ok", "store")
    status, _, body = await node.get(image_id)
    assert (status, body) == (200, data)
    async with node.session.get(node.proc.url + "/readyz", headers=auth("token-admin")) as resp:
        ready = await resp.json()
        assert (resp.status, ready["checks"]["upstream"]) == (200, "reachable"), ready


# --- hung and failing shares (FUSE) -------------------------------------------------------


async def test_hung_cache_share_is_detected_and_everything_else_answers(
    faultfs: FaultFS, glance: FakeGlance, start_node: Any
) -> None:
    """Problem 4 (hung): a cache share that stops answering is hung within the probe
    timeout; pass-through, the management API and /versions keep answering meanwhile, and
    the cache serves again once the share answers, without a restart."""
    cache = faultfs.mountpoint
    node = await start_node(
        glance.url, cache, image_cache_mount={"probe_interval": 0.2, "probe_timeout": 1.0}
    )
    data = os.urandom(2 * MiB)
    image = glance.add_image(data)
    assert (await node.get(image.id))[2] == data
    await node.wait_cached(image.id)

    faultfs.set("block")
    try:
        took = await node.wait_state("hung")
        guard = (await node.guards())["cache"]
        assert "has not returned" in guard["reason"]
        fresh = os.urandom(MiB)
        fresh_image = glance.add_image(fresh)
        for image_id, expected in ((fresh_image.id, fresh), (image.id, data)):
            status, headers, body = await asyncio.wait_for(node.get(image_id), 10)
            assert (status, headers["Cache-Status"], body) == (200, _bypass("hung"), expected)
        assert (await asyncio.wait_for(node.answer("/versions"), 10))[0] == 200
        status, doc = await asyncio.wait_for(node.answer("/v2/cache"), 10)
        # the index is in memory; the queue is on the hung share: a clear 503, no waiting
        assert status == 503 and "hung" in doc.decode(), doc
    finally:
        faultfs.set("ok")
    back = await node.wait_state("ok")
    status, headers, body = await node.get(image.id)
    assert (status, headers["Cache-Status"], body) == (200, "cached; hit", data)
    # (the guard's probe file, named where O_TMPFILE is missing as on NFS, comes and goes)
    on_share = set(os.listdir(faultfs.backing)) - {mounts.PROBE_NAME}
    assert on_share == {"incomplete", "invalid", "queue", image.id}
    print(f"\nhung cache: detected within {took:.2f}s (probe_timeout 1s); ok {back:.2f}s after")


async def test_hits_stuck_on_a_hung_cache_hold_only_the_cache_threads(
    faultfs: FaultFS, glance: FakeGlance, start_node: Any
) -> None:
    """Problem 4 (hung): hits that arrive before the guard says hung wait on the share on
    the cache's own threads. Before: each one's changed-file check held a thread of the
    default executor (blocked in a stat, or on the entry's lock behind it); a dozen of them
    and what else runs there stalled for as long as the share hung: a reload (SIGHUP) never
    finished, nor would a DNS look-up of the upstream's name."""
    node = await start_node(
        glance.url,
        faultfs.mountpoint,
        image_cache_mount={"probe_interval": 0.2, "probe_timeout": 3.0},
    )
    data = os.urandom(MiB)
    image = glance.add_image(data)
    assert (await node.get(image.id))[2] == data
    await node.wait_cached(image.id)

    faultfs.set("block")
    stuck = [asyncio.create_task(node.get(image.id)) for _ in range(12)]
    try:
        await node.wait_state("hung")
        assert node.proc.proc is not None
        node.proc.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            async with node.session.get(node.proc.url + "/healthz") as resp:
                reload = (await resp.json())["reload"]
            if reload["finished"] == 1:
                break
            assert time.monotonic() < deadline, f"the reload never finished: {reload}"
            await asyncio.sleep(0.05)
        fresh = os.urandom(MiB)
        fresh_image = glance.add_image(fresh)
        status, headers, body = await asyncio.wait_for(node.get(fresh_image.id), 10)
        assert (status, headers["Cache-Status"], body) == (200, _bypass("hung"), fresh)
        # The scrape answers (it listed queue/ on the share: every scrape hung meanwhile).
        for _ in range(3):
            async with asyncio.timeout(10):
                async with node.session.get(node.proc.url + "/metrics") as resp:
                    text = await resp.text()
            assert resp.status == 200, text
            assert f'cached_passthrough{{directory="{faultfs.mountpoint}"}} 1.0' in text
    finally:
        faultfs.set("ok")
    # Once the guard says hung, a hit stuck on the share is cut short (the client retries and
    # is passed through); one that got its bytes before is exact. Never wrong bytes.
    for result in await asyncio.gather(*stuck, return_exceptions=True):
        if isinstance(result, BaseException):
            assert isinstance(result, aiohttp.ClientPayloadError), repr(result)
        else:
            assert (result[0], result[2]) == (200, data)


async def test_an_image_deleted_through_the_proxy_while_the_cache_hangs(
    faultfs: FaultFS, glance: FakeGlance, start_node: Any
) -> None:
    """Problem 4 (hung): ``DELETE /v2/images/{id}`` through cached answers while the cache
    share hangs (Glance has deleted the image; dropping the copy must not hold the answer),
    and the copy is gone once the share answers again."""
    node = await start_node(
        glance.url,
        faultfs.mountpoint,
        image_cache_mount={"probe_interval": 0.2, "probe_timeout": 1.0},
    )
    data = os.urandom(MiB)
    image = glance.add_image(data)
    assert (await node.get(image.id))[2] == data
    await node.wait_cached(image.id)

    faultfs.set("block")
    try:
        await node.wait_state("hung")
        url = f"{node.proc.url}/v2/images/{image.id}"
        async with asyncio.timeout(10):
            async with node.session.delete(url, headers=auth()) as resp:
                assert resp.status == 204, await resp.text()
    finally:
        faultfs.set("ok")
    await node.wait_state("ok")
    assert image.id not in await node.cached_ids()
    status, _, _ = await node.get(image.id)
    assert status == 404


async def test_an_io_error_on_a_hit_before_the_guard_knows_passes_through(
    faultfs: FaultFS, glance: FakeGlance, start_node: Any
) -> None:
    """Effects: a cache read error where no byte was sent yet falls back to the upstream,
    and the guard is told at once. Before: the hit's changed-file check met EIO between two
    probes and the client got a 500 (a traceback in the log)."""
    node = await start_node(
        glance.url, faultfs.mountpoint, image_cache_mount={"probe_interval": 60, "probe_timeout": 5}
    )
    data = os.urandom(MiB)
    image = glance.add_image(data)
    assert (await node.get(image.id))[2] == data
    await node.wait_cached(image.id)

    faultfs.set("eio")
    try:
        status, headers, body = await asyncio.wait_for(node.get(image.id), 10)
        assert (status, body) == (200, data), headers
        assert headers["Cache-Status"].startswith("cached; fwd=bypass"), headers
        await node.wait_state("failing", within=10)  # told at once, not after 60 s
    finally:
        faultfs.set("ok")
    assert "Traceback" not in node.proc.output()


@pytest.mark.parametrize("mode", ["eio", "estale"])
async def test_failing_cache_share_passes_through(
    faultfs: FaultFS, glance: FakeGlance, start_node: Any, mode: str
) -> None:
    cache = faultfs.mountpoint
    node = await start_node(glance.url, cache, image_cache_mount=FAST)
    data = os.urandom(MiB)
    image = glance.add_image(data)
    assert (await node.get(image.id))[2] == data
    await node.wait_cached(image.id)
    faultfs.set(mode)
    await node.wait_state("failing")
    status, headers, body = await node.get(image.id)
    assert (status, headers["Cache-Status"], body) == (200, _bypass("failing"), data)
    faultfs.set("ok")
    await node.wait_state("ok")
    assert (await node.get(image.id))[1]["Cache-Status"] == "cached; hit"


async def test_hung_store_share_keeps_cached_images_served(
    tmp_path: Path, faultfs: FaultFS, start_node: Any
) -> None:
    """A hung file store: its guard says hung within the probe timeout; an image already in
    the (healthy) cache is still a hit, others answer 503 at once instead of hanging."""
    data, other = os.urandom(2 * MiB), os.urandom(MiB)
    image_id, other_id = (
        "3f0e1c9a-2a86-4c1e-9d43-3f8b1a2c5d01",
        "3f0e1c9a-2a86-4c1e-9d43-3f8b1a2c5d02",
    )
    (faultfs.backing / image_id).write_bytes(data)
    (faultfs.backing / other_id).write_bytes(other)
    cache = tmp_path / "cache"
    cache.mkdir()
    node = await start_node(
        f"file://{faultfs.mountpoint}",
        cache,
        auth_cache_ttl=300,
        upstream_mount={"probe_interval": 0.2, "probe_timeout": 1.0},
    )
    assert (await node.get(image_id))[2] == data
    await node.wait_cached(image_id)

    faultfs.set("block")
    try:
        took = await node.wait_state("hung", "store")
        status, headers, body = await asyncio.wait_for(node.get(image_id), 10)
        assert (status, headers["Cache-Status"], body) == (200, "cached; hit", data)
        status, _, body = await asyncio.wait_for(node.get(other_id), 10)
        assert status == 503 and b"hung" in body
        assert (await asyncio.wait_for(node.answer("/versions"), 10))[0] == 200
    finally:
        faultfs.set("ok")
    await node.wait_state("ok", "store")
    assert (await node.get(other_id))[:3:2] == (200, other)
    print(f"\nhung store: detected within {took:.2f}s (probe_timeout 1s)")


async def test_a_fresh_filesystem_swapped_in_between_probes_is_rescanned(
    tmp_path: Path, mounted: Mounts
) -> None:
    """An unmount and a mount faster than the probe interval: the kernel may hand the new
    tmpfs the same mount id and device number, but the volume mark cached set on the old
    one is missing, so the index is forgotten and rebuilt from what is there now."""
    from cached import config as configuration
    from cached.cachedir.directories import Directories
    from cached.store import Store

    cache = mounted.tmpfs(tmp_path / "cache", "8m")
    settings = {
        "upstream": "http://127.0.0.1:9",
        "image_cache_dir": str(cache),
        "image_cache_mount": {"probe_interval": 3600},
    }
    directories = Directories.from_config(configuration.build(settings))
    store = Store(cache, io=directories.cache.executor)
    await directories.start(store)
    try:
        assert directories.opened and directories.cache.ok
        assert await asyncio.to_thread(os.getxattr, cache, mounts.VOLUME_XATTR)
        image_id = "7a1c0e55-1f0b-4c43-8f0e-2d6b7a9c1e01"
        await store.create(image_id, 10, checksum=None, os_hash_algo=None, os_hash_value=None)
        old = store.get(image_id)
        assert old is not None

        await asyncio.to_thread(mounted.umount, cache)
        await asyncio.to_thread(mounted.tmpfs, cache, "8m")
        await directories.cache.check()  # what the next scheduled probe would see
        for _ in range(500):
            if directories.opened:
                break
            await asyncio.sleep(0.01)
        assert directories.opened and directories.cache.generation == 1
        assert store.get(image_id) is None and old.removed  # never committed or touched
        assert sorted(os.listdir(cache)) == ["incomplete", "invalid", "queue"]
    finally:
        await directories.close()
        store.close()


async def test_prefetch_queue_resumes_when_the_share_returns(
    tmp_path: Path, mounted: Mounts, glance: FakeGlance, start_node: Any
) -> None:
    """The queue on a share that comes back is fetched at once, not at the next scheduled
    run (an hour away here)."""
    share = mounted.tmpfs(tmp_path / "share")
    cache = tmp_path / "cache"
    cache.mkdir()
    mounted.bind(share, cache)
    node = await start_node(
        glance.url,
        cache,
        image_cache_mount=FAST,
        service_token="token-admin",
        cache_prefetcher_interval=3600,
    )
    data = os.urandom(MiB)
    image = glance.add_image(data, visibility="public")
    queue_url = f"{node.proc.url}/v2/queued_images/{image.id}"
    async with node.session.put(queue_url, headers=auth("token-admin")) as resp:
        assert resp.status == 200, await resp.text()  # queued only (legacy verb)
    assert (cache / "queue" / image.id).exists()
    mounted.umount(cache)
    await node.wait_state("vanished")
    queue_url = f"{node.proc.url}/v2/queued_images/{image.id}"
    async with node.session.put(queue_url, headers=auth("token-admin")) as resp:
        assert resp.status == 503 and "vanished" in await resp.text()
    assert tree(cache) == []

    mounted.bind(share, cache)
    await node.wait_state("ok")
    await node.wait_cached(image.id)
    status, headers, body = await node.get(image.id, **auth("token-admin"))
    assert (status, headers["Cache-Status"], body) == (200, "cached; hit", data)
    assert not (cache / "queue" / image.id).exists()


# --- a hit whose file reads hang (the share stops answering mid-download) -------------------


def _drop_pages(path: Path) -> None:
    """Drop the file's pages from the page cache, so its next reads reach the FUSE process
    (as reads of a file on NFS reach the server once its pages are gone)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def test_a_hit_hanging_on_the_share_never_freezes_the_daemon(
    faultfs: FaultFS, glance: FakeGlance, start_node: Any
) -> None:
    """Issue 10's leftover: a hit of a large image is being sent to a slow client when the
    cache share stops answering. The file reads of that hit hang, but never on the event
    loop: /healthz, a pass-through request and new downloads (which pass through) keep
    answering; the guard says hung, the hung download is cut (its client gets fewer bytes
    than Content-Length), and once the share answers again the image is a hit again."""
    node = await start_node(glance.url, faultfs.mountpoint, image_cache_mount=FAST)
    assert (await node.guards())["cache"]["sendfile"] == "thread"  # FUSE: sendfile: auto
    data = os.urandom(64 * MiB)
    image = glance.add_image(data)
    assert (await node.get(image.id))[2] == data
    await node.wait_cached(image.id)
    await asyncio.to_thread(_drop_pages, faultfs.mountpoint / image.id)

    url = f"{node.proc.url}/v2/images/{image.id}/file"
    async with aiohttp.ClientSession(auto_decompress=False) as slow:
        resp = await slow.get(url, headers=auth(), read_bufsize=64 * 1024)
        try:
            assert (resp.status, resp.headers["Cache-Status"]) == (200, "cached; hit")
            first = await resp.content.readexactly(MiB)  # the download is under way
            faultfs.set("block")

            async def drain() -> bytes:
                try:
                    return first + await resp.content.read()
                except aiohttp.ClientPayloadError:  # cut short: fine, counted below
                    return b""

            hung = asyncio.ensure_future(drain())  # the client now wants the rest
            try:
                # The daemon's reads of the file now hang. Everything else still answers.
                await node.wait_state("hung", within=20)
                async with asyncio.timeout(10):
                    async with node.session.get(node.proc.url + "/healthz") as health:
                        assert health.status == 200
                    status, record = await node.answer(f"/v2/images/{image.id}")
                    assert status == 200 and record["id"] == image.id
                    status, headers, body = await node.get(image.id)
                    assert (status, headers["Cache-Status"], body) == (200, _bypass("hung"), data)
                # The hung download is cut once the guard says hung, not left hanging.
                got = await asyncio.wait_for(hung, 20)
                assert len(got) < len(data)
            finally:
                faultfs.set("ok")
                await asyncio.wait_for(hung, 20)
        finally:
            resp.release()
    await node.wait_state("ok")
    status, headers, body = await node.get(image.id)
    assert (status, headers["Cache-Status"], body) == (200, "cached; hit", data)


async def test_hits_sent_by_io_threads_are_exact(
    tmp_path: Path, glance: FakeGlance, start_node: Any
) -> None:
    """``sendfile: thread`` on a local directory: misses followed by readers, whole hits,
    ranges, empty images and a slow client that fills the socket all get exact bytes."""
    cache = tmp_path / "cache"
    cache.mkdir()
    node = await start_node(glance.url, cache, image_cache_mount={"sendfile": "thread"})
    assert (await node.guards())["cache"]["sendfile"] == "thread"
    big, small, empty = os.urandom(48 * MiB + 123), os.urandom(64 * 1024), b""
    images = [glance.add_image(data) for data in (big, small, empty)]
    for image, data in zip(images, (big, small, empty), strict=True):
        status, headers, body = await node.get(image.id)  # a miss, then hits
        assert (status, body) == (200, data), headers
        await node.wait_cached(image.id)
        status, headers, body = await node.get(image.id)
        assert (status, headers["Cache-Status"], body) == (200, "cached; hit", data)
    status, headers, body = await node.get(images[0].id, Range="bytes=1000-20999999")
    assert (status, body) == (206, big[1000:21000000]), headers
    status, headers, body = await node.get(images[0].id, Range="bytes=-5")
    assert (status, body) == (206, big[-5:]), headers

    # A client that reads slowly: the socket fills, the loop waits for it, threads resume.
    url = f"{node.proc.url}/v2/images/{images[0].id}/file"
    async with aiohttp.ClientSession(auto_decompress=False) as slow:
        async with slow.get(url, headers=auth(), read_bufsize=16 * 1024) as resp:
            got = bytearray()
            while piece := await resp.content.read(256 * 1024):
                got += piece
                if len(got) < 4 * MiB:
                    await asyncio.sleep(0.01)  # pacing only: the assertion is on the bytes
    assert bytes(got) == big
    deadline = time.monotonic() + 10
    while (await node.guards())["cache"]["io_threads_busy"]:  # no thread is left behind
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


def test_which_filesystems_count_as_shares() -> None:
    for fstype in ("nfs", "nfs4", "cifs", "smb3", "ceph", "glusterfs", "fuse", "fuse.sshfs"):
        assert mounts.is_share(fstype), fstype
    for fstype in ("ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs"):
        assert not mounts.is_share(fstype), fstype


async def test_a_tls_hit_hanging_on_the_share_ends_from_the_upstream(
    tmp_path: Path, faultfs: FaultFS, glance: FakeGlance, start_node: Any
) -> None:
    """Over TLS a hit is read in pieces on the I/O threads (no sendfile): a read that hangs
    never reaches the socket, so once the guard says hung the rest of the download comes
    from the upstream and the client gets every byte, while the daemon keeps answering."""
    import ssl

    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    node = await start_node(
        glance.url,
        faultfs.mountpoint,
        image_cache_mount=FAST,
        tls_cert_file=str(cert),
        tls_key_file=str(key),
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)
    await node.session.close()
    node.session = aiohttp.ClientSession(
        auto_decompress=False, connector=aiohttp.TCPConnector(ssl=context)
    )
    data = os.urandom(48 * MiB)
    image = glance.add_image(data)
    assert (await node.get(image.id))[2] == data
    await node.wait_cached(image.id)
    await asyncio.to_thread(_drop_pages, faultfs.mountpoint / image.id)

    url = f"{node.proc.url}/v2/images/{image.id}/file"
    async with aiohttp.ClientSession(
        auto_decompress=False, connector=aiohttp.TCPConnector(ssl=context)
    ) as slow:
        resp = await slow.get(url, headers=auth(), read_bufsize=64 * 1024)
        try:
            assert (resp.status, resp.headers["Cache-Status"]) == (200, "cached; hit")
            first = await resp.content.readexactly(MiB)
            faultfs.set("block")
            rest = asyncio.ensure_future(resp.content.read())
            try:
                await node.wait_state("hung", within=20)
                async with asyncio.timeout(10):
                    async with node.session.get(node.proc.url + "/healthz") as health:
                        assert health.status == 200
                got = first + await asyncio.wait_for(rest, 30)
                assert (len(got), got == data) == (len(data), True)
            finally:
                faultfs.set("ok")
                await asyncio.gather(rest, return_exceptions=True)
        finally:
            resp.release()
    await node.wait_state("ok")
    status, headers, body = await node.get(image.id)
    assert (status, headers["Cache-Status"], body) == (200, "cached; hit", data)


async def test_metrics_answer_while_the_cache_share_is_hung(
    faultfs: FaultFS, glance: FakeGlance, start_node: Any
) -> None:
    """A scrape lists the prefetch queue on the cache directory: while the share is hung it
    is skipped, so /metrics answers (and pins no thread) instead of hanging every scrape."""
    node = await start_node(glance.url, faultfs.mountpoint, image_cache_mount=FAST)
    faultfs.set("block")
    try:
        await node.wait_state("hung")
        for _ in range(8):  # more scrapes than the default executor has threads
            async with asyncio.timeout(10):
                status, text = await node.answer("/metrics")
            assert status == 200 and b"cached_passthrough" in text
    finally:
        faultfs.set("ok")


async def test_management_changes_on_a_read_only_cache_are_refused_and_lose_nothing(
    tmp_path: Path, mounted: Mounts, glance: FakeGlance, start_node: Any
) -> None:
    """Issue 10 (effects, read-only): ``DELETE /v2/cache`` and ``DELETE /v2/cache/{id}`` on a
    read-only cache answer 503 naming the state at once. Before: the clear answered 204, the
    index forgot every entry while their files stayed (uncounted by prune until a restart)."""
    cache = mounted.tmpfs(tmp_path / "cache")
    node = await start_node(glance.url, cache, image_cache_mount=FAST)
    data = os.urandom(MiB)
    image = glance.add_image(data)
    assert (await node.get(image.id))[2] == data
    await node.wait_cached(image.id)
    before = tree(cache)

    mounted.remount(cache, "ro")
    await node.wait_state("read_only")
    admin = auth("token-admin")
    for method, path, headers in [
        ("DELETE", "/v2/cache", {"x-image-cache-clear-target": "cache"}),
        ("DELETE", "/v2/cache", {}),
        ("DELETE", f"/v2/cache/{image.id}", {}),
        ("DELETE", f"/v2/cached_images/{image.id}", {}),
        ("DELETE", "/v2/cached_images", {}),
    ]:
        async with node.session.request(
            method, node.proc.url + path, headers={**admin, **headers}
        ) as resp:
            body = await resp.text()
            assert resp.status == 503, (method, path, resp.status, body)
            assert "read_only" in body, body
    assert await node.cached_ids() == {image.id}
    assert tree(cache) == before
    status, headers, body = await node.get(image.id)
    assert (status, headers["Cache-Status"], body) == (200, "cached; hit", data)

    mounted.remount(cache, "rw")
    await node.wait_state("ok")
    async with node.session.delete(node.proc.url + "/v2/cache", headers=admin) as resp:
        assert resp.status == 204
    assert await node.cached_ids() == set()
    assert not (cache / image.id).exists()
