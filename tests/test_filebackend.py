"""The ``file`` upstream (a directory laid out like Glance's filesystem store), the real
python-glanceclient against it, and a cache directory on a read-only or full filesystem.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    TOKENS,
    Daemon,
    auth,
    start_daemon,
    stop_daemon,
    tree,
    wait_complete,
    wait_guard,
    wait_idle,
    wait_until,
)
from daemonproc import CachedProcess, run_cached
from fakeglance import FakeGlance

from cached.store import xattrs

MiB = 1 << 20
CHUNK = 4 * MiB
REPO = Path(__file__).resolve().parent.parent
LAYOUT = ["incomplete/", "invalid/", "queue/"]


def add_file_image(directory: Path, data: bytes) -> str:
    image_id = str(uuid.uuid4())
    (directory / image_id).write_bytes(data)
    return image_id


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


@pytest.fixture
async def filed(tmp_path: Path, images: Path) -> AsyncIterator[Daemon]:
    """An in-process daemon whose upstream is ``file://<images>``."""
    cache = tmp_path / "cache"
    cache.mkdir()
    d = await start_daemon(cache, f"file://{images}")
    yield d
    await stop_daemon(d)


# ------------------------------------------------------------------ the file backend


async def test_miss_then_hit(filed: Daemon, images: Path) -> None:
    data = os.urandom(9 * MiB + 7)
    image_id = add_file_image(images, data)
    status, headers, body = await filed.get(image_id)
    assert status == 200 and body == data
    assert headers["Cache-Status"] == "cached; fwd=uri-miss; stored"
    assert headers["Content-Length"] == str(len(data))
    assert "Content-MD5" not in headers  # a file store knows no checksum
    await wait_complete(filed, image_id)

    status, headers, body = await filed.get(image_id)
    assert status == 200 and body == data
    assert headers["Cache-Status"] == "cached; hit"
    assert tree(filed.cache_dir) == sorted([*LAYOUT, image_id])
    attrs = await asyncio.to_thread(xattrs.read_all, filed.cache_dir / image_id)
    assert attrs[xattrs.STATE] == b"complete" and attrs[xattrs.BITMAP] == b"\x07"
    assert attrs[xattrs.META] == (
        b'{"size":9437191,"chunk_size":4194304,"checksum":null,'
        b'"os_hash_algo":null,"os_hash_value":null,"disk_format":"raw","container_format":"bare"}'
    )


async def test_ranges_cold_and_hot(filed: Daemon, images: Path) -> None:
    data = os.urandom(12 * MiB)
    image_id = add_file_image(images, data)
    start = 5 * MiB + 3
    status, headers, body = await filed.get(image_id, Range=f"bytes={start}-{start + 99}")
    assert status == 206 and body == data[start : start + 100]
    assert headers["Content-Range"] == f"bytes {start}-{start + 99}/{len(data)}"
    assert headers["Cache-Status"] == "cached; fwd=uri-miss; stored"
    await wait_idle(filed, image_id)
    entry = filed.store.get(image_id)
    assert entry is not None and not entry.complete and list(entry.present) == [1]

    status, _, body = await filed.get(image_id, Range=f"bytes=0-{MiB - 1}")
    assert status == 206 and body == data[:MiB]
    status, _, body = await filed.get(image_id)
    assert status == 200 and body == data
    await wait_complete(filed, image_id)
    status, headers, body = await filed.get(image_id, Range="bytes=0-0")
    assert (status, body, headers["Cache-Status"]) == (206, data[:1], "cached; hit")
    status, headers, _ = await filed.get(image_id, Range=f"bytes={len(data)}-")
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"


async def test_range_to_the_end_of_a_partial_image(filed: Daemon, images: Path) -> None:
    """The last byte is held back only for a whole image (which will be verified); a range
    ending at the image's end of an entry that is not complete must not wait for that."""
    data = os.urandom(12 * MiB)
    image_id = add_file_image(images, data)
    assert (await filed.get(image_id, Range="bytes=0-9"))[2] == data[:10]
    await wait_idle(filed, image_id)
    for header, expected in (("bytes=-10", data[-10:]), (f"bytes={10 * MiB}-", data[10 * MiB :])):
        try:
            status, _, body = await asyncio.wait_for(filed.get(image_id, Range=header), 5)
        except TimeoutError:
            pytest.fail(f"Range: {header} of a partial entry hangs")
        assert status == 206 and body == expected
    await wait_idle(filed, image_id)


