"""Glance's own image cache, found in the cache directory: recognised, adopted, never deleted.

Glance 33's cache drivers (``glance/image_cache/drivers/``) share one layout with ours:
``<dir>/<image id>`` a complete image (the whole file, no holes to speak of),
``incomplete/<id>`` a download in progress, ``invalid/<id>`` a failed one, ``queue/<id>`` an
empty marker of an image queued for caching. What differs is where each keeps its notes:

- ``xattr``: ``user.hits`` on each file (a decimal count); access time is the file's atime.
- ``sqlite`` (deprecated since 2024.1): the table ``cached_images`` (``image_id``,
  ``last_accessed``, ``last_modified``, ``size``, ``hits``, ``checksum``) in
  ``<dir>/cache.db`` (``image_cache_sqlite_db``), plus oslo lock files beside it.
- ``centralized_db`` (the default since 2024.2): the same columns in Glance's own database
  (tables ``cached_images``/``node_reference``), nothing on disk.

None of them records a digest, and nothing says the bytes are still right. So a Glance file
(``<dir>/<id>`` with no ``user.cached.*`` attribute) is **adopted** only against the
upstream's record of the image: same size, and a digest (``os_hash_value`` or ``checksum``)
to verify it with. Adoption writes our metadata onto the file (complete, every chunk
present, Glance's hit count and access times carried over) *without* a commit record
(:mod:`cached.store.written`), so the entry is *suspect* by rule 1 of
:mod:`cached.store.integrity`: its digest is checked over the whole file before it is first
served, and a mismatch moves it to ``invalid/`` (never served; the next download fetches it
again). Until adopted, such a file is not in the index and is left as it is.

Files the cache cannot identify (``cache.db``, lock files, anything not named by an image
id) are left where they are, with one warning at start; nothing here deletes a file.
Glance's ``incomplete/`` files (no bitmap: which bytes arrived is unknown) are left too; a
new download of that image replaces one. ``queue/`` markers mean the same to both.

Every function blocks: call from the store's executor. No shared state: the callers
(:func:`cached.store.store.scan`, :mod:`cached.cachedir.adoption`) own what they return.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

import xattr

from cached.ids import is_image_id
from cached.store import codec, integrity, xattrs
from cached.store.chunks import Bitmap, chunk_count, chunk_size_for
from cached.store.entry import Entry, State

log = logging.getLogger(__name__)

# What a cached cache directory holds besides entries (the probe files are transient).
_OURS = {"incomplete", "invalid", "queue", "verdicts"}  # verdicts: cached/safety/violations.py
_TRANSIENT_PREFIXES = (".xattr-probe-", ".cached-probe")
GLANCE_SQLITE_DB = "cache.db"  # Glance's image_cache_sqlite_db default


def is_foreign(path: Path) -> bool:
    """Whether ``path`` is a regular file without any ``user.cached.*`` attribute: not ours,
    e.g. left by Glance's cache."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return False
        names = xattr.listxattr(os.fspath(path))
    except OSError:
        return False  # the scan's own checks report it
    return not any(n.startswith(xattrs.PREFIX) for n in names)


def unknown_files(root: Path) -> list[str]:
    """Names in ``root`` that are neither image entries nor the cache's own directories."""
    names = []
    for name in sorted(os.listdir(root)):
        if is_image_id(name) or name in _OURS or name.startswith(_TRANSIENT_PREFIXES):
            continue
        names.append(name)
    return names


def warn_unknown(root: Path) -> list[str]:
    """One warning naming what the cache cannot identify in ``root`` (left in place)."""
    names = unknown_files(root)
    if names:
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        log.warning(
            "%s holds %d file(s) cached does not know (%s): left in place, never deleted",
            root,
            len(names),
            shown,
        )
    return names


@dataclass(frozen=True)
class Notes:
    """What Glance's driver knew of one image: its hit count and times (None: unknown)."""

    hits: int = 0
    last_accessed: float | None = None
    last_modified: float | None = None


def glance_notes(root: Path, image_id: str, st: os.stat_result) -> Notes:
    """The hit count and times Glance kept for ``image_id``: the sqlite driver's row if
    ``cache.db`` has one, else the xattr driver's ``user.hits`` and the file's times (the
    centralized_db driver keeps them in Glance's database, which cached does not read)."""
    db = root / GLANCE_SQLITE_DB
    if db.is_file():
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                row = conn.execute(
                    "SELECT hits, last_accessed, last_modified FROM cached_images "
                    "WHERE image_id = ?",
                    (image_id,),
                ).fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.debug("cannot read %s: %s", db, exc)
            row = None
        if row is not None:
            hits, accessed, modified = row
            return Notes(
                int(hits or 0),
                float(accessed) if accessed else None,
                float(modified) if modified else None,
            )
    try:
        raw = xattr.getxattr(os.fspath(root / image_id), xattrs.HITS)
        hits = int(raw.decode("ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        hits = 0
    return Notes(max(0, hits), st.st_atime, st.st_mtime)


def adopt(
    root: Path,
    image_id: str,
    size: int | None,
    checksum: str | None,
    os_hash_algo: str | None,
    os_hash_value: str | None,
) -> Entry:
    """Make Glance's file ``root/image_id`` a complete entry to be verified before it is
    served (a suspect), with the upstream's size and digest for it.

    Raises ValueError when it cannot be adopted (the upstream's size differs, or it gives
    no digest to verify with: the file is then left as it is), OSError from the disk.
    """
    path = root / image_id
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file")
        if size is None or st.st_size != size:
            raise ValueError(f"{path}: {st.st_size} bytes, the upstream's image has {size}")
        if not checksum and not os_hash_value:
            raise ValueError(f"{path}: the upstream gives no digest to verify it with")
        if any(n.startswith(xattrs.PREFIX) for n in xattr.listxattr(fd)):
            raise ValueError(f"{path}: already has cached metadata")
        notes = glance_notes(root, image_id, st)
        chunk = chunk_size_for(size)
        present = Bitmap(chunk_count(size, chunk))
        present.update(list(range(present.count)))
        meta = {
            "size": size,
            "chunk_size": chunk,
            "checksum": checksum,
            "os_hash_algo": os_hash_algo,
            "os_hash_value": os_hash_value,
        }
        accessed = notes.last_accessed or st.st_atime
        modified = notes.last_modified or st.st_mtime
        # The state last: a file with our metadata but no state does not parse (rule 4 of
        # cached/store/integrity.py) and would be quarantined, never served.
        xattrs.write_many(
            fd,
            {
                xattrs.META: codec.dumps(meta),
                xattrs.BITMAP: present.to_bytes(),
                xattrs.HITS: str(notes.hits).encode(),
                xattrs.LAST_ACCESSED: repr(float(accessed)).encode(),
                xattrs.LAST_MODIFIED: repr(float(modified)).encode(),
                xattrs.STATE: State.COMPLETE.value.encode(),
            },
        )
    finally:
        os.close(fd)
    entry = integrity.load(path, State.COMPLETE)  # no commit record: suspect (rule 1)
    assert entry.suspect
    return entry


__all__ = ["Notes", "adopt", "glance_notes", "is_foreign", "unknown_files", "warn_unknown"]
