"""Adopting Glance's image cache directory (issue 19 item 4): a directory laid out as Glance
33's cache drivers leave it (``<dir>/<id>`` complete files with the xattr driver's
``user.hits``, the sqlite driver's ``cache.db``, oslo lock files) is taken over without a
byte fetched again for the images that verify; a file that does not verify is never served
and is fetched again; files cached cannot identify stay where they are. Real files and
xattrs, a fake Glance on loopback, the daemon's app on real sockets."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from pathlib import Path

import pytest
import xattr
from conftest import data_gets, start_daemon, stop_daemon, tree, wait_until
from fakeglance import FakeGlance

from cached.app import MANAGER


def glance_cache(root: Path, files: dict[str, bytes], hits: dict[str, int]) -> None:
    """What Glance's xattr driver leaves: the image files, ``user.hits`` on each, the
    subdirectories, a queued marker; and what its sqlite driver leaves beside them."""
    for sub in ("incomplete", "invalid", "queue"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, data in files.items():
        path = root / image_id
        path.write_bytes(data)
        xattr.setxattr(str(path), "user.hits", str(hits.get(image_id, 0)).encode())
    db = sqlite3.connect(root / "cache.db")
    db.executescript(
        "CREATE TABLE cached_images (image_id TEXT PRIMARY KEY, last_accessed REAL DEFAULT "
        "0.0, last_modified REAL DEFAULT 0.0, size INTEGER DEFAULT 0, hits INTEGER DEFAULT 0,"
        " checksum TEXT);"
    )
    db.commit()
    db.close()
    (root / "image_cache_db_init").write_bytes(b"")  # an oslo lock file


async def test_glance_files_are_adopted_at_first_download_without_a_refetch(
    glance: FakeGlance, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = glance.add_image(os.urandom(300_000))
    other = glance.add_image(os.urandom(5_000))
    corrupt = glance.add_image(os.urandom(200_000))
    partial = glance.add_image(os.urandom(10_000))
    assert good.data is not None and corrupt.data is not None and other.data is not None
    cache = tmp_path / "cache"
    glance_cache(
        cache,
        {good.id: good.data, other.id: other.data, corrupt.id: b"\0" * len(corrupt.data)},
        {good.id: 7},
    )
    (cache / "incomplete" / partial.id).write_bytes(b"x" * 100)  # Glance's half download
    before = tree(cache)
    caplog.set_level(logging.INFO)
    d = await start_daemon(cache, glance.url)
    try:
        # Nothing moved at start (it used to go to invalid/: "no user.cached.meta").
        assert tree(cache) == before
        unknown = [r.message for r in caplog.records if "cached does not know" in r.message]
        assert len(unknown) == 1 and "cache.db, image_cache_db_init" in unknown[0]
        assert d.store.get(good.id) is None  # not served before it is verified

        status, headers, body = await d.get(good.id)
        assert (status, body) == (200, good.data)
        assert headers["Cache-Status"].startswith("cached; hit")
        assert data_gets(glance, good.id) == []  # not a byte fetched again
        entry = d.store.get(good.id)
        assert entry is not None and entry.complete and not entry.suspect
        assert entry.hits >= 7  # Glance's count carried over

        status, headers, body = await d.get(corrupt.id)  # never the zeros: fetched again
        assert (status, body) == (200, corrupt.data)
        assert "hit" not in headers["Cache-Status"]
        assert data_gets(glance, corrupt.id) != []

        # A range of an adopted image is a hit too.
        status, headers, body = await d.get(other.id, Range="bytes=10-19")
        assert (status, body) == (206, other.data[10:20])
        assert data_gets(glance, other.id) == []

        # The clean job leaves what cached cannot identify (and Glance's partial file).
        await d.app[MANAGER].maintenance.clean()
        assert (cache / "cache.db").exists() and (cache / "image_cache_db_init").exists()
        assert (cache / "incomplete" / partial.id).exists()
    finally:
        await stop_daemon(d)


async def test_with_service_credentials_they_are_adopted_at_start(
    glance: FakeGlance, tmp_path: Path
) -> None:
    images = [glance.add_image(os.urandom(100_000 + i)) for i in range(3)]
    cache = tmp_path / "cache"
    glance_cache(cache, {i.id: i.data or b"" for i in images}, {})
    db = sqlite3.connect(cache / "cache.db")  # the sqlite driver's notes of one of them
    db.execute(
        "INSERT INTO cached_images VALUES (?, ?, ?, ?, ?, NULL)",
        (images[0].id, 1700000000.5, 1600000000.25, len(images[0].data or b""), 42),
    )
    db.commit()
    db.close()
    d = await start_daemon(cache, glance.url, service_token="token-admin")
    try:

        def all_verified() -> bool:
            entries = [d.store.get(i.id) for i in images]
            return all(e is not None and e.complete and not e.suspect for e in entries)

        await wait_until(all_verified, "every Glance file adopted and verified")
        first = d.store.get(images[0].id)
        assert first is not None
        assert (first.hits, first.last_accessed, first.last_modified) == (
            42, 1700000000.5, 1600000000.25
        )  # fmt: skip
        for image in images:
            status, headers, body = await d.get(image.id)
            assert (status, body) == (200, image.data)
            assert headers["Cache-Status"].startswith("cached; hit")
            assert data_gets(glance, image.id) == []
            digest = hashlib.sha512(image.data or b"").hexdigest()
            meta = xattr.getxattr(str(cache / image.id), "user.cached.meta")
            assert digest.encode() in meta
    finally:
        await stop_daemon(d)
    # A restart: the adopted entries are ordinary ones now (no second verification needed).
    d = await start_daemon(cache, glance.url)
    try:
        entry = d.store.get(images[1].id)
        assert entry is not None and entry.complete and not entry.suspect
    finally:
        await stop_daemon(d)


async def test_a_file_the_upstream_does_not_know_is_left_in_place(
    glance: FakeGlance, tmp_path: Path
) -> None:
    gone = "0e1f6b9a-5c3d-4e2f-8a7b-9c0d1e2f3a4b"  # deleted upstream since Glance cached it
    cache = tmp_path / "cache"
    glance_cache(cache, {gone: b"old image"}, {})
    d = await start_daemon(cache, glance.url, service_token="token-admin")
    try:
        adopter = d.proxy.adopter
        assert adopter is not None and adopter.task is not None
        await wait_until(adopter.task.done, "the adopter asked the upstream about it")
        assert [r.path for r in glance.requests if gone in r.path] == [f"/v2/images/{gone}"]
        assert (cache / gone).read_bytes() == b"old image"
        assert d.store.get(gone) is None
    finally:
        await stop_daemon(d)