async def test_range_of_present_chunks_leaves_no_fill_running(filed: Daemon, images: Path) -> None:
    """A fill opened for chunks that are all on disk has nothing to do: it must let go of the
    file (and its threads) instead of staying registered forever."""
    data = os.urandom(12 * MiB)
    image_id = add_file_image(images, data)
    assert (await filed.get(image_id, Range="bytes=0-9"))[2] == data[:10]
    await wait_idle(filed, image_id)
    status, headers, body = await filed.get(image_id, Range="bytes=100-199")
    assert status == 206 and body == data[100:200]
    await wait_idle(filed, image_id)  # fails if the fill stays registered


async def test_unknown_image_is_404_and_caches_nothing(filed: Daemon, images: Path) -> None:
    missing = str(uuid.uuid4())
    status, _, body = await filed.get(missing)
    assert status == 404 and f"No image found with ID {missing}".encode() in body
    (images / "not-an-image").write_bytes(b"x")
    (images / str(uuid.uuid4())).mkdir()  # a directory is no image either
    for name in os.listdir(images):
        assert (await filed.get(name))[0] in (400, 404)
    assert tree(filed.cache_dir) == LAYOUT


async def test_versions_document(filed: Daemon) -> None:
    async with filed.session.get(f"{filed.url}/versions") as resp:
        assert resp.status == 200
        doc = await resp.json()
    ids = [v["id"] for v in doc["versions"]]
    assert {"v2.14", "v2.15", "v2.16", "v2.17", "v2.18"} <= set(ids)
    assert [v["id"] for v in doc["versions"] if v["status"] == "CURRENT"] == ["v2.18"]
    assert all(v["links"][0]["href"] == f"{filed.url}/v2/" for v in doc["versions"])
    async with filed.session.get(f"{filed.url}/") as resp:
        assert resp.status == 300
        assert (await resp.json())["versions"] == doc["versions"]


async def test_image_record_and_list(filed: Daemon, images: Path) -> None:
    data = os.urandom(1000)
    image_id = add_file_image(images, data)
    async with filed.session.get(f"{filed.url}/v2/images/{image_id}") as resp:
        assert resp.status == 200
        record = await resp.json()
    assert (record["id"], record["status"], record["size"]) == (image_id, "active", 1000)
    assert record["file"] == f"/v2/images/{image_id}/file"
    assert record["checksum"] is None and record["os_hash_value"] is None
    async with filed.session.get(f"{filed.url}/v2/images") as resp:
        assert [i["id"] for i in (await resp.json())["images"]] == [image_id]
    async with filed.session.get(f"{filed.url}/v2/images/{uuid.uuid4()}") as resp:
        assert resp.status == 404
    async with filed.session.delete(f"{filed.url}/v2/images/{image_id}") as resp:
        assert resp.status == 405
    assert (images / image_id).read_bytes() == data


async def test_access_tokens(tmp_path: Path, images: Path) -> None:
    data = os.urandom(2 * MiB)
    image_id = add_file_image(images, data)
    cache = tmp_path / "cache"
    cache.mkdir()
    daemon = await start_daemon(cache, f"file://{images}", access_tokens=["s3cret", "other"])
    try:
        async with daemon.session.get(daemon.file_url(image_id)) as resp:
            assert resp.status == 401
            assert data[:100] not in await resp.read()
        assert (await daemon.get(image_id, token="wrong"))[0] == 401
        assert tree(cache) == LAYOUT  # refused before anything was cached
        status, _, body = await daemon.get(image_id, token="s3cret")
        assert status == 200 and body == data
        await wait_complete(daemon, image_id)
        # a hit is checked just the same
        assert (await daemon.get(image_id, token="wrong"))[0] == 401
        status, headers, body = await daemon.get(image_id, token="other")
        assert status == 200 and body == data and headers["Cache-Status"] == "cached; hit"
        async with daemon.session.get(f"{daemon.url}/v2/images/{image_id}") as resp:
            assert resp.status == 401
        async with daemon.session.get(
            f"{daemon.url}/v2/images/{image_id}", headers=auth("s3cret")
        ) as resp:
            assert resp.status == 200
        async with daemon.session.get(f"{daemon.url}/versions") as resp:
            assert resp.status == 200  # version discovery needs no token, as in Glance
    finally:
        await stop_daemon(daemon)


# ------------------------------------------------------------------ the real glance client


