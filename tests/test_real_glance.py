"""Issue 2, integration tier: a real Glance from PyPI behind ``cached``, driven by the real
python-glanceclient.

Glance 33.0.0 runs under uWSGI on loopback with the ``keystone`` paste flavor; its
``auth_token`` middleware validates tokens against :class:`fakekeystone.FakeKeystone`,
where each token stands for a project and roles (see ``realglance.TOKENS``). Glance's
default RBAC policies apply unchanged: ``member`` uploads and downloads its project's
images, ``reader`` alone may not download (403), another project does not see the image
(404), a missing or unknown token is 401.

Run: ``python -m pytest tests/test_real_glance.py -q -m glance``. The virtualenv comes
from ``.ci/glance-venv.sh`` (``$CACHED_GLANCE_VENV``, default
``~/.cache/cached-glance-venv``); it is built on first use. Without network to build it
the tests skip, unless ``$CACHED_GLANCE_REQUIRED`` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fakekeystone import FakeKeystone
from realglance import (
    CachedDaemon,
    FailureLogs,
    GlanceCLI,
    GlanceServer,
    add_standard_tokens,
    http,
    image_json,
    venv_or_skip,
)

pytestmark = [pytest.mark.glance, pytest.mark.timeout(300)]

MiB = 1024 * 1024


# ---- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def failure_logs(request: pytest.FixtureRequest) -> Iterator[FailureLogs]:
    plugin = FailureLogs()
    # A name of its own: modules that import this fixture get an instance each.
    request.config.pluginmanager.register(plugin, f"realglance-failure-logs-{id(plugin)}")
    yield plugin
    request.config.pluginmanager.unregister(plugin)


@pytest.fixture(scope="session")
def glance_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return venv_or_skip(tmp_path_factory)


@pytest.fixture(scope="session")
def keystone() -> Iterator[FakeKeystone]:
    with FakeKeystone().serve_in_thread() as ks:
        add_standard_tokens(ks)
        yield ks


@pytest.fixture(scope="session")
def real_glance(
    glance_venv: Path,
    keystone: FakeKeystone,
    tmp_path_factory: pytest.TempPathFactory,
    failure_logs: FailureLogs,
) -> Iterator[GlanceServer]:
    server = GlanceServer(glance_venv, tmp_path_factory.mktemp("glance"), keystone)
    failure_logs.add(server.log_files())
    server.start(probe_token="admin-token")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def glance_with_cache(
    glance_venv: Path,
    keystone: FakeKeystone,
    tmp_path_factory: pytest.TempPathFactory,
    failure_logs: FailureLogs,
) -> Iterator[GlanceServer]:
    """A second Glance with its own image cache (flavor ``keystone+cachemanagement``).

    Its cache misses come without Content-Length, delimited by the connection close.
    """
    server = GlanceServer(
        glance_venv, tmp_path_factory.mktemp("glance-cache"), keystone, cache_middleware=True
    )
    failure_logs.add({f"{name} (cache flavor)": p for name, p in server.log_files().items()})
    server.start(probe_token="admin-token")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cli(glance_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> GlanceCLI:
    return GlanceCLI(glance_venv, tmp_path_factory.mktemp("glanceclient-home"))


@pytest.fixture(scope="module")
def cached(
    real_glance: GlanceServer, tmp_path_factory: pytest.TempPathFactory, failure_logs: FailureLogs
) -> Iterator[CachedDaemon]:
    workdir = tmp_path_factory.mktemp("cached")
    conf = workdir / "cached.yaml"
    conf.write_text("admin_listen: 127.0.0.1:0\n")  # the operator's door (no management auth)
    daemon = CachedDaemon(workdir, real_glance.url, workdir / "cache", ["-c", str(conf)])
    failure_logs.add({"cached": daemon.log})
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def cached_over_glance_cache(
    glance_with_cache: GlanceServer,
    tmp_path_factory: pytest.TempPathFactory,
    failure_logs: FailureLogs,
) -> Iterator[CachedDaemon]:
    workdir = tmp_path_factory.mktemp("cached-over-glance-cache")
    daemon = CachedDaemon(workdir, glance_with_cache.url, workdir / "cache")
    failure_logs.add({"cached (over glance's cache)": daemon.log})
    daemon.start()
    yield daemon
    daemon.stop()


# ---- helpers ----------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def sha512_of(path: Path) -> str:
    h = hashlib.sha512()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def upload_and_fill(
    cli: GlanceCLI, cached: CachedDaemon, tmp_path: Path, name: str, size: int = 2 * MiB + 333
) -> tuple[str, bytes]:
    """Upload an image as p1 through cached and download it once, so that it is cached."""
    data = random_file(tmp_path / f"{name}.img", size)
    image_id = cli.create_image(cached.url, "token-p1", tmp_path / f"{name}.img", name)
    out = tmp_path / f"{name}.fill"
    cli.ok(cached.url, "token-p1", "image-download", "--file", str(out), image_id)
    assert out.read_bytes() == data
    entry = cached.cache_dir / image_id
    assert wait_for(entry.exists), f"{entry} did not appear after a full download"
    return image_id, data


# ---- the fixture itself ------------------------------------------------------------------


def test_real_glance_enforces_identities_from_keystone(
    real_glance: GlanceServer, keystone: FakeKeystone, cli: GlanceCLI, tmp_path: Path
) -> None:
    """Baseline, without cached: the statuses the proxied tests compare against."""
    data = random_file(tmp_path / "direct.img", 100_000)
    image_id = cli.create_image(real_glance.url, "token-p1", tmp_path / "direct.img", "direct")
    record = image_json(real_glance.url, "token-p1", image_id)
    assert (record["owner"], record["status"], record["size"]) == ("p1", "active", len(data))
    assert record["visibility"] == "shared"  # the default: not visible to other projects

    cli.ok(real_glance.url, "token-p1", "image-download", "--file", str(tmp_path / "dl"), image_id)
    assert (tmp_path / "dl").read_bytes() == data

    url = f"{real_glance.url}/v2/images/{image_id}/file"
    assert http("GET", url, "token-p1", {"Range": "bytes=0-0"})[:1] == (206,)
    assert http("GET", url, "token-p2")[0] == 404
    assert http("GET", url, "token-reader-p1")[0] == 403
    assert http("GET", url, None)[0] == 401
    assert http("GET", url, "no-such-token")[0] == 401
    # Glance really asked Keystone (tokens masked in the record).
    validated = keystone.recorded("GET", "/v3/auth/tokens")
    assert {r.status for r in validated} >= {200, 404}


# ---- through cached ---------------------------------------------------------------------


def test_upload_and_download_through_cached(
    real_glance: GlanceServer, cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    src = tmp_path / "three.img"
    data = random_file(src, 3 * MiB + 4321)
    image_id = cli.create_image(cached.url, "token-p1", src, "three-mib")
    record = image_json(real_glance.url, "token-p1", image_id)
    assert (record["status"], record["size"], record["owner"]) == ("active", len(data), "p1")
    assert record["checksum"] == hashlib.md5(data).hexdigest()

    first, second = tmp_path / "first", tmp_path / "second"
    cli.ok(cached.url, "token-p1", "image-download", "--file", str(first), image_id)
    assert first.read_bytes() == data
    full_gets = [r for r in real_glance.file_gets(image_id) if r.status == 200]
    assert [r.body_bytes for r in full_gets] == [len(data)]

    entry = cached.cache_dir / image_id
    assert wait_for(entry.exists), sorted(p.name for p in cached.cache_dir.iterdir())
    assert entry.read_bytes() == data

    before = len(real_glance.file_gets(image_id))
    cli.ok(cached.url, "token-p1", "image-download", "--file", str(second), image_id)
    assert second.read_bytes() == data
    status, headers, body = http("GET", f"{cached.url}/v2/images/{image_id}/file", "token-p1")
    assert status == 200 and body == data
    assert headers.get("cache-status", "").startswith("cached; hit"), headers
    # Another caller: a hit, authorised by a 1-byte probe with that caller's token.
    # (cached asks the upstream before every download unless auth_cache_ttl is set.)
    status, headers, body = http("GET", f"{cached.url}/v2/images/{image_id}/file", "admin-token")
    assert status == 200 and body == data
    assert headers.get("cache-status", "").startswith("cached; hit"), headers
    since = real_glance.file_gets(image_id)[before:]
    assert since, "a hit for a new caller must ask Glance whether it may download"
    # ... and the image data never came from Glance again.
    assert all(r.status == 206 and r.body_bytes <= 1 for r in since), since


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("token-p2", 404),  # another project: the image does not exist for it
        ("token-reader-p1", 403),  # same project, but no download_image permission
        (None, 401),
        ("no-such-token", 401),
    ],
)
def test_cached_image_keeps_glance_access_rules(
    real_glance: GlanceServer,
    cached: CachedDaemon,
    cli: GlanceCLI,
    tmp_path: Path,
    token: str | None,
    expected: int,
) -> None:
    image_id, data = upload_and_fill(cli, cached, tmp_path, f"private-{expected}")
    path = f"/v2/images/{image_id}/file"
    for headers in ({}, {"Range": "bytes=0-1023"}):
        direct = http("GET", real_glance.url + path, token, headers)
        proxied = http("GET", cached.url + path, token, headers)
        assert (direct[0], proxied[0]) == (expected, expected), (headers, proxied[1])
        assert data[:64] not in proxied[2] and len(proxied[2]) < 2048
        assert "hit" not in proxied[1].get("cache-status", "")
    if token is not None:
        # The real client through cached fails the same way and writes no image bytes.
        out = tmp_path / "denied"
        res = cli.run(cached.url, token, "image-download", "--file", str(out), image_id)
        assert res.returncode != 0 and f"HTTP {expected}" in res.stderr, res
        assert not out.exists() or out.stat().st_size == 0
    # Still cached for its owner.
    assert (cached.cache_dir / image_id).exists()
    assert http("GET", cached.url + path, "token-p1")[2] == data


def test_a_refused_download_comes_in_the_shape_glance_gives_that_client(
    real_glance: GlanceServer, cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    """Issue 19 item 12: a refusal through cached is the one Glance gives the same client
    directly: status, Content-Type and body byte for byte, for each Accept (webob's plain
    text without one, JSON, its HTML page for */*). Before, the probe's */* made every
    refusal relayed HTML. An id that is not one is Glance's 404 too (cached answers it)."""
    image_id, _ = upload_and_fill(cli, cached, tmp_path, "refusals")
    cases = [(image_id, token) for token in ("token-p2", "token-reader-p1", "no-such-token")]
    cases.append(("not-a-uuid", "token-p1"))
    for target, token in cases:
        path = f"/v2/images/{target}/file"
        for accept in (None, "application/json", "text/plain", "*/*"):
            headers = {"Accept": accept} if accept else {}
            direct = http("GET", real_glance.url + path, token, headers)
            proxied = http("GET", cached.url + path, token, headers)
            what = (target, token, accept)
            assert direct[0] in (401, 403, 404), what
            assert proxied[0] == direct[0], what
            assert proxied[1].get("content-type") == direct[1].get("content-type"), what
            if accept == "application/json":
                assert direct[1]["content-type"] == "application/json", what
                assert json.loads(proxied[2]) == json.loads(direct[2]), what
            assert proxied[2] == direct[2], what


def test_other_project_cannot_list_or_delete(
    cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    image_id, _ = upload_and_fill(cli, cached, tmp_path, "p1-only")
    status, _, body = http("GET", f"{cached.url}/v2/images", "token-p2")
    assert status == 200 and image_id not in body.decode()
    assert image_id not in cli.ok(cached.url, "token-p2", "image-list")
    res = cli.run(cached.url, "token-p2", "image-delete", image_id)
    assert res.returncode != 0 and f"No image with an ID of '{image_id}'" in res.stderr, res
    assert http("DELETE", f"{cached.url}/v2/images/{image_id}", "token-p2")[0] == 404
    assert http("DELETE", f"{cached.url}/v2/images/{image_id}", "token-reader-p1")[0] == 403
    # A refused DELETE must not drop the owner's cached copy.
    assert (cached.cache_dir / image_id).exists()


def test_image_delete_through_cached_drops_cached_copy(
    real_glance: GlanceServer, cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    image_id, _ = upload_and_fill(cli, cached, tmp_path, "doomed")
    entry = cached.cache_dir / image_id
    cli.ok(cached.url, "token-p1", "image-delete", image_id)
    assert wait_for(lambda: not entry.exists()), f"{entry} survived the image's deletion"
    assert http("GET", f"{real_glance.url}/v2/images/{image_id}", "token-p1")[0] == 404
    status, _, _ = http("GET", f"{cached.url}/v2/images/{image_id}/file", "token-p1")
    assert status == 404
    assert not entry.exists()


def test_image_list_and_links_point_at_the_proxy(
    cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    random_file(tmp_path / "listed.img", 10_000)
    image_id = cli.create_image(cached.url, "token-p1", tmp_path / "listed.img", "listed")
    listing = cli.ok(cached.url, "token-p1", "image-list")
    assert any(image_id in line and "listed" in line for line in listing.splitlines()), listing

    body = json.dumps({"name": "located", "disk_format": "raw", "container_format": "bare"})
    status, headers, raw = http(
        "POST",
        f"{cached.url}/v2/images",
        "token-p1",
        {"Content-Type": "application/json"},
        body.encode(),
    )
    assert status == 201, raw
    created = json.loads(raw)
    assert headers["location"] == f"{cached.url}/v2/images/{created['id']}"
    assert http("GET", headers["location"], "token-p1")[0] == 200

    status, _, raw = http("GET", f"{cached.url}/versions", "token-p1")
    hrefs = [link["href"] for v in json.loads(raw)["versions"] for link in v["links"]]
    assert hrefs and all(h.startswith(cached.url + "/") for h in hrefs), hrefs


def test_large_image_matches_glance_sha512(
    real_glance: GlanceServer, cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    src = tmp_path / "big.img"
    random_file(src, 64 * MiB + 4097)  # not a multiple of any chunk size
    image_id = cli.create_image(cached.url, "token-p1", src, "big")
    record = image_json(real_glance.url, "token-p1", image_id)
    assert record["os_hash_algo"] == "sha512"
    assert record["os_hash_value"] == sha512_of(src)

    for attempt in ("miss", "hit"):
        out = tmp_path / f"big.{attempt}"
        cli.ok(cached.url, "token-p1", "image-download", "--file", str(out), image_id, timeout=120)
        assert out.stat().st_size == record["size"], attempt
        assert sha512_of(out) == record["os_hash_value"], attempt
        out.unlink()
    entry = cached.cache_dir / image_id
    assert entry.exists() and sha512_of(entry) == record["os_hash_value"]


def test_upstream_miss_without_content_length(
    glance_with_cache: GlanceServer,
    cached_over_glance_cache: CachedDaemon,
    cli: GlanceCLI,
    tmp_path: Path,
) -> None:
    """Glance's own cache middleware answers a miss close-delimited (LAB.md P8)."""
    upstream, cached = glance_with_cache, cached_over_glance_cache
    src = tmp_path / "eight.img"
    data = random_file(src, 8 * MiB + 17)
    image_id = cli.create_image(cached.url, "token-p1", src, "eight")
    sha512 = image_json(upstream.url, "token-p1", image_id)["os_hash_value"]
    assert sha512 == hashlib.sha512(data).hexdigest()

    for attempt in ("miss", "hit"):
        out = tmp_path / f"eight.{attempt}"
        cli.ok(cached.url, "token-p1", "image-download", "--file", str(out), image_id)
        assert out.read_bytes() == data, attempt
        if attempt == "miss":
            assert wait_for((cached.cache_dir / image_id).exists)
    full = [r for r in upstream.file_gets(image_id) if r.status == 200]
    assert [r.body_bytes for r in full] == [len(data)]
    assert http("GET", f"{cached.url}/v2/images/{image_id}/file", "token-p2")[0] == 404


def test_glances_own_cache_directory_is_adopted_without_a_refetch(
    glance_with_cache: GlanceServer, cli: GlanceCLI, tmp_path: Path, failure_logs: FailureLogs
) -> None:
    """Issue 19 item 4, against the real thing: a real Glance 33 (``keystone+cachemanagement``,
    its default ``centralized_db`` cache driver) caches two images as it serves them; cached
    is started on a copy of that cache directory (the operator's migration: Glance's
    ``flavor`` switched away from caching, cached given the directory). A verified image is
    a hit with no image data fetched again (Glance's request log: only the authorisation
    probe); a file that no longer matches its digest is never served (fetched again); a
    file cached cannot identify stays where it is, with a warning."""
    upstream = glance_with_cache
    glance_dir = upstream.dir / "cache"
    images: dict[str, str] = {}
    content: dict[str, bytes] = {}
    for name in ("adopted", "spoiled"):
        data = random_file(tmp_path / f"{name}.img", 1 * MiB + 77)
        image_id = cli.create_image(upstream.url, "token-p1", tmp_path / f"{name}.img", name)
        # Glance's cache middleware keeps the image as it serves it
        assert http("GET", f"{upstream.url}/v2/images/{image_id}/file", "token-p1")[2] == data
        assert wait_for((glance_dir / image_id).exists, 30), f"Glance did not cache {name}"
        images[name], content[name] = image_id, data
    copy = tmp_path / "cache"
    shutil.copytree(glance_dir, copy)
    (copy / "notes.txt").write_text("an operator's note\n")
    spoiled = copy / images["spoiled"]
    spoiled.write_bytes(b"\0" * spoiled.stat().st_size)
    before = len(upstream.requests())

    workdir = tmp_path / "cached"
    daemon = CachedDaemon(workdir, upstream.url, copy)
    failure_logs.add({"cached (adopting glance's cache)": daemon.log})
    daemon.start()
    try:
        path = f"/v2/images/{images['adopted']}/file"
        for attempt in ("first", "again"):
            status, headers, body = http("GET", daemon.url + path, "token-p1")
            assert (status, body) == (200, content["adopted"]), attempt
            assert headers["cache-status"].startswith("cached; hit"), (attempt, headers)
        status, headers, body = http(
            "GET", f"{daemon.url}/v2/images/{images['spoiled']}/file", "token-p1"
        )
        assert (status, body) == (200, content["spoiled"])  # never the zeros
        assert "hit" not in headers["cache-status"]
        since = upstream.requests()[before:]
        adopted = [r for r in since if r.uri == path]
        assert adopted and all(r.range == "bytes=0-0" for r in adopted), adopted  # probes only
        refetched = [r for r in since if r.uri.endswith(f"{images['spoiled']}/file")]
        assert any(r.range != "bytes=0-0" for r in refetched), refetched
        assert (copy / "notes.txt").read_text() == "an operator's note\n"
        assert "cached does not know" in daemon.log.read_text() and "notes.txt" in (
            daemon.log.read_text()
        )
    finally:
        daemon.stop()


# ---- Glance behaviours a cache must not change ----------------------------------------------


def test_range_requests_match_glance(
    real_glance: GlanceServer, cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    image_id, data = upload_and_fill(cli, cached, tmp_path, "ranged", size=300_007)
    path = f"/v2/images/{image_id}/file"
    size = len(data)
    direct = http("GET", real_glance.url + path, "token-p1")
    proxied = http("GET", cached.url + path, "token-p1")
    assert proxied[0] == direct[0] == 200 and proxied[2] == direct[2] == data
    for name in ("content-type", "content-md5", "content-length"):
        assert proxied[1].get(name) == direct[1].get(name), name
    for spec in ("bytes=0-0", "bytes=100-199", "bytes=-100", f"bytes={size - 10}-", "bytes=0-"):
        direct = http("GET", real_glance.url + path, "token-p1", {"Range": spec})
        proxied = http("GET", cached.url + path, "token-p1", {"Range": spec})
        assert proxied[0] == direct[0] == 206, spec
        assert proxied[2] == direct[2], spec
        assert proxied[1]["content-range"] == direct[1]["content-range"], spec
        assert proxied[1].get("content-md5") == direct[1].get("content-md5"), spec
    # Glance's 416 page, the same for each Accept (issue 19 item 12: cached's own errors)
    for spec in (f"bytes={size}-", "bytes=abc", "bytes=5-2"):
        for accept in (None, "application/json", "*/*"):
            headers = {"Range": spec} | ({"Accept": accept} if accept else {})
            direct = http("GET", real_glance.url + path, "token-p1", headers)
            proxied = http("GET", cached.url + path, "token-p1", headers)
            assert proxied[0] == direct[0] == 416, (spec, accept, direct[0], proxied[0])
            assert proxied[1]["content-type"] == direct[1]["content-type"], (spec, accept)
            assert proxied[2] == direct[2], (spec, accept)
            assert proxied[1]["content-range"] == f"bytes */{size}"  # RFC 9110 §15.5.17


def test_concurrent_first_downloads_fetch_once(
    real_glance: GlanceServer, cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    src = tmp_path / "popular.img"
    data = random_file(src, 16 * MiB + 5)
    image_id = cli.create_image(cached.url, "token-p1", src, "popular")
    procs = [
        cli.popen(
            cached.url, token, "image-download", "--file", str(tmp_path / f"copy{i}"), image_id
        )
        for i, token in enumerate(["token-p1", "token-p1", "admin-token"])
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    for i in range(len(procs)):
        assert (tmp_path / f"copy{i}").read_bytes() == data
    full = [r for r in real_glance.file_gets(image_id) if r.body_bytes > 1]
    assert len(full) == 1, full


def test_image_without_data_answers_like_glance(
    real_glance: GlanceServer, cached: CachedDaemon
) -> None:
    """A record without data ("queued"): Glance answers a GET of its data with 204.

    Beware: Glance 33 crashes on a *Range* GET of such an image (TypeError
    'ImageProxy' object is not callable; uWSGI closes the connection without a reply).
    """
    body = json.dumps({"name": "empty", "disk_format": "raw", "container_format": "bare"})
    hdrs = {"Content-Type": "application/json"}
    status, _, raw = http("POST", f"{cached.url}/v2/images", "token-p1", hdrs, body.encode())
    assert status == 201
    image_id = json.loads(raw)["id"]
    path = f"/v2/images/{image_id}/file"
    direct = http("GET", real_glance.url + path, "token-p1")
    proxied = http("GET", cached.url + path, "token-p1")
    assert direct[:3:2] == (204, b"")
    assert proxied[:3:2] == direct[:3:2], proxied
    assert not (cached.cache_dir / image_id).exists()


def test_lost_backend_file_is_not_cached(
    real_glance: GlanceServer, cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    """An active image whose file vanished from Glance's store (a lost NFS mount, say)."""
    random_file(tmp_path / "lost.img", 50_000)
    image_id = cli.create_image(cached.url, "token-p1", tmp_path / "lost.img", "lost")
    (real_glance.images / image_id).unlink()
    path = f"/v2/images/{image_id}/file"
    direct = http("GET", real_glance.url + path, "token-p1")
    proxied = http("GET", cached.url + path, "token-p1")
    assert direct[:3:2] == (204, b"")  # glance_store: a missing file reads as no data
    assert proxied[:3:2] == direct[:3:2], proxied
    out = tmp_path / "lost.out"
    res = cli.run(cached.url, "token-p1", "image-download", "--file", str(out), image_id)
    assert not out.exists() or out.stat().st_size == 0, res
    assert not (cached.cache_dir / image_id).exists()


def test_deactivation_through_cached_takes_effect_at_once(
    real_glance: GlanceServer, cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    image_id, data = upload_and_fill(cli, cached, tmp_path, "deactivated")
    path = f"/v2/images/{image_id}/file"
    assert http("GET", cached.url + path, "token-p1")[0] == 200  # a remembered answer
    cli.ok(cached.url, "admin-token", "image-deactivate", image_id)
    direct = http("GET", real_glance.url + path, "token-p1")
    proxied = http("GET", cached.url + path, "token-p1")
    assert proxied[0] == direct[0] == 403 and data[:64] not in proxied[2]
    # Glance lets admins download a deactivated image; so does cached, from its copy.
    status, headers, body = http("GET", cached.url + path, "admin-token")
    assert (status, body) == (200, data) and "hit" in headers.get("cache-status", "")
    cli.ok(cached.url, "admin-token", "image-reactivate", image_id)
    assert http("GET", cached.url + path, "token-p1")[:3:2] == (200, data)


def test_deactivation_elsewhere_is_enforced_on_the_next_hit(
    real_glance: GlanceServer, cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    """An admin deactivates the image on Glance directly (or through another node)."""
    image_id, data = upload_and_fill(cli, cached, tmp_path, "deactivated-elsewhere")
    path = f"/v2/images/{image_id}/file"
    assert http("GET", cached.url + path, "token-p1")[:3:2] == (200, data)
    action = f"{real_glance.url}/v2/images/{image_id}/actions/deactivate"
    assert http("POST", action, "admin-token")[0] == 204
    direct = http("GET", real_glance.url + path, "token-p1")
    proxied = http("GET", cached.url + path, "token-p1")
    assert direct[0] == 403
    assert proxied[0] == 403 and data[:64] not in proxied[2]


def test_upload_with_content_length_and_head(
    real_glance: GlanceServer, cached: CachedDaemon, tmp_path: Path
) -> None:
    body = json.dumps({"name": "sized", "disk_format": "raw", "container_format": "bare"})
    hdrs = {"Content-Type": "application/json"}
    status, _, raw = http("POST", f"{cached.url}/v2/images", "token-p1", hdrs, body.encode())
    assert status == 201
    image_id = json.loads(raw)["id"]
    data = os.urandom(1 * MiB + 1)
    path = f"/v2/images/{image_id}/file"
    put = http(
        "PUT", cached.url + path, "token-p1", {"Content-Type": "application/octet-stream"}, data
    )
    assert put[0] == 204, put
    assert image_json(real_glance.url, "token-p1", image_id)["size"] == len(data)
    assert http("GET", cached.url + path, "token-p1")[2] == data
    # Glance has no HEAD for image data (405, Allow: GET, PUT).
    direct = http("HEAD", real_glance.url + path, "token-p1")
    proxied = http("HEAD", cached.url + path, "token-p1")
    assert proxied[0] == direct[0] == 405, (direct[0], proxied[0])


def test_cache_api_follows_glances_admin_policy(
    real_glance: GlanceServer, cached: CachedDaemon
) -> None:
    """No management auth configured in cached: on the management listener Glance's own
    policy judges a token; the public listener refuses management even from loopback."""
    assert http("GET", real_glance.url + "/v2/cache", "token-p1")[0] == 403
    assert http("GET", cached.admin_url + "/v2/cache", "token-p1")[0] == 403
    assert http("GET", cached.admin_url + "/v2/cache", "no-such-token")[0] == 401
    status, _, body = http("GET", cached.admin_url + "/v2/cache", "admin-token")
    assert status == 200 and b"cached_images" in body
    assert http("GET", cached.url + "/v2/cache", "admin-token")[0] == 403  # loopback: no


def test_glance_cache_commands_through_cached(
    real_glance: GlanceServer, cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    """The real `glance cache-*` against cached in front of the real Glance: the version
    document is rewritten to advertise the cache API, the image is looked up with the
    caller's Keystone token, and cache-queue fetches it at once."""
    data = random_file(tmp_path / "queued.img", 3 * MiB + 7)
    image_id = cli.create_image(cached.url, "token-p1", tmp_path / "queued.img", "queued")
    cli.ok(cached.admin_url, "admin-token", "cache-queue", image_id)
    entry = cached.cache_dir / image_id
    assert wait_for(entry.exists), "cache-queue did not fetch the image"
    listing = cli.ok(cached.admin_url, "admin-token", "cache-list")
    assert image_id in listing and "cached" in listing
    refused = cli.run(cached.admin_url, "token-p1", "cache-list")
    assert refused.returncode != 0  # a member is no admin, for Glance's policy either
    path = f"/v2/images/{image_id}/file"
    status, headers, body = http("GET", cached.url + path, "token-p1")
    assert status == 200 and body == data and headers.get("cache-status") == "cached; hit"
    cli.ok(cached.admin_url, "admin-token", "cache-delete", image_id)
    assert not entry.exists()


def test_upload_with_expect_100_continue(real_glance: GlanceServer, cached: CachedDaemon) -> None:
    """curl's uploads over 1 MiB carry ``Expect: 100-continue``; Glance under uWSGI never
    sends the interim 100, so cached must not forward the expectation (issue 9, item 1)."""
    import rawhttp

    def send(head: list[str], body: bytes) -> rawhttp.Reply:
        with rawhttp.connect(cached.url, timeout=30) as sock:
            lines = [*head, "X-Auth-Token: token-p1", "Expect: 100-continue"]
            lines.append(f"Content-Length: {len(body)}")
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            interim = b""
            while not interim.endswith(b"\r\n\r\n"):
                got = sock.recv(1)
                assert got, "closed before the interim response"
                interim += got
            assert interim.startswith(b"HTTP/1.1 100")
            sock.sendall(body)
            return rawhttp.read_reply(sock)

    meta = json.dumps({"name": "expect", "disk_format": "raw", "container_format": "bare"})
    head = ["POST /v2/images HTTP/1.1", "Host: cached", "Content-Type: application/json"]
    created = send(head, meta.encode())
    assert created.status == 201, created  # was a 500 after 60 s through cached
    image_id = json.loads(created.body)["id"]
    data = os.urandom(2 * MiB)
    head = [
        f"PUT /v2/images/{image_id}/file HTTP/1.1",
        "Host: cached",
        "Content-Type: application/octet-stream",
    ]
    put = send(head, data)
    assert put.status == 204, put
    assert image_json(real_glance.url, "token-p1", image_id)["size"] == len(data)


def test_upper_case_image_id_answers_like_glance(
    real_glance: GlanceServer, cached: CachedDaemon, cli: GlanceCLI, tmp_path: Path
) -> None:
    """Glance 33 on SQLite does not know an image by its upper-case id (404); cached keys its
    entries in lower case but lets the upstream decide about the spelling (issue 9)."""
    image_id, data = upload_and_fill(cli, cached, tmp_path, "upper-case", size=4096)
    path = f"/v2/images/{image_id.upper()}/file"
    direct = http("GET", real_glance.url + path, "token-p1")
    proxied = http("GET", cached.url + path, "token-p1")
    assert proxied[0] == direct[0] == 404, (direct[:2], proxied[:2])
    assert http("GET", f"{cached.url}/v2/images/{image_id}/file", "token-p1")[2] == data


# ---- the metadef lock-down as a policy at the proxy ----------------------------------------


@pytest.fixture(scope="module")
def cached_locked_down(
    real_glance: GlanceServer,
    keystone: FakeKeystone,
    tmp_path_factory: pytest.TempPathFactory,
    failure_logs: FailureLogs,
) -> Iterator[CachedDaemon]:
    """cached with conf/policy-metadef-lockdown.yaml; Keystone decides who is admin."""
    workdir = tmp_path_factory.mktemp("cached-lockdown")
    conf = workdir / "cached.yaml"
    conf.write_text(
        json.dumps(
            {
                "policy": str(Path(__file__).resolve().parent.parent / "conf"
                              / "policy-metadef-lockdown.yaml"),
                "keystone_url": keystone.url + "/v3",
                "service_token": "admin-token",
            }
        )
    )  # fmt: skip
    daemon = CachedDaemon(workdir, real_glance.url, workdir / "cache", ["-c", str(conf)])
    failure_logs.add({"cached (metadef lock-down)": daemon.log})
    daemon.start()
    yield daemon
    daemon.stop()


def test_metadef_lockdown_at_the_proxy(
    real_glance: GlanceServer, cached_locked_down: CachedDaemon
) -> None:
    """A member's POST /v2/metadefs/namespaces is refused by cached and never reaches
    Glance; an admin's is created by Glance; reads pass for everyone."""
    cached = cached_locked_down
    name = f"cached-lockdown-{os.getpid()}"
    body = json.dumps({"namespace": name, "visibility": "public"}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    for path in ("/v2/metadefs/namespaces", "/v2.1//metadefs/./namespaces"):
        status, _, answer = http("POST", cached.url + path, "token-p1", headers, body)
        assert status == 403, answer
        assert json.loads(answer)["message"].startswith(
            "You are not authorized to complete add_metadef_namespace action."
        )
    assert "refused by rule add_metadef_namespace" in cached.output()
    # Glance 33's own default refuses a member too: the same answer, word for word.
    direct = http("POST", real_glance.url + "/v2/metadefs/namespaces", "token-p1", headers, body)
    assert (direct[0], json.loads(direct[2])) == (403, json.loads(answer))
    plain = {"Content-Type": "application/json"}
    ours = http("POST", cached.url + "/v2/metadefs/namespaces", "token-p1", plain, body)
    theirs = http("POST", real_glance.url + "/v2/metadefs/namespaces", "token-p1", plain, body)
    assert (ours[0], ours[1]["content-type"], ours[2]) == (
        theirs[0],
        theirs[1]["content-type"],
        theirs[2],
    )
    # A trailing '/' matches no route of Glance's: its 404, as from Glance directly.
    trailing = http("POST", cached.url + "/v2.1/metadefs/namespaces/", "token-p1", headers, body)
    assert trailing[0] == 404
    missing = http("GET", f"{real_glance.url}/v2/metadefs/namespaces/{name}", "admin-token")
    assert missing[0] == 404  # nothing reached Glance
    status, _, answer = http(
        "POST", cached.url + "/v2/metadefs/namespaces", "admin-token", headers, body
    )
    assert status == 201, answer
    assert json.loads(answer)["namespace"] == name
    try:
        status, _, answer = http("GET", f"{cached.url}/v2/metadefs/namespaces/{name}", "token-p1")
        assert status == 200 and json.loads(answer)["namespace"] == name  # reads pass
        gone = http("DELETE", f"{cached.url}/v2/metadefs/namespaces/{name}", "token-p1")
        assert gone[0] == 403  # a member may not delete it either
    finally:
        status, _, _ = http("DELETE", f"{cached.url}/v2/metadefs/namespaces/{name}", "admin-token")
        assert status == 204


# ---- routing as Glance routes it: a differential test (issue 13, item 1) --------------------
#
# Glance 33 picks the API version from the path or from a versioned media type in Accept
# (glance/api/middleware/version_negotiation.py). For generated (method, path spelling,
# Accept) cases, what cached decides - a policy rule applies, a download is served from the
# cache, a change forgets the image - must match what Glance did with the same request.

VND = "application/vnd.openstack.images-"
SPELLINGS = (
    "/v2/{t}",
    "/{t}",
    "/v2.1/{t}",
    "/v2.0/{t}",
    "/v2.14/{t}",  # allowed only with a cache directory (this Glance has one)
    "/v2.8/{t}",  # allowed only with multi-store (this Glance has none): 300
    "/v2.19/{t}",
    "/V2/{t}",
    "/v2/{t}/",
    "//v2//{t}",
    "/v2/./x/../{t}",
    "/versions/{t}",
)
ACCEPTS = (
    None,
    "*/*",
    "application/json",
    VND + "v2",
    VND + "v2.1",
    VND + "v2.8",
    VND + "v2.19",
    VND + "v2;q=1",  # webob reads it as v2: cached cannot read it exactly, refuses (400)
    VND + "v2, */*",  # webob: "v2, */*", no such version (300): refused (400) too
)
UNREAD = {VND + "v2;q=1", VND + "v2, */*"}


def raw_http(
    base: str, method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One request with ``target`` sent exactly as spelled (no normalisation)."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=60)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _headers(token: str, accept: str | None, **extra: str) -> dict[str, str]:
    out = {"X-Auth-Token": token, **extra}
    if accept is not None:
        out["Accept"] = accept
    return out


def new_image(glance_url: str, token: str, data: bytes) -> str:
    body = json.dumps({"name": "routing", "disk_format": "raw", "container_format": "bare"})
    status, _, answer = http(
        "POST", glance_url + "/v2/images", token, {"Content-Type": "application/json"},
        body.encode(),
    )  # fmt: skip
    assert status == 201, answer
    image_id = str(json.loads(answer)["id"])
    put = http(
        "PUT", f"{glance_url}/v2/images/{image_id}/file", token,
        {"Content-Type": "application/octet-stream"}, data,
    )  # fmt: skip
    assert put[0] == 204, put
    return image_id


@pytest.fixture(scope="module")
def cached_routing(
    real_glance: GlanceServer,
    keystone: FakeKeystone,
    tmp_path_factory: pytest.TempPathFactory,
    failure_logs: FailureLogs,
) -> Iterator[CachedDaemon]:
    """cached with the metadef lock-down and remembered authorisations (300 s): a change
    cached does not see would leave hits served from a remembered answer."""
    workdir = tmp_path_factory.mktemp("cached-routing")
    conf = workdir / "cached.yaml"
    conf.write_text(
        json.dumps(
            {
                "policy": str(Path(__file__).resolve().parent.parent / "conf"
                              / "policy-metadef-lockdown.yaml"),
                "keystone_url": keystone.url + "/v3",
                "service_token": "admin-token",
                "auth_cache_ttl": 300,
            }
        )
    )  # fmt: skip
    daemon = CachedDaemon(workdir, real_glance.url, workdir / "cache", ["-c", str(conf)])
    failure_logs.add({"cached (routing)": daemon.log})
    daemon.start()
    yield daemon
    daemon.stop()


def test_policy_routes_match_glance(
    real_glance: GlanceServer, cached_routing: CachedDaemon
) -> None:
    """POST a metadef namespace in every spelling: cached applies add_metadef_namespace
    exactly where Glance's router reaches it (an admin's POST to Glance directly creates it)."""
    cached = cached_routing
    mismatches = []
    decided = {"rule": 0, "pass": 0, "unread": 0}
    for n, (spelling, accept) in enumerate((s, a) for s in SPELLINGS for a in ACCEPTS):
        target = spelling.format(t="metadefs/namespaces")
        name = f"routing-{os.getpid()}-{n}"
        body = json.dumps({"namespace": name}).encode()
        extra = {"Content-Type": "application/json"}
        status, _, _ = raw_http(
            real_glance.url, "POST", target, _headers("admin-token", accept, **extra), body
        )
        routed = status == 201
        if routed:
            gone = http("DELETE", f"{real_glance.url}/v2/metadefs/namespaces/{name}", "admin-token")
            assert gone[0] == 204
        before = cached.output().count("refused by rule add_metadef_namespace")
        status, _, answer = raw_http(
            cached.url, "POST", target, _headers("token-p1", accept, **extra), body
        )
        if status == 400 and b"does not route" in answer:
            decision = "unread"
        elif cached.output().count("refused by rule add_metadef_namespace") > before:
            decision = "rule"
        else:
            decision = "pass"
        decided[decision] += 1
        # cached never passes what Glance routes, never applies the rule where Glance does
        # not route, and refuses unread only the media types it cannot read exactly.
        want = "rule" if routed else "pass"
        ok = decision == want or (decision == "unread" and accept in UNREAD)
        if not ok:
            mismatches.append(
                (target, accept, "glance routed" if routed else "glance did not", decision)
            )
    assert mismatches == []
    assert decided["rule"] >= 20 and decided["pass"] >= 20  # both sides were exercised


def test_downloads_from_the_cache_match_glance(
    real_glance: GlanceServer, cached_routing: CachedDaemon
) -> None:
    """GET an image's data in every spelling: cached answers as Glance does, and serves its
    copy only where Glance serves the data."""
    cached = cached_routing
    data = os.urandom(300_000)
    image_id = new_image(real_glance.url, "token-p1", data)
    fill = http("GET", f"{cached.url}/v2/images/{image_id}/file", "token-p1")
    assert fill[0] == 200 and fill[2] == data
    assert wait_for(lambda: (cached.cache_dir / image_id).exists())
    mismatches = []
    hits = 0
    for spelling in SPELLINGS:
        for accept in ACCEPTS:
            target = spelling.format(t=f"images/{image_id}/file")
            theirs = raw_http(real_glance.url, "GET", target, _headers("token-p1", accept))
            ours = raw_http(cached.url, "GET", target, _headers("token-p1", accept))
            hit = "hit" in ours[1].get("cache-status", "")
            hits += hit
            if accept in UNREAD:
                ok = not hit and ours[0] in (400, theirs[0])  # (/versions/...: the document)
            else:
                # (/versions/... is the version document, whose links name the host asked.)
                ok = ours[0] == theirs[0] and (theirs[2] != data or ours[2] == data)
                ok = ok and (theirs[0] == 200 or not hit)
            if not ok:
                mismatches.append((target, accept, theirs[0], ours[0], hit))
    assert mismatches == []
    assert hits >= 10  # the spellings Glance serves were served from the copy


def test_changes_seen_in_every_spelling_match_glance(
    real_glance: GlanceServer, cached_routing: CachedDaemon
) -> None:
    """Delete, deactivate or unshare an image in a sample of spellings: afterwards cached
    (which remembers authorisations for 300 s) refuses the copy exactly when Glance refuses
    the data."""
    import random

    cached = cached_routing
    cases = [(s, a) for s in SPELLINGS for a in ACCEPTS if a not in UNREAD]
    sample = random.Random(13).sample(cases, 12)
    sample += [("/{t}", VND + "v2"), ("/{t}", VND + "v2.1"), ("/v2.8/{t}", None)]
    changes = (
        ("DELETE", "", "token-p1"),
        ("POST", "/actions/deactivate", "admin-token"),
        ("DELETE", "/members/p2", "token-p1"),
    )
    mismatches = []
    for spelling, accept in sample:
        for method, rest, token in changes:
            data = os.urandom(50_000)
            image_id = new_image(real_glance.url, "token-p1", data)
            reader = "token-p1"
            if rest.startswith("/members"):
                reader = "token-p2"
                shared = http(
                    "PATCH", f"{real_glance.url}/v2/images/{image_id}", "token-p1",
                    {"Content-Type": "application/openstack-images-v2.1-json-patch"},
                    b'[{"op": "replace", "path": "/visibility", "value": "shared"}]',
                )  # fmt: skip
                assert shared[0] == 200, shared
                member = http(
                    "POST", f"{real_glance.url}/v2/images/{image_id}/members", "token-p1",
                    {"Content-Type": "application/json"}, b'{"member": "p2"}',
                )  # fmt: skip
                assert member[0] == 200, member
            path = f"/v2/images/{image_id}/file"
            assert http("GET", cached.url + path, reader)[:3:2] == (200, data)
            assert wait_for(lambda: (cached.cache_dir / image_id).exists())  # noqa: B023
            assert http("GET", cached.url + path, reader)[0] == 200  # now remembered
            target = spelling.format(t=f"images/{image_id}{rest}")
            status, _, _ = raw_http(cached.url, method, target, _headers(token, accept))
            theirs = http("GET", real_glance.url + path, reader)[0]
            ours = http("GET", cached.url + path, reader)[0]
            if ours != theirs:
                mismatches.append((method, target, accept, status, theirs, ours))
    assert mismatches == []