def glance_venv() -> Path:
    venv = Path(os.environ.get("CACHED_GLANCE_VENV", Path.home() / ".cache" / "cached-glance-venv"))
    if not (venv / "bin" / "glance").exists():
        subprocess.run(["bash", str(REPO / ".ci" / "glance-venv.sh"), str(venv)], check=True)
    return venv


def test_python_glanceclient_downloads_through_cached(tmp_path: Path, images: Path) -> None:
    venv = glance_venv()
    data = os.urandom(6 * MiB + 1)
    image_id = add_file_image(images, data)
    cache = tmp_path / "cache"
    daemon = CachedProcess(f"file://{images}", cache, tmp_path / "cached.log")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    env.update(HOME=str(home), PYTHONWARNINGS="ignore")
    url = daemon.start()
    try:
        for n in (1, 2):
            out = tmp_path / f"download-{n}"
            res = subprocess.run(
                [str(venv / "bin" / "glance"), "--os-image-url", url, "--os-auth-token", "x"]
                + ["image-download", "--file", str(out), image_id],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )
            assert res.returncode == 0, res.stderr + daemon.output()
            assert out.read_bytes() == data
        assert tree(cache) == sorted([*LAYOUT, image_id])
        assert daemon.output().count(f'"GET /v2/images/{image_id}/file HTTP/1.1" 200') == 2
    finally:
        assert daemon.stop() == 0


# ------------------------------------------------------------------ faults: the cache filesystem


@dataclass
class Upstream:
    url: str
    add: Callable[[bytes], str]


@pytest.fixture(params=["file", "glance"])
async def upstream(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Upstream]:
    """Either kind of upstream, holding whatever images the test adds."""
    if request.param == "file":
        d = tmp_path / "images"
        d.mkdir()
        yield Upstream(f"file://{d}", lambda data: add_file_image(d, data))
        return
    fake = FakeGlance()
    for token, (project, roles) in TOKENS.items():
        fake.add_token(token, project, roles)
    await fake.start()
    yield Upstream(fake.url, lambda data: fake.add_image(data).id)
    await fake.close()


def _mount(*args: str) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise AssertionError(
            f"mount {' '.join(args)} failed (these tests need root and tmpfs): {res.stderr}"
        )


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mount a small tmpfs (``tmpfs("size=8m")``) as a cache directory; unmounted at teardown."""
    mounted: list[Path] = []

    def mount(*options: str) -> Path:
        path = tmp_path / f"cache{len(mounted)}"
        path.mkdir()
        _mount("-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path))
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


async def remount_read_only(path: Path) -> None:
    await asyncio.to_thread(_mount, "-o", "remount,ro", str(path))


async def test_read_only_cache_passes_a_new_image_through(
    upstream: Upstream, tmpfs: Callable[..., Path]
) -> None:
    cache = tmpfs("size=16m")
    daemon = await start_daemon(cache, upstream.url)
    try:
        await remount_read_only(cache)
        data = os.urandom(5 * MiB)
        image_id = upstream.add(data)
        status, headers, body = await daemon.get(image_id)
        assert status == 200 and body == data
        # Before its guard noticed, the failed write says so; after it, the state is named.
        assert headers.get("Cache-Status") in (
            "cached; fwd=bypass",
            "cached; fwd=bypass; detail=read_only",
        )
        await wait_guard(daemon, "read_only")
        status, headers, body = await daemon.get(image_id)
        assert status == 200 and body == data
        assert headers.get("Cache-Status") == "cached; fwd=bypass; detail=read_only"
        assert tree(cache) == LAYOUT
    finally:
        await stop_daemon(daemon)


async def test_read_only_cache_still_serves_hits(
    upstream: Upstream, tmpfs: Callable[..., Path]
) -> None:
    cache = tmpfs("size=16m")
    daemon = await start_daemon(cache, upstream.url)
    try:
        data = os.urandom(5 * MiB)
        image_id = upstream.add(data)
        assert (await daemon.get(image_id))[2] == data
        await wait_complete(daemon, image_id)
        await remount_read_only(cache)
        for _ in range(2):
            status, headers, body = await daemon.get(image_id)
            assert status == 200 and body == data
            assert headers["Cache-Status"] == "cached; hit"
    finally:
        await stop_daemon(daemon)


async def test_read_only_cache_partial_entry_passes_through(
    upstream: Upstream, tmpfs: Callable[..., Path]
) -> None:
    cache = tmpfs("size=16m")
    daemon = await start_daemon(cache, upstream.url)
    try:
        data = os.urandom(10 * MiB)
        image_id = upstream.add(data)
        assert (await daemon.get(image_id, Range="bytes=0-9"))[2] == data[:10]
        await wait_idle(daemon, image_id)
        before = tree(cache)
        await remount_read_only(cache)
        status, _, body = await daemon.get(image_id)
        assert status == 200 and body == data
        status, _, body = await daemon.get(image_id, Range=f"bytes={9 * MiB}-")
        assert status == 206 and body == data[9 * MiB :]
        assert tree(cache) == before
    finally:
        await stop_daemon(daemon)


async def test_no_room_for_an_entry_passes_through(
    upstream: Upstream, tmpfs: Callable[..., Path]
) -> None:
    cache = tmpfs("size=16m", "nr_inodes=4")  # the root and its three directories: no files
    daemon = await start_daemon(cache, upstream.url)
    try:
        data = os.urandom(3 * MiB)
        image_id = upstream.add(data)
        status, headers, body = await daemon.get(image_id)
        assert status == 200 and body == data
        assert headers.get("Cache-Status") == "cached; fwd=bypass"
        assert tree(cache) == LAYOUT
    finally:
        await stop_daemon(daemon)


def _fill_up(path: Path) -> None:
    """Write ``path`` until its filesystem is full (another writer taking the space)."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


async def test_disk_full_mid_fill_finishes_the_client_from_the_upstream(
    glance: FakeGlance, tmpfs: Callable[..., Path]
) -> None:
    """ENOSPC met anyway (another writer filled the disk mid-fill): the fill stops, its
    client gets the rest from the upstream (issue 10: a cache problem never costs a client
    its download; before: cut short), and nothing on disk claims bytes it lacks."""
    cache = tmpfs("size=10m")
    daemon = await start_daemon(cache, glance.url, min_free_space=0)
    try:
        data = os.urandom(2 * CHUNK + MiB)  # fits the 10 MiB when the fill is admitted
        image = glance.add_image(data)
        image.pause()  # the first piece goes out, then the upstream holds
        download = asyncio.create_task(daemon.get(image.id))
        await wait_until(lambda: daemon.filler.get(image.id) is not None, "the fill runs")
        await asyncio.to_thread(_fill_up, cache / "someone-else.bin")
        image.resume()
        status, _, body = await download
        assert status == 200 and body == data
        await wait_idle(daemon, image.id)
        entry = daemon.store.get(image.id)
        assert entry is None or not entry.complete
        if entry is not None:  # whatever it kept is what the upstream sent
            on_disk = await asyncio.to_thread(entry.path.read_bytes)
            for c in entry.present:
                start, end = entry.chunk_bounds(c)
                assert on_disk[start:end] == data[start:end]
        await asyncio.to_thread(os.unlink, cache / "someone-else.bin")
        # room again: the next download is whole and right
        status, _, body = await daemon.get(image.id)
        assert status == 200 and body == data
    finally:
        await stop_daemon(daemon)


async def test_an_image_the_free_space_cannot_hold_passes_through(
    upstream: Upstream, tmpfs: Callable[..., Path]
) -> None:
    """The min_free_space watermark stops a fill before the disk is full, not after
    ENOSPC: nothing is written, the client gets the image from the upstream."""
    cache = tmpfs("size=10m")
    daemon = await start_daemon(cache, upstream.url, min_free_space="5%")
    try:
        data = os.urandom(20 * MiB)
        image_id = upstream.add(data)
        for _ in range(2):
            status, headers, body = await daemon.get(image_id)
            assert status == 200 and body == data
            assert headers["Cache-Status"] == "cached; fwd=bypass; detail=no-space"
        assert tree(cache) == LAYOUT
        fits = os.urandom(3 * MiB)
        fits_id = upstream.add(fits)
        status, headers, body = await daemon.get(fits_id)
        assert status == 200 and body == fits
        assert headers["Cache-Status"] == "cached; fwd=uri-miss; stored"
    finally:
        await stop_daemon(daemon)


def test_serve_on_a_read_only_cache_dir_says_so(tmp_path: Path, tmpfs: Callable[..., Path]) -> None:
    cache = tmpfs("size=1m")
    _mount("-o", "remount,ro", str(cache))
    images = tmp_path / "images"
    images.mkdir()
    res = run_cached(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        f"file://{images}",
        "--cache-dir",
        str(cache),
    )
    assert res.returncode == 2
    assert f"option 'image_cache_dir': {cache}" in res.stderr
    assert "Read-only file system" in res.stderr  # the real reason, not "no xattrs"
